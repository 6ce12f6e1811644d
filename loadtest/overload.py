#!/usr/bin/env python3
"""``make overload``: what one worker does with more users than it can serve.

    python loadtest/overload.py [--queue-sizes 100 16] [--users 4 64 200] [--seconds 40]
                                [--warmup 10] [--pause-after-503 1] [--quiet 0.2] [--port-base 29000]

For each ``job_queue_size`` (default: TorchServe's 100 and config.properties') it starts
its own TorchServe (ports ``--port-base`` .. +5) with EfficientNet-Lite0 built by
``scripts/build_mar.py`` into ``build/overload/model_store`` (one worker, batch size 8,
max batch delay 5 ms, as ``make loadtest``), warms it up, then runs Locust's ``explain``
scenario (raw photos of the load test's mix, both maps, every answer checked) with each
number of closed-loop users for ``--seconds``.

The users do not retry a 503 (``DVE_RETRY_503=0``), so every request is a first
attempt. A user turned away sends its next, new request after ``--pause-after-503``
seconds (default 1: a client told the server is busy does not come straight back; with
0, users turned away come back hundreds of times a second, and on a 2-core machine that
takes the CPU the worker needs).

Per phase it reports, for the admitted requests (HTTP 200 with a correct answer), p50
and p99 latency and throughput; the share of all requests rejected with 503, and how
fast they were (TorchServe's answer when the model's queue is full: "Model ... has no
worker to serve inference request. Please use scale workers API to add workers. ...");
any other 5xx or failure; whether the worker's PID changed; and the CPU seconds per
second used by TorchServe, by Locust (on the same machine) and by every other process.

The machine may be shared: one core taken by something else cuts the worker's
throughput many times over. So each phase starts once other processes use under
``--quiet`` CPU seconds per second, and is measured again (up to ``--repeats`` times)
if they used more while it ran.

Writes ``overload.md`` and ``overload.json`` to ``build/overload/<time>/``. Exits 1 if
any request failed otherwise than with a 503, or the worker was replaced.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from serving.load import overload

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--queue-sizes",
        type=int,
        nargs="+",
        help=(
            f"job_queue_size values (default: TorchServe's {overload.TORCHSERVE_DEFAULT_QUEUE} and config.properties')"
        ),
    )
    parser.add_argument("--users", type=int, nargs="+", default=[4, 64, 200])
    parser.add_argument("--seconds", type=int, default=40, help="length of each measured phase")
    parser.add_argument(
        "--warmup", type=int, default=10, help="seconds of 4 users before the phases of each server (0: none)"
    )
    parser.add_argument(
        "--pause-after-503",
        type=float,
        default=1.0,
        help="seconds a rejected user waits before its next request (0: none)",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.2,
        help="before each phase, wait (up to 15 min) until other processes use less CPU s/s than this",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="times a phase is measured again when others used over --quiet during it"
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="start each phase at once and never repeat it, busy machine or not"
    )
    parser.add_argument("--port-base", type=int, default=overload.PORT_BASE)
    parser.add_argument("--report-dir", type=Path, default=ROOT / "build" / "overload" / time.strftime("%Y%m%d-%H%M%S"))
    return overload.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
