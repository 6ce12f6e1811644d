"""Saliency maps of a batch drawn through the handler's own path: DVE, Grad-CAM, baselines.

``scripts/evaluate.py`` (``make evaluate``, ``evaluation/report.py``) measures them with
``evaluation/metrics.py`` on the photos of ``evaluation/photos.py`` and the localisation
set of ``evaluation/localisation.py``; the figures (``evaluation/figures.py``) draw them.
Every DVE map here comes from ``handler.explainer.Explainer.forward`` (the handler's
hook) and ``handler.dve.explain`` (the handler's math), drawn at the model's input size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from handler import dve, imaging, rendering
from handler.dve import DVEParams
from handler.explainer import Explainer
from handler.options import ParsedRequest, RequestOptions


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

    def forget(self) -> None:
        """Drops whatever the method kept from earlier batches (so the next call is timed alone)."""


class ExplanationCache:
    """The last explanation computed, with its batch and settings.

    DVE and targeted DVE of the same settings share one: both maps then come from one
    ``dve.explain`` call, as in the handler. Give the methods that may share work the
    same cache (``evaluation.report.build_methods`` does); each ``DVEMap`` has its own
    otherwise.
    """

    def __init__(self) -> None:
        self.last: tuple[Batch, DVEParams, bool, dve.Explanation] | None = None

    def get(self, batch: Batch, params: DVEParams, class_conditional: bool) -> dve.Explanation | None:
        last = self.last
        if last is not None and last[0] is batch and last[1:3] == (params, class_conditional):
            return last[3]
        return None

    def put(self, batch: Batch, params: DVEParams, class_conditional: bool, explanation: dve.Explanation) -> None:
        self.last = (batch, params, class_conditional, explanation)

    def clear(self) -> None:
        self.last = None


class DVEMap(SaliencyMethod):
    """DVE or targeted DVE as the handler computes it, optionally class-conditional."""

    def __init__(
        self,
        name: str,
        params: DVEParams,
        *,
        targeted: bool = False,
        class_conditional: bool = False,
        cache: ExplanationCache | None = None,
    ) -> None:
        self.name = name
        self.params = params
        self.targeted = targeted
        self.class_conditional = class_conditional
        self.cache = ExplanationCache() if cache is None else cache

    def forget(self) -> None:
        self.cache.clear()

    def maps(self, explainer: Explainer, batch: Batch) -> torch.Tensor:
        explanation = self.cache.get(batch, self.params, self.class_conditional)
        if explanation is None:
            weights = None
            if self.class_conditional:
                if explainer.classifier is None:
                    raise ValueError(f"class-conditional DVE needs a linear classifier reading layer {explainer.layer}")
                weights = explainer.classifier.weight.detach()[batch.classes]
            explanation = dve.explain(batch.features, self.params, explainer.input_size, weights)
            self.cache.put(batch, self.params, self.class_conditional, explanation)
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


def overlay_tile(pixels: torch.Tensor, saliency: torch.Tensor) -> np.ndarray:
    """A map drawn over its image as the handler's ``overlay`` format draws it (H x W x 3)."""
    return rendering.overlay(pixels.cpu().numpy(), rendering.to_uint8(saliency.cpu()).numpy())
