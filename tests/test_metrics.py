"""The handler's own metrics reach TorchServe's Prometheus endpoint (no token needed)."""

from __future__ import annotations

import re
import time

import requests

from tests.test_integration import post_image

MODEL = "efficientnet_lite0"
SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$")
STAGES = ("DVEDecodeTime", "DVEForwardTime", "DVEExplainTime", "DVEEncodeTime")


def scrape(server) -> tuple[dict[str, float], str]:
    """This model's samples by metric name (histogram buckets left out), and the raw text."""
    response = requests.get(f"{server.metrics_url}/metrics", timeout=10)  # no Authorization header
    assert response.status_code == 200
    samples = {}
    for line in response.text.splitlines():
        match = SAMPLE.match(line)
        if match and f'ModelName="{MODEL}"' in match.group(2) and not match.group(1).endswith("_bucket"):
            samples[match.group(1)] = float(match.group(3))
    return samples, response.text


def test_handler_metrics_are_scraped_in_prometheus_format(server, photos):
    before, _ = scrape(server)
    statuses = [
        post_image(server, MODEL, image).status_code for image in (photos["chelsea"], b"not an image", photos["coffee"])
    ]
    assert statuses == [200, 400, 200]
    deadline = time.monotonic() + 15  # the frontend reads the worker's metrics asynchronously
    while True:
        after, text = scrape(server)
        delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
        if delta.get("DVEBatchSize_count", 0) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert delta["DVEBatchSize_count"] == 3 and delta["DVEBatchSize_sum"] == 3  # sequential: batches of one
    assert delta["DVEBadRequests"] == 1 and delta["DVEInternalErrors"] == 0
    assert all(delta[stage] > 0 for stage in STAGES), delta
    assert after["HandlerTime"] > 0
    for name in STAGES + ("DVEBadRequests", "DVEInternalErrors"):
        assert f"# TYPE {name} counter" in text
    assert "# TYPE DVEBatchSize histogram" in text
