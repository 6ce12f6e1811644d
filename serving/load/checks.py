"""What a correct answer looks like, for the load tests (no Locust import: tests use it too)."""

from __future__ import annotations

import base64
import struct

from handler.imaging import CropGeometry  # the server's own geometry
from serving.load.photos import Photo


def _png_size(b64: str) -> tuple[int, int]:
    """Width and height from a base64 PNG's header, without decoding the picture."""
    header = base64.b64decode(b64[:32])
    if header[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return struct.unpack(">II", header[16:24])


def check_ours(body: dict, photo: Photo, topk: int, explanations: tuple[str, ...], fmt: str, map_size) -> None:
    """Raises AssertionError unless ``body`` is the answer this request should get."""
    assert len(body["predictions"]) == topk, f"{len(body['predictions'])} predictions, asked {topk}"
    assert body["image"] == {"width": photo.width, "height": photo.height}, body["image"]
    assert set(body["explanations"]) == set(explanations), sorted(body["explanations"])
    geometry = CropGeometry.centre_crop(photo.width, photo.height, 256, 224)
    width, height = geometry.map_size(None if map_size == "original" else map_size)
    for name, entry in body["explanations"].items():
        assert (entry["format"], entry["width"], entry["height"]) == (fmt, width, height), entry.get("width")
        if fmt == "array":
            assert len(entry["data"]) == height and len(entry["data"][0]) == width
        else:
            assert _png_size(entry["data"]) == (width, height)
        if name == "targeted_dve" and entry["box"] is not None:
            x0, y0, x1, y1 = entry["box"]
            assert 0 <= x0 < x1 <= photo.width and 0 <= y0 < y1 <= photo.height, entry["box"]


def check_stock(body: dict) -> None:
    """TorchServe's image_classifier: the top 5 labels with their probabilities."""
    assert isinstance(body, dict) and len(body) == 5 and all(0 <= v <= 1 for v in body.values()), body


def check_stock_explanation(body) -> None:
    """TorchServe's stock /explanations: Integrated Gradients attributions, 3 x 224 x 224."""
    assert isinstance(body, list) and len(body) == 3, type(body)
