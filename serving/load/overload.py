"""What one worker does with more users than it can serve (``make overload``).

``loadtest/overload.py`` is its command line, and describes the run and its report.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from serving import server as ts_server
from serving.archive import ArchiveOptions
from serving.load.runner import OURS, build_or_exit, start_locust
from serving.stats import percentile

ROOT = Path(__file__).resolve().parent.parent.parent

PORT_BASE = ts_server.port_base(ts_server.OVERLOAD_OFFSET)  # PORT_BASE + offset: one setting moves every port
TORCHSERVE_DEFAULT_QUEUE = 100
STORE = ROOT / "build" / "overload" / "model_store"
RUN_DIR = ROOT / "build" / "overload" / "server"


def configured_queue_size() -> int:
    """``job_queue_size`` of config.properties (TorchServe's default, 100, if it sets none)."""
    return int(ts_server.read_properties(ts_server.DEFAULT_CONFIG).get("job_queue_size", TORCHSERVE_DEFAULT_QUEUE))


def busy_seconds() -> float:
    """CPU seconds all processes have used since boot, and the hypervisor taken (all cores, /proc/stat).

    Interrupt time is left out: it is mostly the load test's own loopback traffic.
    """
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")


def server_seconds(server: ts_server.Server) -> float:
    """CPU seconds used so far by TorchServe's frontend and its running workers."""
    import psutil  # a TorchServe dependency

    total = 0.0
    try:
        frontend = psutil.Process(ts_server.server_pid(server.run_dir))
        for process in [frontend, *frontend.children(recursive=True)]:
            times = process.cpu_times()
            total += times.user + times.system
    except (psutil.Error, TypeError):
        pass
    return total


def wait_for_quiet(server: ts_server.Server, limit: float, timeout: float = 900.0, window: float = 5.0) -> float:
    """Waits until other processes use under ``limit`` CPU seconds per second over ``window``; returns that figure."""
    deadline = time.monotonic() + timeout
    while True:
        busy, served = busy_seconds(), server_seconds(server)
        time.sleep(window)
        others = max(0.0, busy_seconds() - busy - (server_seconds(server) - served)) / window
        if others < limit or time.monotonic() > deadline:
            return others
        print(f"  others use {others:.2f} CPU s/s; waiting for a quiet machine ...", flush=True)


def run_phase(
    server: ts_server.Server, users: int, seconds: int, prefix: Path, pause: float, retry_503: bool = False
) -> tuple[list[dict], dict]:
    """One Locust phase of the ``explain`` scenario: its request records, and CPU seconds per second
    used by Locust, by TorchServe, and by every other process of the machine."""
    results = prefix.with_suffix(".jsonl")
    busy, served, started = busy_seconds(), server_seconds(server), time.monotonic()
    locust = start_locust(
        server, "explain", users, seconds, prefix, results, model=OURS, retry_503=retry_503, pause_after_503=pause
    )
    try:
        _, status, usage = os.wait4(locust.pid, 0)  # like wait(), and the child's CPU time
    except BaseException:  # stopped (Ctrl-C, SIGTERM): no Locust left behind
        locust.terminate()
        locust.wait()
        raise
    locust.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - started
    locust_cpu = usage.ru_utime + usage.ru_stime
    server_cpu = server_seconds(server) - served
    cpu = {
        "locust_cpu_per_s": locust_cpu / elapsed,
        "server_cpu_per_s": server_cpu / elapsed,
        "others_cpu_per_s": max(0.0, busy_seconds() - busy - locust_cpu - server_cpu) / elapsed,
    }
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    return rows, cpu


def summarize(rows: list[dict], seconds: int) -> dict:
    """Admitted (200, correct): p50, p99, per second; rejected (503): share; everything else counted."""
    admitted = [r["ms"] for r in rows if r["ok"] and r["status"] == 200]
    turned_away = [r["ms"] for r in rows if r["status"] == 503]
    rejected = len(turned_away)
    other_5xx = sum(r["status"] >= 500 and r["status"] != 503 for r in rows)
    other_failures = len(rows) - len(admitted) - rejected - other_5xx
    return {
        "requests": len(rows),
        "admitted": len(admitted),
        "p50_ms": percentile(admitted, 50),
        "p99_ms": percentile(admitted, 99),
        "admitted_per_s": len(admitted) / seconds,
        "rejected_503": rejected,
        "rejected_share": rejected / len(rows) if rows else float("nan"),
        "rejected_p50_ms": percentile(turned_away, 50),
        "rejected_p99_ms": percentile(turned_away, 99),
        "other_5xx": other_5xx,
        "other_failures": other_failures,
        "statuses": {str(s): sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
    }


def measure(
    queue_size: int,
    users: list[int],
    seconds: int,
    warmup: int,
    pause: float,
    quiet: float | None,
    repeats: int,
    port_base: int,
    report_dir: Path,
) -> list[dict]:
    """One TorchServe with ``job_queue_size=queue_size``: a warm-up, then one phase per user count."""
    server = ts_server.start(
        [OURS], run_dir=RUN_DIR, model_store=STORE, port_base=port_base, properties={"job_queue_size": str(queue_size)}
    )
    rows = []
    try:
        print(f"job_queue_size={queue_size}: TorchServe up at {server.inference_url}", flush=True)
        if warmup:
            run_phase(server, 4, warmup, report_dir / f"q{queue_size}-warmup", pause, retry_503=True)
        for n in users:
            for attempt in range(1 + repeats):
                if quiet is not None:
                    wait_for_quiet(server, quiet)
                (before,) = [w["pid"] for w in server.workers(OURS)]
                records, cpu = run_phase(server, n, seconds, report_dir / f"q{queue_size}-u{n}-{attempt}", pause)
                after = [w["pid"] for w in server.workers(OURS)]
                row = {"queue": queue_size, "users": n, "seconds": seconds, **summarize(records, seconds)}
                row.update(worker_pid_before=before, worker_pids_after=after, worker_replaced=after != [before], **cpu)
                row["busy_repeats"] = attempt
                print("  " + line(row), flush=True)
                if quiet is None or cpu["others_cpu_per_s"] <= quiet or after != [before]:
                    break
                print(
                    f"  others used {cpu['others_cpu_per_s']:.2f} CPU s/s during that phase: measuring it again",
                    flush=True,
                )
            rows.append(row)
    finally:
        ts_server.stop(RUN_DIR)
    return rows


def line(row: dict) -> str:
    return (
        f"{row['users']:>3} users: {row['requests']} requests, "
        f"admitted {row['admitted']} ({row['admitted_per_s']:.1f}/s, "
        f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms), 503 {row['rejected_share']:.1%} "
        f"(p50 {_ms(row['rejected_p50_ms'])} ms, p99 {_ms(row['rejected_p99_ms'])} ms), "
        f"other 5xx {row['other_5xx']}, other failures {row['other_failures']}, "
        f"worker {'REPLACED ' + str(row['worker_pids_after']) if row['worker_replaced'] else 'unchanged'}, "
        f"CPU s/s: TorchServe {row['server_cpu_per_s']:.2f}, Locust {row['locust_cpu_per_s']:.2f}, "
        f"others {row['others_cpu_per_s']:.2f}"
    )


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.0f}"  # NaN: no such request


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Overload",
        "",
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores; "
        f"`{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"One worker, batch size 8, max batch delay 5 ms; Locust `explain` (raw photos, both maps), closed loop, "
        f"no retry, {args.pause_after_503:g} s pause after a 503; "
        f"{args.seconds} s per phase after a {args.warmup} s warm-up. "
        "Latency and throughput of admitted requests (200); rejected: share of all requests.",
        "",
        "| job_queue_size | users | p50 ms | p99 ms | admitted req/s | rejected 503 | 503 p50 / p99 ms "
        "| other 5xx | other failures | worker replaced | CPU s/s: TorchServe, Locust, others |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['queue']} | {r['users']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {r['admitted_per_s']:.1f} | {r['rejected_share']:.1%} "
            f"| {_ms(r['rejected_p50_ms'])} / {_ms(r['rejected_p99_ms'])} "
            f"| {r['other_5xx']} | {r['other_failures']} | {'yes' if r['worker_replaced'] else 'no'} "
            f"| {r['server_cpu_per_s']:.2f}, {r['locust_cpu_per_s']:.2f}, {r['others_cpu_per_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """The overload run ``loadtest/overload.py`` asks for with its flags ``args``.

    Returns 0, or 1 on failures other than 503 or a replaced worker.
    """
    # SIGTERM (and SIGINT, which a background job ignores) unwind like Ctrl-C: the server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    queue_sizes = args.queue_sizes or sorted({TORCHSERVE_DEFAULT_QUEUE, configured_queue_size()}, reverse=True)
    args.report_dir.mkdir(parents=True, exist_ok=True)
    build_or_exit(ArchiveOptions("efficientnet_lite0", export_path=STORE, batch_size=8, max_batch_delay=5))
    rows = []
    for queue_size in queue_sizes:
        quiet = None if args.no_wait else args.quiet
        rows += measure(
            queue_size,
            args.users,
            args.seconds,
            args.warmup,
            args.pause_after_503,
            quiet,
            args.repeats,
            args.port_base,
            args.report_dir,
        )
    text = report(rows, args)
    (args.report_dir / "overload.md").write_text(text)
    (args.report_dir / "overload.json").write_text(json.dumps(rows, indent=2))
    print("\n" + text + f"\nreport in {args.report_dir}")
    bad = [r for r in rows if r["other_5xx"] or r["other_failures"] or r["worker_replaced"]]
    if bad:
        print(f"FAILED: {len(bad)} phase(s) with failures other than 503, or a replaced worker", file=sys.stderr)
        return 1
    return 0
