#!/usr/bin/env python3
"""Ask a running server why it classified each image as it did.

    python scripts/client.py IMAGE... [--model efficientnet_lite0] [--url http://127.0.0.1:8080]
                             [--out build/client] [--topk 5] [--map-size 224]

For each image it prints the top predictions and writes, into ``--out``:
``<image>_dve.png`` and ``<image>_targeted_dve.png`` (the 8-bit maps, aligned to the
image) and ``<image>_overlay.png`` (the photo coloured by DVE beside targeted DVE with
its salient box). The token is read from TorchServe's ``key_file.json``.

A 503 (the model's queue is full) is retried with exponential backoff and jitter, at
most ``--tries`` attempts and ``--retry-budget`` seconds of waiting in all, honouring a
``Retry-After`` header (``scripts/backoff.py``); any other error is final.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handler.rendering import overlay  # noqa: E402  (the server's own colouring)
from scripts.backoff import Backoff, call  # noqa: E402

DEFAULT_KEY_FILE = ROOT / "build" / "serve" / "key_file.json"


def _send(request: urllib.request.Request) -> tuple[int, Mapping[str, str], bytes]:
    """One attempt: status, headers and body, for success and HTTP errors alike."""
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def explain(url: str, model: str, token: str, image: bytes, options: dict, retry: Backoff = Backoff()) -> dict:
    """POSTs one image as JSON (base64) and returns the decoded response; retries 503 as ``retry`` says."""
    body = json.dumps({"image": base64.b64encode(image).decode("ascii"), **options}).encode()
    request = urllib.request.Request(
        f"{url.rstrip('/')}/predictions/{model}",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        (status, _, payload), tries = call(lambda: _send(request), lambda a: a[0], lambda a: a[1], retry)
    except urllib.error.URLError as error:
        raise SystemExit(f"error: cannot reach {url}: {error.reason} (is the server running? `make serve`)") from None
    if not 200 <= status < 300:
        detail = payload.decode("utf-8", "replace")
        after = f" after {tries} tries" if tries > 1 else ""
        raise SystemExit(f"error: HTTP {status} from the server{after}: {detail}")
    return json.loads(payload)


def save_outputs(path: Path, response: dict, out: Path) -> list[Path]:
    """Writes the maps and a side-by-side overlay with the salient box; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    photo = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    panels = []
    for name, entry in response["explanations"].items():
        target = out / f"{path.stem}_{name}.png"
        target.write_bytes(base64.b64decode(entry["data"]))
        written.append(target)
        gray = np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["data"]))).convert("L"))
        panel = Image.fromarray(overlay(photo, gray))
        if entry.get("box"):
            scale = panel.width / response["image"]["width"]
            ImageDraw.Draw(panel).rectangle([round(v * scale) for v in entry["box"]], outline=(255, 255, 255), width=2)
        panels.append(panel)
    if panels:
        sheet = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)))
        x = 0
        for panel in panels:
            sheet.paste(panel, (x, 0))
            x += panel.width
        target = out / f"{path.stem}_overlay.png"
        sheet.save(target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE, help="TorchServe's key_file.json")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "client")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--map-size", default="224", help='long side of the maps in pixels, or "original"')
    parser.add_argument("--tries", type=int, default=Backoff.tries, help="attempts per image when the server answers 503 (1: no retry)")
    parser.add_argument("--retry-budget", type=float, default=Backoff.budget, help="most seconds to wait between those attempts, in all")
    args = parser.parse_args(argv)
    if args.tries < 1 or args.retry_budget < 0:
        parser.error("--tries must be at least 1 and --retry-budget not negative")
    retry = Backoff(tries=args.tries, budget=args.retry_budget)
    try:
        token = json.loads(args.key_file.read_text())["inference"]["key"]
    except (OSError, ValueError, KeyError):
        raise SystemExit(f"error: no inference key in {args.key_file}; start the server with `make serve` or pass --key-file")
    map_size = args.map_size if args.map_size == "original" else int(args.map_size)
    options = {"topk": args.topk, "map_size": map_size, "format": "png", "explanations": ["dve", "targeted_dve"]}
    for path in args.images:
        response = explain(args.url, args.model, token, path.read_bytes(), options, retry)
        print(f"{path}  ({response['image']['width']} x {response['image']['height']})")
        for prediction in response["predictions"]:
            print(f"  {prediction['probability']:7.2%}  {prediction['label']} ({prediction['index']})")
        box = response["explanations"].get("targeted_dve", {}).get("box")
        print(f"  salient patch (targeted DVE): {box}")
        for written in save_outputs(path, response, args.out):
            print(f"  wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
