"""Overload: a burst larger than the model's queue is turned away with 503, fast; every
admitted request gets its normal answer; no other 5xx; the worker keeps running.

A short-lived TorchServe of its own, with ``job_queue_size=2`` (the archive's batch
size, 8, and batch delay, 200 ms, are the test archives'), against 24 requests sent at
once: at most one batch and the queue can hold them, the rest must be refused.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import requests

from serving import server as ts_server
from tests.conftest import INTEGRATION_PORT_BASE
from tests.test_integration import batch_totals, batches_since, post_image

MODEL = "efficientnet_lite0"
BURST = 24
# What TorchServe 0.12 answers when a model's job queue is full.
QUEUE_FULL = f'Model "{MODEL}" has no worker to serve inference request. Please use scale workers API to add workers.'


def test_a_burst_beyond_the_queue_gets_503_and_the_worker_survives(model_store, photos, tmp_path):
    run_dir = tmp_path / "run"
    try:
        server = ts_server.start(
            [MODEL],
            run_dir=run_dir,
            model_store=model_store,
            port_base=INTEGRATION_PORT_BASE + 40,
            properties={"job_queue_size": "2"},
        )
        pids = server.worker_pids(MODEL)
        headers = {"Authorization": f"Bearer {server.token()}", "Content-Type": "image/jpeg"}
        start = threading.Barrier(BURST)

        def send(_) -> requests.Response:
            start.wait()
            return requests.post(
                f"{server.inference_url}/predictions/{MODEL}", data=photos["chelsea"], headers=headers, timeout=120
            )

        before = batch_totals(server, MODEL)
        with ThreadPoolExecutor(BURST) as pool:
            responses = list(pool.map(send, range(BURST)))
        statuses = [r.status_code for r in responses]
        assert 503 in statuses and 200 in statuses, statuses
        batches, ran = batches_since(server, MODEL, before, statuses.count(200))
        assert ran == statuses.count(200) and batches < ran, (batches, ran)  # the admitted ones ran in batches
        assert set(statuses) == {200, 503}, [r.text[:200] for r in responses]  # no other 5xx, no 4xx
        for response in responses:
            body = response.json()
            if response.status_code == 503:
                assert body["code"] == 503 and body["message"].startswith(QUEUE_FULL), body
            else:
                assert len(body["predictions"]) == 5 and set(body["explanations"]) == {"dve", "targeted_dve"}
        assert server.worker_pids(MODEL) == pids  # the same worker, not a replacement
        assert post_image(server, MODEL, photos["chelsea"]).status_code == 200
    finally:
        ts_server.stop(run_dir)
