"""The handler's configuration: the ``handler:`` section of a model's ``model-config.yaml``.

``scripts/build_mar.py`` writes it; the handler reads it at start-up. Unknown keys are
refused, so a typo in a config stops the worker with a clear message instead of being
silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from handler.dve import DVEParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPLANATIONS = ("dve", "targeted_dve")
FORMATS = ("png", "overlay", "array")


@dataclass(frozen=True)
class RequestDefaults:
    """What a request gets for every option it does not set."""

    topk: int = 5
    explanations: tuple[str, ...] = EXPLANATIONS
    format: str = "png"
    # Long side of the returned maps in pixels. 224 keeps the two PNG maps at a few KB
    # and their rendering + encoding at about a millisecond each; an original-size map
    # of a 12 MP photo costs far more than the forward pass (docs/performance.md).
    map_size: int | str = 224
    # DVE at every stage of the model (Fig. 7 of the paper): off unless asked for, as it
    # renders one more map per stage and holds every stage's maps during the forward pass.
    stages: bool = False
    # The class-conditional variant (not the paper's; docs/explanation-quality.md): off
    # unless asked for, so the maps are the paper's DVE by default.
    class_conditional: bool = False


@dataclass(frozen=True)
class Limits:
    """Bounds on one request's work, checked before its image is decoded (``handler.budget``).

    Attributes:
        max_image_bytes: the image's encoded size.
        max_image_pixels: the image's pixels, read from its header; bounds decoding.
        max_map_size: the long side of a map, ``"original"`` included.
        max_array_values: the values of format ``array``, over all maps.
        max_rendered_pixels: map pixels drawn over all maps (an overlay counts 3 per pixel).
        max_response_bytes: an upper bound of the answer's size; keep it below TorchServe's
            ``max_response_size``.

    The defaults keep the most expensive request they allow under 2 s of worker time and
    500 MB of extra memory on 2 CPU cores (``make worstcase``, docs/reliability.md).
    """

    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_map_size: int = 4096
    max_array_values: int = 1024 * 1024
    max_rendered_pixels: int = 12_000_000
    max_response_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class ServingConfig:
    """Everything the handler needs to know about the model it serves.

    Attributes:
        architecture: ``efficientnet_lite0``, a torchvision classifier name, or ``custom``.
        num_classes: number of outputs (and labels).
        model_class: for ``custom``: the class to build from the archive's model file.
        model_kwargs: for ``custom``: keyword arguments of that class.
        target_layer: the layer to explain (``"features.30"``, ``"avgpool:input"``);
            found automatically when None (see ``handler.layers.find_feature_layer``).
        resize_size: the image's short side is scaled to this before the crop.
        crop_size: side of the square centre crop the model sees.
        mean, std: per-channel normalisation of the [0, 1] RGB input.
        dve: parameters of DVE and targeted DVE.
        defaults: per-request defaults.
        limits: input and output bounds.
        compile_dve: on CUDA, run DVE's fixed-shape tail (band products, psi, normalisation,
            targeted DVE, boxes) through ``torch.compile(mode="reduce-overhead")``: CUDA
            graphs per batch size instead of about fifty small kernel launches. Each new
            batch size compiles once (seconds), so it is off unless asked for; any failure
            falls back to eager for good.
    """

    architecture: str = "efficientnet_lite0"
    num_classes: int = 1000
    model_class: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    target_layer: str | None = None
    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dve: DVEParams = DVEParams()
    defaults: RequestDefaults = RequestDefaults()
    limits: Limits = Limits()
    compile_dve: bool = False

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError("num_classes must be at least 1")
        if not 0 < self.crop_size <= self.resize_size:
            raise ValueError(f"need 0 < crop_size <= resize_size, got {self.crop_size}, {self.resize_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std positive")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> ServingConfig:
        """Builds the config from the ``handler:`` mapping of ``model-config.yaml``."""
        values = dict(values or {})
        _refuse_unknown(cls, values, "handler")
        if "dve" in values:
            values["dve"] = DVEParams.from_mapping(values["dve"] or {})
        if "defaults" in values:
            defaults = dict(values["defaults"] or {})
            _refuse_unknown(RequestDefaults, defaults, "handler.defaults")
            if "explanations" in defaults:
                defaults["explanations"] = tuple(defaults["explanations"])
            values["defaults"] = RequestDefaults(**defaults)
        if "limits" in values:
            limits = dict(values["limits"] or {})
            _refuse_unknown(Limits, limits, "handler.limits")
            values["limits"] = Limits(**limits)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        """Plain data for YAML: the inverse of ``from_mapping``."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        data["model_kwargs"] = dict(self.model_kwargs)
        data["defaults"]["explanations"] = list(self.defaults.explanations)
        return data


def _refuse_unknown(cls: type, values: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
