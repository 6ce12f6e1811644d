#!/usr/bin/env python3
"""Write real photographs that ship with scikit-image to build/samples/ (JPEG and PNG).

They are the example images of the README, the client and `make serve`'s printed request
(``evaluation.photos.write_samples``).

    python scripts/samples.py [FOLDER]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.photos import write_samples

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, default=ROOT / "build" / "samples")
    args = parser.parse_args(argv)
    for path in write_samples(args.folder):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
