"""End to end against a real TorchServe: archives built by the build script, served with
the project's config.properties on other ports, called over HTTP like any client."""

from __future__ import annotations

import base64
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from evaluation.photos import CAT_CLASSES
from evaluation.photos import encode_image as encode
from tests.conftest import INTEGRATION_PORT_BASE, SCENE_SIDE, centred_gaussian, hottest_in


def post(server, model, *, endpoint="predictions", token=None, **kwargs) -> requests.Response:
    headers = kwargs.pop("headers", {})
    headers.setdefault("Authorization", f"Bearer {token or server.token()}")
    return requests.post(f"{server.inference_url}/{endpoint}/{model}", headers=headers, timeout=120, **kwargs)


def post_image(server, model, image: bytes, **kwargs) -> requests.Response:
    return post(server, model, data=image, headers={"Content-Type": "image/jpeg"}, **kwargs)


def png(entry: dict) -> Image.Image:
    assert entry["format"] in ("png", "overlay")
    return Image.open(io.BytesIO(base64.b64decode(entry["data"])))


BATCH_SIZE_SAMPLE = re.compile(r"^DVEBatchSize_(count|sum)\{([^}]*)\} (\S+)$", re.M)


def batch_totals(server, model) -> tuple[float, float]:
    """(batches, requests) the model's handler has run so far: DVEBatchSize's _count and _sum at the metrics port."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    values = {
        kind: float(value)
        for kind, labels, value in BATCH_SIZE_SAMPLE.findall(text)
        if f'ModelName="{model}"' in labels
    }
    return values.get("count", 0.0), values.get("sum", 0.0)


def batches_since(server, model, before: tuple[float, float], sent: int) -> tuple[int, int]:
    """(batches, requests) run since ``before``, read once the metrics count ``sent`` requests (they arrive
    asynchronously; after 15 s, whatever they say)."""
    deadline = time.monotonic() + 15
    while True:
        count, total = batch_totals(server, model)
        if total - before[1] >= sent or time.monotonic() > deadline:
            return round(count - before[0]), round(total - before[1])
        time.sleep(0.2)


def test_raw_photo_gets_prediction_and_both_explanations(server, photos):
    response = post_image(server, "efficientnet_lite0", photos["chelsea"])
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["predictions"][0]["index"] in CAT_CLASSES and "cat" in body["predictions"][0]["label"]
    assert len(body["predictions"]) == 5
    assert body["image"] == {"width": 451, "height": 300}
    for name in ("dve", "targeted_dve"):
        entry = body["explanations"][name]
        image = png(entry)
        assert image.size == (entry["width"], entry["height"]) == (224, 149)
        assert abs(entry["width"] / entry["height"] - 451 / 300) < 0.01
    x0, y0, x1, y1 = body["explanations"]["targeted_dve"]["box"]
    assert 0 <= x0 < x1 <= 451 and 0 <= y0 < y1 <= 300


def test_explanations_endpoint_returns_the_prediction_too(server, photos):
    predicted = post_image(server, "efficientnet_lite0", photos["coffee"]).json()
    explained = post_image(server, "efficientnet_lite0", photos["coffee"], endpoint="explanations").json()
    assert explained["predictions"] == predicted["predictions"]
    assert explained["explanations"].keys() == predicted["explanations"].keys() == {"dve", "targeted_dve"}
    assert predicted["predictions"][0]["label"] == "espresso"


def test_dve_is_hottest_on_off_centre_objects(server, off_centre_objects):
    """Objects in a corner (tests/conftest.py): DVE points at them, a centred Gaussian would not."""
    for name, image, box in off_centre_objects:
        body = post(
            server,
            "efficientnet_lite0",
            json={
                "image": base64.b64encode(image).decode(),
                "map_size": "original",
                "format": "array",
                "explanations": ["dve"],
            },
        ).json()
        dve_map = np.array(body["explanations"]["dve"]["data"])
        assert dve_map.shape == (body["image"]["height"], body["image"]["width"]) == (SCENE_SIDE, SCENE_SIDE)
        assert not hottest_in(centred_gaussian(*dve_map.shape), box), name
        assert hottest_in(dve_map, box), name


def test_options_by_json_and_by_multipart(server, photos):
    body = post(
        server,
        "efficientnet_lite0",
        json={
            "image": base64.b64encode(photos["rocket"]).decode(),
            "topk": 2,
            "explanations": ["targeted_dve"],
            "format": "overlay",
            "map_size": 100,
        },
    ).json()
    assert len(body["predictions"]) == 2 and set(body["explanations"]) == {"targeted_dve"}
    overlay = png(body["explanations"]["targeted_dve"])
    assert overlay.mode == "RGB" and overlay.size == (100, 67)
    form = post(
        server,
        "efficientnet_lite0",
        files={"image": ("rocket.png", encode(Image.open(io.BytesIO(photos["rocket"])), "PNG"), "image/png")},
        data={"topk": "3", "explanations": "dve", "format": "array", "map_size": "40"},
    )
    assert form.status_code == 200, form.text
    body = form.json()
    values = np.array(body["explanations"]["dve"]["data"])
    assert len(body["predictions"]) == 3 and values.shape == (27, 40) and 0 <= values.min() <= values.max() <= 1


def test_bad_requests_fail_alone_in_a_concurrent_batch_and_the_worker_survives(server, photos):
    pids = server.worker_pids("efficientnet_lite0")
    good = lambda: post_image(server, "efficientnet_lite0", photos["chelsea"])  # noqa: E731
    bad = [
        lambda: post_image(server, "efficientnet_lite0", b""),
        lambda: post_image(server, "efficientnet_lite0", photos["coffee"][:3000]),
        lambda: post_image(server, "efficientnet_lite0", b"GIF89a not really"),
        lambda: post(server, "efficientnet_lite0", json={"image": "!!!"}),
        lambda: post(
            server, "efficientnet_lite0", json={"image": base64.b64encode(photos["coffee"]).decode(), "topk": "many"}
        ),
        lambda: post(server, "efficientnet_lite0", json={"topk": 3}),
    ]
    calls = [good, *bad, good, good]
    before = batch_totals(server, "efficientnet_lite0")
    with ThreadPoolExecutor(len(calls)) as pool:
        responses = list(pool.map(lambda call: call(), calls))
    statuses = [r.status_code for r in responses]
    assert statuses == [200] + [400] * len(bad) + [200, 200], [r.text[:200] for r in responses]
    batches, ran = batches_since(server, "efficientnet_lite0", before, len(calls))
    assert ran == len(calls) and batches < ran, (batches, ran)  # some requests shared a batch
    for response in responses[1 : 1 + len(bad)]:
        assert response.json()["code"] == 400 and response.json()["message"]
    assert server.worker_pids("efficientnet_lite0") == pids  # no worker restarted
    alone = post_image(server, "efficientnet_lite0", photos["chelsea"]).json()  # the normal answer
    for response in (responses[0], *responses[-2:]):
        body = response.json()
        assert [p["index"] for p in body["predictions"]] == [p["index"] for p in alone["predictions"]]
        assert [p["probability"] for p in body["predictions"]] == pytest.approx(
            [p["probability"] for p in alone["predictions"]], abs=1e-4
        )
        assert body["explanations"].keys() == alone["explanations"].keys() and body["image"] == alone["image"]


def test_vgg16_explains_its_final_pooling_layer(server, photos):
    body = post_image(server, "vgg16", photos["coffee"]).json()
    assert body["layer"] == "features.30"
    assert len(body["predictions"]) == 5 and body["image"] == {"width": 600, "height": 400}
    assert png(body["explanations"]["dve"]).size == (224, 149)


def test_a_users_own_model_answers_with_its_own_labels(server):
    bright = encode(np.full((120, 80, 3), 230, dtype=np.uint8), "PNG")
    dark = encode(np.full((80, 120, 3), 20, dtype=np.uint8), "PNG")
    for image, label in ((bright, "bright"), (dark, "dark")):
        body = post(server, "brightness", json={"image": base64.b64encode(image).decode(), "topk": 2}).json()
        assert [p["label"] for p in body["predictions"]][0] == label
        assert {p["label"] for p in body["predictions"]} == {"bright", "dark"}
        assert set(body["explanations"]) == {"dve", "targeted_dve"}
    refused = post(server, "brightness", json={"image": base64.b64encode(bright).decode(), "topk": 3})
    assert refused.status_code == 400 and "between 1 and 2" in refused.json()["message"]


def test_a_model_that_cannot_load_fails_fast_with_its_error(model_store, tmp_path):
    """A broken config crash-loops TorchServe's worker while /ping says Healthy:
    start() must say why, quickly, and leave no server behind."""
    import time
    import zipfile

    from serving import server as ts_server

    store = tmp_path / "store"
    store.mkdir()
    with (
        zipfile.ZipFile(model_store / "brightness.mar") as source,
        zipfile.ZipFile(store / "broken.mar", "w") as target,
    ):
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "model-config.yaml":
                data = data.replace(b"handler:\n", b"handler:\n  sigma: 3\n")
            target.writestr(item, data)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    with pytest.raises(ts_server.ServerError, match=r"broken failed to load: ValueError: unknown key\(s\) \['sigma'\]"):
        ts_server.start(
            ["broken"], run_dir=run_dir, model_store=store, port_base=INTEGRATION_PORT_BASE + 10, timeout=120
        )
    assert time.monotonic() - started < 60
    assert not ts_server.stop(run_dir)  # already stopped


VGG16_POOLS = [
    ("features.4", [64, 112, 112]),
    ("features.9", [128, 56, 56]),
    ("features.16", [256, 28, 28]),
    ("features.23", [512, 14, 14]),
    ("features.30", [512, 7, 7]),
]


def test_stages_on_request_and_only_for_the_requests_that_ask(server, photos):
    coffee = base64.b64encode(photos["coffee"]).decode()
    vgg = post(server, "vgg16", json={"image": coffee, "stages": True, "explanations": []})
    assert vgg.status_code == 200, vgg.text
    body = vgg.json()
    assert (
        body["explanations"] == {} and [(s["layer"], s["shape"]) for s in body["stages"]] == VGG16_POOLS
    )  # pool1..pool5
    assert all(png(s["dve"]).size == (224, 149) for s in body["stages"])
    # In one batch (the test archives wait 200 ms for one): multipart asking for stages, a raw photo not asking.
    staged = lambda: post(  # noqa: E731
        server,
        "efficientnet_lite0",
        files={"image": ("chelsea.jpg", photos["chelsea"], "image/jpeg")},
        data={"stages": "true", "format": "array", "map_size": "16", "explanations": "none"},
    )
    plain = lambda: post_image(server, "efficientnet_lite0", photos["chelsea"])  # noqa: E731
    before = batch_totals(server, "efficientnet_lite0")
    with ThreadPoolExecutor(2) as pool:
        with_stages, without = [future.result() for future in [pool.submit(staged), pool.submit(plain)]]
    assert with_stages.status_code == without.status_code == 200
    assert batches_since(server, "efficientnet_lite0", before, 2) == (1, 2)  # one batch of both
    stages = with_stages.json()["stages"]
    assert [s["layer"] for s in stages] == ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.10", "_avg_pooling:input"]
    assert all(np.array(s["dve"]["data"]).shape == (11, 16) for s in stages)
    alone = post_image(server, "efficientnet_lite0", photos["chelsea"]).json()
    assert "stages" not in without.json() and without.json()["explanations"].keys() == alone["explanations"].keys()
    assert [p["index"] for p in without.json()["predictions"]] == [p["index"] for p in alone["predictions"]]
    refused = post(server, "efficientnet_lite0", json={"image": coffee, "stages": "yes"})
    assert refused.status_code == 400 and refused.json()["message"] == "'stages' must be true or false, got 'yes'"


def test_class_conditional_on_request(server, photos):
    chelsea = base64.b64encode(photos["chelsea"]).decode()
    answer = post(server, "efficientnet_lite0", json={"image": chelsea, "class_conditional": True})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["explained_class"] == body["predictions"][0]
    assert png(body["explanations"]["dve"]).size == (224, 149)
    refused = post(
        server, "vgg16", json={"image": chelsea, "class_conditional": True}
    )  # its classifier reads 25,088 features
    assert refused.status_code == 400 and "class_conditional needs a linear classifier" in refused.json()["message"]


def test_target_on_request_by_index_and_by_label(server, photos):
    chelsea = base64.b64encode(photos["chelsea"]).decode()
    tabby = post(server, "efficientnet_lite0", json={"image": chelsea, "target": 281})
    lynx = post(server, "efficientnet_lite0", endpoint="explanations", json={"image": chelsea, "target": "lynx"})
    assert tabby.status_code == lynx.status_code == 200, (tabby.text, lynx.text)
    tabby, lynx = tabby.json(), lynx.json()
    assert tabby["explained_class"]["index"] == 281 and tabby["explained_class"]["label"] == "tabby"
    assert lynx["explained_class"]["index"] == 287 and lynx["explained_class"]["label"] == "lynx"
    assert tabby["predictions"] == lynx["predictions"] and lynx["explained_class"] in lynx["predictions"]
    for name in ("dve", "targeted_dve"):
        assert png(tabby["explanations"][name]).size == png(lynx["explanations"][name]).size == (224, 149)
        assert tabby["explanations"][name]["data"] != lynx["explanations"][name]["data"]
    # The same class by index, as multipart text, and by label in another case: the same answer.
    by_index = post(
        server,
        "efficientnet_lite0",
        files={"image": ("chelsea.jpg", photos["chelsea"], "image/jpeg")},
        data={"target": "287"},
    )
    by_label = post(server, "efficientnet_lite0", json={"image": chelsea, "target": "Lynx"})
    assert by_index.json() == by_label.json() == lynx
    unknown = post(server, "efficientnet_lite0", json={"image": chelsea, "target": "snow leopard cub"})
    assert unknown.status_code == 400
    assert (
        unknown.json()["message"]
        == "'target' 'snow leopard cub' is neither a class index nor one of the model's labels"
    )
    refused = post(server, "vgg16", json={"image": chelsea, "target": 281})
    assert refused.status_code == 400 and refused.json()["message"].startswith("target needs a linear classifier")
