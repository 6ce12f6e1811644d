"""Faults under load, and a soak run: what breaks, for how long, and what comes back.

``loadtest/faults.py`` (``make faults``, ``make soak``) is its command line, and describes
each fault.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time
from pathlib import Path

import requests

from serving import server as ts_server
from serving.archive import ArchiveOptions
from serving.load.photos import load_sizes
from serving.load.runner import OURS, build_or_exit, start_locust
from serving.stats import percentile

ROOT = Path(__file__).resolve().parent.parent.parent

PORT_BASE = ts_server.port_base(ts_server.FAULTS_OFFSET)  # PORT_BASE + offset: one setting moves every port
SLOW = "efficientnet_lite0_slow"  # responseTimeout of 2 s and no budget to speak of, for the timeout fault
# The default limits keep every request far under a second of work; the slow archive lifts
# them on purpose, so that one request can outlast its responseTimeout.
UNBOUNDED = ["max_rendered_pixels=1000000000", "max_response_bytes=1000000000"]
STORE = ROOT / "build" / "faults" / "model_store"
RUN_DIR = ROOT / "build" / "faults" / "server"


def build() -> None:
    for options in (
        ArchiveOptions("efficientnet_lite0"),
        ArchiveOptions("efficientnet_lite0", name=SLOW, response_timeout=2, limits=UNBOUNDED),
    ):
        options.export_path, options.max_batch_delay = STORE, 5
        build_or_exit(options)


def start(models: list[str]) -> ts_server.Server:
    return ts_server.start(models, run_dir=RUN_DIR, model_store=STORE, port_base=PORT_BASE)


def wait_for_new_worker(server: ts_server.Server, model: str, old_pid: int, timeout: float = 120.0) -> float:
    """Waits until a READY worker with another PID serves ``model``; returns that moment."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if any(w["status"] == "READY" and w["pid"] != old_pid for w in server.workers(model)):
                return time.time()
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"error: no new worker for {model} within {timeout:.0f} s")


def records(results: Path) -> list[dict]:
    """Every answered request; a 503 the user sent again (``retried``) is left out, its retry counts."""
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    return [r for r in rows if not r.get("retried")]


def recovered(rows: list[dict], fault_start: float, service_back: float) -> bool:
    """Prints requests before, during and after the fault; True if all after it succeeded.

    The fault lasts until one second after the service is back.
    """
    fault_end = service_back + 1.0
    print(windows(rows, fault_start, fault_end))
    after = [r for r in rows if r["t"] > fault_end]
    return bool(after) and all(r["ok"] for r in after)


def windows(rows: list[dict], fault_start: float, fault_end: float) -> str:
    """Requests and failures before, during and after the fault, completion-time based."""
    parts = {
        "before": [r for r in rows if r["t"] < fault_start],
        "during": [r for r in rows if fault_start <= r["t"] <= fault_end],
        "after": [r for r in rows if r["t"] > fault_end],
    }
    lines = []
    for label, part in parts.items():
        failures = sum(not r["ok"] for r in part)
        p50 = statistics.median(r["ms"] for r in part) if part else float("nan")
        lines.append(f"  {label:<7} {len(part):>5} requests, {failures:>4} failed, p50 {p50:.0f} ms")
    return "\n".join(lines)


def kill_worker(report: Path, users: int) -> bool:
    server = start([OURS])
    results = report / "kill-worker.jsonl"
    try:
        locust = start_locust(server, "explain", users, 45, report / "kill-worker", results)
        time.sleep(15)
        (worker,) = server.workers(OURS)
        killed = time.time()
        os.kill(worker["pid"], signal.SIGKILL)
        ready = wait_for_new_worker(server, OURS, worker["pid"])
        locust.wait()
    finally:
        ts_server.stop(RUN_DIR)
    print(
        f"kill-worker: SIGKILL to worker {worker['pid']} at t=15 s; a new worker was READY {ready - killed:.1f} s later"
    )
    return recovered(records(results), killed, ready)


def restart(report: Path, users: int) -> bool:
    server = start([OURS])
    results = report / "restart.jsonl"
    try:
        locust = start_locust(server, "explain", users, 60, report / "restart", results)
        time.sleep(15)
        down = time.time()
        ts_server.stop(RUN_DIR)
        stopped = time.time()
        time.sleep(5)
        server = start([OURS])
        up = time.time()
        locust.wait()
    finally:
        ts_server.stop(RUN_DIR)
    print(
        f"restart: stop took {stopped - down:.1f} s, down 5 s, start to READY {up - stopped - 5:.1f} s; "
        "users re-read the new keys"
    )
    return recovered(records(results), down, up)


def timeout(report: Path) -> bool:
    server = start([SLOW])
    try:
        token = {"Authorization": f"Bearer {server.token()}"}
        big = load_sizes()[-1]  # 4000 x 2667 JPEG
        (before,) = server.workers(SLOW)
        url = f"{server.inference_url}/predictions/{SLOW}"
        started = time.time()
        slow = requests.post(
            url,
            files={"image": (big.name, big.data, "image/jpeg")},
            data={"format": "overlay", "map_size": "original", "stages": "true"},
            headers=token,
            timeout=120,
        )
        elapsed = time.time() - started
        print(
            f"timeout: original-size overlays of every stage of a {big.width} x {big.height} photo, "
            f"limits lifted, responseTimeout 2 s: HTTP {slow.status_code} after {elapsed:.1f} s: "
            f"{slow.text[:160]!r}"
        )
        ready = wait_for_new_worker(server, SLOW, before["pid"])
        print(
            f"  the worker ({before['pid']}) was replaced; "
            f"the new one was READY {ready - started:.1f} s after the request"
        )
        small = load_sizes()[2]
        follow = [
            requests.post(url, data=small.data, headers={**token, "Content-Type": "image/jpeg"}, timeout=60).status_code
            for _ in range(5)
        ]
        print(f"  the next 5 ordinary requests: {follow}")
    finally:
        ts_server.stop(RUN_DIR)
    (report / "timeout.txt").write_text(f"{slow.status_code} {elapsed:.2f} {follow}\n")
    return slow.status_code >= 500 and follow == [200] * 5


def worker_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def soak(report: Path, users: int, minutes: float) -> bool:
    server = start([OURS])
    results = report / "soak.jsonl"
    samples = []
    try:
        duration = int(minutes * 60)
        locust = start_locust(server, "mix", users, duration, report / "soak", results)
        started = time.time()
        while locust.poll() is None:
            (worker,) = server.workers(OURS)
            samples.append((time.time() - started, worker["pid"], worker_rss_mb(worker["pid"])))
            time.sleep(10)
        code = locust.returncode
    finally:
        ts_server.stop(RUN_DIR)
    rows = records(results)
    failures = sum(not r["ok"] for r in rows)
    pids = {pid for _, pid, _ in samples}
    (report / "soak-memory.csv").write_text(
        "seconds,pid,rss_mb\n" + "".join(f"{t:.0f},{p},{m:.1f}\n" for t, p, m in samples)
    )
    warm = [m for t, _, m in samples if 60 <= t < 120] or [samples[0][2]]
    last = [m for t, _, m in samples if t >= samples[-1][0] - 60]
    growth = statistics.mean(last) - statistics.mean(warm)
    print(
        f"soak: {minutes:g} min, {users} users, mix: {len(rows)} requests, {failures} failed, "
        f"{len(rows) / duration:.1f} req/s, "
        f"p50 {statistics.median(r['ms'] for r in rows):.0f} ms, p99 {percentile([r['ms'] for r in rows], 99):.0f} ms"
    )
    print(
        f"  worker PIDs seen: {sorted(pids)}; RSS {samples[0][2]:.0f} MB at start, "
        f"{statistics.mean(warm):.0f} MB in minute 2, "
        f"{statistics.mean(last):.0f} MB in the last minute (change {growth:+.0f} MB), "
        f"max {max(m for _, _, m in samples):.0f} MB"
    )
    return code == 0 and failures == 0 and len(pids) == 1


def run(args: argparse.Namespace) -> int:
    """The runs ``loadtest/faults.py`` asks for with its flags ``args``: 0 if every one recovered, else 1."""
    args.report_dir.mkdir(parents=True, exist_ok=True)
    build()
    runs = {
        "kill-worker": lambda: kill_worker(args.report_dir, args.users),
        "restart": lambda: restart(args.report_dir, args.users),
        "timeout": lambda: timeout(args.report_dir),
        "soak": lambda: soak(args.report_dir, args.users, args.minutes),
    }
    chosen = list(runs) if args.fault == "all" else [args.fault]
    verdicts = {name: runs[name]() for name in chosen}
    print("\n" + "\n".join(f"{name}: {'recovered' if ok else 'FAILED'}" for name, ok in verdicts.items()))
    return 0 if all(verdicts.values()) else 1
