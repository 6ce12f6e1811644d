"""Decoding every kind of image (HEIC, AVIF, colour profiles, animations, tiny images), the crop
geometry, and maps aligned to the original."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from evaluation.photos import encode_image as encode
from handler import imaging
from handler.errors import RequestError
from handler.imaging import CropGeometry, decode, decode_image, decode_scale, encode_png, model_input, open_image

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
        lambda: encode(Image.fromarray(gradient()[..., 0].astype(np.uint16) * 257), "PNG"),  # 16-bit gray
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


@pytest.fixture(params=["isal", "zlib"])
def deflater(request, monkeypatch) -> str:
    """Each of encode_png's compressors: ISA-L's (installed with the project) and zlib's,
    which a TorchServe environment without ``isal`` falls back to."""
    assert imaging.isal_zlib is not None  # a dependency of the project: installed here
    if request.param == "zlib":
        monkeypatch.setattr(imaging, "isal_zlib", None)
    return request.param


def test_png_encodes_what_it_is_given(deflater):
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


def test_isal_deflates_smooth_maps_smaller_than_zlib():
    """The reason for the dependency besides speed: no response grows by using it."""
    y, x = np.mgrid[0:149, 0:224]
    smooth = (255 * np.exp(-((x - 120) ** 2 + (y - 70) ** 2) / 2000.0)).astype(np.uint8)
    filtered = np.diff(smooth.astype(np.int16), axis=0, prepend=0).astype(np.uint8)
    with_isal = imaging.deflate(filtered.tobytes())
    compressor = zlib.compressobj(1)
    with_zlib = compressor.compress(filtered.tobytes()) + compressor.flush()
    assert zlib.decompress(with_isal) == filtered.tobytes()
    assert len(with_isal) <= len(with_zlib)


# The photos people really send: HEIC, AVIF, colour profiles, animations, tiny images.


@pytest.fixture(scope="module")
def cat(photos) -> Image.Image:
    return Image.open(io.BytesIO(photos["chelsea"])).convert("RGB")


def upright_input(data: bytes) -> np.ndarray:
    """The model's input (float) of an image file, decoded as the handler does it."""
    decoded = decode_image(data, max_pixels=LIMIT, short_side=256)
    geometry = CropGeometry.centre_crop(decoded.width, decoded.height, 256, 224)
    return model_input(decoded, geometry).numpy().astype(np.float32)


def test_pillow_reads_avif_and_pillow_heif_heic():
    from PIL import features

    assert features.check("avif")
    assert "HEIF" in Image.OPEN


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_decode_upright_like_a_png(fmt):
    image = Image.fromarray(gradient(64, 48))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    reference = decode_image(encode(image, "PNG", exif=exif), max_pixels=LIMIT)
    opened = open_image(encode(image, fmt, quality=95, exif=exif.tobytes()), max_pixels=LIMIT)
    assert opened.image.format == fmt and (opened.width, opened.height) == (48, 64)
    decoded = decode(opened)
    assert (decoded.width, decoded.height) == decoded.image.size == (48, 64)
    assert np.abs(np.asarray(decoded.image, np.float32) - np.asarray(reference.image, np.float32)).mean() < 3.0


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_over_the_pixel_limit_are_refused_from_the_header(fmt):
    data = encode(Image.new("RGB", (640, 480)), fmt)
    with pytest.raises(RequestError, match="640 x 480 = 307200 pixels") as caught:
        open_image(data, max_pixels=300_000)
    assert caught.value.status == 413


def test_a_display_p3_photo_gives_the_model_its_srgb_original(cat):
    from tests.test_photos import iphone_heic, p3_jpeg

    original = upright_input(encode(cat, "JPEG", quality=95))
    converted = np.abs(upright_input(p3_jpeg(cat)) - original).mean()
    ignored = np.abs(upright_input(p3_jpeg(cat, embed=False)) - original).mean()
    assert converted < 1.5 < 3.0 < ignored  # measured: 0.97 against 4.39 grey levels
    assert np.abs(upright_input(iphone_heic(cat)) - original).mean() < 1.5


def test_an_adobe_rgb_png_gives_the_model_its_srgb_original(cat):
    from tests.test_photos import adobe_rgb_png, in_profile

    original = upright_input(encode(cat, "PNG"))
    assert np.abs(upright_input(adobe_rgb_png(cat)) - original).mean() < 1.0
    assert np.abs(upright_input(encode(in_profile(cat, "Adobe RGB (1998)")[0], "PNG")) - original).mean() > 3.0


def test_a_large_p3_image_is_converted_after_its_reduction(cat):
    from tests.test_photos import in_profile

    big = cat.resize((2706, 1800), Image.Resampling.BICUBIC)
    pixels, icc = in_profile(big, "Display P3")
    opened = open_image(encode(pixels, "PNG", icc_profile=icc), max_pixels=LIMIT)
    assert opened.to_srgb is not None
    decoded = decode(opened, decode_scale(opened.width, opened.height, 256))
    assert decoded.image.width < 2706 / 2  # reduced before its colours were converted
    expected = big.reduce(2706 // decoded.image.width)
    assert np.abs(np.asarray(decoded.image, np.float32) - np.asarray(expected, np.float32)).mean() < 1.0


def test_srgb_and_absent_profiles_cost_no_conversion(cat):
    from tests.icc import display_profile

    for icc in (None, imaging.SRGB.tobytes(), display_profile("sRGB")):
        opened = open_image(encode(cat, "JPEG", **({"icc_profile": icc} if icc else {})), max_pixels=LIMIT)
        assert opened.to_srgb is None


@pytest.mark.parametrize(
    "icc",
    [
        b"not an ICC profile at all",
        pytest.param("truncated", id="truncated-p3"),
        pytest.param("no-tags", id="header-only"),
        pytest.param("lab", id="not-rgb"),
    ],
)
def test_an_unusable_profile_leaves_the_pixels_as_srgb(cat, icc):
    from PIL import ImageCms

    from tests.icc import display_profile

    p3 = display_profile("Display P3")
    icc = {
        "truncated": p3[:300],
        "no-tags": p3[:128] + bytes(4),
        "lab": ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes(),
    }.get(icc, icc)
    plain = encode(cat, "PNG")
    with_profile = encode(cat, "PNG", icc_profile=icc)
    assert open_image(with_profile, max_pixels=LIMIT).to_srgb is None
    assert np.array_equal(upright_input(with_profile), upright_input(plain))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_an_animation_decodes_its_first_frame_only(lite0_explainer, fmt):
    """A 300-frame animation: its first frame, and only that, is decoded and counted.

    Its later frames are then cut off (GIF, APNG) or corrupted (WebP, whose container
    must stay whole): decoding still succeeds, so they were never decoded.
    """
    from handler.options import ParsedRequest, RequestOptions
    from tests.test_photos import animated

    data = animated(fmt)
    if fmt == "WEBP":
        spoilt = bytearray(data)
        last = data.rindex(b"VP8L") + 20
        spoilt[last : last + 200] = bytes(200)
        broken = bytes(spoilt)
    else:
        broken = data[: len(data) // 2]
    everything = Image.open(io.BytesIO(broken))
    with pytest.raises(OSError):  # every frame at once: the damage is real (a truncated or broken frame)
        for frame in range(everything.n_frames):
            everything.seek(frame)
            everything.load()
    for file in (data, broken):
        decoded = decode_image(file, max_pixels=LIMIT)
        assert decoded.image.size == (64, 48)
        assert np.asarray(decoded.image).reshape(-1, 3).tolist() == [[200, 30, 30]] * (64 * 48)
    admitted = lite0_explainer.admit(ParsedRequest(data, RequestOptions(5, ("dve",), "png", 224)))
    assert admitted.cost.decoded_pixels == 64 * 48


@pytest.mark.parametrize("size", [(1, 1), (16, 16), (1, 300), (300, 1)])
def test_tiny_images_give_a_whole_model_input(size):
    colour = (10, 120, 240)
    decoded = decode_image(encode(Image.new("RGB", size, colour), "PNG"), max_pixels=LIMIT, short_side=256)
    pixels = model_input(decoded, CropGeometry.centre_crop(*size, 256, 224))
    assert pixels.shape == (224, 224, 3)
    assert pixels.reshape(-1, 3).unique(dim=0).tolist() == [list(colour)]
