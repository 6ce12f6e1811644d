"""Calling a running server: one image explained, its maps saved, its answer summed up.

``scripts/client.py`` is its command line (how it reports each file: see there). A 503
(the model's queue is full) is retried with exponential backoff and jitter, at most the
policy's tries and seconds of waiting in all, honouring a ``Retry-After`` header
(``serving/backoff.py``); any other error is final.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from handler.rendering import overlay  # the server's own colouring
from serving.backoff import Backoff, call
from serving.server import DEFAULT_RUN_DIR, KEY_FILE

DEFAULT_KEY_FILE = DEFAULT_RUN_DIR / KEY_FILE
MAP_NAMES = ("dve", "targeted_dve")
DEFAULT_RETRY = Backoff()  # serving.backoff's defaults: 5 tries, 15 s of waiting at most


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


def explain(
    url: str, model: str, token: str, image: bytes, options: Mapping[str, Any], retry: Backoff = DEFAULT_RETRY
) -> dict[str, Any]:
    """POSTs one image as JSON (base64) with ``options``; the decoded answer, or RequestFailed.

    Retries 503 as ``retry`` says.
    """
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
    """Writes every map of ``response`` (PNG or .npy).

    For gray PNG maps, also a side-by-side overlay with the salient box.
    """
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


def options_from(args: Any) -> dict[str, Any]:
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
