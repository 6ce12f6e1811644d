"""Real photographs at several sizes and in JPEG and PNG, for load tests and scaling runs.

The photos ship with scikit-image and scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

from evaluation.photos import SAMPLES, encode_image, load_photos


@dataclass(frozen=True)
class Photo:
    name: str
    data: bytes
    content_type: str
    width: int
    height: int


def photo(name: str, image: Image.Image, fmt: str) -> Photo:
    image = image.convert("RGB")
    data = encode_image(image, fmt, quality=90) if fmt == "JPEG" else encode_image(image, fmt)
    return Photo(name, data, "image/jpeg" if fmt == "JPEG" else "image/png", image.width, image.height)


def _sources() -> dict[str, Image.Image]:
    """scikit-image's sample photos and scikit-learn's (china, flower), from ``evaluation.photos``."""
    return {name: Image.fromarray(array) for name, array in load_photos([*SAMPLES, "china", "flower"]).items()}


@lru_cache(maxsize=1)
def load_mix() -> tuple[Photo, ...]:
    """The load test's mix: 0.01 to 3.8 megapixels, JPEG and PNG."""
    src = _sources()
    return (
        photo("chelsea.jpg", src["chelsea"], "JPEG"),
        photo("coffee.png", src["coffee"], "PNG"),
        photo("rocket.jpg", src["rocket"], "JPEG"),
        photo("astronaut.png", src["astronaut"], "PNG"),
        photo("china.jpg", src["china"], "JPEG"),
        photo("flower.jpg", src["flower"], "JPEG"),
        photo("chelsea-thumbnail.jpg", src["chelsea"].resize((120, 80), Image.Resampling.LANCZOS), "JPEG"),
        photo("coffee-3.8mp.jpg", src["coffee"].resize((2400, 1600), Image.Resampling.BICUBIC), "JPEG"),
    )


def load_sizes() -> list[Photo]:
    """One photo (coffee) as JPEG from a thumbnail to 12 megapixels, for scaling runs."""
    coffee = _sources()["coffee"]
    sizes = [(96, 64), (300, 200), (600, 400), (1200, 800), (2400, 1600), (4000, 2667)]
    return [photo(f"coffee-{w}x{h}.jpg", coffee.resize((w, h), Image.Resampling.BICUBIC), "JPEG") for w, h in sizes]
