"""TorchServe's gRPC inference API gives the same JSON as the REST API.

The client stubs are generated at test time, with grpcio-tools, from the proto files
that TorchServe ships inside its frontend jar, so they match the server exactly.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
import zipfile
from pathlib import Path

import grpc
import pytest
from grpc_tools import protoc

from tests.test_integration import post, post_image

JAR = Path(importlib.import_module("ts").__file__).parent / "frontend" / "model-server.jar"
PROTOS = ["inference.proto", "google/rpc/status.proto"]


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """``inference_pb2`` and ``inference_pb2_grpc`` built from the jar's own protos."""
    source = tmp_path_factory.mktemp("protos")
    out = tmp_path_factory.mktemp("stubs")
    with zipfile.ZipFile(JAR) as jar:
        for name in PROTOS:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(jar.read(name))
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/empty.proto
    args = ["protoc", f"-I{source}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *PROTOS]
    assert protoc.main(args) == 0
    # The generated modules import each other by their top-level names (``inference_pb2``,
    # ``google.rpc.status_pb2``): each is loaded from its file and registered under that name.
    rpc = types.ModuleType("google.rpc")
    rpc.__path__ = [str(out / "google" / "rpc")]
    names = ["google.rpc", "google.rpc.status_pb2", "inference_pb2", "inference_pb2_grpc"]
    sys.modules["google.rpc"] = rpc
    try:
        rpc.status_pb2 = _load("google.rpc.status_pb2", out / "google" / "rpc" / "status_pb2.py")
        yield (
            _load("inference_pb2", out / "inference_pb2.py"),
            _load("inference_pb2_grpc", out / "inference_pb2_grpc.py"),
        )
    finally:
        for name in names:
            sys.modules.pop(name, None)


def _load(name: str, path: Path) -> types.ModuleType:
    """The module of ``path``, imported as ``name`` (and registered under it, for the modules that import it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_inference_port}") as channel:
        yield channel


def predict(stubs, channel, server, inputs: dict[str, bytes], token: str | None = None):
    pb2, pb2_grpc = stubs
    request = pb2.PredictionsRequest(model_name="efficientnet_lite0", input=inputs)
    metadata = [("authorization", f"Bearer {token or server.token()}")]
    return pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(request, metadata=metadata, timeout=120)


def test_grpc_prediction_is_the_rest_json(stubs, channel, server, photos):
    response = predict(stubs, channel, server, {"data": photos["chelsea"]})
    rest = post_image(server, "efficientnet_lite0", photos["chelsea"])
    assert rest.status_code == 200
    assert json.loads(response.prediction) == rest.json()
    assert set(rest.json()["explanations"]) == {"dve", "targeted_dve"}


def test_grpc_options_are_the_rest_options(stubs, channel, server, photos):
    options = {"topk": "2", "explanations": "targeted_dve", "format": "array", "map_size": "32"}
    response = predict(
        stubs, channel, server, {"image": photos["coffee"], **{k: v.encode() for k, v in options.items()}}
    )
    rest = post(
        server, "efficientnet_lite0", files={"image": ("coffee.jpg", photos["coffee"], "image/jpeg")}, data=options
    )
    body = json.loads(response.prediction)
    assert body == rest.json()
    assert len(body["predictions"]) == 2 and set(body["explanations"]) == {"targeted_dve"}


def test_grpc_bad_input_gets_the_rest_error_body(stubs, channel, server):
    """TorchServe's gRPC API drops a request's own status: the call succeeds and the
    JSON carries the code and message, exactly as REST's body does."""
    response = predict(stubs, channel, server, {"data": b"not an image"})
    rest = post_image(server, "efficientnet_lite0", b"not an image")
    assert rest.status_code == 400
    assert json.loads(response.prediction) == rest.json()
    assert rest.json()["code"] == 400 and "not an image" in rest.json()["message"]


@pytest.mark.parametrize("token", ["wrong-token", ""])
def test_grpc_needs_the_inference_token(stubs, channel, server, photos, token):
    pb2, pb2_grpc = stubs
    request = pb2.PredictionsRequest(model_name="efficientnet_lite0", input={"data": photos["chelsea"]})
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with pytest.raises(grpc.RpcError) as caught:
        pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(request, metadata=metadata, timeout=30)
    assert "Token Authorization failed" in caught.value.details()
