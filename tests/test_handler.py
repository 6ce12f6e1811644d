"""The TorchServe handler in process, behind TorchServe's own worker plumbing.

The archive is the one scripts/build_mar.py builds. Each request is encoded in the
frontend-to-worker wire format, decoded by TorchServe's ``_retrieve_request`` (which
parses JSON and text bodies), run through ``Service.predict`` (what a worker does for a
batch), and the binary response is decoded with each request's own status.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import ts
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.protocol.otf_message_handler import _retrieve_request
from ts.service import Service

from evaluation.photos import encode_image as encode
from handler.dve_handler import DVEHandler


def _frame(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def encode_request(
    request_id: str, parameters: list[tuple[str, str, bytes]], headers: dict[str, str] | None = None
) -> bytes:
    """One request as the Java frontend writes it to the worker's socket."""
    message = _frame(request_id.encode())
    for name, value in (headers or {}).items():
        message += _frame(name.encode()) + _frame(value.encode())
    message += struct.pack("!i", -1)
    for name, content_type, value in parameters:
        message += _frame(name.encode()) + _frame(content_type.encode()) + _frame(value)
    return message + struct.pack("!i", -1)


class _Socket:
    def __init__(self, data: bytes) -> None:
        self.stream = io.BytesIO(data)

    def recv(self, n: int) -> bytes:
        return self.stream.read(n)


def decode_response(message: bytes) -> tuple[int, list[tuple[int, str, dict]]]:
    """Batch status and, per request, (HTTP status, content type, JSON body)."""
    stream = io.BytesIO(bytes(message))

    def integer() -> int:
        return struct.unpack("!i", stream.read(4))[0]

    def chunk() -> bytes:
        return stream.read(integer())

    batch_status = integer()
    chunk()  # batch message
    results = []
    while (length := integer()) != -1:
        stream.read(length)  # request id
        content_type = chunk().decode()
        status = integer()
        chunk()  # reason phrase
        for _ in range(integer()):
            chunk(), chunk()  # response headers
        results.append((status, content_type, json.loads(chunk())))
    return batch_status, results


@pytest.fixture(scope="module")
def service(model_store, tmp_path_factory) -> Service:
    model_dir = tmp_path_factory.mktemp("efficientnet_lite0")
    with zipfile.ZipFile(model_store / "efficientnet_lite0.mar") as archive:
        archive.extractall(model_dir)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    handler = DVEHandler()
    service = Service("efficientnet_lite0", str(model_dir), manifest, handler.handle, None, 8, True, metrics)
    handler.initialize(service.context)
    service.handler = handler
    service.cl_socket = None  # set by the worker; only used for streaming responses
    return service


def predict(service: Service, requests: list[bytes]) -> tuple[int, list[tuple[int, str, dict]]]:
    batch = [_retrieve_request(_Socket(request)) for request in requests]
    return decode_response(service.predict(batch))


def test_the_archive_serves_the_labels_and_layer_it_was_built_with(service):
    explainer = service.handler.explainer
    assert str(explainer.layer) == "_avg_pooling:input"
    assert explainer.labels[285] == "Egyptian cat"
    assert explainer.config.mean == (0.5, 0.5, 0.5)


def test_each_request_of_a_batch_gets_its_own_status_and_options(service, photos):
    def b64(name):
        return base64.b64encode(photos[name]).decode()

    batch = [
        encode_request("raw", [("body", "image/jpeg", photos["chelsea"])]),
        encode_request(
            "json",
            [
                (
                    "body",
                    "application/json",
                    json.dumps({"image": b64("coffee"), "topk": 1, "explanations": []}).encode(),
                )
            ],
        ),
        encode_request("zeros", [("body", "image/jpeg", b"\x00" * 100)]),
        encode_request("broken-json", [("body", "application/json", b'{"image": "xx", "topk": 3')]),
        encode_request(
            "bad-format", [("body", "application/json", json.dumps({"image": b64("rocket"), "format": "gif"}).encode())]
        ),
        encode_request(
            "multipart",
            [
                ("image", "application/octet-stream", photos["coffee"]),
                ("topk", "text/plain", b"2"),
                ("explanations", "text/plain", b"targeted_dve"),
            ],
        ),
    ]
    batch_status, results = predict(service, batch)
    assert batch_status == 200
    assert [status for status, _, _ in results] == [200, 200, 400, 400, 400, 200]
    assert all(content_type == "application/json" for _, content_type, _ in results)
    raw, json_body, zeros, broken, bad_format, multipart = (body for _, _, body in results)
    assert set(raw["explanations"]) == {"dve", "targeted_dve"} and len(raw["predictions"]) == 5
    assert json_body["explanations"] == {} and [p["label"] for p in json_body["predictions"]] == ["espresso"]
    assert "not an image" in zeros["message"]
    assert broken["message"] == "the body is declared application/json but is not valid JSON"
    assert "'format' must be one of" in bad_format["message"]
    assert set(multipart["explanations"]) == {"targeted_dve"} and len(multipart["predictions"]) == 2


def test_predictions_and_explanations_give_the_same_answer(service, photos):
    body = [("body", "image/jpeg", photos["chelsea"])]
    _, [(s1, _, explained)] = predict(service, [encode_request("e", body, {"explain": "True"})])
    _, [(s2, _, predicted)] = predict(service, [encode_request("p", body)])
    assert s1 == s2 == 200
    assert explained["predictions"] == predicted["predictions"]
    assert explained["explanations"].keys() == predicted["explanations"].keys() == {"dve", "targeted_dve"}


# Property: whatever arrives, handle() answers every request of the batch, in order,
# with a JSON body and a status of its own, and never raises (which would fail the batch).
def _seed_images() -> list[bytes]:
    from PIL import Image

    x = np.linspace(0, 255, 48, dtype=np.uint8)
    picture = np.stack([np.tile(x, (32, 1)), np.tile(x[:32, None], (1, 48)), np.full((32, 48), 90, np.uint8)], axis=2)
    image = Image.fromarray(picture)
    return [
        encode(picture, quality=80),
        encode(image, "PNG"),
        encode(image.convert("P"), "GIF"),
        encode(image.convert("LA"), "PNG"),
    ]


SEED_IMAGES = _seed_images()


@st.composite
def mutated_images(draw) -> bytes:
    """A valid small image with a few bytes changed, cut out or inserted (or none)."""
    data = bytearray(draw(st.sampled_from(SEED_IMAGES)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 4]))):
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        operation = draw(st.sampled_from(["replace", "cut", "insert"]))
        if operation == "replace" and data:
            data[position] = draw(st.integers(0, 255))
        elif operation == "cut":
            del data[position : position + draw(st.integers(1, 400))]
        else:
            data[position:position] = draw(st.binary(max_size=16))
    return bytes(data)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
OPTION_VALUES = JSON_VALUES | st.sampled_from(
    [
        1,
        3,
        "2",
        "dve",
        "targeted_dve",
        "dve,targeted_dve",
        ["dve"],
        [],
        "none",
        "png",
        "overlay",
        "array",
        8,
        64,
        "64",
        "original",
        True,
        "true",
        "false",
    ]
)
VALID_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "topk": st.integers(1, 1000) | st.integers(1, 1000).map(str),
        "explanations": st.sampled_from(
            [[], ["dve"], ["targeted_dve"], ["dve", "targeted_dve"], "dve", "targeted_dve,dve"]
        ),
        "format": st.sampled_from(["png", "overlay", "array"]),
        "map_size": st.sampled_from([8, 64, "96", "original"]),
        "stages": st.sampled_from([False, True, "true"]),
    },
)
ANY_OPTIONS = st.dictionaries(
    st.sampled_from(["topk", "explanations", "format", "map_size", "stages", "image", "colour", ""]),
    OPTION_VALUES,
    max_size=4,
)
OPTIONS = VALID_OPTIONS | ANY_OPTIONS


@st.composite
def requests_on_the_wire(draw) -> bytes:
    """One request as the frontend sends it: a raw body, a JSON body or multipart fields."""
    image, options = draw(mutated_images()), draw(OPTIONS)
    shape = draw(st.sampled_from(["raw", "json", "multipart"]))
    if shape == "raw":
        content_type = draw(
            st.sampled_from(["image/jpeg", "application/octet-stream", "text/plain", "application/json"])
        )
        return encode_request("raw", [("body", content_type, image)])
    if shape == "json":
        body = {"image": base64.b64encode(image).decode(), **options}
        return encode_request("json", [("body", "application/json", json.dumps(body).encode())])
    fields = [
        (name, "text/plain", (value if isinstance(value, str) else json.dumps(value)).encode())
        for name, value in options.items()
        if name != "image"
    ]
    return encode_request("multipart", [("image", "application/octet-stream", image), *fields])


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(batch=st.lists(requests_on_the_wire(), min_size=1, max_size=3))
def test_any_input_gets_one_answer_per_request_and_never_fails_the_batch(service, batch):
    batch_status, results = predict(service, batch)
    assert batch_status == 200
    assert len(results) == len(batch)
    for status, content_type, body in results:
        event(f"status {status}")  # shown by --hypothesis-show-statistics
        assert content_type == "application/json"
        assert status in (200, 400, 413), body  # a 500 would be a bug caught by the last resort
        assert ("predictions" in body) if status == 200 else (body["code"] == status and body["message"])


def test_a_bug_while_parsing_fails_its_own_request_only(service, photos, monkeypatch):
    from handler import explainer

    parse = explainer.parse_request

    def buggy(request, **kwargs):
        if request.get("body") == bytearray(b"boom"):
            raise KeyError("a bug")
        return parse(request, **kwargs)

    monkeypatch.setattr(explainer, "parse_request", buggy)
    batch = [
        encode_request("bug", [("body", "image/jpeg", b"boom")]),
        encode_request("ok", [("body", "image/jpeg", photos["coffee"])]),
    ]
    batch_status, results = predict(service, batch)
    assert batch_status == 200
    assert [(status, body.get("code")) for status, _, body in results] == [(500, 500), (200, None)]


# Property: on images as large as the limits allow, with options at their limits, every
# answer is 200 or 4xx and stays within the budget (``handler.budget``). The limits are
# scaled down so that a run takes seconds; the budget's arithmetic is the same at any scale.
SMALL_LIMITS = {
    "max_image_pixels": 3_000_000,
    "max_rendered_pixels": 1_500_000,
    "max_response_bytes": 2_000_000,
    "max_array_values": 200_000,
    "max_map_size": 2048,
}


def _large_images() -> dict[str, bytes]:
    from PIL import Image

    noise = np.random.default_rng(2).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    return {
        "noise jpeg 2000 x 1500": encode(noise, quality=95),
        "transparent png 2000 x 1500": encode(Image.new("RGBA", (2000, 1500)), "PNG"),
        "16-bit png 1500 x 2000": encode(Image.fromarray(np.full((2000, 1500), 30000, dtype=np.uint16)), "PNG"),
        "strip jpeg 60000 x 50": encode(noise[:50, :1000].repeat(60, axis=1), quality=90),
        "one pixel": encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "over the pixel limit": encode(Image.new("L", (2000, 1501)), "PNG"),
    }


LARGE_IMAGES = _large_images()
LIMIT_OPTIONS = st.fixed_dictionaries(
    {
        "format": st.sampled_from(["png", "overlay", "array"]),
        "stages": st.booleans(),
        "map_size": st.sampled_from([8, 2048, 2049, "original"]) | st.integers(8, 2048),
    },
    optional={
        "topk": st.sampled_from([1, 1000]),
        "explanations": st.sampled_from([[], ["dve"], ["dve", "targeted_dve"]]),
        "class_conditional": st.booleans(),
        "target": st.sampled_from([0, 999, "lynx"]),
    },
)


@pytest.fixture
def small_limits(service):
    from dataclasses import replace

    explainer = service.handler.explainer
    config = explainer.config
    explainer.config = replace(config, limits=replace(config.limits, **SMALL_LIMITS))
    yield explainer.config.limits
    explainer.config = config


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(batch=st.lists(st.tuples(st.sampled_from(sorted(LARGE_IMAGES)), LIMIT_OPTIONS), min_size=1, max_size=3))
def test_requests_at_the_limits_stay_within_the_budget(service, small_limits, batch):
    wire = [
        encode_request(
            str(i),
            [
                (
                    "body",
                    "application/json",
                    json.dumps({"image": base64.b64encode(LARGE_IMAGES[name]).decode(), **options}).encode(),
                )
            ],
        )
        for i, (name, options) in enumerate(batch)
    ]
    message = service.predict([_retrieve_request(_Socket(request)) for request in wire])
    batch_status, results = decode_response(message)
    assert batch_status == 200 and len(results) == len(batch)
    for (_name, options), (status, _, body) in zip(batch, results):
        event(f"status {status}")
        assert status in (200, 400, 413), body
        if status != 200:
            continue
        size = len(json.dumps(body, separators=(",", ":")))
        assert size <= small_limits.max_response_bytes
        maps = list(body["explanations"].values()) + [stage["dve"] for stage in body.get("stages", [])]
        assert all(max(m["width"], m["height"]) <= small_limits.max_map_size for m in maps)
        per_pixel = {"png": 1, "overlay": 3, "array": 1}[options["format"]]
        assert sum(m["width"] * m["height"] * per_pixel for m in maps) <= small_limits.max_rendered_pixels
