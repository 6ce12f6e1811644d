#!/usr/bin/env python3
"""Ask a running server why it classified each image as it did.

    python scripts/client.py IMAGE... [--model efficientnet_lite0] [--url http://127.0.0.1:8080]
        [--topk K] [--explanations dve,targeted_dve|none] [--format png|overlay|array]
        [--map-size N|original] [--stages] [--class-conditional] [--target CLASS]
        [--json] [--out DIR]

The flags mirror the API's options (README, "The API"); an option not given is left to
the server's default. For each image it prints the top predictions and the salient box
and writes, into ``--out`` (default ``build/client``): each map as ``<image>_<name>.png``
(``.npy`` for ``--format array``; stage maps as ``<image>_stage<i>_<layer>.*``) and, for
PNG maps, ``<image>_overlay.png`` (the photo coloured by each map, side by side, with the
salient box). With ``--json`` it prints each raw answer as one line of JSON instead (the
server's error JSON for a failed image; ``{"code": null, ...}`` when there was no answer),
in the order of the images, and writes files only if ``--out`` is given.

Every image is answered on its own: a file that cannot be read or an image the server
refuses is reported on stderr, the others are still sent, and the exit status is 1 if
any failed. The token is read from TorchServe's ``key_file.json``; the default URL's port
is ``$PORT_BASE`` (8080 if unset), as for ``make serve``.

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
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handler.rendering import overlay  # noqa: E402  (the server's own colouring)
from scripts.backoff import Backoff, call  # noqa: E402
from scripts.server import port_base  # noqa: E402

DEFAULT_KEY_FILE = ROOT / "build" / "serve" / "key_file.json"
MAP_NAMES = ("dve", "targeted_dve")


class RequestFailed(Exception):
    """One image got no answer: an HTTP error (``status``, the server's ``body``) or no connection (``status`` None)."""

    def __init__(self, message: str, status: int | None = None, body: bytes = b""):
        super().__init__(message)
        self.status = status
        self.body = body

    def as_json(self) -> str:
        """The server's error JSON, or one of the same shape when the server sent none."""
        try:
            answer = json.loads(self.body)
            if isinstance(answer, dict):
                return json.dumps(answer, separators=(",", ":"))
        except ValueError:
            pass
        return json.dumps({"code": self.status, "type": "ClientError", "message": str(self)}, separators=(",", ":"))


def _send(request: urllib.request.Request) -> tuple[int, Mapping[str, str], bytes]:
    """One attempt: status, headers and body, for success and HTTP errors alike."""
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def explain(url: str, model: str, token: str, image: bytes, options: Mapping[str, Any], retry: Backoff = Backoff()) -> dict[str, Any]:
    """POSTs one image as JSON (base64) with ``options``; the decoded answer, or RequestFailed. Retries 503 as ``retry`` says."""
    body = json.dumps({"image": base64.b64encode(image).decode("ascii"), **options}).encode()
    request = urllib.request.Request(
        f"{url.rstrip('/')}/predictions/{model}",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        (status, _, payload), tries = call(lambda: _send(request), lambda a: a[0], lambda a: a[1], retry)
    except urllib.error.URLError as error:
        raise RequestFailed(f"cannot reach {url}: {error.reason} (is the server running? `make serve`)") from None
    except OSError as error:  # connection reset or timed out mid-answer
        raise RequestFailed(f"no answer from {url}: {error}") from None
    if not 200 <= status < 300:
        try:
            detail = json.loads(payload)["message"]
        except (ValueError, KeyError, TypeError):
            detail = payload.decode("utf-8", "replace")[:300]
        after = f" after {tries} tries" if tries > 1 else ""
        raise RequestFailed(f"HTTP {status} from the server{after}: {detail}", status, payload)
    try:
        return json.loads(payload)
    except ValueError:
        raise RequestFailed(f"the server's answer is not JSON: {payload[:100]!r}", status, payload) from None


def _decoded(entry: Mapping[str, Any]) -> Image.Image | np.ndarray:
    """A map of the answer: a PIL image (``png``, ``overlay``) or a float array (``array``)."""
    if entry["format"] == "array":
        return np.asarray(entry["data"], dtype=np.float32)
    return Image.open(io.BytesIO(base64.b64decode(entry["data"])))


def _write(target: Path, entry: Mapping[str, Any]) -> Path:
    if entry["format"] == "array":
        target = target.with_suffix(".npy")
        np.save(target, _decoded(entry))
    else:
        target.write_bytes(base64.b64decode(entry["data"]))
    return target


def _photo(path: Path) -> Image.Image | None:
    """The photo as the server saw it (EXIF-oriented RGB) for the overlay, or None if Pillow here cannot read it."""
    try:
        return ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def save_outputs(path: Path, response: Mapping[str, Any], out: Path) -> list[Path]:
    """Writes every map of ``response`` (PNG or .npy) and, for gray PNG maps, a side-by-side overlay with the salient box."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    panels = []
    photo = _photo(path)
    for name, entry in response.get("explanations", {}).items():
        written.append(_write(out / f"{path.stem}_{name}.png", entry))
        if entry["format"] == "array" or (entry["format"] == "png" and photo is None):
            continue
        if entry["format"] == "png":
            panel = Image.fromarray(overlay(photo, np.asarray(_decoded(entry).convert("L"))))
        else:  # the server's own overlay
            panel = _decoded(entry).convert("RGB")
        if entry.get("box"):
            scale = panel.width / response["image"]["width"]
            ImageDraw.Draw(panel).rectangle([round(v * scale) for v in entry["box"]], outline=(255, 255, 255), width=2)
        panels.append(panel)
    for number, stage in enumerate(response.get("stages") or []):
        layer = "".join(c if c.isalnum() else "_" for c in stage["layer"])
        written.append(_write(out / f"{path.stem}_stage{number}_{layer}.png", stage["dve"]))
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


def _explanations(text: str) -> list[str]:
    names = [] if text.strip().lower() in ("", "none") else [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in MAP_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown map {unknown[0]!r}: use a comma-separated list of {', '.join(MAP_NAMES)}, or none")
    return names


def _map_size(text: str) -> int | str:
    if text == "original":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of pixels nor 'original'") from None


def _target(text: str) -> int | str:
    """A class index (digits) or a label."""
    return int(text) if text.isdigit() else text


def options_from(args: argparse.Namespace) -> dict[str, Any]:
    """The API options the flags ask for; those not given are left to the server."""
    options: dict[str, Any] = {}
    for flag in ("topk", "explanations", "format", "map_size", "target"):
        if getattr(args, flag) is not None:
            options[flag] = getattr(args, flag)
    if args.stages:
        options["stages"] = True
    if args.class_conditional:
        options["class_conditional"] = True
    return options


def summary(path: Path, response: Mapping[str, Any]) -> list[str]:
    """The human-readable lines for one answer."""
    lines = [f"{path}  ({response['image']['width']} x {response['image']['height']})"]
    for prediction in response["predictions"]:
        lines.append(f"  {prediction['probability']:7.2%}  {prediction['label']} ({prediction['index']})")
    explained = response.get("explained_class")
    if explained:
        lines.append(f"  maps explain: {explained['label']} ({explained['index']}, {explained['probability']:.2%})")
    if "targeted_dve" in response.get("explanations", {}):
        lines.append(f"  salient patch (targeted DVE): {response['explanations']['targeted_dve'].get('box')}")
    return lines


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--url", default=None, help="the inference address (default http://127.0.0.1:$PORT_BASE, 8080 if unset)")
    parser.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE, help="TorchServe's key_file.json")
    api = parser.add_argument_group("the API's options (default: the server's)")
    api.add_argument("--topk", type=int, help="how many classes to return")
    api.add_argument("--explanations", type=_explanations, help="maps to return: dve,targeted_dve (both), dve, targeted_dve, or none")
    api.add_argument("--format", choices=["png", "overlay", "array"], help="png: gray map; overlay: the photo coloured by the map; array: floats")
    api.add_argument("--map-size", type=_map_size, help='long side of the maps in pixels, or "original"')
    api.add_argument("--stages", action="store_true", help="also return the DVE map of every stage of the model")
    api.add_argument("--class-conditional", action="store_true", help="explain the top class rather than the paper's class-agnostic DVE")
    api.add_argument("--target", type=_target, help="explain this class: an index or a label")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print each raw answer as one line of JSON")
    output.add_argument("--out", type=Path, help="folder for the maps (default build/client; with --json: none unless given)")
    retries = parser.add_argument_group("retries of 503")
    retries.add_argument("--tries", type=int, default=Backoff.tries, help="attempts per image when the server answers 503 (1: no retry)")
    retries.add_argument("--retry-budget", type=float, default=Backoff.budget, help="most seconds to wait between those attempts, in all")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _arguments()
    args = parser.parse_args(argv)
    if args.tries < 1 or args.retry_budget < 0:
        parser.error("--tries must be at least 1 and --retry-budget not negative")
    url = args.url or f"http://127.0.0.1:{port_base()}"
    out = args.out if args.out or args.json else ROOT / "build" / "client"
    retry = Backoff(tries=args.tries, budget=args.retry_budget)
    try:
        token = json.loads(args.key_file.read_text())["inference"]["key"]
    except (OSError, ValueError, KeyError):
        print(f"error: no inference key in {args.key_file}; start the server with `make serve` or pass --key-file", file=sys.stderr)
        return 1
    options = options_from(args)
    failed = 0
    for path in args.images:
        try:
            try:
                image = path.read_bytes()
            except OSError as error:
                raise RequestFailed(f"cannot read the file: {error.strerror or error}") from None
            response = explain(url, args.model, token, image, options, retry)
        except RequestFailed as failure:
            failed += 1
            print(f"{path}: error: {failure}", file=sys.stderr)
            if args.json:
                print(failure.as_json(), flush=True)
            continue
        if args.json:
            print(json.dumps(response, separators=(",", ":")), flush=True)
        else:
            print("\n".join(summary(path, response)))
        if out is not None:
            for written in save_outputs(path, response, out):
                if not args.json:
                    print(f"  wrote {written}")
    if failed:
        print(f"{failed} of {len(args.images)} images failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
