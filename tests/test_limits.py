"""Limits that agree: the largest image the handler accepts reaches it in every body type.

The handler refuses images over ``max_image_bytes`` (20 MiB) with its own 413. The body
limits in front of it (TorchServe's ``max_request_size``, nginx's ``client_max_body_size``)
must let such an image through as base64 JSON (4/3 of its size, plus the options), or
the client gets a generic 413 from the frontend instead of the handler's answer.
"""

from __future__ import annotations

import base64
import math
import re
import struct
import zlib

import numpy as np
import pytest

from evaluation.photos import encode_image as encode
from handler.config import Limits
from serving.server import DEFAULT_CONFIG, ROOT, read_properties
from tests.test_integration import post

MAX_IMAGE_BYTES = Limits().max_image_bytes  # 20 MiB
# What a JSON body may carry besides the image's base64: its keys, every option at its
# longest, and escaped slashes ("\/") or line breaks that some encoders write.
JSON_ALLOWANCE = 1_000_000


def base64_size(n: int) -> int:
    return 4 * math.ceil(n / 3)


def png_of_size(size: int, side: int = 2640, seed: int = 0) -> bytes:
    """A real RGB PNG of random noise (side x side, under 8 MP) of exactly ``size`` bytes.

    Stored without compression, then padded with a tEXt chunk after the header: the
    picture decodes as any PNG does.
    """
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    image = encode(pixels, "PNG", compress_level=0)
    text = size - len(image) - 12 - len(b"Comment\0")  # a chunk: length, type, data, CRC
    assert text >= 0, f"{side} x {side} makes {len(image)} bytes already"
    data = b"Comment\0" + b"x" * text
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    header_end = 8 + 4 + 4 + 13 + 4  # the signature, then IHDR
    padded = image[:header_end] + chunk + image[header_end:]
    assert len(padded) == size
    return padded


@pytest.fixture(scope="module")
def largest_png() -> bytes:
    """The largest image the handler accepts: ``max_image_bytes`` - 1 bytes, 2640 x 2640."""
    image = png_of_size(MAX_IMAGE_BYTES - 1)
    assert 19.5 * 2**20 < len(image) < MAX_IMAGE_BYTES
    return image


@pytest.fixture(scope="module")
def too_large_png() -> bytes:
    """The same picture, 1 byte over ``max_image_bytes``."""
    return png_of_size(MAX_IMAGE_BYTES + 1)


def nginx_body_limit() -> int:
    size = re.search(
        r"^\s*client_max_body_size\s+(\d+)([kKmM]?);", (ROOT / "deploy" / "nginx" / "dve.conf").read_text(), re.M
    )
    return int(size.group(1)) * {"": 1, "k": 2**10, "m": 2**20}[size.group(2).lower()]


def test_every_body_limit_lets_base64_json_of_the_largest_image_through():
    limit = int(read_properties(DEFAULT_CONFIG)["max_request_size"])
    assert base64_size(MAX_IMAGE_BYTES) == 27_962_028
    assert limit >= base64_size(MAX_IMAGE_BYTES) + JSON_ALLOWANCE
    assert limit < 2 * MAX_IMAGE_BYTES  # and is no blank cheque
    # The deployments agree: KServe's TorchServe and the nginx in front of TorchServe.
    assert int(read_properties(ROOT / "deploy" / "kserve" / "config.properties")["max_request_size"]) == limit
    assert nginx_body_limit() == limit


def test_the_noise_pngs_are_real_images(largest_png, too_large_png):
    import io

    from PIL import Image

    for data in (largest_png, too_large_png):
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.size == (2640, 2640) and image.mode == "RGB"


def test_base64_json_of_the_largest_image_is_answered(server, largest_png):
    body = {"image": base64.b64encode(largest_png).decode(), "topk": 1, "explanations": ["dve"], "map_size": 64}
    response = post(server, "efficientnet_lite0", json=body)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["image"] == {"width": 2640, "height": 2640}


def test_one_byte_more_gets_the_handlers_413_not_the_frontends(server, too_large_png):
    expected = f"image is {MAX_IMAGE_BYTES + 1} bytes; the limit is {MAX_IMAGE_BYTES}"
    as_json = post(server, "efficientnet_lite0", json={"image": base64.b64encode(too_large_png).decode()})
    assert as_json.status_code == 413 and as_json.json()["message"] == expected, as_json.text[:300]
    raw = post(server, "efficientnet_lite0", data=too_large_png, headers={"Content-Type": "image/png"})
    assert raw.status_code == 413 and raw.json()["message"] == expected, raw.text[:300]
    form = post(
        server, "efficientnet_lite0", files={"image": ("big.png", too_large_png, "image/png")}, data={"topk": "1"}
    )
    assert form.status_code == 413 and form.json()["message"] == expected, form.text[:300]


def test_a_body_over_max_request_size_gets_the_frontends_413_with_no_body(server):
    """What the handler's 413 is not: TorchServe's own answer, before any handler runs."""
    limit = int(read_properties(DEFAULT_CONFIG)["max_request_size"])
    response = post(
        server, "efficientnet_lite0", data=b"\0" * (limit + 1), headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 413 and response.content == b""
