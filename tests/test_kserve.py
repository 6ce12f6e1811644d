"""KServe v2 / Open Inference Protocol: a real TorchServe with the ``kservev2`` service
envelope answers ``/v2/models/{name}/infer`` with our JSON in its outputs; the
deploy/kserve/ manifest is a well-formed InferenceService for it."""

from __future__ import annotations

import base64
import json
import zipfile
from pathlib import Path

import pytest
import requests
import yaml

from serving import server as ts_server
from serving.server import ROOT, read_properties
from tests.conftest import INTEGRATION_PORT_BASE
from tests.test_integration import post
from tests.test_limits import largest_png  # noqa: F401  (a fixture: the largest image the handler accepts)

MODEL = "efficientnet_lite0"
DEPLOY = ROOT / "deploy" / "kserve"


def single_request_archive(source: Path, target: Path) -> None:
    """``source`` with batchSize 1: the kservev2 envelope answers request 0 of a batch only."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for item in archive.infolist():
            data = archive.read(item)
            if item.filename == "model-config.yaml":
                config = yaml.safe_load(data)
                config["batchSize"] = 1
                data = yaml.safe_dump(config, sort_keys=False).encode()
            out.writestr(item, data)


@pytest.fixture(scope="module")
def kserve(model_store, tmp_path_factory):
    """TorchServe configured as deploy/kserve/ configures it: envelope kservev2, batches of one."""
    store = tmp_path_factory.mktemp("kserve_store")
    single_request_archive(model_store / f"{MODEL}.mar", store / f"{MODEL}.mar")
    run_dir = tmp_path_factory.mktemp("kserve_run")
    try:
        yield ts_server.start(
            [MODEL],
            run_dir=run_dir,
            model_store=store,
            port_base=INTEGRATION_PORT_BASE + 20,
            properties={"service_envelope": "kservev2"},
        )
    finally:
        ts_server.stop(run_dir)


def infer(server, body: dict) -> requests.Response:
    return requests.post(
        f"{server.inference_url}/v2/models/{MODEL}/infer",
        json=body,
        headers={"Authorization": f"Bearer {server.token()}"},
        timeout=120,
    )


def image_tensor(name: str, image: bytes, **options) -> dict:
    tensor = {"name": name, "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}
    return {**tensor, "parameters": options} if options else tensor


def test_v2_infer_carries_the_rest_json_in_its_output(kserve, server, photos):
    options = {"topk": 3, "explanations": ["targeted_dve"], "map_size": 64}
    response = infer(kserve, {"id": "cat-1", "inputs": [image_tensor("photo", photos["chelsea"], **options)]})
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert (body["id"], body["model_name"], body["model_version"]) == ("cat-1", MODEL, "1.0")
    [output] = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("photo", "BYTES", [1])
    rest = post(server, MODEL, json={"image": base64.b64encode(photos["chelsea"]).decode(), **options})
    assert rest.status_code == 200
    assert json.loads(output["data"][0]) == rest.json()


def test_each_input_tensor_is_answered_and_a_bad_one_sets_the_status(kserve, photos):
    pids = kserve.worker_pids(MODEL)
    inputs = [
        image_tensor("coffee", photos["coffee"], topk=1, explanations=[]),
        {"name": "bad", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]},
        {"name": "floats", "shape": [2], "datatype": "FP32", "data": [0.5, 0.25]},
    ]
    response = infer(kserve, {"inputs": inputs})
    assert response.status_code == 400
    outputs = {output["name"]: json.loads(output["data"][0]) for output in response.json()["outputs"]}
    assert [p["label"] for p in outputs["coffee"]["predictions"]] == ["espresso"] and outputs["coffee"][
        "explanations"
    ] == {}
    assert outputs["bad"] == {"code": 400, "type": "BadRequest", "message": "'image' is not valid base64"}
    assert outputs["floats"]["code"] == 400 and "datatype 'FP32'" in outputs["floats"]["message"]
    assert kserve.worker_pids(MODEL) == pids


def test_the_largest_image_reaches_the_handler_as_a_v2_tensor(kserve, largest_png):  # noqa: F811
    """20 MiB - 1 byte of PNG, base64 in a BYTES tensor: under max_request_size, answered by the handler."""
    response = infer(kserve, {"id": "big", "inputs": [image_tensor("photo", largest_png, topk=1, explanations=[])]})
    assert response.status_code == 200, response.text[:300]
    assert json.loads(response.json()["outputs"][0]["data"][0])["image"] == {"width": 2640, "height": 2640}


def test_a_body_the_envelope_cannot_read_fails_alone(kserve, photos):
    """TorchServe's envelope itself fails on a body without ``inputs`` (503, before the
    handler runs); the worker survives and the next request is answered."""
    pids = kserve.worker_pids(MODEL)
    assert infer(kserve, {"image": "x"}).status_code == 503
    assert infer(kserve, {"inputs": [image_tensor("photo", photos["rocket"])]}).status_code == 200
    assert kserve.worker_pids(MODEL) == pids


def test_the_inferenceservice_manifest_is_well_formed():
    documents = list(yaml.safe_load_all((DEPLOY / "inferenceservice.yaml").read_text()))
    [service] = [d for d in documents if d["kind"] == "InferenceService"]
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["metadata"]["name"]
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["protocolVersion"] == "v2"
    assert model["storageUri"].startswith(("pvc://", "s3://", "gs://"))
    assert {"cpu", "memory"} <= set(model["resources"]["requests"]) and {"cpu", "memory"} <= set(
        model["resources"]["limits"]
    )
    assert predictor["minReplicas"] >= 1 and predictor["maxReplicas"] >= predictor["minReplicas"]


def test_the_kserve_config_uses_the_v2_envelope_loopback_and_single_request_batches():
    properties = read_properties(DEPLOY / "config.properties")
    assert properties["service_envelope"] == "kservev2"
    for key in ("inference_address", "management_address"):  # only the wrapper in the pod may call
        assert properties[key].startswith("http://127.0.0.1:"), key
    assert properties["enable_model_api"] == "false"
    assert properties["metrics_mode"] == "prometheus"
    snapshot = json.loads(properties["model_snapshot"])
    [versions] = snapshot["models"].values()
    [model] = versions.values()
    assert model["batchSize"] == 1 and model["marName"].endswith(".mar")
    assert snapshot["modelCount"] == len(snapshot["models"])
