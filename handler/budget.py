"""What one request will cost, known from its image header and options before any work.

A valid request can still ask for a lot: an 8000 x 6000 image with original-size
overlays of every stage is seven 48 MP RGB images to draw and encode. ``check`` counts,
before the image is decoded:

* the pixels decoded (bounded by ``max_image_pixels``, read from the header: a JPEG
  decodes at reduced scale when the request needs less, so this may be fewer);
* the pixels rendered over all the request's maps (``dve``, ``targeted_dve``, every
  stage); an overlay counts three per pixel, its RGB work; an ``array`` counts its values;
* the bytes of its answer, an upper bound that holds even for maps that do not compress.

A request over a limit is answered 413 with a message naming the limit and the largest
``map_size`` that would fit. The limits are the archive's ``handler.limits``
(``handler.config.Limits``); docs/reliability.md gives how their defaults were measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import ceil

from handler.config import Limits
from handler.errors import RequestError
from handler.imaging import CropGeometry
from handler.options import MIN_MAP_SIZE, RequestOptions

PNG_FIXED_BYTES = 1024  # signature, header, end chunk and zlib's wrapper, with room to spare
ARRAY_VALUE_CHARS = 7  # "0.1234," : values in [0, 1] at 4 decimals, and a separator
MAP_ENTRY_BYTES = 256  # {"format", "width", "height", "box", "layer", "shape", ...} around a map
FIXED_BYTES = 2048  # the rest of the answer: image size, layer, the JSON's punctuation
PREDICTION_BYTES = 64  # one prediction's keys and numbers, without its label


@dataclass(frozen=True)
class RequestCost:
    """One request's work and answer size.

    Attributes:
        decoded_pixels: pixels the decoder will produce.
        maps: how many maps the request draws.
        map_width, map_height: each map's size in pixels.
        rendered_pixels: map pixels over all maps; 3 per pixel for an overlay.
        response_bytes: an upper bound of the JSON answer's size.
    """

    decoded_pixels: int
    maps: int
    map_width: int
    map_height: int
    rendered_pixels: int
    response_bytes: int


def request_cost(
    options: RequestOptions, geometry: CropGeometry, *, decoded_pixels: int, stages: int, label_chars: int
) -> RequestCost:
    """The cost of ``options`` on an image of ``geometry``.

    Args:
        options: what the request asked for.
        geometry: the image's size and the model's crop in it.
        decoded_pixels: what the decoder will produce (``OpenedImage.plan``).
        stages: the model's number of stages (maps a ``stages`` request adds).
        label_chars: the longest class label, in characters.
    """
    maps = len(options.explanations) + (stages if options.stages else 0)
    width, height = geometry.map_size(options.map_size)
    pixels = width * height
    if options.format == "array":
        per_map = height * (width * ARRAY_VALUE_CHARS + 2) + 2
        rendered = pixels * maps
    else:
        channels = 3 if options.format == "overlay" else 1
        raw = height * (width * channels + 1)  # one filter byte per row
        # zlib's deflateBound (raw/4096 + raw/16384 + 13 at most); ISA-L's stored blocks stay
        # under it too (measured: 1,520 bytes more than 12 MB of random bytes, against 3,751).
        png = raw + (raw // 3200 + 1) + PNG_FIXED_BYTES
        per_map = 4 * ceil(png / 3)  # base64
        rendered = pixels * channels * maps
    answer = FIXED_BYTES + options.topk * (PREDICTION_BYTES + 6 * label_chars) + maps * (per_map + MAP_ENTRY_BYTES)
    return RequestCost(decoded_pixels, maps, width, height, rendered, answer)


def check(
    options: RequestOptions,
    geometry: CropGeometry,
    limits: Limits,
    *,
    decoded_pixels: int,
    stages: int,
    label_chars: int,
) -> RequestCost:
    """The request's cost, or a RequestError (413) naming the limit it exceeds and the way out."""
    if options.map_size is None and max(geometry.width, geometry.height) > limits.max_map_size:
        raise RequestError(
            f"map_size 'original' means maps of {geometry.width} x {geometry.height} for this image; the long side "
            f"may be at most {limits.max_map_size}: ask for a map_size of at most "
            f"{largest_map_size(options, geometry, limits, stages, label_chars)}",
            413,
        )
    cost = request_cost(options, geometry, decoded_pixels=decoded_pixels, stages=stages, label_chars=label_chars)
    problem = _over(cost, options, limits)
    if problem:
        fit = largest_map_size(options, geometry, limits, stages, label_chars)
        way_out = f"ask for a map_size of at most {fit}" if fit else "ask for fewer maps"
        if options.stages or len(options.explanations) > 1:
            way_out += " (or fewer maps: one explanation, stages false)"
        if options.format != "png":
            way_out += ", or format 'png'"
        raise RequestError(f"{problem}: {way_out}", 413)
    return cost


def _over(cost: RequestCost, options: RequestOptions, limits: Limits) -> str | None:
    """What ``cost`` exceeds, in words, or None."""
    drawn = f"{cost.maps} map(s) of {cost.map_width} x {cost.map_height}"
    if options.format == "array" and cost.rendered_pixels > limits.max_array_values:
        return (
            f"format 'array' would return {drawn} = {cost.rendered_pixels} values; "
            f"the limit is {limits.max_array_values}"
        )
    if cost.rendered_pixels > limits.max_rendered_pixels:
        kind = " RGB" if options.format == "overlay" else ""
        return (
            f"drawing {drawn}{kind} is {cost.rendered_pixels} pixel values; "
            f"the limit per request is {limits.max_rendered_pixels}"
        )
    if cost.response_bytes > limits.max_response_bytes:
        return (
            f"{drawn} in format '{options.format}' could answer up to {cost.response_bytes} bytes; "
            f"the limit is {limits.max_response_bytes}"
        )
    return None


def largest_map_size(
    options: RequestOptions, geometry: CropGeometry, limits: Limits, stages: int, label_chars: int
) -> int | None:
    """The largest map_size (long side) within every limit for these options, or None if none is."""

    def fits(size: int) -> bool:
        sized = replace(options, map_size=size)
        return (
            _over(
                request_cost(sized, geometry, decoded_pixels=0, stages=stages, label_chars=label_chars), sized, limits
            )
            is None
        )

    low, high = MIN_MAP_SIZE, limits.max_map_size
    if not fits(low):
        return None
    while low < high:  # cost grows with the size: the largest size that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low
