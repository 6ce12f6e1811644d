"""The localisation set: real objects pasted on real textures at known boxes.

The objects are cut from the photos along the hand-drawn boxes of
``evaluation.photos.OBJECTS``; the pointing game and the energy-based pointing game
(``evaluation/metrics.py``) are played on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from evaluation.photos import OBJECTS, TEXTURES, load_photos, rgb
from evaluation.saliency import forward_batch
from handler.explainer import Explainer


@dataclass(frozen=True)
class Composite:
    """One image of the localisation set: a real object pasted on a real texture.

    Attributes:
        name: ``object@texture#n``.
        pixels: H x W x 3 uint8 at the model's input size.
        box: where the object lies (x0, y0, x1, y1), exclusive ends.
        label: the class the model gives the object alone (and the composite).
    """

    name: str
    pixels: torch.Tensor
    box: tuple[int, int, int, int]
    label: int

    @property
    def off_centre(self) -> bool:
        """True when the box leaves out the image's centre, where a centre prior cannot score."""
        height, width = self.pixels.shape[:2]
        x0, y0, x1, y1 = self.box
        return not (x0 <= width // 2 < x1 and y0 <= height // 2 < y1)


def _object_crops(objects: dict[str, tuple[str, tuple[int, int, int, int]]]) -> dict[str, np.ndarray]:
    photos = load_photos(sorted({photo for photo, _ in objects.values()}))
    return {name: photos[photo][y0:y1, x0:x1] for name, (photo, (x0, y0, x1, y1)) in objects.items()}


def _fit(crop: np.ndarray, size: int) -> np.ndarray:
    """The crop resized so its long side is ``size``, aspect kept."""
    height, width = crop.shape[:2]
    scale = size / max(height, width)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(crop).resize(new, Image.BICUBIC))


def _letterbox(crop: np.ndarray, side: int) -> np.ndarray:
    """The crop centred on a grey square: how the model sees the object alone."""
    canvas = np.full((side, side, 3), 128, dtype=np.uint8)
    fitted = _fit(crop, side)
    y0, x0 = (side - fitted.shape[0]) // 2, (side - fitted.shape[1]) // 2
    canvas[y0 : y0 + fitted.shape[0], x0 : x0 + fitted.shape[1]] = fitted
    return canvas


def build_localisation_set(
    explainer: Explainer, per_object: int = 36, seed: int = 0, progress: Callable[[str], None] = lambda _: None
) -> tuple[list[Composite], int]:
    """Objects pasted at random places and sizes on random texture crops, reproducibly.

    Objects span 30-70 % of the image's side, anywhere in it: large enough for the
    model to still recognise them, so most boxes hold the image's centre (see
    ``Composite.off_centre``).
    Each object's class is the model's top-1 for the object alone (letterboxed on grey);
    a composite is kept only when the model gives it that class too, so a map that
    points at the object points at the evidence for the prediction.

    Returns:
        The kept composites and how many were made.
    """
    side = explainer.input_size[0]
    rng = np.random.default_rng(seed)
    crops = _object_crops(OBJECTS)
    textures = {name: rgb(load()) for name, load in TEXTURES.items()}
    alone = torch.from_numpy(np.stack([_letterbox(crop, side) for crop in crops.values()]))
    object_class = dict(zip(crops, forward_batch(explainer, alone).classes.tolist()))
    candidates: list[Composite] = []
    for name, crop in crops.items():
        for n in range(per_object):
            texture_name = list(textures)[n % len(textures)]
            texture = textures[texture_name]
            ty, tx = rng.integers(0, texture.shape[0] - side + 1), rng.integers(0, texture.shape[1] - side + 1)
            canvas = texture[ty : ty + side, tx : tx + side].copy()
            fitted = _fit(crop, int(rng.integers(side * 3 // 10, side * 7 // 10 + 1)))
            height, width = fitted.shape[:2]
            y0, x0 = int(rng.integers(0, side - height + 1)), int(rng.integers(0, side - width + 1))
            canvas[y0 : y0 + height, x0 : x0 + width] = fitted
            candidates.append(
                Composite(
                    f"{name}@{texture_name}#{n}",
                    torch.from_numpy(canvas),
                    (x0, y0, x0 + width, y0 + height),
                    object_class[name],
                )
            )
    kept: list[Composite] = []
    for start in range(0, len(candidates), 32):
        chunk = candidates[start : start + 32]
        classes = forward_batch(explainer, torch.stack([c.pixels for c in chunk])).classes.tolist()
        kept += [c for c, got in zip(chunk, classes) if got == c.label]
        progress(f"localisation set: {start + len(chunk)}/{len(candidates)} composites classified, {len(kept)} kept")
    return kept, len(candidates)
