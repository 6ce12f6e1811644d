"""What an explanation costs next to the prediction alone, measured side by side in-process.

``scripts/bench.py`` (``make bench``) is its command line. For each model and batch size,
every variant runs in the same process on the same batch of real photos, interleaved
repetition by repetition (so load from elsewhere on a shared machine hits every variant
alike); each figure is a median over repetitions:

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

import contextlib
import importlib.util
import io
import json
import os
import statistics
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from evaluation.photos import SAMPLES, sample_jpegs
from evaluation.saliency import GradCAMMap
from handler import dve
from handler.explainer import Explainer
from handler.loading import make_explainer
from handler.options import ParsedRequest, RequestOptions

MODELS = ("efficientnet_lite0", "vgg16")
IG_STEPS = 15
IG_INTERNAL_BATCH = 32  # images per Integrated Gradients forward/backward pass


def jpeg_photos() -> list[bytes]:
    """The sample photos as JPEG bytes: from scikit-image, or from $DVE_PHOTO_DIR (the GPU check's bundle)."""
    return list(sample_jpegs(SAMPLES).values())


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

    def __enter__(self) -> PeakMemory:
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
    explainer: Explainer,
    batch_size: int,
    photos: list[bytes],
    repeats: int,
    budget: float,
    per_image_ms: dict[str, float],
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


THROUGHPUT = {  # variant -> archive built by serving.load.runner.build_archives
    "ours, dve+targeted": "efficientnet_lite0",
    "ours, no maps": "efficientnet_lite0_noexplain",
    "stock image_classifier": "efficientnet_lite0_stock",
}


def load_services(device: torch.device, batch_size: int, store: Path) -> dict[str, object]:
    """The three archives loaded in this process exactly as a TorchServe worker loads them."""
    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import ModelLoaderFactory

    from serving.load.runner import build_archives

    build_archives(store, batch_size=batch_size, max_batch_delay=5)
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    services = {}
    for variant, name in THROUGHPUT.items():
        folder = store / "extracted" / name
        with zipfile.ZipFile(store / f"{name}.mar") as archive:
            archive.extractall(folder)
        manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())["model"]
        import_archive_modules(folder)  # as the worker, whose path holds the archive's folder
        loader = ModelLoaderFactory.get_model_loader()
        gpu = device.index or 0 if device.type == "cuda" else None
        services[variant] = loader.load(name, str(folder), manifest["handler"], gpu, batch_size, None, True, metrics)
        services[variant].set_cl_socket(None)  # the worker's socket: used only for streamed responses
    return services


def import_archive_modules(folder: Path) -> None:
    """The Python files at the root of an extracted archive (its handler, its model file),
    imported under their own names as a worker would find them on its path.

    TorchServe's loader then imports them by name (``importlib.import_module``) and finds
    them in ``sys.modules``. A name already imported (the same handler file of another
    archive built from this repository) is left as it is, as a worker's import would.
    The handler's own ``handler`` package is this repository's, which the archive copies.
    """
    for path in sorted(folder.glob("*.py")):
        if path.stem in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[path.stem]
            raise


def throughput(device: torch.device, batch_sizes: list[int], photos: list[bytes], budget: float, store: Path) -> None:
    """Images/s of the whole worker path, raw JPEG bytes in, each request's response out.

    Each variant runs through TorchServe's own ``Service.predict`` (what a worker does
    with a batch from the frontend), interleaved repetition by repetition. Images/s
    come from each variant's median time; ``x stock`` and ``x no maps`` are paired
    ratios (``paired_ratio``). ``host ms`` is the process's CPU time per image: on a GPU,
    the work the host does per image.
    """
    print(f"\nhandler throughput: raw JPEG requests through Service.predict, {device.type}")
    header = f"{'batch':>6}  {'variant':<24}{'images/s':>10}{'x stock':>9}{'x no maps':>11}{'host ms/img':>13}"
    print(header)
    print("-" * len(header))
    with contextlib.redirect_stdout(io.StringIO()):  # the archive builder's progress
        services = load_services(device, max(batch_sizes), store)
    for batch_size in batch_sizes:
        batch = [
            {
                "requestId": str(i).encode(),
                "headers": [],
                "parameters": [{"name": "body", "contentType": "image/jpeg", "value": photos[i % len(photos)]}],
            }
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
                f"{batch_size:>6}  {variant:<24}{rate[variant]:>10.1f}"
                f"{paired_ratio(walls['stock image_classifier'], walls[variant]):>9.2f}"
                f"{paired_ratio(walls['ours, no maps'], walls[variant]):>11.2f}{host_ms:>13.2f}",
                flush=True,
            )


def paired_ratio(reference: list[float], other: list[float]) -> float:
    """How many times ``reference``'s time ``other``'s throughput is: the median over
    repetitions of the ratio of the two times measured back to back in one repetition.

    A shared machine's speed drifts within a run; each ratio compares two runs made
    milliseconds apart, so the drift cancels, where a ratio of two medians keeps it.
    """
    return statistics.median(r / o for r, o in zip(reference, other))


def dve_costs(
    models: list[str], batch_sizes: list[int], device: torch.device, photos: list[bytes], repeats: int, budget: float
) -> None:
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
                    print(
                        f"{name:<19}{batch_size:>6}  {variant:<22}{ms:>10.1f}{ms / forward_ms:>9.2f}{peak:>9.0f}",
                        flush=True,
                    )
        del explainer
    print("\nforward+dve: hook, DVE, targeted DVE, boxes; served: decode + crop + forward + JSON, without and with")
    print("both maps rendered and PNG-encoded at 224 px; grad-cam: pytorch-grad-cam GradCAM; integrated gradients:")
    print(f"Captum, {IG_STEPS} steps, {IG_INTERNAL_BATCH} images per pass.")
