#!/usr/bin/env python3
"""``make loadtest``: Locust against a real TorchServe it starts and stops itself.

    python loadtest/run.py [--users 4] [--spawn-rate 4] [--duration 2m]
                           [--compare-rounds 3] [--compare-seconds 20] [--no-compare]

1. Builds three archives of EfficientNet-Lite0 with the same real weights and batching:
   ours (``efficientnet_lite0``), ours answering without maps by default
   (``efficientnet_lite0_noexplain``), and TorchServe's stock ``image_classifier``
   handler (``efficientnet_lite0_stock``), and serves them from one TorchServe.
2. The load test: ``--users`` closed-loop clients for ``--duration`` send the mix of
   ``serving/load/users.py`` (photos of many sizes, JPEG and PNG, both endpoints,
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
import sys
import time
from pathlib import Path

from serving.load import runner

ROOT = Path(__file__).resolve().parent.parent


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
    parser.add_argument(
        "--torch-threads", type=int, help="PyTorch threads per worker (OMP_NUM_THREADS); default: PyTorch's own"
    )
    parser.add_argument("--report-dir", type=Path, default=ROOT / "build" / "loadtest" / time.strftime("%Y%m%d-%H%M%S"))
    return runner.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
