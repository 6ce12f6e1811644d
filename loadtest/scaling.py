#!/usr/bin/env python3
"""How the served cost grows with the photo's size and with concurrent users.

    python loadtest/scaling.py [--requests 10] [--users 1 2 4 8] [--seconds 20]

Against a TorchServe it starts (the same three archives as ``make loadtest``):

* input size: one photo as JPEG from 96 x 64 to 4000 x 2667 (10.7 MP), sent one at a
  time; p50 latency and response size for the stock handler, ours with the default
  224 px maps, and ours with original-size maps;
* concurrent users: Locust phases with 1, 2, 4, 8 closed-loop users against ours with
  explanations and the stock handler, alternating: requests/s, p50, p95.

Writes ``scaling.md`` and ``scaling.png`` into the report folder
(``build/loadtest/scaling-<time>/``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from serving.load import scaling

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument(
        "--report-dir", type=Path, default=ROOT / "build" / "loadtest" / time.strftime("scaling-%Y%m%d-%H%M%S")
    )
    return scaling.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
