"""Shared fixtures: real photos, the real default model, the test archives and server.

The packages (handler, evaluation, serving) are imported as installed (``make install-dev``
installs the project in editable mode), or from the repository root on PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.photos import SAMPLES, encode_image, sample_jpegs
from serving import server as ts_server  # the same start/stop and ports as `make serve`

ROOT = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs one of the command lines (``scripts/client.py``, ...) as a user would, from the
    repository root with this Python: its exit code, stdout and stderr."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli(script: str, *args: str | Path) -> int:
    """``run_script``, its output written to this process's stdout and stderr (where pytest's
    ``capsys`` reads it, as if the command had run in-process); its exit code."""
    done = run_script(script, *args)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """scikit-image's sample photographs as JPEG bytes (or from $DVE_PHOTO_DIR's JPEGs where
    scikit-image is not installed: the GPU check's bundle, scripts/gpu_bundle.py)."""
    return sample_jpegs(SAMPLES)


# Objects of the localisation set (evaluation/photos.py, boxes drawn by hand) pasted into a
# corner of a 256 x 256 texture, 110 pixels long, 20 pixels in from the edges: inside the
# model's centre crop (the middle 224 x 224), away from the image's centre.
OFF_CENTRE = [
    ("cat", "grass", "top-left"),
    ("cat", "brick", "bottom-right"),
    ("cup", "gravel", "top-right"),
    ("cup", "grass", "bottom-left"),
]
SCENE_SIDE = 256


@pytest.fixture(scope="session")
def off_centre_objects() -> list[tuple[str, bytes, tuple[int, int, int, int]]]:
    """(name, PNG bytes, object box x0, y0, x1, y1 with exclusive ends) for each scene of ``OFF_CENTRE``."""
    import numpy as np
    from PIL import Image

    from evaluation import photos

    scenes = []
    for name, texture, corner in OFF_CENTRE:
        photo, (x0, y0, x1, y1) = photos.OBJECTS[name]
        crop = Image.fromarray(photos.load_photos([photo])[photo][y0:y1, x0:x1])
        scale = 110 / max(crop.size)
        fitted = np.asarray(crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.BICUBIC))
        canvas = photos.rgb(photos.TEXTURES[texture]())[:SCENE_SIDE, :SCENE_SIDE].copy()
        height, width = fitted.shape[:2]
        left = 20 if corner.endswith("left") else SCENE_SIDE - 20 - width
        top = 20 if corner.startswith("top") else SCENE_SIDE - 20 - height
        canvas[top : top + height, left : left + width] = fitted
        scenes.append(
            (f"{name} {corner} on {texture}", encode_image(canvas, "PNG"), (left, top, left + width, top + height))
        )
    return scenes


def hottest_in(saliency, box: tuple[int, int, int, int]) -> bool:
    """The pointing game: True when the map's (H x W) maximum lies in ``box`` (exclusive ends)."""
    import numpy as np

    y, x = np.unravel_index(np.argmax(saliency), np.shape(saliency))
    x0, y0, x1, y1 = box
    return bool(x0 <= x < x1 and y0 <= y < y1)


def centred_gaussian(height: int, width: int):
    """The photographer's prior: a Gaussian bump in the middle (sigma a quarter of each side)."""
    import numpy as np

    y = np.arange(height) - (height - 1) / 2
    x = np.arange(width) - (width - 1) / 2
    return np.exp(-(y[:, None] ** 2 / (2 * (height / 4) ** 2) + x[None, :] ** 2 / (2 * (width / 4) ** 2)))


@pytest.fixture(scope="session")
def lite0_explainer():
    """The default model with its real ImageNet weights, as the handler configures it."""
    import torch

    from handler.loading import make_explainer

    return make_explainer("efficientnet_lite0", torch.device("cpu"))


TINY_NET = '''
"""A user's own two-class model: "bright" when the image is light, "dark" otherwise."""
import torch
from torch import nn


class BrightnessNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))
'''


def tiny_net_weights(path: Path) -> None:
    """Hand-set weights: the features measure brightness, the head compares it to 0.5."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("tiny_net", path.parent / "tiny_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.BrightnessNet()
    with torch.no_grad():
        first, second = net.features[0], net.features[3]
        first.weight.fill_(1.0 / 27.0), first.bias.zero_()
        second.weight.zero_(), second.bias.zero_()
        for c in range(4):
            second.weight[c, c, 1, 1] = 1.0
        net.head.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
        net.head.bias.copy_(torch.tensor([2.0, -2.0]))
    torch.save(net.state_dict(), path)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """Archives built as scripts/build_mar.py builds them (``serving.archive.build``).

    * efficientnet_lite0: the default, real ImageNet weights;
    * vgg16: the paper's model (random weights: nothing here can fetch the real ones);
    * brightness: a user's own 2-class model with its own label file.
    A long batch delay makes concurrent test requests share a batch.
    """
    from serving.archive import ArchiveOptions, build

    store = tmp_path_factory.mktemp("model_store")
    work = tmp_path_factory.mktemp("custom_model")
    (work / "tiny_net.py").write_text(TINY_NET)
    tiny_net_weights(work / "tiny_net.pth")
    (work / "labels.txt").write_text("dark\nbright\n")
    common = {"export_path": store, "max_batch_delay": 200}
    build(ArchiveOptions("efficientnet_lite0", **common))
    build(ArchiveOptions("vgg16", random_weights=True, **common))
    build(
        ArchiveOptions(
            "custom",
            name="brightness",
            model_file=work / "tiny_net.py",
            model_class="BrightnessNet",
            weights=work / "tiny_net.pth",
            labels=work / "labels.txt",
            resize_size=64,
            crop_size=64,
            mean=[0.0, 0.0, 0.0],
            std=[1.0, 1.0, 1.0],
            **common,
        )
    )
    return store


# PORT_BASE + 10100 (18180-18185 by default), and base+10, +20, +30, +40 for the short-lived
# servers of single tests: clear of TorchServe's defaults (8080-8082, 7070-7071) and of
# `make serve`. PORT_BASE moves them with every other port of the project;
# DVE_TEST_PORT_BASE sets the tests' base alone (two checkouts side by side).
INTEGRATION_PORT_BASE = int(os.environ.get("DVE_TEST_PORT_BASE") or ts_server.port_base(ts_server.TESTS_OFFSET))


@pytest.fixture(scope="session")
def server(model_store, tmp_path_factory):
    """A real TorchServe on loopback serving the three test archives; always stopped."""
    run_dir = tmp_path_factory.mktemp("torchserve")
    try:
        running = ts_server.start(
            ["efficientnet_lite0", "vgg16", "brightness"],
            run_dir=run_dir,
            model_store=model_store,
            port_base=INTEGRATION_PORT_BASE,
        )
        yield running
    finally:
        ts_server.stop(run_dir)
