"""JPEGs decoded on the model's device (nvJPEG on CUDA) give the model the same input as Pillow.

On a CPU the same code runs through torchvision's CPU decoder, so every step but nvJPEG
itself is tested here; the CUDA test runs where there is a GPU.

Tolerance: cropping and scaling on the device match Pillow's ``resize(box=...)`` within
one grey level on average (Pillow rounds to 8 bits between its two passes). Against the
CPU path, which decodes a large JPEG at reduced scale (libjpeg's DCT scaling), the mean
difference stays under 3 levels: the same photo, filtered slightly differently.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.photos import SAMPLES
from evaluation.photos import encode_image as encode
from handler import imaging
from handler.options import ParsedRequest, RequestOptions

OPTIONS = RequestOptions(5, ("dve", "targeted_dve"), "overlay", 224)


def on_device(explainer):
    """The session's explainer (on the CPU), decoding JPEGs with torchvision's decoder (a shallow copy)."""
    clone = copy.copy(explainer)
    clone.device_decoding = True
    return clone


def photo(size=(640, 480), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    return Image.fromarray(smooth).resize(size, Image.Resampling.BICUBIC)


@pytest.mark.parametrize(
    "box, size",
    [((0, 0, 640, 480), (224, 168)), ((80.5, 12.25, 560.5, 470.75), (224, 224)), ((100, 100, 140, 130), (224, 168))],
)
def test_resize_box_matches_pillow(box, size):
    image = photo()
    expected = np.asarray(image.resize(size, Image.Resampling.BILINEAR, box=box), dtype=np.int16)
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    got = imaging.resize_box(tensor, box, size).numpy().astype(np.int16)
    assert got.shape == expected.shape
    difference = np.abs(got - expected)
    assert difference.mean() < 0.5 and difference.max() <= 2


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillow(orientation):
    image = photo((64, 48))
    exif = image.getexif()
    exif[0x0112] = orientation
    upright = np.asarray(imaging.decode_image(encode(image, "PNG", exif=exif), max_pixels=10**7).image)
    turned = (
        imaging.orient(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), orientation)
        .permute(1, 2, 0)
        .numpy()
    )
    assert np.array_equal(turned, upright)


@pytest.mark.parametrize("size, orientation", [((451, 300), 1), ((4000, 3000), 1), ((640, 480), 6)])
def test_the_device_path_gives_the_model_the_same_input(lite0_explainer, size, orientation):
    image = photo(size)
    exif = image.getexif()
    exif[0x0112] = orientation
    data = encode(image, "JPEG", quality=95, exif=exif)
    device = on_device(lite0_explainer)
    admitted = device.admit(ParsedRequest(data, OPTIONS))
    assert device.decodes_on_device(admitted)
    host = lite0_explainer.prepare(ParsedRequest(data, OPTIONS))
    (gpu,) = device._decode_on_device([admitted])
    assert gpu.geometry == host.geometry
    difference = (gpu.pixels.float() - host.pixels.float()).abs()
    assert difference.mean() < 3.0
    assert gpu.photo.shape == host.photo.shape
    assert (gpu.photo.float() - host.photo.float()).abs().mean() < 3.0


def test_a_batch_answers_alike_on_either_path(lite0_explainer, photos):
    requests = [ParsedRequest(photos[name], OPTIONS) for name in ("chelsea", "coffee", "rocket")]
    host = lite0_explainer.run(requests)
    device = on_device(lite0_explainer).run(requests)
    for a, b in zip(host, device):
        assert a.status == b.status == 200
        assert a.body["predictions"][0]["index"] == b.body["predictions"][0]["index"]
        assert a.body["explanations"].keys() == b.body["explanations"].keys()


def test_what_the_device_refuses_goes_through_pillow(lite0_explainer, photos):
    """A CMYK JPEG never goes to the device; a JPEG its decoder refuses falls back to Pillow,
    whose answer (here: 400, truncated) is the request's, and the rest of the batch is served."""
    cmyk = encode(photo().convert("CMYK"), "JPEG")
    truncated = photos["coffee"][: len(photos["coffee"]) // 2]
    device = on_device(lite0_explainer)
    assert not device.decodes_on_device(device.admit(ParsedRequest(cmyk, OPTIONS)))
    results = device.run([ParsedRequest(data, OPTIONS) for data in (cmyk, truncated, photos["chelsea"])])
    assert [r.status for r in results] == [200, 400, 200]
    assert "truncated or corrupt" in results[1].body["message"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_matches_the_cpu_decoder(photos):
    data = [photos[name] for name in SAMPLES]
    on_cpu = imaging.decode_jpegs(data, torch.device("cpu"))
    on_gpu = imaging.decode_jpegs(data, torch.device("cuda"))
    for a, b in zip(on_cpu, on_gpu):
        assert a.shape == b.shape
        assert (a.float() - b.cpu().float()).abs().mean() < 1.0  # IDCT implementations differ slightly


def test_a_jpeg_whose_profile_asks_for_a_conversion_goes_through_pillow(lite0_explainer):
    """nvJPEG cannot apply an ICC profile: a Display P3 JPEG is decoded by Pillow, which
    converts it to sRGB; a JPEG with an sRGB profile (no conversion) stays on the device."""
    from PIL import ImageCms

    from tests.icc import display_profile

    image = photo()
    p3 = ImageCms.getOpenProfile(io.BytesIO(display_profile("Display P3")))
    in_p3 = ImageCms.buildTransform(imaging.SRGB, p3, "RGB", "RGB", imaging.INTENT).apply(image)
    p3_jpeg = encode(in_p3, "JPEG", quality=95, icc_profile=display_profile("Display P3"))
    srgb_jpeg = encode(image, "JPEG", quality=95, icc_profile=imaging.SRGB.tobytes())
    device = on_device(lite0_explainer)
    assert not device.decodes_on_device(device.admit(ParsedRequest(p3_jpeg, OPTIONS)))
    assert device.decodes_on_device(device.admit(ParsedRequest(srgb_jpeg, OPTIONS)))
    p3_batch = device.preprocess([ParsedRequest(p3_jpeg, OPTIONS)])
    srgb_input = lite0_explainer.prepare(ParsedRequest(srgb_jpeg, OPTIONS)).pixels
    assert (p3_batch.pixels[0].float() - srgb_input.float()).abs().mean() < 1.5
