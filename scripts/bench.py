#!/usr/bin/env python3
"""What an explanation costs next to the prediction alone, measured side by side in-process.

    python scripts/bench.py [--models efficientnet_lite0 vgg16] [--batch-sizes 1 8 32]
                            [--repeats 15] [--budget 40] [--device auto|cpu|cuda]

What each variant is and how it is measured: ``serving/bench.py`` (below).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from handler.loading import DEVICES, choose_device
from serving import bench

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__ + "\n" + bench.__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "vgg16"], choices=bench.MODELS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=15, help="repetitions at most (at least 3)")
    parser.add_argument("--budget", type=float, default=40.0, help="seconds of timed runs per model and batch size")
    parser.add_argument("--device", default="auto", choices=list(DEVICES))
    parser.add_argument("--sections", nargs="+", default=["dve", "throughput"], choices=["dve", "throughput"])
    parser.add_argument("--throughput-batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--throughput-budget", type=float, default=20.0, help="seconds of timed runs per batch size")
    args = parser.parse_args(argv)
    device = choose_device(args.device)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"
    )
    print(f"device: {where}; torch {torch.__version__}; medians of interleaved repeats")
    photos = bench.jpeg_photos()
    if "dve" in args.sections:
        bench.dve_costs(args.models, sorted(args.batch_sizes), device, photos, args.repeats, args.budget)
    if "throughput" in args.sections:
        bench.throughput(device, args.throughput_batch_sizes, photos, args.throughput_budget, ROOT / "build" / "bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
