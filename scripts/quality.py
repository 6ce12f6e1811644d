"""How faithful a saliency map is: the photos, the localisation set, the methods, the measures.

``scripts/evaluate.py`` (``make evaluate``) runs all of it on EfficientNet-Lite0 with its
real weights; the figure scripts reuse the photos and the methods. Every DVE map here
comes from ``handler.explainer.Explainer.forward`` (the handler's hook) and
``handler.dve.explain`` (the handler's math), drawn at the model's input size.

Measures (see ``docs/algorithm.md#measures-used-to-choose-the-defaults``):

* deletion / insertion AUC (Petsiuk et al., RISE, arXiv 1806.07421): the probability of
  the class predicted for the photo as its pixels, most salient first, are replaced by
  a constant (deletion; lower is better) or put back into a blurred copy (insertion;
  higher is better), in ``steps`` equal steps;
* pointing game (Zhang et al., arXiv 1608.00507): a hit when the map's maximum lies in
  the object's box (strict: no 15-pixel tolerance); energy-based pointing game
  (Score-CAM): the share of the map's mass inside the box.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from handler import dve, imaging, rendering
from handler.dve import DVEParams
from handler.explainer import Explainer
from handler.options import ParsedRequest, RequestOptions


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


def rgb(array: np.ndarray) -> np.ndarray:
    """Any scikit-image photo as H x W x 3 uint8 (grayscale repeated, alpha dropped)."""
    image = Image.fromarray(array)
    return np.asarray(image.convert("RGB"))


def load_photos(names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The named photos (all of ``PHOTOS`` by default) as RGB uint8 arrays."""
    names = list(PHOTOS) if names is None else names
    unknown = sorted(set(names) - set(PHOTOS))
    if unknown:
        raise ValueError(f"unknown photo(s) {unknown}; known: {sorted(PHOTOS)}")
    return {name: rgb(PHOTOS[name]()) for name in names}


def model_crop(explainer: Explainer, image: np.ndarray | bytes) -> torch.Tensor:
    """The crop the handler would feed the model for this photo (H x W x 3 uint8).

    ``image`` is an RGB array (sent as a PNG) or an image file's bytes, sent as they are
    (so a user's JPEG is decoded, EXIF orientation included, exactly as the server does).
    """
    data = image if isinstance(image, bytes) else imaging.encode_png(image)
    request = ParsedRequest(data, RequestOptions(1, (), "png", None))
    return explainer.prepare(request).pixels


@dataclass
class Batch:
    """Model inputs and what one forward pass says about them.

    Attributes:
        pixels: B x H x W x 3 uint8 crops.
        x: the normalised model input, B x 3 x H x W.
        features: the explained layer's feature maps.
        probabilities: B x classes softmax.
        classes: the class each map explains: each image's top-1.
    """

    pixels: torch.Tensor
    x: torch.Tensor
    features: torch.Tensor
    probabilities: torch.Tensor
    classes: torch.Tensor


def forward_batch(explainer: Explainer, pixels: torch.Tensor) -> Batch:
    """One forward pass through the handler's own path (hook included)."""
    logits, features = explainer.forward(pixels)
    x = explainer.normalise(pixels)
    probabilities = logits.float().softmax(dim=1)
    return Batch(pixels, x, features, probabilities, probabilities.argmax(dim=1))


class SaliencyMethod:
    """A way to draw one saliency map per image of a batch at the model's input size."""

    name: str

    def maps(self, explainer: Explainer, batch: Batch) -> torch.Tensor:
        """B x H x W maps in [0, 1], larger meaning more salient."""
        raise NotImplementedError


class DVEMap(SaliencyMethod):
    """DVE or targeted DVE as the handler computes it, optionally class-conditional."""

    def __init__(self, name: str, params: DVEParams, *, targeted: bool = False, class_conditional: bool = False) -> None:
        self.name = name
        self.params = params
        self.targeted = targeted
        self.class_conditional = class_conditional

    # The last explanation computed, with its batch and settings: DVE and targeted DVE of
    # the same settings come from one ``dve.explain`` call, as in the handler.
    _last: tuple[Batch, DVEParams, bool, dve.Explanation] | None = None

    def maps(self, explainer: Explainer, batch: Batch) -> torch.Tensor:
        last = DVEMap._last
        if last is not None and last[0] is batch and last[1:3] == (self.params, self.class_conditional):
            explanation = last[3]
        else:
            weights = None
            if self.class_conditional:
                if explainer.classifier is None:
                    raise ValueError(f"class-conditional DVE needs a linear classifier reading layer {explainer.layer}")
                weights = explainer.classifier.weight.detach()[batch.classes]
            explanation = dve.explain(batch.features, self.params, explainer.input_size, weights)
            DVEMap._last = (batch, self.params, self.class_conditional, explanation)
        chosen = explanation.targeted if self.targeted else explanation.dve
        return dve.upsample_maps(chosen, explainer.input_size)


class GradCAMMap(SaliencyMethod):
    """Grad-CAM from the ``grad-cam`` package for each image's top class.

    Grad-CAM hooks a module's *output*. EfficientNet-Lite0's explained map enters global
    pooling from a Swish module that runs many times, so there Grad-CAM takes the
    BatchNorm right before it: the same 1280 x 7 x 7 map, before the activation.
    """

    LAYERS = {"_avg_pooling:input": "_bn1", "avgpool:input": "layer4"}

    def __init__(self, name: str = "grad-cam") -> None:
        self.name = name

    @classmethod
    def layer_name(cls, explainer: Explainer) -> str:
        explained = str(explainer.layer)
        return cls.LAYERS.get(explained, explained)

    def maps(self, explainer: Explainer, batch: Batch) -> torch.Tensor:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        layer = dict(explainer.model.named_modules())[self.layer_name(explainer)]
        targets = [ClassifierOutputTarget(int(c)) for c in batch.classes]
        with torch.enable_grad(), GradCAM(model=explainer.model, target_layers=[layer]) as cam:
            maps = cam(input_tensor=batch.x.detach().clone(), targets=targets)
        return torch.from_numpy(maps).float().to(batch.x.device).clamp_(0.0, 1.0)


class RandomMap(SaliencyMethod):
    """Uniform noise on the explained layer's grid, upsampled like DVE (a fair random baseline)."""

    def __init__(self, seed: int = 0, name: str = "random") -> None:
        self.name = name
        self.generator = torch.Generator().manual_seed(seed)  # same calls, same maps

    def maps(self, explainer: Explainer, batch: Batch) -> torch.Tensor:
        grid = torch.rand(batch.features.shape[0], *batch.features.shape[-2:], generator=self.generator)
        return dve.upsample_maps(dve.normalize_maps(grid), explainer.input_size).to(batch.x.device)


class CentredGaussian(SaliencyMethod):
    """A Gaussian bump in the middle of the image (sigma a quarter of the side): the photographer's prior."""

    def __init__(self, name: str = "centred gaussian") -> None:
        self.name = name

    def maps(self, explainer: Explainer, batch: Batch) -> torch.Tensor:
        height, width = explainer.input_size
        y = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
        x = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
        bump = torch.exp(-(y[:, None] ** 2 / (2 * (height / 4) ** 2) + x[None, :] ** 2 / (2 * (width / 4) ** 2)))
        return bump.expand(batch.pixels.shape[0], height, width).to(batch.x.device)


class Scorer:
    """The model as a judge: probability of a class for batches of normalised inputs.

    It runs a channels-last copy of the model (1.3x faster on CPU, same answers to 1e-5),
    so the thousands of deletion/insertion images cost less.
    """

    def __init__(self, explainer: Explainer, chunk: int = 32) -> None:
        self.model = copy.deepcopy(explainer.model).to(memory_format=torch.channels_last).eval()
        self.chunk = chunk

    def probability(self, x: torch.Tensor, target: int) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for part in x.split(self.chunk):
                logits = self.model(part.contiguous(memory_format=torch.channels_last))
                out.append(logits.float().softmax(dim=1)[:, target])
        return torch.cat(out).cpu()


def blurred(x: torch.Tensor) -> torch.Tensor:
    """RISE's insertion start: the image blurred by an 11-pixel Gaussian of sigma 5."""
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(x, kernel_size=[11, 11], sigma=[5.0, 5.0])


def saliency_order(saliency: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Rank of each pixel (0 = most salient) of one H x W map; ties broken at random, reproducibly.

    Maps that zero whatever lies under a threshold (DVE's psi) tie over whole regions:
    a fixed random order among equals gives them the expected score of "no preference".
    """
    generator = torch.Generator().manual_seed(seed)
    jitter = torch.rand(saliency.numel(), generator=generator, dtype=torch.float64)
    values = saliency.flatten().double().cpu()
    order = np.lexsort((jitter.numpy(), -values.numpy()))  # by value descending, then jitter
    rank = torch.empty(saliency.numel(), dtype=torch.long)
    rank[torch.from_numpy(order)] = torch.arange(saliency.numel())
    return rank.view(saliency.shape)


@dataclass(frozen=True)
class Curves:
    """Probability of the explained class after each step (``steps + 1`` points each)."""

    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> float:
        return auc(self.deletion)

    @property
    def insertion_auc(self) -> float:
        return auc(self.insertion)


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at equal steps over [0, 1] (trapezoid rule)."""
    curve = np.asarray(curve, dtype=np.float64)
    return float((curve[1:] + curve[:-1]).sum() / (2 * (len(curve) - 1)))


@dataclass(frozen=True)
class Substrates:
    """What one image's deletion and insertion start from, with their scores.

    Attributes:
        x: the normalised image, 3 x H x W.
        removed: what deleted pixels become (the normalisation's mean: 0, as in RISE).
        start: insertion's start (the blurred image).
        p_full, p_removed, p_start: the explained class's probability on each.
    """

    x: torch.Tensor
    removed: torch.Tensor
    start: torch.Tensor
    p_full: float
    p_removed: float
    p_start: float

    @classmethod
    def of(cls, scorer: Scorer, x: torch.Tensor, target: int) -> "Substrates":
        removed = torch.zeros_like(x)
        start = blurred(x.unsqueeze(0))[0]
        p = scorer.probability(torch.stack([x, removed, start]), target)
        return cls(x, removed, start, float(p[0]), float(p[1]), float(p[2]))


def deletion_insertion(scorer: Scorer, substrates: Substrates, saliency: torch.Tensor, target: int, steps: int, seed: int = 0) -> Curves:
    """RISE deletion and insertion curves of one map (H x W) in ``steps`` equal steps.

    The two end points of each curve (nothing / everything changed) do not depend on
    the map: they come from ``substrates``, so a map costs ``2 (steps - 1)`` images.
    """
    if steps < 2:
        raise ValueError("steps must be at least 2")
    x = substrates.x
    rank = saliency_order(saliency, seed).to(x.device)
    counts = torch.tensor([round(k * rank.numel() / steps) for k in range(1, steps)], device=x.device)
    masks = (rank[None] < counts[:, None, None]).unsqueeze(1)  # (steps-1) x 1 x H x W
    deleted = torch.where(masks, substrates.removed, x)
    inserted = torch.where(masks, x, substrates.start)
    p = scorer.probability(torch.cat([deleted, inserted]), target).numpy()
    middle = steps - 1
    deletion = np.concatenate([[substrates.p_full], p[:middle], [substrates.p_removed]])
    insertion = np.concatenate([[substrates.p_start], p[middle:], [substrates.p_full]])
    return Curves(deletion, insertion)


def pointing_hit(saliency: torch.Tensor, box: tuple[int, int, int, int]) -> bool:
    """True when the map's maximum (H x W) lies in ``box`` (x0, y0, x1, y1; exclusive ends)."""
    index = int(saliency.flatten().argmax())
    y, x = divmod(index, saliency.shape[-1])
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


def energy_in_box(saliency: torch.Tensor, box: tuple[int, int, int, int]) -> float:
    """Share of the map's (non-negative) mass inside ``box``; 0 for an empty map."""
    mass = saliency.clamp_min(0)
    total = float(mass.sum())
    if total <= 0:
        return 0.0
    x0, y0, x1, y1 = box
    return float(mass[y0:y1, x0:x1].sum()) / total


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1; exclusive ends)."""
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


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
            candidates.append(Composite(f"{name}@{texture_name}#{n}", torch.from_numpy(canvas), (x0, y0, x0 + width, y0 + height), object_class[name]))
    kept: list[Composite] = []
    for start in range(0, len(candidates), 32):
        chunk = candidates[start : start + 32]
        classes = forward_batch(explainer, torch.stack([c.pixels for c in chunk])).classes.tolist()
        kept += [c for c, got in zip(chunk, classes) if got == c.label]
        progress(f"localisation set: {start + len(chunk)}/{len(candidates)} composites classified, {len(kept)} kept")
    return kept, len(candidates)


def overlay_tile(pixels: torch.Tensor, saliency: torch.Tensor) -> np.ndarray:
    """A map drawn over its image as the handler's ``overlay`` format draws it (H x W x 3)."""
    return rendering.overlay(pixels.cpu().numpy(), rendering.to_uint8(saliency.cpu()).numpy())
