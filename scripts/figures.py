#!/usr/bin/env python3
"""The paper's figures, one command each, drawn through the handler's own code path.

    python scripts/figures.py grid [--images chelsea coffee ... | photo.jpg ...]
                                   [--truth NAME=CLASSES ...] [--archive X.mar]
                                   [--out build/figures/grid.png]
    python scripts/figures.py blur [--image chelsea | photo.jpg] [--sigmas 0 1 2 4 8 16]
                                   [--archive X.mar] [--out build/figures/blur.png]

``grid`` (Figs. 4 and 5 of Babiker & Goebel, 2017): one row per photo with the model's
input crop, DVE, targeted DVE with its salient box, and Grad-CAM beside them; the top-1
label, its probability and whether it is right. ``blur`` (Fig. 6): the photo's input
crop blurred by a Gaussian of growing sigma; per sigma the top-1 label, its probability,
the probability of the unblurred photo's top-1 class, and DVE and targeted DVE.

Same path as the server (``evaluation/figures.py``, which draws them): the handler's
crop, forward pass with its hook, ``handler.dve.explain`` and overlays; Grad-CAM on the
same feature map, for each photo's top-1 class.

Photos: any name of ``evaluation/photos.py``'s ``PHOTOS`` (scikit-image and scikit-learn
photos) or an image file. The model: EfficientNet-Lite0 with its real ImageNet weights
(``handler.loading.make_explainer``), or any archive with ``--archive``, loaded as a
TorchServe worker loads it (``handler.loading.load_archive``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation import figures
from evaluation.saliency import model_crop
from handler.errors import RequestError
from handler.loading import DEVICES, choose_device

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--archive", type=Path, help="a .mar archive (default: EfficientNet-Lite0 with its real weights)"
    )
    common.add_argument("--device", default="auto", choices=list(DEVICES))
    grid = commands.add_parser(
        "grid", parents=[common], help="Fig. 4/5: crop, DVE, targeted DVE + box, Grad-CAM per photo"
    )
    grid.add_argument("--images", nargs="+", default=list(figures.DEFAULT_IMAGES), help="photo names or image files")
    grid.add_argument(
        "--truth",
        action="append",
        default=[],
        metavar="NAME=CLASSES",
        help="classes that count as right for a photo (index or label, comma-separated); repeatable",
    )
    grid.add_argument("--out", type=Path, default=ROOT / "build" / "figures" / "grid.png")
    sweep = commands.add_parser(
        "blur", parents=[common], help="Fig. 6: prediction and explanation against Gaussian blur"
    )
    sweep.add_argument("--image", default=figures.DEFAULT_BLUR_IMAGE, help="a photo name or an image file")
    sweep.add_argument("--sigmas", nargs="+", type=float, default=list(figures.DEFAULT_SIGMAS))
    sweep.add_argument("--truth", action="append", default=[], metavar="NAME=CLASSES", help="as for grid")
    sweep.add_argument("--out", type=Path, default=ROOT / "build" / "figures" / "blur.png")
    args = parser.parse_args(argv)

    if args.archive is not None and not args.archive.is_file():
        print(f"error: no archive {args.archive}; build one with scripts/build_mar.py (make archives)", file=sys.stderr)
        return 2
    try:
        images = [figures.load_image(spec) for spec in (args.images if args.command == "grid" else [args.image])]
        if args.command == "blur" and any(s < 0 for s in args.sigmas):
            raise ValueError("sigmas must be >= 0")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = choose_device(args.device)
    explainer, model = figures.make_model(args.archive, device)
    labels = explainer.labels
    layer = figures.gradcam_layer(explainer)
    print(f"{model}: explained layer {explainer.layer}, Grad-CAM on {layer or 'none'}, DVE {explainer.config.dve}")
    try:
        truths = figures.default_truths(explainer)
        truths.update(figures.parse_truth(spec, labels) for spec in args.truth)
        if args.command == "grid":
            rows = figures.grid_rows(explainer, images, truths)
            print(figures.grid_table(rows, labels))
            size = figures.draw_grid(rows, labels, model, args.out)
        else:
            ((name, image),) = images
            original, steps = figures.blur_sweep(explainer, model_crop(explainer, image), args.sigmas, truths.get(name))
            print(f"{name}: Gaussian blur of the model's input crop (kernel 2*ceil(3 sigma)+1)")
            print(figures.blur_table(original, steps, labels))
            size = figures.draw_blur(name, original, steps, labels, model, args.out)
    except (ValueError, RequestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({size[0]} x {size[1]} px, {figures.file_size(args.out)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
