"""Find the layer DVE explains and capture its feature maps with a forward hook.

DVE reads the feature maps of the model's *final pooling layer* (VGG-16: ``features.30``,
512 x 7 x 7). Networks whose last pooling is global (ResNet, EfficientNet, ...) squash the
maps to 1 x 1, so there the explained maps are the last spatial ones, the *input* of that
global pooling. Hooks live only inside a ``with`` block, so nothing leaks across requests.

For the paper's Fig. 7 ("how a DCNN compresses information") the same model is also
cut into *stages*, one per spatial resolution (VGG-16: pool1..pool5), found by
``find_stages`` and captured together in one forward pass by ``StageCapture``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

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
    def parse(cls, spec: str) -> FeatureLayer:
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

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        self.features = inputs[0] if self.layer.capture == "input" else output

    def __enter__(self) -> FeatureCapture:
        self.features = None
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@dataclass(frozen=True)
class Stage:
    """One stage of a model: the feature maps of one call of one of its modules.

    Attributes:
        layer: the module, and whether its input or its output is taken.
        shape: the maps' shape for one image, C x h x w, at the model's input size.
        call: which call of the module, counted from 0, when the module runs more
            than once in a forward pass and the stage is not its last call; None for
            the last (or only) call, as ``FeatureCapture`` takes it.
    """

    layer: FeatureLayer
    shape: tuple[int, int, int]
    call: int | None = None

    def __str__(self) -> str:
        """``features.4``, ``avgpool:input``; ``pool#1`` for the first call of a module that runs twice."""
        return str(self.layer) if self.call is None else f"{self.layer}#{self.call + 1}"


class StageCapture:
    """Context manager that records the feature maps of several stages in one forward pass.

    One hook per module involved, each counting that module's calls; all of them are
    removed when the block exits, even if the forward pass raised. After the pass,
    ``features[i]`` holds stage ``i``'s maps (B x C x h x w), or None if it never ran.
    Capturing keeps references to tensors the forward pass computes anyway: it costs
    the memory of holding them, no computation.
    """

    def __init__(self, model: nn.Module, stages: Sequence[Stage]) -> None:
        modules = dict(model.named_modules())
        missing = sorted({stage.layer.name for stage in stages} - set(modules))
        if missing:
            raise ValueError(f"model has no module(s) named {missing}")
        self.stages = tuple(stages)
        self._by_module: dict[str, list[int]] = {}
        for i, stage in enumerate(self.stages):
            self._by_module.setdefault(stage.layer.name, []).append(i)
        self._modules = {name: modules[name] for name in self._by_module}
        self.features: list[torch.Tensor | None] = [None] * len(self.stages)
        self._calls: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook_for(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            for i in self._by_module[name]:
                stage = self.stages[i]
                if stage.call is None or stage.call == call:
                    self.features[i] = inputs[0] if stage.layer.capture == "input" else output

        return hook

    def __enter__(self) -> StageCapture:
        self.features = [None] * len(self.stages)
        self._calls = {}
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._hook_for(name)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass(frozen=True)
class _Call:
    """One traced module call.

    ``call`` counts the module's calls in the forward pass (0 for the first);
    ``last`` says no later call of the module followed. ``start`` and ``end`` are
    ticks of one clock shared by every traced call (entering and leaving a module
    each advance it), so a call lies inside another exactly when its interval does.
    """

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    call: int = 0
    last: bool = True
    start: int = 0
    end: int = 0


def _trace_calls(model: nn.Module, example: torch.Tensor, *, all_modules: bool = False) -> list[_Call]:
    """Runs one forward pass and lists module calls whose input is 4-D, in the order they end.

    By default only leaf modules and pooling modules are traced; with ``all_modules``
    every named module (containers too: a container's call ends after its children's).
    """
    raw: list[tuple[str, nn.Module, tuple[int, ...], tuple[int, ...], int, int, int]] = []
    counts: dict[str, int] = {}
    starts: dict[str, list[int]] = {}
    clock = [0]
    handles = []

    def enter(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def pre_hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            starts.setdefault(name, []).append(clock[0])
            clock[0] += 1

        return pre_hook

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            call = counts.get(name, 0)
            counts[name] = call + 1
            start = starts[name].pop() if starts.get(name) else clock[0]
            end = clock[0]
            clock[0] += 1
            if (
                inputs
                and isinstance(inputs[0], torch.Tensor)
                and inputs[0].dim() == 4
                and isinstance(output, torch.Tensor)
            ):
                raw.append((name, module, tuple(inputs[0].shape), tuple(output.shape), call, start, end))

        return hook

    for name, module in model.named_modules():
        if name and (all_modules or isinstance(module, POOLING_TYPES) or not any(True for _ in module.children())):
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return [
        _Call(name, module, input_shape, output_shape, call, call == counts[name] - 1, start, end)
        for name, module, input_shape, output_shape, call, start, end in raw
    ]


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


def resolve_feature_layer(
    model: nn.Module, example: torch.Tensor, spec: str | None = None
) -> tuple[FeatureLayer, tuple[int, ...]]:
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


def find_classifier(model: nn.Module, channels: int, num_classes: int) -> nn.Linear | None:
    """The model's linear classifier, if it reads the explained maps' channels directly.

    That is the last ``nn.Linear`` of the model when it maps ``channels`` features to
    ``num_classes`` (global pooling + linear head: ResNet, EfficientNet, MobileNetV2,
    DenseNet). Its row for class c then weighs each feature map's contribution to c,
    which the class-conditional DVE needs. None otherwise: VGG-16's classifier, for
    one, reads 25,088 flattened features through two hidden layers, and MobileNetV3's
    head is two linear layers. (DenseNet's ReLU and ConvNeXt's LayerNorm between the
    pooling and the linear layer make the weighting an approximation there.)
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if linears and (linears[-1].in_features, linears[-1].out_features) == (channels, num_classes):
        return linears[-1]
    return None


def find_stages(model: nn.Module, example: torch.Tensor, explained: FeatureLayer | None = None) -> list[Stage]:
    """The model's stages, one per spatial resolution, ending with the explained layer.

    Found by tracing one forward pass of ``example`` through every module:

    1. **Pooling stages.** If at least two pooling modules shrink a spatial map and keep
       it spatial (output larger than 1 x 1), the stages are those pooling outputs
       (VGG-16: ``features.4, .9, .16, .23, .30``, the paper's pool1..pool5; also
       AlexNet, GoogLeNet, DenseNet).
    2. **Resolution stages** otherwise (ResNet, EfficientNet, MobileNet: downsampling
       by strided convolutions): for each spatial size above 1 x 1, in the order the
       pass reaches it, the last map computed at that size, i.e. the end of that
       resolution. Two refinements: outputs larger than their input (padding,
       upsampling) are no maps of their own; and a map computed inside a *step
       down* at the step's input size does not end that resolution. A step down is a
       call that shrinks the map and inside which only its input and output sizes
       occur: a strided convolution, ResNet's ``layer2``, an inverted-residual block
       with stride 2, whose expansion at the old size already belongs to the next
       stage. (If a size occurs only inside step downs, its last map is taken anyway.)
       ResNet-18: ``relu, layer1, layer2, layer3``; EfficientNet-Lite0:
       ``_blocks.0, .2, .4, .10``.
    3. **The last stage is the explained layer** (``explained``, found by
       ``find_feature_layer`` if None): stages are kept only if they end before it
       and their maps are larger than its own, then it is appended. VGG-16's pool5 is
       its explained layer; ResNet's last stage is ``avgpool:input``,
       EfficientNet-Lite0's ``_avg_pooling:input``: the last stage's DVE is the
       response's ``dve`` map.

    A module that runs several times in a pass (a shared activation or pooling
    module) is captured at the right call: see ``Stage.call``.

    Raises:
        ValueError: the model produces no spatial feature map.
    """
    if explained is None:
        explained = find_feature_layer(model, example)
    calls = _trace_calls(model, example, all_modules=True)
    explained_calls = [call for call in calls if call.name == explained.name]
    if explained_calls:
        own = explained_calls[-1]  # FeatureCapture takes the last call
        shape = own.input_shape if explained.capture == "input" else own.output_shape
        explained_shape = tuple(shape[1:])
        cutoff: float = own.start if explained.capture == "input" else own.end
    else:  # a module whose input is no 4-D tensor: not traced, check it directly
        _, explained_shape = resolve_feature_layer(model, example, str(explained))
        cutoff = math.inf
    pools = [
        call
        for call in calls
        if isinstance(call.module, POOLING_TYPES) and 1 < _spatial(call.output_shape) < _spatial(call.input_shape)
    ]
    ends = pools if len(pools) >= 2 else _resolution_ends(calls)
    area = explained_shape[-1] * explained_shape[-2]
    stages = [
        Stage(FeatureLayer(call.name), tuple(call.output_shape[1:]), None if call.last else call.call)  # type: ignore[arg-type]
        for call in ends
        if call.end < cutoff and _spatial(call.output_shape) > area
    ]
    stages.append(Stage(explained, explained_shape))  # type: ignore[arg-type]
    return stages


def _size(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[-2], shape[-1]


def _resolution_ends(calls: list[_Call]) -> list[_Call]:
    """The last call at each spatial size (rule 2 of ``find_stages``), in execution order.

    Only sizes that a convolution or pooling module outputs count: those are
    B x C x h x w by construction, while a 4-D tensor elsewhere may be channels-last
    (ConvNeXt's blocks permute to B x h x w x C around their LayerNorm and MLP).
    """
    sizes = {_size(call.output_shape) for call in calls if isinstance(call.module, (nn.Conv2d, *POOLING_TYPES))}
    maps = [
        call
        for call in calls
        if len(call.output_shape) == 4
        and _spatial(call.output_shape) > 1
        and _size(call.output_shape) in sizes
        and all(out <= inp for out, inp in zip(_size(call.output_shape), _size(call.input_shape)))
    ]

    def inside(inner: _Call, outer: _Call) -> bool:
        return outer.start < inner.start and inner.end < outer.end

    steps = []
    for call in maps:
        if _spatial(call.output_shape) < _spatial(call.input_shape):
            sizes_inside = {_size(other.output_shape) for other in maps if inside(other, call)}
            if sizes_inside <= {_size(call.input_shape), _size(call.output_shape)}:
                steps.append(call)
    last: dict[tuple[int, int], _Call] = {}
    last_outside_steps: dict[tuple[int, int], _Call] = {}
    for call in maps:
        size = _size(call.output_shape)
        last[size] = call
        if not any(_size(step.input_shape) == size and inside(call, step) for step in steps):
            last_outside_steps[size] = call
    return sorted((last_outside_steps.get(size, call) for size, call in last.items()), key=lambda call: call.end)
