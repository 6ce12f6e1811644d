#!/usr/bin/env python3
"""Fig. 7 of the paper: DVE at every stage of a model ("how a DCNN compresses information").

    python scripts/stages.py [--model efficientnet_lite0|vgg16|<torchvision name>]
                             [--weights FILE | --random-weights | --download]
                             [--archive MODEL.mar] [--images IMAGE ...]
                             [--out build/figures/stages.png] [--panel 160] [--device auto]

One row per image: the crop the model sees, titled with the predicted label, then the
DVE overlay at each stage (VGG-16: pool1..pool5; other models: the end of each spatial
resolution, see ``handler.layers.find_stages``), titled with the layer and the shape of
its feature maps. The last stage is the layer the response's ``dve`` map explains.

The maps come from the handler's own code path: the images go through
``handler.options.parse_request`` and one batch of ``handler.explainer.Explainer.run``
with ``"stages": true`` and ``"format": "overlay"``, exactly what a TorchServe worker
answers. The model is built as ``scripts/build_mar.py`` builds an archive (same
preprocessing, same weights rules: ``serving.archive``), or loaded from an archive with
``--archive``. The drawing is ``evaluation/figures.py``'s.

EfficientNet-Lite0 uses the real ImageNet weights its package ships. VGG-16's weights
cannot be downloaded without a network: pass torchvision's state dict with --weights,
or --random-weights to see the stages of an untrained VGG-16 (the title says so: its
maps show the architecture, not what a trained model looks at). The default images
are scikit-image's chelsea, coffee, rocket and astronaut.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image, ImageOps

from evaluation import figures
from evaluation.figures import FigureError
from handler.loading import DEVICES, choose_device
from handler.models import EFFICIENTNET_LITE0

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "build" / "figures" / "stages.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=EFFICIENTNET_LITE0,
        help=f"{EFFICIENTNET_LITE0} (default), vgg16 or another torchvision classifier",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help="the model's state dict (.pth); VGG-16: vgg16-397923af.pth")
    source.add_argument("--random-weights", action="store_true", help="an untrained model (the figure's title says so)")
    source.add_argument("--download", action="store_true", help="torchvision's ImageNet weights (needs a network)")
    source.add_argument(
        "--archive", type=Path, help="a model archive built by scripts/build_mar.py, loaded as a worker loads it"
    )
    parser.add_argument(
        "--images",
        nargs="+",
        type=Path,
        help="image files (default: scikit-image's " + ", ".join(figures.STAGES_IMAGES) + ")",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="the PNG to write (default build/figures/stages.png)"
    )
    parser.add_argument("--panel", type=int, default=160, help="side of each panel in pixels (default 160)")
    parser.add_argument("--device", default="auto", choices=list(DEVICES))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = choose_device(args.device)
    try:
        if args.panel < 32:
            raise FigureError(f"--panel must be at least 32 pixels, got {args.panel}")
        images = figures.read_images(args.images)
        explainer, weights = figures.stages_explainer(
            device,
            args.model,
            weights=args.weights,
            random_weights=args.random_weights,
            download=args.download,
            archive=args.archive,
        )
    except FigureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{weights}; stages: " + ", ".join(f"{stage} {'x'.join(map(str, stage.shape))}" for stage in explainer.stages)
    )
    results = figures.explain_stages(explainer, images, args.panel)
    timings = explainer.timings
    print(
        f"one batch of {len(images)} with stages on {device}: forward {timings.forward:.0f} ms, "
        f"DVE {timings.dve:.0f} ms, rendering {timings.encode:.0f} ms"
    )
    rows = []
    for (name, data), result in zip(images, results):
        if result.status != 200:
            print(f"{name}: HTTP {result.status}: {result.body['message']}")
            continue
        top = result.body["predictions"][0]
        print(f"{name}: {top['label']} ({top['probability']:.1%})")
        rows.append((name, ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"), result.body))
    if not rows:
        print("error: no image could be explained", file=sys.stderr)
        return 1
    figures.draw_stages(rows, explainer, f"DVE at every stage (Fig. 7): {weights}", args.panel, args.out)
    print(f"wrote {args.out}")
    return 0 if len(rows) == len(images) else 1


if __name__ == "__main__":
    sys.exit(main())
