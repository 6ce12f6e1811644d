"""503 (a full queue) is retried with exponential backoff and jitter, within bounds:
the policy itself, and the client (serving/client.py) against a tiny local HTTP server."""

from __future__ import annotations

import json
import random
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving import client
from serving.backoff import NO_RETRY, Backoff, call, retry_after_seconds

FAST = Backoff(tries=4, base=0.02, cap=0.05, budget=1.0)
ANSWER = {"predictions": [{"index": 1, "label": "x", "probability": 1.0}]}


def test_waits_grow_exponentially_with_jitter_up_to_the_cap():
    policy = Backoff(tries=10, base=0.25, cap=2.0, budget=1000.0)
    rng = random.Random(1)
    for tries_done, ceiling in [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (5, 2.0), (9, 2.0)]:
        waits = [policy.next_wait(tries_done, 0.0, None, rng) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits), tries_done
        assert max(waits) - min(waits) > ceiling / 4  # jittered, not one value
    assert policy.next_wait(10, 0.0, None, rng) is None  # the 10th try was the last


def test_the_total_wait_and_the_tries_are_bounded():
    policy = Backoff(tries=100, base=1.0, cap=1.0, budget=3.0)
    rng, waited, tries = random.Random(2), 0.0, 1
    while (wait := policy.next_wait(tries, waited, None, rng)) is not None:
        waited, tries = waited + wait, tries + 1
    assert waited <= 3.0 and 4 <= tries <= 7
    assert NO_RETRY.next_wait(1, 0.0, None, rng) is None
    with pytest.raises(ValueError):
        Backoff(tries=0)


def test_retry_after_is_honoured_and_counts_against_the_budget():
    policy = Backoff(tries=5, base=0.1, cap=0.2, budget=10.0)
    assert policy.next_wait(1, 0.0, 3.0, random.Random(3)) == 3.0  # at least Retry-After
    assert policy.next_wait(1, 8.0, 3.0, random.Random(3)) is None  # 8 + 3 > 10: give up now
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(formatdate(1_000_030.0, usegmt=True), now=1_000_000.0) == pytest.approx(30.0)
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


def test_only_503_is_retried():
    answers = iter([503, 500, 200])
    seen = []
    answer, tries = call(lambda: seen.append(1) or next(answers), lambda a: a, lambda a: {}, FAST, sleep=lambda s: None)
    assert (answer, tries, len(seen)) == (500, 2, 2)


class Scripted(BaseHTTPRequestHandler):
    """Answers POSTs from a script of (status, headers); the last entry repeats."""

    script: list[tuple[int, dict[str, str]]] = []
    cycle = False  # True: the script starts again after its last entry
    answer: dict = ANSWER
    seen: list[float] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(time.monotonic())
        n = len(self.seen) - 1
        status, headers = self.script[n % len(self.script) if self.cycle else min(n, len(self.script) - 1)]
        body = json.dumps(
            self.answer
            if status == 200
            else {"code": status, "type": "ServiceUnavailableException", "message": "queue full"}
        ).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_server():
    """A local HTTP server on 127.0.0.1 (a free port) whose answers the test scripts."""

    def serve(script, cycle=False, answer=ANSWER):
        Scripted.script, Scripted.cycle, Scripted.answer, Scripted.seen = script, cycle, answer, []
        return f"http://127.0.0.1:{httpd.server_address[1]}", Scripted.seen

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield serve
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_client_retries_503_twice_then_gets_the_answer(scripted_server):
    url, seen = scripted_server([(503, {}), (503, {}), (200, {})])
    assert client.explain(url, "m", "token", b"image", {}, FAST) == ANSWER
    assert len(seen) == 3


def test_the_client_gives_up_on_a_server_that_always_answers_503(scripted_server):
    url, seen = scripted_server([(503, {})])
    started = time.monotonic()
    with pytest.raises(client.RequestFailed, match="HTTP 503 from the server after 4 tries: .*queue full"):
        client.explain(url, "m", "token", b"image", {}, FAST)
    assert len(seen) == FAST.tries and time.monotonic() - started < FAST.budget + 1.0


def test_the_client_waits_as_long_as_retry_after_says(scripted_server):
    url, seen = scripted_server([(503, {"Retry-After": "1"}), (200, {})])
    assert client.explain(url, "m", "token", b"image", {}, FAST) == ANSWER
    assert len(seen) == 2 and seen[1] - seen[0] >= 1.0  # not FAST's 0.05 s


def test_the_client_does_not_wait_past_its_budget_for_retry_after(scripted_server):
    url, seen = scripted_server([(503, {"Retry-After": "120"})])
    started = time.monotonic()
    with pytest.raises(client.RequestFailed, match="HTTP 503 from the server: "):
        client.explain(url, "m", "token", b"image", {}, FAST)
    assert len(seen) == 1 and time.monotonic() - started < 1.0


def test_other_errors_are_not_retried(scripted_server):
    url, seen = scripted_server([(400, {}), (200, {})])
    with pytest.raises(client.RequestFailed, match="HTTP 400 from the server: "):
        client.explain(url, "m", "token", b"image", {}, FAST)
    assert len(seen) == 1


@pytest.mark.parametrize("retry", [True, False])
def test_locust_users_retry_503_unless_told_not_to(scripted_server, tmp_path, retry):
    """Locust (the stock scenario's check) against a server answering 503, 503, 200, 503, ..."""
    from types import SimpleNamespace

    from serving.load.runner import start_locust

    url, seen = scripted_server([(503, {}), (503, {}), (200, {})], cycle=True, answer={str(i): 0.2 for i in range(5)})
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "k"}}))
    fake = SimpleNamespace(inference_url=url, key_file=tmp_path / "key_file.json")
    results = tmp_path / "requests.jsonl"
    code = start_locust(fake, "stock", 1, 4, tmp_path / "run", results, model="m", retry_503=retry).wait(timeout=60)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    answered = [r for r in records if not r.get("retried")]
    assert len(records) == len(seen) >= 3
    assert {r["status"] for r in records} == {200, 503}
    if retry:  # every 503 is sent again, and every logical request ends in a 200
        assert code == 0 and all(r["ok"] for r in records)
        assert {r["status"] for r in answered} == {200} and all(r["status"] == 503 for r in records if r.get("retried"))
    else:  # every 503 is a failure of its own
        assert code != 0 and not any(r.get("retried") for r in records)
        assert all(r["ok"] == (r["status"] == 200) for r in records)
