"""How the served cost grows with the photo's size and with concurrent users.

``loadtest/scaling.py`` (``make scaling``) is its command line, and describes the run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import requests

from serving import server as ts_server
from serving.load.photos import load_sizes
from serving.load.runner import NO_MAPS, OURS, PORT_BASE, STOCK, build_archives, run_locust, summarize

ROOT = Path(__file__).resolve().parent.parent.parent


def by_input_size(server: ts_server.Server, count: int) -> list[dict]:
    token = server.token()
    rows = []
    targets = {
        "stock": (STOCK, None),
        "ours, 224 px maps": (OURS, None),
        "ours, original-size maps": (OURS, {"map_size": "original"}),
    }
    for photo in load_sizes():
        row = {"photo": photo.name, "megapixels": photo.width * photo.height / 1e6, "jpeg_kb": len(photo.data) / 1e3}
        for label, (model, options) in targets.items():
            latencies, size = [], 0
            for i in range(count + 1):
                headers = {"Authorization": f"Bearer {token}"}
                start = time.perf_counter()
                if options is None:
                    response = requests.post(
                        f"{server.inference_url}/predictions/{model}",
                        data=photo.data,
                        headers={**headers, "Content-Type": "image/jpeg"},
                        timeout=120,
                    )
                else:
                    files = {"image": (photo.name, photo.data, "image/jpeg")}
                    response = requests.post(
                        f"{server.inference_url}/predictions/{model}",
                        files=files,
                        data=options,
                        headers=headers,
                        timeout=120,
                    )
                elapsed = (time.perf_counter() - start) * 1000.0
                response.raise_for_status()
                if i:  # the first request warms caches up
                    latencies.append(elapsed)
                size = len(response.content)
            row[label] = (statistics.median(latencies), size)
        rows.append(row)
        print(
            f"  {photo.name}: " + ", ".join(f"{k} {v[0]:.0f} ms" for k, v in row.items() if isinstance(v, tuple)),
            flush=True,
        )
    return rows


def by_users(server: ts_server.Server, users: list[int], seconds: int, report_dir: Path) -> dict[int, dict]:
    results = {}
    for n in users:
        log = report_dir / f"users-{n}.jsonl"
        for scenario in ("stock", "explain"):
            run_locust(server, scenario, n, seconds, report_dir / f"users-{n}-{scenario}", log)
        results[n] = summarize(log, {"stock": seconds, "explain": seconds})
    return results


def write_report(sizes: list[dict], users: dict[int, dict], report_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k for k in sizes[0] if isinstance(sizes[0][k], tuple)]
    lines = ["## Latency and response size against the photo's size (one request at a time)", ""]
    lines.append("| photo | MP | JPEG KB | " + " | ".join(f"{label}: p50 ms / KB" for label in labels) + " |")
    lines.append("| --- | ---: | ---: | " + " | ".join("---:" for _ in labels) + " |")
    for row in sizes:
        cells = " | ".join(f"{row[label][0]:.0f} / {row[label][1] / 1e3:.1f}" for label in labels)
        lines.append(f"| {row['photo']} | {row['megapixels']:.2f} | {row['jpeg_kb']:.0f} | {cells} |")
    lines += ["", "## Throughput and latency against concurrent users (closed loop)", ""]
    lines.append(
        "| users | stock req/s | ours req/s | ratio | stock p50 ms | ours p50 ms | stock p95 ms | ours p95 ms |"
    )
    lines.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, summary in users.items():
        a, b = summary["stock"], summary["explain"]
        lines.append(
            f"| {n} | {a['rps']:.1f} | {b['rps']:.1f} | {b['rps'] / a['rps']:.2f} "
            f"| {a['p50']:.0f} | {b['p50']:.0f} | {a['p95']:.0f} | {b['p95']:.0f} |"
        )
    (report_dir / "scaling.md").write_text("\n".join(lines) + "\n")

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    megapixels = [row["megapixels"] for row in sizes]
    for label in labels:
        ax1.plot(megapixels, [row[label][0] for row in sizes], marker="o", label=label)
        ax2.plot(megapixels, [row[label][1] / 1e3 for row in sizes], marker="o", label=label)
    ax1.set(xscale="log", xlabel="photo megapixels", ylabel="p50 latency (ms)", title="latency vs photo size")
    ax2.set(
        xscale="log", yscale="log", xlabel="photo megapixels", ylabel="response KB", title="response size vs photo size"
    )
    counts = list(users)
    for scenario, label in (("stock", "stock"), ("explain", "ours, with maps")):
        ax3.plot(counts, [users[n][scenario]["rps"] for n in counts], marker="o", label=f"{label}: req/s")
    ax3.set(xlabel="concurrent users", ylabel="requests/s", title="throughput vs users")
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report_dir / "scaling.png", dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """The scaling run ``loadtest/scaling.py`` asks for with its flags ``args``; writes its report, returns 0."""
    args.report_dir.mkdir(parents=True, exist_ok=True)
    store = ROOT / "build" / "loadtest" / "model_store"
    build_archives(store, batch_size=8, max_batch_delay=5)
    run_dir = ROOT / "build" / "loadtest" / "server"
    server = ts_server.start([OURS, NO_MAPS, STOCK], run_dir=run_dir, model_store=store, port_base=PORT_BASE)
    try:
        print("input size:", flush=True)
        sizes = by_input_size(server, args.requests)
        print("concurrent users:", flush=True)
        users = by_users(server, args.users, args.seconds, args.report_dir)
    finally:
        ts_server.stop(run_dir)
    write_report(sizes, users, args.report_dir)
    print((args.report_dir / "scaling.md").read_text())
    print(f"plot: {args.report_dir / 'scaling.png'}")
    return 0
