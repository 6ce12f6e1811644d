"""Prediction + DVE + targeted DVE for a batch of requests, independent of TorchServe.

``Explainer`` is what the TorchServe handler runs and what offline tools run: one
forward pass per batch with a hook on the explained layer, DVE for the whole batch on
the model's device, then one JSON response per request. A request that fails (bad
image, bad option) gets its own error; the rest of the batch is unaffected.

A request may also ask for DVE at every stage of the model (``stages``, the paper's
Fig. 7). Only then does the forward pass capture every stage's maps, and only the
requests that asked pay for their DVE and rendering.
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from handler import budget, dve, imaging
from handler.config import ServingConfig
from handler.errors import RequestError, failure
from handler.layers import FeatureCapture, Stage, StageCapture, find_classifier, find_stages, resolve_feature_layer
from handler.models import CUSTOM, build_model, imagenet_labels, load_weights, read_labels
from handler.options import ParsedRequest, RequestOptions

ARRAY_DECIMALS = 4
LABELS_FILE = "index_to_name.json"  # TorchServe's name for an archive's labels
ERROR_TYPES = {400: "BadRequest", 413: "PayloadTooLarge", 500: "InternalServerError", 503: "ServiceUnavailable"}


@dataclass
class PreparedImage:
    """One request, decoded and cropped, ready for the batch.

    Attributes:
        options: what the request asked for.
        geometry: where the model's crop lies in the original image.
        pixels: the model's input crop, H x W x 3 uint8 on the host.
        photo: the photo at the maps' size, kept only when overlays are drawn on it.
        cost: what its decoding, maps and answer cost (``handler.budget``).
    """

    options: RequestOptions
    geometry: imaging.CropGeometry
    pixels: torch.Tensor
    photo: Image.Image | None
    cost: budget.RequestCost


@dataclass(frozen=True)
class Result:
    """One request's answer: HTTP status and JSON body."""

    status: int
    body: dict[str, Any]

    def to_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode("utf-8")

    @classmethod
    def error(cls, error: RequestError) -> "Result":
        """The body TorchServe itself uses for errors: code, type and message."""
        kind = ERROR_TYPES.get(error.status, "Error")
        return cls(error.status, {"code": error.status, "type": kind, "message": str(error)})


@dataclass
class Timings:
    """Milliseconds spent by the last batch in each stage."""

    decode: float = 0.0
    forward: float = 0.0
    dve: float = 0.0
    encode: float = 0.0
    batch_size: int = 0


class Explainer:
    """Serves one model: predictions and explanations for batches of parsed requests."""

    def __init__(self, model: nn.Module, config: ServingConfig, labels: list[str], device: torch.device) -> None:
        if len(labels) != config.num_classes:
            raise ValueError(f"{len(labels)} labels for {config.num_classes} classes")
        self.config = config
        self.labels = labels
        self.device = device
        self.model = model.to(device).eval()
        size = config.crop_size
        self.input_size = (size, size)
        example = torch.zeros(1, 3, size, size, device=device)
        self.layer, self.feature_shape = resolve_feature_layer(self.model, example, config.target_layer)
        # The last stage is the explained layer itself (handler.layers.find_stages).
        self.stages: list[Stage] = find_stages(self.model, example, self.layer)
        self.classifier = find_classifier(self.model, self.feature_shape[0], config.num_classes)
        self.label_chars = max(len(label) for label in labels)
        self.mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(config.std, device=device).view(1, 3, 1, 1)
        self.timings = Timings()

    @classmethod
    def from_files(
        cls,
        config: ServingConfig,
        *,
        weights: str | Path,
        labels: list[str],
        device: torch.device,
        model_file: str | Path | None = None,
    ) -> "Explainer":
        """Builds the model named by ``config``, loads its state dict and wraps it."""
        model = build_model(
            config.architecture,
            config.num_classes,
            model_file=model_file if config.architecture == CUSTOM else None,
            model_class=config.model_class,
            model_kwargs=config.model_kwargs,
        )
        return cls(load_weights(model, weights), config, labels, device)

    @classmethod
    def from_model_dir(
        cls, model_dir: Path, manifest_model: dict[str, Any], model_yaml_config: dict[str, Any] | None, device: torch.device
    ) -> "Explainer":
        """The explainer an extracted model archive describes (what a TorchServe worker loads).

        Args:
            model_dir: the archive's extracted folder.
            manifest_model: the ``model`` section of ``MAR-INF/MANIFEST.json``.
            model_yaml_config: the parsed ``model-config.yaml`` (its ``handler:`` section
                is the ``ServingConfig``).
            device: where the model runs.
        """
        config = ServingConfig.from_mapping((model_yaml_config or {}).get("handler"))
        labels_file = model_dir / LABELS_FILE
        if labels_file.exists():
            labels = read_labels(labels_file)
        else:
            labels = imagenet_labels() if config.num_classes == 1000 else [str(i) for i in range(config.num_classes)]
        model_file = manifest_model.get("modelFile")
        return cls.from_files(
            config,
            weights=model_dir / manifest_model["serializedFile"],
            labels=labels,
            device=device,
            model_file=model_dir / model_file if model_file else None,
        )

    def prepare(self, request: ParsedRequest) -> PreparedImage:
        """Checks one request's cost from its image header, then decodes and crops (raises RequestError).

        Nothing is decoded before the request is known to fit the archive's limits
        (``handler.budget``); an overlay's photo is decoded just large enough for its maps.
        """
        config, options = self.config, request.options
        opened = imaging.open_image(request.image, max_pixels=config.limits.max_image_pixels)
        geometry = imaging.CropGeometry.centre_crop(opened.width, opened.height, config.resize_size, config.crop_size)
        if options.class_conditional and self.classifier is None:
            raise RequestError(
                f"class_conditional needs a linear classifier reading the {self.feature_shape[0]} channels of the "
                f"explained layer {self.layer}; this model has none"
            )
        has_maps = bool(options.explanations or options.stages)
        map_size = geometry.map_size(options.map_size)
        cover = map_size if options.format == "overlay" and has_maps else None
        scale = imaging.decode_scale(opened.width, opened.height, config.resize_size, cover)
        cost = budget.check(
            options,
            geometry,
            config.limits,
            decoded_pixels=opened.plan(scale),
            stages=len(self.stages),
            label_chars=self.label_chars,
        )
        decoded = imaging.decode(opened, scale)
        pixels = imaging.model_input(decoded, geometry)
        photo = decoded.image.resize(map_size, imaging.OVERLAY_RESAMPLING) if cover else None
        return PreparedImage(options, geometry, pixels, photo, cost)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model's input for a uint8 batch (B x H x W x 3): B x 3 x H x W, normalised, on its device."""
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the explained layer's feature maps for a uint8 batch (B x H x W x 3)."""
        x = self.normalise(pixels)
        with torch.inference_mode(), FeatureCapture(self.model, self.layer) as capture:
            logits = self.model(x)
        return logits, capture.features

    def forward_stages(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """As ``forward``, and every stage's feature maps (``self.stages``), from the same pass.

        The explained layer's maps are the last stage's: the same tensor, not a copy.
        """
        x = self.normalise(pixels)
        with torch.inference_mode(), StageCapture(self.model, self.stages) as capture:
            logits = self.model(x)
        missing = [str(stage) for stage, features in zip(self.stages, capture.features) if features is None]
        if missing:
            raise RuntimeError(f"stage(s) {missing} did not run in the forward pass")
        stage_features: list[torch.Tensor] = capture.features  # type: ignore[assignment]
        return logits, stage_features[-1], stage_features

    def run(self, requests: list[ParsedRequest | RequestError]) -> list[Result]:
        """Answers a batch: errors stay errors, the rest share one forward pass."""
        timings = Timings()
        start = time.perf_counter()
        prepared: list[PreparedImage | RequestError] = []
        for request in requests:
            try:
                prepared.append(request if isinstance(request, RequestError) else self.prepare(request))
            except RequestError as error:
                prepared.append(error)
            except Exception as error:  # a bug or a lack of memory fails its own request only
                prepared.append(failure(error, "decoding an image"))
        ok = [i for i, item in enumerate(prepared) if isinstance(item, PreparedImage)]
        timings.decode = _ms_since(start)
        results = [Result.error(item) if isinstance(item, RequestError) else None for item in prepared]
        if ok:
            try:
                answers = self._answer([prepared[i] for i in ok], timings)
            except Exception as error:  # the batch's shared work failed: its requests, not the worker
                answers = [Result.error(failure(error, "answering a batch"))] * len(ok)
            for i, result in zip(ok, answers):
                results[i] = result
        timings.batch_size = len(ok)
        self.timings = timings
        return results  # type: ignore[return-value]

    def _answer(self, batch: list[PreparedImage], timings: Timings) -> list[Result]:
        """One forward pass and one batched DVE for prepared requests, then encoding."""
        start = time.perf_counter()
        pixels = torch.stack([item.pixels for item in batch])
        staged = [b for b, item in enumerate(batch) if item.options.stages]
        stage_features: list[torch.Tensor] = []
        if staged:  # only then: the others' batches run exactly as before
            logits, features, stage_features = self.forward_stages(pixels)
        else:
            logits, features = self.forward(pixels)
        probabilities = logits.float().softmax(dim=1)
        k = max(item.options.topk for item in batch)
        top_p, top_i = (t.cpu() for t in probabilities.topk(k, dim=1))
        _sync(self.device)
        timings.forward = _ms_since(start)

        start = time.perf_counter()
        explanation, boxes, box_valid = None, [], []
        if any(item.options.explanations for item in batch):
            explanation = dve.explain(features, self.config.dve, self.input_size, self._channel_weights(batch, features, top_i[:, 0]))
            boxes = explanation.boxes.cpu().tolist()
            box_valid = explanation.box_valid.cpu().tolist()
        stage_maps = self._stage_maps(stage_features, staged)
        _sync(self.device)
        timings.dve = _ms_since(start)

        start = time.perf_counter()
        results = []
        for b, item in enumerate(batch):
            try:  # each answer is drawn and encoded on its own: one failure is one request's
                results.append(Result(200, self._body(b, item, top_p, top_i, explanation, boxes, box_valid, stage_maps)))
            except RequestError as error:
                results.append(Result.error(error))
            except Exception as error:
                results.append(Result.error(failure(error, "drawing and encoding an answer")))
        timings.encode = _ms_since(start)
        return results

    def _body(
        self,
        b: int,
        item: PreparedImage,
        top_p: torch.Tensor,
        top_i: torch.Tensor,
        explanation: dve.Explanation | None,
        boxes: list[list[float]],
        box_valid: list[bool],
        stage_maps: dict[int, list[torch.Tensor]],
    ) -> dict[str, Any]:
        """Batch row ``b``'s answer: its predictions, and its maps drawn and encoded."""
        topk = item.options.topk
        body: dict[str, Any] = {
            "predictions": [
                {"index": int(index), "label": self.labels[index], "probability": round(float(p), 6)}
                for p, index in zip(top_p[b, :topk].tolist(), top_i[b, :topk].tolist())
            ],
            "image": {"width": item.geometry.width, "height": item.geometry.height},
            "explanations": {},
            "layer": str(self.layer),
        }
        if item.options.class_conditional:
            body["explained_class"] = body["predictions"][0]
        if explanation is not None and item.options.explanations:
            maps = {"dve": explanation.dve[b], "targeted_dve": explanation.targeted[b]}
            names = item.options.explanations
            body["explanations"] = self._render(torch.stack([maps[name] for name in names]), names, item)
            if "targeted_dve" in names:
                body["explanations"]["targeted_dve"]["box"] = item.geometry.box_to_original(boxes[b]) if box_valid[b] else None
        if b in stage_maps:
            body["stages"] = [
                {"layer": str(stage), "shape": list(stage.shape), "dve": self._render_stage(stage_map, item)}
                for stage, stage_map in zip(self.stages, stage_maps[b])
            ]
        return body

    def _channel_weights(self, batch: list[PreparedImage], features: torch.Tensor, top1: torch.Tensor) -> torch.Tensor | None:
        """B x C weights for ``dve.explain``: the classifier's row for the top class where a
        request asked for class-conditional maps, ones (the paper's DVE) elsewhere; None
        when nobody asked."""
        rows = [b for b, item in enumerate(batch) if item.options.class_conditional]
        if not rows:
            return None
        weights = torch.ones(features.shape[:2], device=features.device)
        classes = top1[rows].to(features.device)
        weights[torch.tensor(rows, device=features.device)] = self.classifier.weight.detach()[classes].float()
        return weights

    def _stage_maps(self, stage_features: list[torch.Tensor], staged: list[int]) -> dict[int, list[torch.Tensor]]:
        """Normalised DVE (h x w) of every stage for the batch rows ``staged``: {row: [map per stage]}.

        Each stage's DVE is one batched call over the rows that asked, on the model's
        device; the other rows' feature maps are never filtered.
        """
        if not staged:
            return {}
        rows = torch.tensor(staged, device=self.device) if len(staged) < stage_features[0].shape[0] else None
        per_stage = []
        for features in stage_features:
            chosen = features if rows is None else features.index_select(0, rows)
            per_stage.append(dve.normalize_maps(dve.dve(chosen, self.config.dve, self.input_size)))
        return {b: [maps[i] for maps in per_stage] for i, b in enumerate(staged)}

    def _render_stage(self, stage_map: torch.Tensor, item: PreparedImage) -> dict[str, Any]:
        """One stage's map (h x w) drawn like the other maps.

        An early stage's map (112 x 112 for VGG-16's pool1) can be finer than the place
        of the crop in the returned map: it is first averaged down to that size and
        normalised again, so small maps do not alias and their maximum is still 1.
        """
        width, _ = item.geometry.map_size(item.options.map_size)
        side = max(1, math.ceil(item.geometry.side * width / item.geometry.width))
        if max(stage_map.shape) > side:
            stage_map = dve.normalize_maps(F.adaptive_avg_pool2d(stage_map[None, None], side)[0])[0]
        return self._render(stage_map[None], ("dve",), item)["dve"]

    def _render(self, maps: torch.Tensor, names: tuple[str, ...], item: PreparedImage) -> dict[str, dict[str, Any]]:
        """One request's maps (C x h x w), drawn in one call and copied to the host once."""
        width, height = item.geometry.map_size(item.options.map_size)
        drawn = imaging.render_maps(maps, item.geometry, (width, height))
        fmt = item.options.format
        # float64 before rounding: a rounded float32 prints as 0.30000001192092896, not 0.3
        host = drawn.double().cpu().numpy().round(ARRAY_DECIMALS) if fmt == "array" else imaging.to_uint8(drawn)
        del drawn
        entries = {}
        for name, data in zip(names, host):
            if fmt == "array":
                encoded: Any = data.tolist()
            else:
                encoded = _b64(imaging.encode_png(imaging.overlay(item.photo, data) if fmt == "overlay" else data))
            entries[name] = {"format": fmt, "width": width, "height": height, "data": encoded}
        return entries


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
