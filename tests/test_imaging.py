"""Decoding every kind of image, the crop geometry, and maps aligned to the original."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from handler.errors import RequestError
from handler.imaging import CropGeometry, decode_image, encode_png, model_input
from tests.conftest import encode

LIMIT = 50_000_000


def gradient(width=64, height=48) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8)


@pytest.mark.parametrize(
    "make",
    [
        lambda: encode(Image.fromarray(gradient()).convert("L"), "PNG"),
        lambda: encode(Image.fromarray(gradient()).convert("RGBA"), "PNG"),
        lambda: encode(Image.fromarray(gradient()).convert("P"), "PNG"),
        lambda: encode(Image.fromarray(gradient()).convert("CMYK"), "JPEG"),
        lambda: encode(Image.fromarray((gradient()[..., 0].astype(np.uint16) * 257)), "PNG"),  # 16-bit gray
        lambda: encode(Image.fromarray(gradient()).convert("1"), "BMP"),
        lambda: encode(gradient(), "WEBP"),
        lambda: encode(gradient(), "TIFF"),
        lambda: encode(gradient(), "GIF"),
    ],
    ids=["gray", "rgba", "palette", "cmyk-jpeg", "16-bit-png", "1-bit-bmp", "webp", "tiff", "gif"],
)
def test_every_common_mode_decodes_to_rgb(make):
    decoded = decode_image(make(), max_pixels=LIMIT)
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (64, 48)


def test_sixteen_bit_values_are_scaled_not_clipped():
    array = np.full((8, 8), 32768, dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(array), "PNG"), max_pixels=LIMIT)
    assert abs(int(np.asarray(decoded.image)[0, 0, 0]) - 128) <= 1


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), max_pixels=LIMIT)
    assert np.asarray(decoded.image).min() == 255


def test_exif_orientation_is_applied():
    image = Image.fromarray(gradient(64, 48))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(image, "JPEG", exif=exif)
    decoded = decode_image(data, max_pixels=LIMIT, short_side=16)
    assert (decoded.width, decoded.height) == (48, 64)
    assert decoded.image.width < decoded.image.height


@pytest.mark.parametrize(
    "data, status, message",
    [
        (b"", 400, "0 bytes"),
        (b"hello, I am text", 400, "not an image"),
        (np.random.default_rng(0).bytes(5000), 400, "not an image"),
    ],
)
def test_unusable_bytes_are_a_clear_400(data, status, message):
    with pytest.raises(RequestError, match=message) as caught:
        decode_image(data, max_pixels=LIMIT)
    assert caught.value.status == status


def test_truncated_jpeg_is_a_400(photos):
    with pytest.raises(RequestError, match="truncated or corrupt") as caught:
        decode_image(photos["chelsea"][: len(photos["chelsea"]) // 2], max_pixels=LIMIT)
    assert caught.value.status == 400


def test_too_many_pixels_is_refused_from_the_header_with_413():
    data = encode(Image.new("L", (4000, 3000)), "PNG")
    with pytest.raises(RequestError, match="12000000 pixels") as caught:
        decode_image(data, max_pixels=10_000_000)
    assert caught.value.status == 413


def test_jpeg_draft_decoding_keeps_geometry_and_input(photos):
    big = Image.open(io.BytesIO(photos["coffee"])).resize((2400, 1600))
    data = encode(big, "JPEG", quality=95)
    full = decode_image(data, max_pixels=LIMIT)
    small = decode_image(data, max_pixels=LIMIT, short_side=256)
    assert (small.width, small.height) == (full.width, full.height) == (2400, 1600)
    assert min(small.image.size) >= 256 and small.image.width < full.image.width
    geometry = CropGeometry.centre_crop(2400, 1600, 256, 224)
    a = model_input(full, geometry).float()
    b = model_input(small, geometry).float()
    assert (a - b).abs().mean().item() < 4.0  # same crop, within JPEG-scaling noise


def test_centre_crop_geometry():
    g = CropGeometry.centre_crop(400, 200, 256, 224)
    assert g.side == pytest.approx(175.0)
    assert (g.left, g.top) == (pytest.approx(112.5), pytest.approx(12.5))
    assert g.box_to_original((0, 0, 224, 224)) == [112, 12, 288, 188]
    assert g.map_size(100) == (100, 50)
    assert g.map_size(None) == (400, 200)


def test_png_encodes_what_it_is_given():
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (10, 1))
    decoded = Image.open(io.BytesIO(encode_png(gray)))
    assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), gray)
    noise = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_png(noise[::-1])))  # not contiguous: reversed rows
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), noise[::-1])
    one = Image.open(io.BytesIO(encode_png(np.full((1, 1), 7, dtype=np.uint8))))
    assert np.asarray(one).tolist() == [[7]]
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), dtype=np.float32))
