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

import pytest
import ts
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.protocol.otf_message_handler import _retrieve_request
from ts.service import Service

from handler.dve_handler import DVEHandler


def _frame(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def encode_request(request_id: str, parameters: list[tuple[str, str, bytes]], headers: dict[str, str] | None = None) -> bytes:
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
        encode_request("json", [("body", "application/json", json.dumps({"image": b64("coffee"), "topk": 1, "explanations": []}).encode())]),
        encode_request("zeros", [("body", "image/jpeg", b"\x00" * 100)]),
        encode_request("broken-json", [("body", "application/json", b'{"image": "xx", "topk": 3')]),
        encode_request("bad-format", [("body", "application/json", json.dumps({"image": b64("rocket"), "format": "gif"}).encode())]),
        encode_request(
            "multipart",
            [("image", "application/octet-stream", photos["coffee"]), ("topk", "text/plain", b"2"), ("explanations", "text/plain", b"targeted_dve")],
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
