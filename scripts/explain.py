#!/usr/bin/env python3
"""Explain local image files without a server, through the handler's own code path.

    python scripts/explain.py IMAGE... [--archive model_store/efficientnet_lite0.mar]
                              [--out build/explain] [--topk 5] [--map-size 224]
                              [--explanations dve,targeted_dve] [--device auto]

The archive is loaded exactly as a TorchServe worker loads it (its model, weights,
labels and ``model-config.yaml``: ``handler.loading.load_archive``), and each image is
answered by the same ``Explainer`` the handler runs. For each image it writes
``<image>.json`` (the JSON the server would return), the maps as PNG files and an
overlay with the salient box (as ``scripts/client.py`` does), and prints the top
predictions. Useful to debug a model
offline, or to explain images in bulk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from handler.loading import DEVICES, choose_device, load_archive
from serving.client import save_outputs

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--archive", type=Path, default=ROOT / "model_store" / "efficientnet_lite0.mar")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "explain")
    parser.add_argument("--topk", default="5")
    parser.add_argument("--map-size", default="224", help='long side of the maps in pixels, or "original"')
    parser.add_argument("--explanations", default="dve,targeted_dve")
    parser.add_argument("--device", default="auto", choices=list(DEVICES))
    args = parser.parse_args(argv)
    if not args.archive.is_file():
        print(f"error: no archive {args.archive}; build one with scripts/build_mar.py (make archives)", file=sys.stderr)
        return 2
    device = choose_device(args.device)
    explainer = load_archive(args.archive, device)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in args.images:
        fields = {
            "image": path.read_bytes(),
            "topk": args.topk,
            "map_size": args.map_size,
            "explanations": args.explanations,
        }
        (result,) = explainer.run([explainer.parse(fields)])
        (args.out / f"{path.stem}.json").write_bytes(result.to_bytes())
        if result.status != 200:
            print(f"{path}: HTTP {result.status}: {result.body['message']}")
            failed += 1
            continue
        body = result.body
        print(f"{path}  ({body['image']['width']} x {body['image']['height']}, layer {body['layer']})")
        for prediction in body["predictions"]:
            print(f"  {prediction['probability']:7.2%}  {prediction['label']} ({prediction['index']})")
        for written in save_outputs(path, body, args.out):
            print(f"  wrote {written}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
