#!/usr/bin/env python3
"""Build a TorchServe model archive (.mar) that serves predictions with DVE explanations.

Examples:
    # The default: EfficientNet-Lite0 with the real ImageNet weights its package ships.
    python scripts/build_mar.py efficientnet_lite0

    # VGG-16, the paper's model, with a state dict you supply (or --download where
    # there is a network; --random-weights only for tests).
    python scripts/build_mar.py vgg16 --weights vgg16-397923af.pth

    # Any torchvision classifier by name, with its weights.
    python scripts/build_mar.py resnet50 --weights resnet50.pth

    # Your own fine-tuned model and labels.
    python scripts/build_mar.py custom --name skin_lesion --model-file my_net.py \
        --model-class MyNet --weights my_net.pth --labels labels.txt

The archive is checked before it is written: the model is built, its weights loaded
strictly and the explained layer found, so a broken archive fails here, not in a worker.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from handler.config import Limits
from handler.dve import DVEParams
from handler.models import CUSTOM, EFFICIENTNET_LITE0
from serving.archive import DEFAULT_EXPORT, ArchiveOptions, BuildError, build


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "architecture", help=f"{EFFICIENTNET_LITE0}, a torchvision classifier name (vgg16, resnet50, ...) or {CUSTOM}"
    )
    parser.add_argument("--name", help="model name in TorchServe's URLs (default: the architecture)")
    parser.add_argument("--version", default="1.0")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help="state dict file (.pth/.pt) of the model")
    source.add_argument("--download", action="store_true", help="torchvision's ImageNet weights (needs a network)")
    source.add_argument(
        "--random-weights", action="store_true", help="untrained weights, for tests only: explanations are meaningless"
    )
    parser.add_argument(
        "--labels",
        type=Path,
        help="class names: index_to_name.json, a JSON list or one name per line (default: ImageNet)",
    )
    parser.add_argument("--num-classes", type=int, help="number of classes (default: from the labels, else 1000)")
    parser.add_argument("--model-file", type=Path, help="custom: Python file defining the model class")
    parser.add_argument("--model-class", help="custom: name of the nn.Module subclass in --model-file")
    parser.add_argument(
        "--target-layer", help="layer to explain, e.g. features.30 or avgpool:input (default: found automatically)"
    )
    parser.add_argument("--resize-size", type=int, help="short side before the centre crop (default: the model's own)")
    parser.add_argument("--crop-size", type=int, help="side of the square input (default: the model's own)")
    parser.add_argument("--mean", type=float, nargs=3, help="per-channel mean of the [0, 1] input")
    parser.add_argument("--std", type=float, nargs=3, help="per-channel std of the [0, 1] input")
    parser.add_argument(
        "--explanations",
        default="dve,targeted_dve",
        help="maps a request gets unless it asks otherwise: dve,targeted_dve (default), one of them, or none",
    )
    parser.add_argument(
        "--dve",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="DVE parameters other than the defaults, e.g. --dve sigma_low=2 sigma_high=1 box_threshold=0.5 "
        "(the first choice before docs/explanation-quality.md); keys: " + ", ".join(f.name for f in fields(DVEParams)),
    )
    parser.add_argument(
        "--limits",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="per-request limits other than the defaults (docs/reliability.md, 'Bounded work per request'), "
        "e.g. --limits max_rendered_pixels=30000000 max_response_bytes=41943040; keys: "
        + ", ".join(f.name for f in fields(Limits)),
    )
    parser.add_argument(
        "--compile-dve",
        action="store_true",
        help=(
            "on CUDA, compile DVE's tail into CUDA graphs "
            "(torch.compile reduce-overhead; each batch size compiles once)"
        ),
    )
    parser.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize (default 8)")
    parser.add_argument("--max-batch-delay", type=int, default=5, help="TorchServe maxBatchDelay in ms (default 5)")
    parser.add_argument("--workers", type=int, default=1, help="workers per model (default 1)")
    parser.add_argument(
        "--response-timeout", type=int, default=120, help="seconds before TorchServe gives up on a batch"
    )
    parser.add_argument(
        "--export-path", type=Path, default=DEFAULT_EXPORT, help="where the .mar goes (default model_store/)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        build(ArchiveOptions(**vars(parse_args(argv))))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
