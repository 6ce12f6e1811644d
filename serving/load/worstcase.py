"""The most expensive requests the limits allow, against a real TorchServe (``make worstcase``).

``loadtest/worstcase.py`` is its command line, and describes the cases, what is measured
and when the run fails.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from evaluation.photos import encode_image
from handler import budget
from handler.config import EXPLANATIONS, FORMATS, Limits, ServingConfig
from handler.imaging import CropGeometry
from handler.loading import load_archive
from handler.options import RequestOptions
from serving import server as ts_server
from serving.archive import ArchiveOptions, BuildError, build

ROOT = Path(__file__).resolve().parent.parent.parent

PORT_BASE = ts_server.port_base(ts_server.WORSTCASE_OFFSET)  # PORT_BASE + offset: one setting moves every port
MODEL = "efficientnet_lite0"
BUILD = ROOT / "build" / "worstcase"
ASPECT = 4 / 3  # the images' width over height: a camera's


@dataclass(frozen=True)
class Case:
    """One worst request: which image, and the options at their most expensive."""

    image: str
    options: RequestOptions

    @property
    def name(self) -> str:
        o = self.options
        return f"{self.image} {o.format}{' +stages' if o.stages else ''} map {o.map_size or 'original'}"

    def payload(self, images: dict[str, bytes]) -> dict:
        o = self.options
        return {
            "image": base64.b64encode(images[self.image]).decode("ascii"),
            "topk": o.topk,
            "explanations": list(o.explanations),
            "format": o.format,
            "map_size": o.map_size or "original",
            "stages": o.stages,
            "class_conditional": o.class_conditional,
        }


def largest_size(max_pixels: int) -> tuple[int, int]:
    """(width, height) of a 4:3 image with as many pixels as ``max_pixels`` allows."""
    height = int(math.sqrt(max_pixels / ASPECT))
    return min(int(height * ASPECT), max_pixels // height), height


def worst_png(limits: Limits) -> bytes:
    """Black, fully transparent RGBA at the pixel limit: tiny to send, the costliest to decode."""
    image = Image.new("RGBA", largest_size(limits.max_image_pixels), (0, 0, 0, 0))
    return encode_image(image, "PNG", compress_level=9)


def worst_jpeg(limits: Limits) -> bytes:
    """Noise at the pixel limit, at the highest JPEG quality that stays within the byte limit."""
    width, height = largest_size(limits.max_image_pixels)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    best = b""
    for quality in (95, 90, 80, 70, 60, 50, 40, 30, 20, 10):
        best = encode_image(noise, "JPEG", quality=quality)
        if len(best) <= limits.max_image_bytes:
            return best
    scale = math.sqrt(limits.max_image_bytes / len(best)) * 0.95  # even quality 10 is too large: fewer pixels
    return encode_image(noise.resize((int(width * scale), int(height * scale))), "JPEG", quality=10)


def worst_heic(limits: Limits) -> bytes:
    """A photo-like HEIC at the pixel limit: libheif has no reduced-scale decoding, so the
    whole image is decoded before it is reduced, unlike a JPEG (decoded at 1/8 scale)."""
    width, height = largest_size(limits.max_image_pixels)
    columns = (np.arange(width) // 31 % 256).astype(np.uint8)
    rows = (np.arange(height) // 23 % 256).astype(np.uint8)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = columns[None, :]
    pixels[..., 1] = rows[:, None]
    pixels[..., 2] = columns[None, :] ^ rows[:, None]
    return encode_image(Image.fromarray(pixels), "HEIF", quality=60)


def images(limits: Limits) -> dict[str, bytes]:
    """The three worst images, made once and kept in build/worstcase/."""
    BUILD.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, make, suffix in (("png", worst_png, "png"), ("jpeg", worst_jpeg, "jpg"), ("heic", worst_heic, "heic")):
        path = BUILD / f"worst-{limits.max_image_pixels}-{limits.max_image_bytes}.{suffix}"
        if not path.exists():
            path.write_bytes(make(limits))
        made[name] = path.read_bytes()
    return made


def cases(config: ServingConfig, stages: int, label_chars: int, sizes: dict[str, tuple[int, int]]) -> list[Case]:
    """Every format x stages, with the largest map_size the limits allow on each image."""
    found = []
    for image, (width, height) in sizes.items():
        geometry = CropGeometry.centre_crop(width, height, config.resize_size, config.crop_size)
        for fmt in FORMATS:
            for with_stages in (False, True):
                options = RequestOptions(config.num_classes, EXPLANATIONS, fmt, None, with_stages, True)
                size = budget.largest_map_size(options, geometry, config.limits, stages, label_chars)
                original_fits = max(width, height) <= (size or 0)
                found.append(Case(image, replace(options, map_size=None if original_fits else size)))
    return found


class Worker:
    """The model's worker process as the kernel sees it: its PID, memory, and peak memory."""

    def __init__(self, server: ts_server.Server) -> None:
        self.server = server
        self.pid = self.current_pid()

    def current_pid(self) -> int:
        return self.server.workers(MODEL)[0]["pid"]

    def _status(self, field: str) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
        raise RuntimeError(f"no {field} for {self.pid}")

    def reset_peak(self) -> float:
        """Resets the high-water mark of resident memory; returns the current RSS in MB."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        return self._status("VmRSS")

    def peak(self) -> float:
        return self._status("VmHWM")


@dataclass
class Outcome:
    statuses: list[int]
    seconds: float
    extra_mb: float
    rss_mb: float
    response_bytes: int
    message: str = ""


def send(server: ts_server.Server, payload: dict | bytes) -> tuple[int, bytes]:
    """POSTs a JSON request (a dict, or its bytes made beforehand so that timing leaves them out)."""
    response = requests.post(
        f"{server.inference_url}/predictions/{MODEL}",
        data=payload if isinstance(payload, bytes) else json.dumps(payload),
        headers={"Authorization": f"Bearer {server.token()}", "Content-Type": "application/json"},
        timeout=600,
    )
    return response.status_code, response.content


def send_copies(server: ts_server.Server, worker: Worker, payload: dict, copies: int) -> Outcome:
    """``copies`` concurrent requests of ``payload``: statuses, wall time, peak extra memory."""
    body = json.dumps(payload).encode()
    answers: list[tuple[int, bytes]] = [(0, b"")] * copies
    before = worker.reset_peak()

    def one(i: int) -> None:
        answers[i] = send(server, body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(copies)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    peak = worker.peak()
    message = ""
    if answers[0][0] != 200:  # the handler's JSON error, or the frontend's own (not always JSON)
        try:
            message = json.loads(answers[0][1]).get("message", "")[:160]
        except ValueError:
            message = answers[0][1][:160].decode("utf-8", "replace")
    return Outcome(
        [status for status, _ in answers], seconds, peak - before, peak, max(len(body) for _, body in answers), message
    )


def run(args: argparse.Namespace) -> int:
    """The worst-case run ``loadtest/worstcase.py`` asks for with its flags ``args``.

    Returns 0 if every case stays within budget, else 1.
    """

    store, run_dir = BUILD / "model_store", BUILD / "server"
    try:
        build(ArchiveOptions(MODEL, export_path=store, batch_size=args.batch, response_timeout=args.response_timeout))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    explainer = load_archive(store / f"{MODEL}.mar", torch.device("cpu"))  # the archive's config, stages and labels
    config, limits = explainer.config, explainer.config.limits
    made = images(limits)
    sizes = {name: Image.open(io.BytesIO(data)).size for name, data in made.items()}
    worst = cases(config, len(explainer.stages), explainer.label_chars, sizes)
    del explainer
    for name, data in made.items():
        print(f"{name}: {sizes[name][0]} x {sizes[name][1]}, {len(data) / 1e6:.1f} MB")
    ts_server.stop(run_dir)
    server = ts_server.start([MODEL], run_dir=run_dir, model_store=store, port_base=PORT_BASE)
    failures = []
    try:
        worker = Worker(server)
        send(server, {"image": base64.b64encode(made["jpeg"]).decode("ascii"), "explanations": []})  # warm up
        print(f"\nlimits: {limits}\nworker {worker.pid}, RSS {worker.reset_peak():.0f} MB after one request\n")
        header = (
            f"| {'request':<38} | {'alone: status':>13} | {'s':>5} | {'extra MB':>8} | {'answer MB':>9} "
            f"| {f'batch of {args.batch}: statuses':>22} | {'s':>5} | {'peak RSS MB':>11} |"
        )
        print(header)
        print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
        for case in worst:
            payload = case.payload(made)
            alone = send_copies(server, worker, payload, 1)
            batch = send_copies(server, worker, payload, args.batch)
            statuses = ",".join(str(s) for s in sorted(set(batch.statuses)))
            print(
                f"| {case.name:<38} | {alone.statuses[0]:>13} | {alone.seconds:5.2f} | {alone.extra_mb:8.0f} "
                f"| {alone.response_bytes / 1e6:9.2f} "
                f"| {statuses:>22} | {batch.seconds:5.2f} | {batch.rss_mb:11.0f} |",
                flush=True,
            )
            problems = []
            max_seconds = args.max_seconds_heic if case.image == "heic" else args.max_seconds
            if alone.seconds > max_seconds:
                problems.append(f"alone took {alone.seconds:.2f} s > {max_seconds}")
            if alone.extra_mb > args.max_extra_mb:
                problems.append(f"alone used {alone.extra_mb:.0f} MB > {args.max_extra_mb}")
            if max(alone.response_bytes, batch.response_bytes) > limits.max_response_bytes:
                problems.append("an answer is over max_response_bytes")
            if any(not (s == 200 or 400 <= s < 500) for s in alone.statuses + batch.statuses):
                problems.append(f"statuses {alone.statuses + batch.statuses}")
            if alone.statuses[0] != 200:
                problems.append(f"the largest allowed request was refused: {alone.message}")
            if batch.seconds > args.response_timeout / 4:
                problems.append(
                    f"the batch took {batch.seconds:.1f} s, over a quarter of the {args.response_timeout} s timeout"
                )
            over = dict(payload, map_size=(case.options.map_size or max(sizes[case.image])) + 1)
            status, body = send(server, over)
            if status != 413:
                problems.append(f"one pixel more of map_size answered {status}, not 413")
            failures += [f"{case.name}: {p}" for p in problems]
        if worker.current_pid() != worker.pid:
            failures.append(f"the worker was replaced ({worker.pid} -> {worker.current_pid()})")
    finally:
        ts_server.stop(run_dir)
    print()
    for failure in failures:
        print(f"FAIL {failure}")
    print("worst case within budget" if not failures else f"{len(failures)} problem(s)")
    return 1 if failures else 0
