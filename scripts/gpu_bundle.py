#!/usr/bin/env python3
"""``make gpu-bundle``: what ``scripts/gpu_check.sh`` needs on a GPU machine that has only PyTorch.

    python scripts/gpu_bundle.py [--out build/gpu]

A GPU machine lent for a few minutes has PyTorch (with torchvision, numpy and Pillow) and
no package index. This copies, from this project's virtual environment, the pure-Python
packages the CUDA tests and the CUDA bench import (TorchServe's ``ts`` without its Java
frontend, the EfficientNet-Lite0 model and its weights, Captum for the stock handler,
pytest, PyYAML), and writes the sample photos as JPEG files (scikit-image, which ships
them, is compiled). About 32 MB: small enough to travel with the working tree
(``serving/gpu_bundle.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.gpu_bundle import PACKAGES, PHOTOS, write_bundle

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu")
    args = parser.parse_args(argv)
    size = write_bundle(args.out)
    print(f"wrote {args.out} ({size / 1e6:.0f} MB): {', '.join(PACKAGES)}; photos {', '.join(PHOTOS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
