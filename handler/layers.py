"""Find the layer DVE explains and capture its feature maps with a forward hook.

DVE reads the feature maps of the model's *final pooling layer* (VGG-16: ``features.30``,
512 x 7 x 7). Networks whose last pooling is global (ResNet, EfficientNet, ...) squash the
maps to 1 x 1, so there the explained maps are the last spatial ones, the *input* of that
global pooling. Hooks live only inside a ``with`` block, so nothing leaks across requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

POOLING_TYPES: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
)


@dataclass(frozen=True)
class FeatureLayer:
    """A module of the model and which of its tensors holds the explained feature maps."""

    name: str
    capture: Literal["output", "input"] = "output"

    @classmethod
    def parse(cls, spec: str) -> "FeatureLayer":
        """Parses ``"features.30"`` or ``"avgpool:input"`` (the tensor entering avgpool)."""
        name, _, capture = spec.partition(":")
        capture = capture or "output"
        if not name or capture not in ("output", "input"):
            raise ValueError(f"layer must look like 'name' or 'name:input', got {spec!r}")
        return cls(name, capture)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.name if self.capture == "output" else f"{self.name}:input"


class FeatureCapture:
    """Context manager that records the feature maps of ``layer`` during a forward pass.

    If the module runs more than once in a forward pass, the last call wins: that is
    the one closest to the classifier.
    """

    def __init__(self, model: nn.Module, layer: FeatureLayer) -> None:
        modules = dict(model.named_modules())
        if layer.name not in modules:
            raise ValueError(f"model has no module named {layer.name!r}")
        self.module = modules[layer.name]
        self.layer = layer
        self.features: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.features = inputs[0] if self.layer.capture == "input" else output

    def __enter__(self) -> "FeatureCapture":
        self.features = None
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@dataclass(frozen=True)
class _Call:
    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def _trace_calls(model: nn.Module, example: torch.Tensor) -> list[_Call]:
    """Runs one forward pass and lists module calls whose input is 4-D, in execution order."""
    calls: list[_Call] = []
    handles = []

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() == 4 and isinstance(output, torch.Tensor):
                calls.append(_Call(name, module, tuple(inputs[0].shape), tuple(output.shape)))

        return hook

    for name, module in model.named_modules():
        if name and (isinstance(module, POOLING_TYPES) or not any(True for _ in module.children())):
            handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _spatial(shape: tuple[int, ...]) -> int:
    return shape[-1] * shape[-2] if len(shape) == 4 else 0


def find_feature_layer(model: nn.Module, example: torch.Tensor) -> FeatureLayer:
    """Finds the layer whose feature maps DVE explains, by tracing one forward pass.

    Rules, in order:

    1. The last pooling module that shrinks its input. If it pools globally (1 x 1
       output), explain its input, the last spatial feature map (ResNet: ``avgpool:input``).
    2. If it keeps a spatial output and no module with parameters produces a 4-D
       output after it, it is the final pooling layer: explain its output
       (VGG-16: ``features.30``; the identity ``AdaptiveAvgPool2d(7)`` after it is skipped).
    3. Otherwise (pooling done functionally, e.g. ``F.adaptive_avg_pool2d``), explain
       the last module whose output is a spatial 4-D map.

    Raises:
        ValueError: the model produces no spatial feature map.
    """
    calls = _trace_calls(model, example)
    pools = [
        i
        for i, call in enumerate(calls)
        if isinstance(call.module, POOLING_TYPES) and _spatial(call.output_shape) < _spatial(call.input_shape)
    ]
    if pools:
        last = calls[pools[-1]]
        if _spatial(last.output_shape) == 1:
            return FeatureLayer(last.name, "input")
        later_layers_with_weights = [
            call
            for call in calls[pools[-1] + 1 :]
            if len(call.output_shape) == 4 and any(True for _ in call.module.parameters(recurse=False))
        ]
        if not later_layers_with_weights:
            return FeatureLayer(last.name, "output")
    spatial = [call for call in calls if _spatial(call.output_shape) > 1]
    if not spatial:
        raise ValueError("the model produces no spatial (4-D) feature map to explain; name one with target_layer")
    return FeatureLayer(spatial[-1].name, "output")


def resolve_feature_layer(model: nn.Module, example: torch.Tensor, spec: str | None = None) -> tuple[FeatureLayer, tuple[int, ...]]:
    """The layer to explain (``spec`` if given, else found) and its feature-map shape.

    Runs ``example`` through the model once to check that the layer yields a
    B x C x h x w map.
    """
    layer = FeatureLayer.parse(spec) if spec else find_feature_layer(model, example)
    with torch.inference_mode(), FeatureCapture(model, layer) as capture:
        model(example)
    features = capture.features
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        shape = None if features is None else tuple(getattr(features, "shape", ()))
        raise ValueError(f"layer {layer} does not yield B x C x h x w feature maps (got {shape})")
    return layer, tuple(features.shape[1:])
