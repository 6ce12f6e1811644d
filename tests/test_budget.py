"""Each request's cost is known and bounded before its image is decoded (handler.budget)."""

from __future__ import annotations

import copy
import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from evaluation.photos import encode_image as encode
from handler import budget
from handler.config import Limits
from handler.imaging import CropGeometry
from handler.options import ParsedRequest, RequestOptions

BOTH = ("dve", "targeted_dve")


def limited(explainer, **limits):
    """The session's explainer with other limits (a shallow copy: same model)."""
    clone = copy.copy(explainer)
    clone.config = replace(explainer.config, limits=replace(explainer.config.limits, **limits))
    return clone


def noise_png(width: int, height: int) -> bytes:
    return encode(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8), "PNG")


def test_every_map_counts_and_an_overlay_counts_its_rgb():
    geometry = CropGeometry.centre_crop(400, 300, 256, 224)

    def rendered(fmt, explanations=BOTH, stages=False):
        options = RequestOptions(5, explanations, fmt, 200, stages)
        return budget.request_cost(options, geometry, decoded_pixels=0, stages=5, label_chars=20).rendered_pixels

    assert rendered("png") == 2 * 200 * 150
    assert rendered("png", ("dve",)) == 200 * 150
    assert rendered("png", stages=True) == 7 * 200 * 150
    assert rendered("overlay", stages=True) == 3 * 7 * 200 * 150
    assert rendered("png", ()) == 0


def test_original_obeys_max_map_size_with_a_413_naming_what_fits():
    geometry = CropGeometry.centre_crop(6000, 4000, 256, 224)
    options = RequestOptions(5, ("dve",), "png", None)
    limits = Limits(max_map_size=4096, max_rendered_pixels=8_000_000, max_response_bytes=64 << 20)
    with pytest.raises(budget.RequestError, match="'original' means maps of 6000 x 4000") as caught:
        budget.check(options, geometry, limits, decoded_pixels=0, stages=5, label_chars=20)
    assert caught.value.status == 413
    assert "map_size of at most 3464" in str(caught.value)  # 3464 x 2309 = 7,998,376 values; 3465 would be over 8 M
    small = CropGeometry.centre_crop(2000, 1500, 256, 224)
    assert budget.check(options, small, limits, decoded_pixels=0, stages=5, label_chars=20).map_width == 2000


@pytest.mark.parametrize("fmt, stages", [("png", False), ("overlay", True), ("array", False), ("array", True)])
def test_the_largest_map_size_named_fits_and_one_more_does_not(fmt, stages):
    geometry = CropGeometry.centre_crop(3000, 2000, 256, 224)
    limits = Limits(max_rendered_pixels=2_000_000, max_response_bytes=3_000_000, max_array_values=500_000)
    options = RequestOptions(1000, BOTH, fmt, 4096, stages)
    with pytest.raises(budget.RequestError) as caught:
        budget.check(options, geometry, limits, decoded_pixels=0, stages=5, label_chars=80)
    size = budget.largest_map_size(options, geometry, limits, 5, 80)
    assert caught.value.status == 413 and f"map_size of at most {size}" in str(caught.value)
    assert budget.check(replace(options, map_size=size), geometry, limits, decoded_pixels=0, stages=5, label_chars=80)
    with pytest.raises(budget.RequestError):
        budget.check(replace(options, map_size=size + 1), geometry, limits, decoded_pixels=0, stages=5, label_chars=80)


@pytest.mark.parametrize("fmt", ["png", "overlay", "array"])
def test_the_answer_is_never_larger_than_counted(lite0_explainer, fmt):
    """Noise photos make overlays incompressible; the bound must still hold, with maps and stages."""
    explainer = limited(lite0_explainer, max_rendered_pixels=1_000_000, max_array_values=1_000_000)
    image = noise_png(640, 480)
    options = RequestOptions(1000, BOTH, fmt, 10_000, stages=True, class_conditional=True)
    refused = explainer.run([ParsedRequest(image, options)])[0]
    size = budget.largest_map_size(
        options,
        CropGeometry.centre_crop(640, 480, 256, 224),
        explainer.config.limits,
        len(explainer.stages),
        explainer.label_chars,
    )
    assert refused.status == 413 and f"at most {size}" in refused.body["message"]
    sized = replace(options, map_size=size)
    result = explainer.run([ParsedRequest(image, sized)])[0]
    assert result.status == 200, result.body
    cost = budget.request_cost(
        sized,
        CropGeometry.centre_crop(640, 480, 256, 224),
        decoded_pixels=0,
        stages=len(explainer.stages),
        label_chars=explainer.label_chars,
    )
    assert len(result.to_bytes()) <= cost.response_bytes


def test_an_expensive_request_is_refused_before_its_image_is_decoded(lite0_explainer):
    """A header that promises a large image, with no image data behind it: 413, not 'corrupt'."""
    image = noise_png(2000, 1500)
    truncated = image[:4096]
    options = RequestOptions(5, BOTH, "overlay", None, stages=True)
    result = limited(lite0_explainer, max_rendered_pixels=1_000_000).run([ParsedRequest(truncated, options)])[0]
    assert result.status == 413 and "limit per request is 1000000" in result.body["message"]
    cheap = lite0_explainer.run([ParsedRequest(truncated, replace(options, map_size=64))])[0]
    assert cheap.status == 400 and "truncated or corrupt" in cheap.body["message"]


def test_an_overlay_decodes_the_photo_large_enough_for_its_maps(lite0_explainer):
    """A 2400 x 1600 JPEG: 1/8 scale feeds the model, but an overlay of 1200 px needs 1/2."""
    stripes = np.zeros((1600, 2400, 3), dtype=np.uint8)
    stripes[:, ::4] = 255  # one-pixel stripes every 4 pixels: gone at 1/8 scale, kept at 1/2
    data = encode(stripes, "JPEG", quality=95)
    options = RequestOptions(1, ("dve",), "overlay", 1200)
    body = lite0_explainer.run([ParsedRequest(data, options)])[0].body
    import base64

    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["explanations"]["dve"]["data"]))), dtype=np.float32)
    row = drawn[10, :, 1]  # a corner row, outside the crop: the photo untouched
    assert row.std() > 40  # the stripes survive: the photo was not decoded at 1/8 and scaled up


def test_an_archive_sets_its_own_limits():
    from serving.archive import BuildError, limits

    assert limits([]) == Limits()
    assert limits(["max_rendered_pixels=30000000", "max_map_size=8192"]) == Limits(
        max_rendered_pixels=30_000_000, max_map_size=8192
    )
    for pairs in (["max_rendered_pixels=lots"], ["max_pixels=5"], ["max_map_size=0"], ["max_map_size"]):
        with pytest.raises(BuildError):
            limits(pairs)
