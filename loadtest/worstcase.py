#!/usr/bin/env python3
"""``make worstcase``: the most expensive requests the limits allow, against a real TorchServe.

    python loadtest/worstcase.py [--batch 8] [--max-seconds 2] [--max-seconds-heic 3] [--max-extra-mb 500]

For every format (png, overlay, array) x stages (off, on), with both explanations,
``class_conditional`` and the largest ``topk``, it asks for the largest ``map_size`` the
archive's limits allow on the largest image they allow, in three kinds:

* ``png``: a PNG of ``max_image_pixels`` pixels that is almost all header (black RGBA,
  the costliest mode to decode: 4 bytes a pixel, then laid on white), a few hundred KB;
* ``jpeg``: a JPEG of noise with as many pixels and as high a quality as
  ``max_image_bytes`` allows (noise decodes slowest and makes overlays incompressible);
* ``heic``: a HEIC of ``max_image_pixels`` pixels. HEVC has no reduced-scale decoding
  (a JPEG is decoded at 1/8 of its size here): libheif decodes every pixel, about 1.5 s
  for 50 MP on 2 cores by itself, so its budget alone is ``--max-seconds-heic``.

Each request is sent alone, then ``--batch`` copies at once (one full batch), to a
TorchServe it starts (ports 28280-28285) and stops. For each it reports the time, the
worker's peak resident memory above what it held before (the kernel's high-water mark,
reset before each run) and the answer's size; and that one more pixel of map is refused
with 413. It exits 1 if any request alone took over its ``--max-seconds`` or over
``--max-extra-mb``, any answer was over ``max_response_bytes`` or neither 200 nor 4xx,
the full batch took over a quarter of the response timeout, or the worker was replaced.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.load import worstcase

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--batch", type=int, default=8, help="requests sent at once for the full batch (the archive's batchSize)"
    )
    parser.add_argument("--max-seconds", type=float, default=2.0, help="budget of one request alone")
    parser.add_argument(
        "--max-seconds-heic", type=float, default=3.0, help="budget of one HEIC request alone (decoded whole)"
    )
    parser.add_argument("--max-extra-mb", type=float, default=500.0, help="budget of one request's extra worker memory")
    parser.add_argument("--response-timeout", type=int, default=120, help="the archive's responseTimeout")
    return worstcase.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
