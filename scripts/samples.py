#!/usr/bin/env python3
"""Write real photographs that ship with scikit-image to build/samples/ (JPEG and PNG).

They are the example images of the README, the client and `make serve`'s printed request.
"""

from __future__ import annotations

import sys
from pathlib import Path

import skimage.data
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = {"chelsea.jpg": "chelsea", "coffee.jpg": "coffee", "rocket.jpg": "rocket", "astronaut.png": "astronaut"}


def write_samples(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, name in PHOTOS.items():
        path = folder / filename
        if not path.exists():
            Image.fromarray(getattr(skimage.data, name)()).save(path, quality=92)
        written.append(path)
    return written


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "samples"
    for path in write_samples(folder):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
