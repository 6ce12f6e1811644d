"""Who may call the server, where it listens, what it may load, and what its logs keep."""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import UTC, datetime

import pytest
import requests

from serving import server as ts_server
from serving.server import ROOT, read_properties
from tests.conftest import INTEGRATION_PORT_BASE
from tests.test_integration import post, post_image

REFUSED = "Token Authorization failed"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_requests_without_the_right_token_are_refused(server, photos, token):
    headers = {"Content-Type": "image/jpeg", **(bearer(token) if token else {})}
    response = requests.post(
        f"{server.inference_url}/predictions/efficientnet_lite0", data=photos["chelsea"], headers=headers, timeout=30
    )
    assert response.status_code == 400
    assert REFUSED in response.json()["message"]


def test_the_inference_token_opens_no_management_call(server):
    response = requests.get(f"{server.management_url}/models", headers=bearer(server.token("inference")), timeout=10)
    assert response.status_code == 400 and "Token Authorization failed" in response.json()["message"]


def test_a_rotated_token_replaces_the_old_one_at_once(server, photos):
    """The API key asks the management API for a new inference key; the old one stops working."""
    old = server.token("inference")
    rotated = requests.post(
        f"{server.management_url}/token", params={"type": "inference"}, headers=bearer(server.token("API")), timeout=10
    )
    assert rotated.status_code == 200
    new = server.token("inference")  # TorchServe rewrites key_file.json
    assert new != old
    assert post_image(server, "efficientnet_lite0", photos["chelsea"], token=old).status_code == 400
    assert post_image(server, "efficientnet_lite0", photos["chelsea"], token=new).status_code == 200


def test_only_the_api_key_may_rotate_tokens(server):
    response = requests.post(
        f"{server.management_url}/token",
        params={"type": "inference"},
        headers=bearer(server.token("management")),
        timeout=10,
    )
    assert response.status_code == 400


def test_an_expired_token_is_refused(tmp_path):
    """A server without models (it starts in seconds) whose keys live 6 seconds."""
    run_dir = tmp_path / "run"
    try:
        expiring = ts_server.start(
            [],
            run_dir=run_dir,
            model_store=tmp_path,
            port_base=INTEGRATION_PORT_BASE + 30,
            properties={"token_expiration_min": "0.1"},
        )
        ping = f"{expiring.inference_url}/ping"
        requests.post(
            f"{expiring.management_url}/token",
            params={"type": "inference"},
            headers=bearer(expiring.token("API")),
            timeout=10,
        )
        token = expiring.token("inference")
        assert requests.get(ping, headers=bearer(token), timeout=10).status_code == 200
        expires = json.loads(expiring.key_file.read_text())["inference"]["expiration time"]
        wait = datetime.fromisoformat(expires.replace("Z", "+00:00")) - datetime.now(UTC)
        assert 0 < wait.total_seconds() <= 6.5
        time.sleep(wait.total_seconds() + 0.5)
        response = requests.get(ping, headers=bearer(token), timeout=10)
        assert response.status_code == 400 and REFUSED in response.json()["message"]
    finally:
        ts_server.stop(run_dir)


def test_model_registration_over_http_is_off(server, tmp_path):
    response = requests.post(
        f"{server.management_url}/models",
        params={"url": f"file://{tmp_path}/x.mar"},
        headers=bearer(server.token("management")),
        timeout=10,
    )
    assert response.status_code == 405


def test_defaults_listen_on_loopback_with_tokens_on_and_registration_off():
    properties = read_properties(ROOT / "config.properties")
    for key in ("inference_address", "management_address", "metrics_address"):
        assert properties[key].startswith("http://127.0.0.1:"), key
    assert properties["grpc_inference_address"] == properties["grpc_management_address"] == "127.0.0.1"
    assert properties["disable_token_authorization"] == "false"
    assert properties["enable_model_api"] == "false"
    assert properties["token_expiration_min"] == "60"  # pinned, not TorchServe's default


def test_the_server_may_load_archives_from_its_model_store_only(server, model_store):
    log = (server.log_dir / "ts_log.log").read_text(errors="replace")
    assert f"Allowed Urls: [file://{ts_server._literal_regex(str(model_store.resolve()))}/.*]" in log
    assert f"Inference address: {server.inference_url}" in log and server.inference_url.startswith("http://127.0.0.1:")


def test_logs_hold_no_token_and_no_request_body(server, photos):
    marker = f"marker-{uuid.uuid4().hex}"
    image = base64.b64encode(photos["rocket"]).decode()
    assert post_image(server, "efficientnet_lite0", photos["chelsea"]).status_code == 200
    refused = post(server, "efficientnet_lite0", json={"image": image, "format": marker})
    assert refused.status_code == 400 and marker in refused.json()["message"]  # the client is told...
    secrets = [server.token("inference"), server.token("management"), server.token("API"), marker, image[100:160]]
    logs = list(server.log_dir.glob("*.log"))
    assert {log.name for log in logs} >= {"ts_log.log", "model_log.log", "access_log.log"}
    for log in logs:  # ...and the logs are not
        text = log.read_text(errors="replace")
        assert not [secret for secret in secrets if secret in text], log.name
