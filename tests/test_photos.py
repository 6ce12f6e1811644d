"""The photos people really send, against a real TorchServe: HEIC and AVIF, Display P3
and Adobe RGB colour profiles, animated GIF, WebP and APNG, and tiny images. Every file is
made here, from a real photo (skimage's chelsea), with real encoders and real profiles
(``tests.icc``)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageCms

from evaluation.photos import CAT_CLASSES
from evaluation.photos import encode_image as encode
from handler import imaging
from tests.icc import display_profile
from tests.test_integration import png, post, post_image

MODEL = "efficientnet_lite0"
ORIENTATION = 0x0112


def in_profile(image: Image.Image, name: str) -> tuple[Image.Image, bytes]:
    """An sRGB image's pixels converted to the colour space of profile ``name``, and the profile."""
    icc = display_profile(name)
    profile = ImageCms.getOpenProfile(io.BytesIO(icc))
    pixels = ImageCms.buildTransform(imaging.SRGB, profile, "RGB", "RGB", imaging.INTENT).apply(image)
    del pixels.info["icc_profile"]  # embedded only where asked (Pillow's PNG encoder would embed it)
    return pixels, icc


def p3_jpeg(image: Image.Image, embed: bool = True) -> bytes:
    """A Display P3 JPEG of an sRGB image, as phones save them; ``embed=False``: its profile left out."""
    pixels, icc = in_profile(image, "Display P3")
    return encode(pixels, "JPEG", quality=95, **({"icc_profile": icc} if embed else {}))


def adobe_rgb_png(image: Image.Image) -> bytes:
    pixels, icc = in_profile(image, "Adobe RGB (1998)")
    return encode(pixels, "PNG", icc_profile=icc)


def iphone_heic(image: Image.Image) -> bytes:
    """What an iPhone sends: HEIC, Display P3, stored sideways with an orientation (libheif's irot)."""
    pixels, icc = in_profile(image.transpose(Image.Transpose.ROTATE_90), "Display P3")
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    return encode(pixels, "HEIF", quality=90, icc_profile=icc, exif=exif.tobytes())


def animated(
    fmt: str, size: tuple[int, int] = (64, 48), frames: int = 300, first: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    """A ``frames``-frame animation (GIF, WEBP or PNG: APNG) whose first frame is ``first`` all over, the rest noise."""
    rng = np.random.default_rng(0)
    rest = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(frames - 1)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return encode(Image.new("RGB", size, first), fmt, save_all=True, append_images=rest, duration=40, **extra)


def tiny(width: int, height: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(width * 1000 + height)
    return encode(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)), fmt)


@pytest.fixture(scope="module")
def cat(photos) -> Image.Image:
    return Image.open(io.BytesIO(photos["chelsea"])).convert("RGB")


@pytest.fixture(scope="module")
def pids(server) -> list[int]:
    return server.worker_pids(MODEL)


FILES = {
    "heic": (lambda cat: iphone_heic(cat), (451, 300)),
    "avif": (lambda cat: encode(cat, "AVIF", quality=90), (451, 300)),
    "display-p3-jpeg": (lambda cat: p3_jpeg(cat), (451, 300)),
    "adobe-rgb-png": (lambda cat: adobe_rgb_png(cat), (451, 300)),
    "animated-gif": (lambda cat: animated("GIF"), (64, 48)),
    "animated-webp": (lambda cat: animated("WEBP"), (64, 48)),
    "apng": (lambda cat: animated("PNG"), (64, 48)),
    "1x1": (lambda cat: tiny(1, 1, "JPEG"), (1, 1)),
    "16x16": (lambda cat: tiny(16, 16), (16, 16)),
    "1x300": (lambda cat: tiny(1, 300), (1, 300)),
}


@pytest.mark.parametrize("name", list(FILES))
def test_the_photos_people_send_are_answered(server, cat, pids, name):
    make, (width, height) = FILES[name]
    response = post_image(server, MODEL, make(cat))
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert body["image"] == {"width": width, "height": height} and len(body["predictions"]) == 5
    if width == 451:  # the cat, whatever the format or colour space
        assert body["predictions"][0]["index"] in CAT_CLASSES, body["predictions"][0]
    scale = 224 / max(width, height)
    expected = (max(1, round(width * scale)), max(1, round(height * scale)))
    for entry in body["explanations"].values():
        assert png(entry).size == (entry["width"], entry["height"]) == expected
    x0, y0, x1, y1 = body["explanations"]["targeted_dve"]["box"]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert server.worker_pids(MODEL) == pids


def test_a_display_p3_photo_is_answered_as_its_srgb_original(server, cat):
    """The same photo in sRGB and in Display P3 (converted, profile embedded): the same
    top class with nearly the same probability, and nearly the same maps."""
    answers = [post_image(server, MODEL, data).json() for data in (encode(cat, "JPEG", quality=95), p3_jpeg(cat))]
    srgb, p3 = (answer["predictions"][0] for answer in answers)
    assert p3["index"] == srgb["index"] and abs(p3["probability"] - srgb["probability"]) < 0.05
    maps = [np.asarray(png(answer["explanations"]["dve"]), dtype=np.float32) for answer in answers]
    assert np.abs(maps[0] - maps[1]).mean() < 3.0  # of 255


def test_a_heic_is_mixed_with_a_bad_request_in_one_batch(server, cat, pids):
    heic = iphone_heic(cat)
    calls = [
        lambda: post_image(server, MODEL, heic),
        lambda: post_image(server, MODEL, heic[: len(heic) // 2]),
        lambda: post(server, MODEL, json={"image": base64.b64encode(animated("GIF")).decode(), "topk": "many"}),
        lambda: post(server, MODEL, json={"image": base64.b64encode(tiny(1, 1)).decode(), "topk": 2}),
    ]
    with ThreadPoolExecutor(len(calls)) as pool:
        responses = list(pool.map(lambda call: call(), calls))
    assert [r.status_code for r in responses] == [200, 400, 400, 200], [r.text[:200] for r in responses]
    assert responses[0].json()["predictions"][0]["index"] in CAT_CLASSES
    assert "not an image in a format the server reads" in responses[1].json()["message"]  # libheif refuses its header
    assert "'topk' must be an integer" in responses[2].json()["message"]
    assert len(responses[3].json()["predictions"]) == 2
    assert server.worker_pids(MODEL) == pids
