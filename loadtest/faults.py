#!/usr/bin/env python3
"""Faults under load, and a soak run: what breaks, for how long, and what comes back.

    python loadtest/faults.py kill-worker   # SIGKILL the worker during a Locust run
    python loadtest/faults.py restart       # torchserve --stop, then --start, under load
    python loadtest/faults.py timeout       # a request slower than the model's responseTimeout (limits lifted)
    python loadtest/faults.py soak --minutes 10   # the documented load; worker memory over time
    python loadtest/faults.py all

Each runs against a TorchServe it starts (ports 28180-28185) and stops, with Locust
(closed loop, ``--users``, default 4) sending raw photos with both explanations, and
prints what happened with timestamps: requests failed while the fault lasted, and
requests (and failures) after it. The reports go to ``build/faults/<time>/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from serving.load import faults

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fault", choices=["kill-worker", "restart", "timeout", "soak", "all"])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration")
    parser.add_argument("--report-dir", type=Path, default=ROOT / "build" / "faults" / time.strftime("%Y%m%d-%H%M%S"))
    return faults.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
