"""Bad input against a real TorchServe: every case gets a clear 4xx and message, the
worker keeps running, and images in unusual modes work."""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from evaluation.photos import encode_image as encode
from handler.config import Limits
from tests.test_integration import batch_totals, batches_since, post, post_image

MODEL = "efficientnet_lite0"
MAX_IMAGE_BYTES = Limits().max_image_bytes


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1 x 1 PNG whose header claims ``width x height`` (a decompression bomb's header)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then length and type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def big_png(width: int, height: int) -> bytes:
    """A real image of ``width x height`` pixels (black, so it compresses to a few KB)."""
    return encode(Image.new("1", (width, height)), "PNG")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def pids(server) -> list[int]:
    """The model's worker PIDs before any bad request of this module."""
    return server.worker_pids(MODEL)


BAD_INPUT = {
    "zero-bytes": (
        lambda p: dict(data=b"", headers={"Content-Type": "application/octet-stream"}),
        400,
        r"no image data \(0 bytes\)",
    ),
    "random-bytes": (
        lambda p: dict(data=np.random.default_rng(1).bytes(5000), headers={"Content-Type": "application/octet-stream"}),
        400,
        r"not an image in a format the server reads",
    ),
    "truncated-jpeg": (
        lambda p: dict(data=p["coffee"][:3000], headers={"Content-Type": "image/jpeg"}),
        400,
        r"truncated or corrupt",
    ),
    "text-file": (
        lambda p: dict(data=b"Dear user,\nthis is a text file.\n", headers={"Content-Type": "text/plain"}),
        400,
        r"the body is text, not an image",
    ),
    "text-file-as-octets": (
        lambda p: dict(
            data=b"Dear user,\nthis is a text file.\n", headers={"Content-Type": "application/octet-stream"}
        ),
        400,
        r"not an image in a format the server reads",
    ),
    "decompression-bomb": (
        lambda p: dict(data=png_claiming(100_000, 100_000), headers={"Content-Type": "image/png"}),
        413,
        r"image is too large: Image size \(10000000000 pixels\) exceeds limit",
    ),
    "over-pixel-limit": (
        lambda p: dict(data=big_png(8000, 6400), headers={"Content-Type": "image/png"}),
        413,
        r"8000 x 6400 = 51200000 pixels",
    ),
    "over-byte-limit": (
        lambda p: dict(data=b"\xff\xd8\xff" + bytes(MAX_IMAGE_BYTES), headers={"Content-Type": "image/jpeg"}),
        413,
        rf"image is {MAX_IMAGE_BYTES + 3} bytes; the limit is {MAX_IMAGE_BYTES}",
    ),
    "invalid-base64": (
        lambda p: dict(json={"image": "this is not base64 at all!"}),
        400,
        r"'image' is not valid base64",
    ),
    "invalid-json": (
        lambda p: dict(data=b'{"image": "abc', headers={"Content-Type": "application/json"}),
        400,
        r"not valid JSON",
    ),
    "unknown-option": (
        lambda p: dict(json={"image": b64(p["chelsea"]), "colour": "red"}),
        400,
        r"unknown field\(s\) \['colour'\]",
    ),
    "ill-typed-topk": (
        lambda p: dict(json={"image": b64(p["chelsea"]), "topk": "many"}),
        400,
        r"'topk' must be an integer",
    ),
    "non-ascii-option": (
        lambda p: dict(json={"image": b64(p["chelsea"]), "topk": "\u00b2\u00a1"}),
        400,
        r"'topk' must be an integer, got '\u00b2\u00a1'",
    ),
    "ill-typed-map-size": (
        lambda p: dict(json={"image": b64(p["chelsea"]), "map_size": 3.5}),
        400,
        r"'map_size' must be an integer",
    ),
    "ill-typed-explanations": (
        lambda p: dict(json={"image": b64(p["chelsea"]), "explanations": 5}),
        400,
        r"'explanations' must be a list",
    ),
    "ill-typed-format": (
        lambda p: dict(json={"image": b64(p["chelsea"]), "format": ["png"]}),
        400,
        r"'format' must be one of",
    ),
    "json-without-image": (lambda p: dict(json={"topk": 3}), 400, r"the request has no image"),
    "5000-digit-option": (
        lambda p: dict(json={"image": b64(p["chelsea"]), "topk": "9" * 5000}),
        400,
        r"'topk' has 5000 digits",
    ),
    "5000-digit-json-number": (
        lambda p: dict(
            data=b'{"image": "%s", "map_size": %s}' % (b64(p["chelsea"]).encode(), b"9" * 5000),
            headers={"Content-Type": "application/json"},
        ),
        400,
        r"a number of 5000 digits",
    ),
    "original-over-max-map-size": (
        lambda p: dict(json={"image": b64(big_png(6000, 4000)), "map_size": "original"}),
        413,
        r"'original' means maps of 6000 x 4000 .* at most 4096: ask for a map_size of at most \d+",
    ),
    "over-budget": (
        lambda p: dict(json={"image": b64(big_png(4000, 3000)), "map_size": 4000, "format": "overlay", "stages": True}),
        413,
        r"the limit per request is 12000000: ask for a map_size of at most \d+",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_a_clear_4xx_and_the_worker_survives(server, photos, pids, case):
    make, status, message = BAD_INPUT[case]
    response = post(server, MODEL, **make(photos))
    assert response.status_code == status, response.text[:300]
    body = response.json()
    assert body["code"] == status
    assert re.search(message, body["message"]), body["message"]
    assert server.worker_pids(MODEL) == pids


def _gradient() -> Image.Image:
    x = np.linspace(0, 255, 320, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, 240, dtype=np.float32)[:, None]
    return Image.fromarray(np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8))


UNUSUAL_MODES = {
    "grayscale": lambda: encode(_gradient().convert("L"), "PNG"),
    "rgba": lambda: encode(_gradient().convert("RGBA"), "PNG"),
    "palette": lambda: encode(_gradient().convert("P"), "PNG"),
    "cmyk-jpeg": lambda: encode(_gradient().convert("CMYK"), "JPEG"),
    "16-bit-png": lambda: encode(Image.fromarray(np.asarray(_gradient().convert("L")).astype(np.uint16) * 257), "PNG"),
}


@pytest.mark.parametrize("mode", list(UNUSUAL_MODES))
def test_unusual_image_modes_work(server, pids, mode):
    data = UNUSUAL_MODES[mode]()
    if mode == "16-bit-png":
        assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    response = post_image(server, MODEL, data)
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert body["image"] == {"width": 320, "height": 240} and len(body["predictions"]) == 5
    assert {name: (e["width"], e["height"]) for name, e in body["explanations"].items()} == {
        "dve": (224, 168),
        "targeted_dve": (224, 168),
    }
    assert server.worker_pids(MODEL) == pids


def worker_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_concurrent_worst_requests_are_refused_at_once_and_the_worker_stays_small(server, photos, pids):
    """Three 48 MP PNGs asking for original-size overlays of every stage, at once: once this
    took the worker past the response timeout and 11 GB; now each is a 413 from its header."""
    from concurrent.futures import ThreadPoolExecutor

    payload = {"image": b64(big_png(8000, 6000)), "map_size": "original", "format": "overlay", "stages": True}
    before = batch_totals(server, MODEL)
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda _: post(server, MODEL, json=payload), range(3)))
    assert [r.status_code for r in responses] == [413] * 3
    batches, ran = batches_since(server, MODEL, before, 3)
    assert ran == 3 and batches < 3, (batches, ran)  # at least two of them in one batch
    assert all("ask for a map_size of at most" in r.json()["message"] for r in responses)
    assert server.worker_pids(MODEL) == pids
    assert all(worker_rss_mb(pid) < 2048 for pid in pids)
    assert post_image(server, MODEL, photos["chelsea"]).status_code == 200
