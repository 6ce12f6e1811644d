"""The project's real photographs: which ones, what they show, where their objects lie.

The one place for the sample photos every part of the project uses (the tests, the
evaluation, the figures, the bench, the load tests, ``scripts/samples.py`` and the GPU
bundle), with

* ``SAMPLES``: scikit-image's four sample photographs (chelsea, coffee, rocket,
  astronaut), the default images of the README, the tests, the bench and Fig. 7;
* ``PHOTOS``: every real photograph scikit-image and scikit-learn ship without a
  download (the evaluation's deletion/insertion set);
* ``TRUTH``: the ImageNet classes that count as a right answer for the figures' photos,
  and ``CAT_CLASSES``, the classes that count as right for chelsea (the cat);
* ``OBJECTS``: the boxes drawn by hand around whole objects in those photos (the
  localisation set and the tests' off-centre scenes);
* ``encode_image``: an array or a PIL image as file bytes (JPEG, PNG, ...).

scikit-image and scikit-learn are imported only when a photo is loaded: where they are
not installed (the GPU check's bare machine) ``sample_jpegs`` reads the JPEG files of
``$DVE_PHOTO_DIR`` instead.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# scikit-image's sample photographs: the default images wherever a few real photos are needed.
SAMPLES = ("chelsea", "coffee", "rocket", "astronaut")
SAMPLE_JPEG_QUALITY = 92


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _motorcycle(side: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return skimage.data.stereo_motorcycle()[side]

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


# Every real photograph that scikit-image and scikit-learn ship without a download.
# Left out: the textures (brick, grass, gravel: the localisation set's backgrounds),
# ``cat`` (the same array as chelsea), lfw_subset (25 x 25 faces), and the drawn or
# synthetic images (logo, colorwheel, checkerboard, binary_blobs, horse, phantom).
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    **{
        name: _skimage(name)
        for name in (
            "astronaut",
            "camera",
            "cell",
            "chelsea",
            "clock",
            "coffee",
            "coins",
            "hubble_deep_field",
            "immunohistochemistry",
            "microaneurysms",
            "moon",
            "page",
            "retina",
            "rocket",
            "text",
        )
    },
    "motorcycle_left": _motorcycle(0),
    "motorcycle_right": _motorcycle(1),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
}
TEXTURES: dict[str, Callable[[], np.ndarray]] = {name: _skimage(name) for name in ("brick", "grass", "gravel")}

# Objects cut from the photos for the localisation set: (photo, box x0, y0, x1, y1),
# boxes drawn by hand around the whole object.
OBJECTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "cat": ("chelsea", (90, 40, 360, 300)),
    "cup": ("coffee", (150, 20, 480, 330)),
    "rocket": ("rocket", (270, 60, 345, 427)),
    "shuttle": ("astronaut", (345, 0, 475, 285)),
    "helmet": ("astronaut", (275, 340, 512, 512)),
    "motorcycle": ("motorcycle_left", (90, 95, 690, 450)),
    "flower": ("flower", (165, 85, 450, 360)),
    "movie camera": ("camera", (245, 130, 335, 200)),
}


# ---------------------------------------------------------------------------------------
# Ground truth: which ImageNet classes count as a right answer for the photos.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Truth:
    """What a photo shows and which classes count as right for it.

    Attributes:
        shows: what is in the photo, in words.
        classes: the class indices that count as a right top-1; empty when the label set
            has no class for what the photo shows (then every answer is wrong).
        reason: why these classes and not others.
    """

    shows: str
    classes: frozenset[int]
    reason: str


# chelsea is a short-haired, striped tabby. ImageNet-1k's domestic cats are tabby (281),
# tiger cat (282), Persian (283), Siamese (284) and Egyptian cat (285): the first two and
# the last are the short-haired striped ones, which ImageNet's own labels do not tell
# apart reliably; a Persian (long hair) or a Siamese (pale coat, dark points) is visibly
# another cat. So a right answer for chelsea, in the tests and in the figures alike, is
# one of these three.
CAT_CLASSES = frozenset({281, 282, 285})

# ImageNet-1k indices. The rule: a class is right when its definition (WordNet, which
# ImageNet's classes are) covers the object in the photo as far as the photo shows it.
# Where several classes fit, all count, as in the "ReaL" relabelling of ImageNet (Beyer
# et al., "Are we done with ImageNet?", arXiv 2006.07159), which accepts every plausible
# label. The default set holds right and wrong answers, as the paper's Fig. 4 does.
TRUTH: dict[str, Truth] = {
    "chelsea": Truth(
        "a short-haired, striped tabby cat",
        CAT_CLASSES,
        "tabby (281), tiger cat (282) and Egyptian cat (285) are ImageNet's short-haired striped domestic cats, "
        "which its own labels do not tell apart reliably; Persian (283, long hair) and Siamese (284, pale coat, "
        "dark points) are visibly not this cat",
    ),
    "coffee": Truth(
        "an espresso in a small cup on a saucer",
        frozenset({967, 968}),
        "espresso (967) is the drink, cup (968) the vessel; coffee mug (504) is left out: a mug is a tall "
        "cylinder without a saucer, this is a demitasse on one",
    ),
    "rocket": Truth(
        "a launch rocket (Falcon 9) on its pad",
        frozenset({657, 744}),
        "ImageNet has no launch-vehicle class; missile (657, 'a rocket carrying a warhead') and projectile "
        "(744, 'projectile, missile') are its rocket classes, and what tells a missile from a launch rocket, "
        "the payload, is not visible; space shuttle (812) is wrong: there is no winged orbiter in the photo",
    ),
    "astronaut": Truth(
        "an astronaut's portrait, a space-shuttle model behind her",
        frozenset({812}),
        "ImageNet has no class for a person or a spacesuit; the only object it names here is the shuttle "
        "model, space shuttle (812). The helmet is a space helmet, neither a crash helmet (518, a "
        "motorcyclist's) nor a football helmet (560); bobsled (450) is not in the photo",
    ),
    "motorcycle_left": Truth(
        "a full-size motorcycle",
        frozenset(),
        "ImageNet-1k has no motorcycle class. Moped (665) is 'a motorbike that can be pedaled or driven by a "
        "low-powered gasoline engine' and motor scooter (670) has a step-through frame and small wheels: "
        "both are other vehicles, and the difference (size, engine, no pedals, frame) is visible, so no "
        "answer is right",
    ),
}


# ---------------------------------------------------------------------------------------
# Loading and encoding.
# ---------------------------------------------------------------------------------------


def rgb(array: np.ndarray) -> np.ndarray:
    """Any scikit-image photo as H x W x 3 uint8 (grayscale repeated, alpha dropped)."""
    image = Image.fromarray(array)
    return np.asarray(image.convert("RGB"))


def load_photos(names: list[str] | tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The named photos (all of ``PHOTOS`` by default) as RGB uint8 arrays."""
    names = list(PHOTOS) if names is None else list(names)
    unknown = sorted(set(names) - set(PHOTOS))
    if unknown:
        raise ValueError(f"unknown photo(s) {unknown}; known: {sorted(PHOTOS)}")
    return {name: rgb(PHOTOS[name]()) for name in names}


def encode_image(array_or_image: np.ndarray | Image.Image, fmt: str = "JPEG", **save_args: Any) -> bytes:
    """Image bytes of a numpy array or PIL image in ``fmt`` (Pillow's format name), with Pillow's save options."""
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def sample_jpeg(name: str) -> bytes:
    """One photo as an RGB JPEG of quality 92: how the sample photos travel as files."""
    return encode_image(load_photos([name])[name], "JPEG", quality=SAMPLE_JPEG_QUALITY)


def sample_jpegs(names: tuple[str, ...] = SAMPLES) -> dict[str, bytes]:
    """The photos as JPEG bytes (``sample_jpeg``), or the files ``<name>.jpg`` of
    ``$DVE_PHOTO_DIR`` where it is set (the GPU check's bundle, ``scripts/gpu_bundle.py``)."""
    if os.environ.get("DVE_PHOTO_DIR"):
        return {name: (Path(os.environ["DVE_PHOTO_DIR"]) / f"{name}.jpg").read_bytes() for name in names}
    return {name: sample_jpeg(name) for name in names}


# The files of ``scripts/samples.py`` (build/samples/): JPEG, but astronaut as PNG (both formats in the examples).
SAMPLE_FILES = {f"{name}.{'png' if name == 'astronaut' else 'jpg'}": name for name in SAMPLES}


def write_samples(folder: Path) -> list[Path]:
    """The sample photos as the files of ``SAMPLE_FILES`` in ``folder`` (those already there are kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, name in SAMPLE_FILES.items():
        path = folder / filename
        if not path.exists():
            fmt = "PNG" if path.suffix == ".png" else "JPEG"
            path.write_bytes(
                encode_image(
                    load_photos([name])[name], fmt, **({"quality": SAMPLE_JPEG_QUALITY} if fmt == "JPEG" else {})
                )
            )
        written.append(path)
    return written
