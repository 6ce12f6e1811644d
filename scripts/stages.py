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
preprocessing, same weights rules), or loaded from an archive with ``--archive``.

EfficientNet-Lite0 uses the real ImageNet weights its package ships. VGG-16's weights
cannot be downloaded without a network: pass torchvision's state dict with --weights,
or --random-weights to see the stages of an untrained VGG-16 (the title says so: its
maps show the architecture, not what a trained model looks at). The default images
are scikit-image's chelsea, coffee, rocket and astronaut.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handler.errors import RequestError  # noqa: E402
from handler.explainer import Explainer, Result  # noqa: E402
from handler import imaging  # noqa: E402
from handler.imaging import CropGeometry  # noqa: E402
from handler.models import EFFICIENTNET_LITE0, build_model, torchvision_classifiers  # noqa: E402
from handler.options import MIN_MAP_SIZE, parse_request  # noqa: E402
from scripts import build_mar, quality  # noqa: E402

DEFAULT_IMAGES = ("chelsea", "coffee", "rocket", "astronaut")  # scikit-image's photographs
DEFAULT_OUT = ROOT / "build" / "figures" / "stages.png"


class FigureError(RuntimeError):
    """A problem the user can fix; printed on one line without a traceback."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EFFICIENTNET_LITE0, help=f"{EFFICIENTNET_LITE0} (default), vgg16 or another torchvision classifier")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help="the model's state dict (.pth); VGG-16: vgg16-397923af.pth")
    source.add_argument("--random-weights", action="store_true", help="an untrained model (the figure's title says so)")
    source.add_argument("--download", action="store_true", help="torchvision's ImageNet weights (needs a network)")
    source.add_argument("--archive", type=Path, help="a model archive built by scripts/build_mar.py, loaded as a worker loads it")
    parser.add_argument("--images", nargs="+", type=Path, help="image files (default: scikit-image's " + ", ".join(DEFAULT_IMAGES) + ")")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the PNG to write (default build/figures/stages.png)")
    parser.add_argument("--panel", type=int, default=160, help="side of each panel in pixels (default 160)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser.parse_args(argv)


def load_explainer(args: argparse.Namespace, device: torch.device) -> tuple[Explainer, str]:
    """The explainer and a description of its weights, built as an archive would be."""
    if args.archive:
        if not args.archive.is_file():
            raise FigureError(f"no archive {args.archive}; build one with scripts/build_mar.py")
        from scripts.explain import load_archive

        explainer = load_archive(args.archive, device)
        return explainer, f"{explainer.config.architecture} from {args.archive.name}"
    if args.model not in (EFFICIENTNET_LITE0, *torchvision_classifiers()):
        raise FigureError(f"unknown model {args.model!r}: use {EFFICIENTNET_LITE0}, vgg16 or a torchvision classifier name (or --archive)")
    if args.model != EFFICIENTNET_LITE0 and not (args.weights or args.random_weights or args.download):
        raise FigureError(
            f"{args.model} needs weights: --weights FILE (its state dict), --download (needs a network) "
            f"or --random-weights (an untrained model: the figure then shows the architecture only)"
        )
    build_args = build_mar.parse_args(
        [args.model]
        + (["--weights", str(args.weights)] if args.weights else [])
        + (["--random-weights"] if args.random_weights else [])
        + (["--download"] if args.download else [])
    )
    labels = build_mar.class_labels(build_args)
    config = build_mar.serving_config(build_args, labels)  # the archive's preprocessing
    if args.random_weights:  # the weights build_mar --random-weights writes, without the file
        torch.manual_seed(0)
        model = build_model(config.architecture, config.num_classes)
        return Explainer(model, config, labels, device), f"{args.model}, RANDOM weights (untrained): the maps show the architecture, not what a trained model sees"
    with tempfile.TemporaryDirectory(prefix="stages_") as tmp:
        try:
            weights = build_mar.weights_file(build_args, config, Path(tmp))
        except build_mar.BuildError as exc:
            raise FigureError(" ".join(str(exc).split())) from None
        try:
            explainer = Explainer.from_files(config, weights=weights, labels=labels, device=device)
        except (ValueError, RuntimeError) as exc:
            raise FigureError(f"the model does not load: {exc}") from None
    source = args.weights.name if args.weights else "torchvision's ImageNet weights" if args.download else "ImageNet weights from its package"
    return explainer, f"{args.model}, {source}"


def read_images(paths: list[Path] | None) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image: the given files, or scikit-image's photographs as PNG."""
    if paths:
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise FigureError(f"image file(s) not found: {', '.join(missing)}")
        return [(path.stem, path.read_bytes()) for path in paths]
    return [(name, imaging.encode_png(photo)) for name, photo in quality.load_photos(list(DEFAULT_IMAGES)).items()]


def map_size_for(image: Image.Image, explainer: Explainer, panel: int) -> int:
    """The long side of the maps at which the model's crop covers at least ``panel`` pixels."""
    config = explainer.config
    geometry = CropGeometry.centre_crop(image.width, image.height, config.resize_size, config.crop_size)
    size = int(np.ceil(panel * max(image.width, image.height) / geometry.side))
    return max(MIN_MAP_SIZE, min(size, config.limits.max_map_size))


def explain_stages(explainer: Explainer, images: list[tuple[str, bytes]], panel: int) -> list[Result]:
    """One batch through the handler's path: each image with "stages": true, overlays only."""
    config = explainer.config
    requests = []
    for _, data in images:
        try:
            upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
            fields = {
                "image": data, "topk": "1", "explanations": "none", "format": "overlay",
                "map_size": str(map_size_for(upright, explainer, panel)), "stages": "true",
            }
            requests.append(parse_request(fields, content_type=None, defaults=config.defaults, limits=config.limits, num_classes=config.num_classes))
        except RequestError as error:
            requests.append(error)
        except Exception as exc:  # Pillow could not even open it: let the explainer say why
            requests.append(RequestError(f"the data is not an image Pillow reads: {exc}"))
    return explainer.run(requests)


def crop_panel(image: Image.Image, explainer: Explainer, panel: int) -> Image.Image:
    """The model's centre crop of ``image`` (photo or overlay at any scale), ``panel`` pixels square."""
    config = explainer.config
    geometry = CropGeometry.centre_crop(image.width, image.height, config.resize_size, config.crop_size)
    box = (geometry.left, geometry.top, geometry.left + geometry.side, geometry.top + geometry.side)
    return image.resize((panel, panel), Image.Resampling.LANCZOS, box=box)


def draw_figure(rows: list[tuple[str, Image.Image, dict]], explainer: Explainer, title: str, panel: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + len(explainer.stages)
    inches = panel / 100.0
    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * (inches + 0.3), len(rows) * (inches + 0.7) + 0.6), squeeze=False)
    for row, (name, photo, body) in zip(axes, rows):
        top = body["predictions"][0]
        row[0].imshow(crop_panel(photo, explainer, panel))
        row[0].set_title(f"{name}\n{top['label']} ({top['probability']:.0%})", fontsize=8)
        for axis, stage in zip(row[1:], body["stages"]):
            overlay = Image.open(io.BytesIO(base64.b64decode(stage["dve"]["data"]))).convert("RGB")
            axis.imshow(crop_panel(overlay, explainer, panel))
            axis.set_title(f"{stage['layer']}\n{' x '.join(map(str, stage['shape']))}", fontsize=8)
        for axis in row:
            axis.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        if args.panel < 32:
            raise FigureError(f"--panel must be at least 32 pixels, got {args.panel}")
        images = read_images(args.images)
        explainer, weights = load_explainer(args, device)
    except FigureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{weights}; stages: " + ", ".join(f"{stage} {'x'.join(map(str, stage.shape))}" for stage in explainer.stages))
    results = explain_stages(explainer, images, args.panel)
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
    draw_figure(rows, explainer, f"DVE at every stage (Fig. 7): {weights}", args.panel, args.out)
    print(f"wrote {args.out}")
    return 0 if len(rows) == len(images) else 1


if __name__ == "__main__":
    sys.exit(main())
