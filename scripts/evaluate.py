#!/usr/bin/env python3
"""``make evaluate``: how faithful DVE and targeted DVE are, next to Grad-CAM and two baselines.

    python scripts/evaluate.py [--steps 16] [--per-object 36] [--photos chelsea coffee ...]
                               [--quick] [--out build/evaluation]

What it measures and writes (``report.md``, ``results.json``, ``overlays.png``) is
described in ``evaluation/report.py``, which computes it. 8-9 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from evaluation import photos, report
from handler.loading import make_explainer

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (default 16)")
    parser.add_argument("--per-object", type=int, default=36, help="composites made per object (default 36)")
    parser.add_argument(
        "--photos", nargs="+", choices=sorted(photos.PHOTOS), help="photos for deletion/insertion (default all)"
    )
    parser.add_argument("--quick", action="store_true", help="only the defaults, Grad-CAM and the baselines (no sweep)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "evaluation")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    explainer = make_explainer("efficientnet_lite0", torch.device("cpu"))
    images = photos.load_photos(args.photos)
    methods = report.build_methods(explainer.config.dve, quick=args.quick)
    print(f"evaluating {len(methods)} methods on {len(images)} photos and a localisation set", file=sys.stderr)
    results, predictions, composites, made, forward_ms, examples, box_ious = report.evaluate(
        explainer, images, methods, args.steps, args.per_object, args.seed
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_overlays(args.out, explainer, examples, methods)
    text = report.write_report(
        args.out,
        args,
        explainer,
        results,
        predictions,
        composites,
        made,
        forward_ms,
        methods,
        box_ious,
        time.perf_counter() - start,
    )
    report.write_results(args.out, args.steps, explainer, predictions, composites, results, box_ious)
    print(text)
    print(
        f"\nwrote {args.out / 'report.md'}, results.json and overlays.png "
        f"in {report.clock(time.perf_counter() - start)}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
