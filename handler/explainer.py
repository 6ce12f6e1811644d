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
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from handler import budget, dve, imaging, rendering
from handler.config import ServingConfig
from handler.errors import RequestError, failure
from handler.layers import FeatureCapture, Stage, StageCapture, find_classifier, find_stages, resolve_feature_layer
from handler.models import CUSTOM, build_model, imagenet_labels, load_weights, read_labels
from handler.options import ParsedRequest, RequestOptions, parse_request

logger = logging.getLogger(__name__)
LABELS_FILE = "index_to_name.json"  # TorchServe's name for an archive's labels
ERROR_TYPES = {400: "BadRequest", 413: "PayloadTooLarge", 500: "InternalServerError", 503: "ServiceUnavailable"}


@dataclass
class PreparedImage:
    """One request, decoded and cropped, ready for the batch.

    Attributes:
        options: what the request asked for.
        geometry: where the model's crop lies in the original image.
        pixels: the model's input crop, H x W x 3 uint8 on the host.
        photo: the photo at the maps' size (H x W x 3 uint8), kept only when overlays are drawn on it.
        cost: what its decoding, maps and answer cost (``handler.budget``).
    """

    options: RequestOptions
    geometry: imaging.CropGeometry
    pixels: torch.Tensor
    photo: torch.Tensor | None
    cost: budget.RequestCost


@dataclass(frozen=True)
class Admitted:
    """A request whose header has been read and whose cost fits its limits, not yet decoded."""

    request: ParsedRequest
    opened: imaging.OpenedImage
    geometry: imaging.CropGeometry
    scale: float
    cover: tuple[int, int] | None  # an overlay's size, which the decoded photo must fill
    cost: budget.RequestCost


@dataclass(frozen=True)
class Result:
    """One request's answer: HTTP status and JSON body."""

    status: int
    body: dict[str, Any]

    def to_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode("utf-8")

    @classmethod
    def error(cls, error: RequestError) -> Result:
        """The body TorchServe itself uses for errors: code, type and message."""
        kind = ERROR_TYPES.get(error.status, "Error")
        return cls(error.status, {"code": error.status, "type": kind, "message": str(error)})


@dataclass
class Batch:
    """A batch after ``Explainer.preprocess``.

    Attributes:
        items: per request, in order: its prepared image or its error.
        pixels: the prepared requests' crops, in order, B x H x W x 3 uint8 on the model's device.
    """

    items: list[PreparedImage | RequestError]
    pixels: torch.Tensor | None

    @property
    def prepared(self) -> list[PreparedImage]:
        return [item for item in self.items if isinstance(item, PreparedImage)]


@dataclass
class Inference:
    """What ``Explainer.infer`` found for the prepared requests of a batch (rows in their order).

    Attributes:
        top_p, top_i: the most probable classes' probabilities and indices (host).
        explained: per row, the class its class-conditional maps explain (its ``target``,
            else its top class) and that class's probability (host).
        explanation: DVE, targeted DVE and boxes of every row (device), or None if no
            request asked for maps.
        boxes, box_valid: the salient boxes in model-input pixels, on the host.
        stage_maps: for rows that asked for stages: each stage's normalised DVE (device).
    """

    top_p: torch.Tensor
    top_i: torch.Tensor
    explained: list[tuple[int, float]]
    explanation: dve.Explanation | None
    boxes: list[list[int]]
    box_valid: list[bool]
    stage_maps: dict[int, list[torch.Tensor]]

    @classmethod
    def empty(cls) -> Inference:
        return cls(torch.empty(0, 0), torch.empty(0, 0, dtype=torch.long), [], None, [], [], {})


@dataclass
class Timings:
    """Milliseconds spent by the last batch in each step: ``decode`` is ``preprocess``,
    ``forward`` and ``dve`` are ``infer``, ``encode`` (drawing and encoding) is ``postprocess``."""

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
        # JPEGs are decoded on the model's GPU (nvJPEG) when it has one; the CPU path stays
        # Pillow's, whose reduced-scale JPEG decoding is faster there. Tests set it on a CPU.
        self.device_decoding = device.type == "cuda"
        self._explain = CompiledExplain() if config.compile_dve and device.type == "cuda" else dve.explain
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
    ) -> Explainer:
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
        cls,
        model_dir: Path,
        manifest_model: dict[str, Any],
        model_yaml_config: dict[str, Any] | None,
        device: torch.device,
    ) -> Explainer:
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

    def parse(self, request: Mapping[str, Any], content_type: str | None = None) -> ParsedRequest | RequestError:
        """A request's image and options (``handler.options``) under this archive's defaults,
        limits and labels, or its own 4xx: what the handler and the offline tools both read."""
        config = self.config
        try:
            return parse_request(
                request,
                content_type=content_type,
                defaults=config.defaults,
                limits=config.limits,
                num_classes=config.num_classes,
                labels=self.labels,
            )
        except RequestError as error:
            return error

    def prepare(self, request: ParsedRequest) -> PreparedImage:
        """Checks one request's cost from its image header, then decodes and crops it with
        Pillow (raises RequestError)."""
        return self._decode_on_host(self.admit(request))

    def admit(self, request: ParsedRequest) -> Admitted:
        """Reads the image's header and checks the request against the archive's limits.

        Nothing is decoded before the request is known to fit (``handler.budget``); an
        overlay's photo is planned just large enough for its maps. Raises RequestError.
        """
        config, options = self.config, request.options
        opened = imaging.open_image(request.image, max_pixels=config.limits.max_image_pixels)
        geometry = imaging.CropGeometry.centre_crop(opened.width, opened.height, config.resize_size, config.crop_size)
        if options.class_conditional and self.classifier is None:
            asked = "target" if options.target is not None else "class_conditional"
            raise RequestError(
                f"{asked} needs a linear classifier reading the {self.feature_shape[0]} channels of the "
                f"explained layer {self.layer}; this model has none"
            )
        map_size = geometry.map_size(options.map_size)
        cover = map_size if options.format == "overlay" and (options.explanations or options.stages) else None
        scale = imaging.decode_scale(opened.width, opened.height, config.resize_size, cover)
        cost = budget.check(
            options,
            geometry,
            config.limits,
            decoded_pixels=opened.plan(scale),
            stages=len(self.stages),
            label_chars=self.label_chars,
        )
        return Admitted(request, opened, geometry, scale, cover, cost)

    def _decode_on_host(self, admitted: Admitted) -> PreparedImage:
        decoded = imaging.decode(admitted.opened, admitted.scale)
        pixels = imaging.model_input(decoded, admitted.geometry)
        cover = admitted.cover
        photo = torch.from_numpy(np.array(decoded.image.resize(cover, imaging.OVERLAY_RESAMPLING))) if cover else None
        return PreparedImage(admitted.request.options, admitted.geometry, pixels, photo, admitted.cost)

    def _decode_on_device(self, batch: list[Admitted]) -> list[PreparedImage | RequestError]:
        """JPEGs decoded together on the model's device, cropped and scaled there.

        What the device's decoder refuses goes through Pillow (``_decode_on_host``).
        """
        images = imaging.decode_jpegs([admitted.request.image for admitted in batch], self.device)
        prepared: list[PreparedImage | RequestError] = []
        for admitted, image in zip(batch, images):
            try:
                if isinstance(image, Exception):
                    prepared.append(self._decode_on_host(admitted))
                    continue
                image = imaging.orient(image, admitted.opened.orientation)
                geometry = admitted.geometry
                box = (geometry.left, geometry.top, geometry.left + geometry.side, geometry.top + geometry.side)
                pixels = imaging.resize_box(image, box, (geometry.input_size, geometry.input_size))
                cover = admitted.cover
                photo = imaging.resize_box(image, (0, 0, geometry.width, geometry.height), cover) if cover else None
                prepared.append(PreparedImage(admitted.request.options, geometry, pixels, photo, admitted.cost))
            except RequestError as error:
                prepared.append(error)
            except Exception as error:
                prepared.append(failure(error, "decoding an image"))
        return prepared

    def decodes_on_device(self, admitted: Admitted) -> bool:
        """Whether this request's JPEG is decoded on the model's device (CUDA, or when asked).

        Not one whose ICC profile asks for a colour conversion (Display P3 from a phone):
        the device's decoder cannot apply it, Pillow does.
        """
        opened = admitted.opened
        image = opened.image
        return (
            self.device_decoding
            and image.format == "JPEG"
            and image.mode in imaging.DEVICE_JPEG_MODES
            and opened.to_srgb is None
        )

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model's input for a uint8 batch (B x H x W x 3): B x 3 x H x W, normalised, on its device."""
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the explained layer's feature maps for a uint8 batch (B x H x W x 3)."""
        x = self.normalise(pixels)
        with torch.inference_mode(), FeatureCapture(self.model, self.layer) as capture:
            logits: torch.Tensor = self.model(x)
        if capture.features is None:
            raise RuntimeError(f"the explained layer {self.layer} did not run in the forward pass")
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
        """Answers a batch: ``preprocess``, ``infer``, ``postprocess``, each step timed."""
        self.timings = Timings()
        batch = self.preprocess(requests)
        return self.postprocess(batch, self.infer(batch))

    def preprocess(self, requests: list[ParsedRequest | RequestError]) -> Batch:
        """Decodes and crops every request into one input tensor on the model's device.

        A request that fails (its image, its budget, a bug, a lack of memory) keeps its
        error; the others are batched.
        """
        start = time.perf_counter()
        items: list[PreparedImage | Admitted | RequestError] = []
        for request in requests:
            try:
                if isinstance(request, RequestError):
                    items.append(request)
                    continue
                admitted = self.admit(request)
                items.append(admitted if self.decodes_on_device(admitted) else self._decode_on_host(admitted))
            except RequestError as error:
                items.append(error)
            except Exception as error:  # a bug or a lack of memory fails its own request only
                items.append(failure(error, "decoding an image"))
        on_device = [i for i, item in enumerate(items) if isinstance(item, Admitted)]
        if on_device:
            try:
                decoded = self._decode_on_device([item for item in items if isinstance(item, Admitted)])
            except Exception as error:
                decoded = [failure(error, "decoding images on the device")] * len(on_device)
            for i, item in zip(on_device, decoded):
                items[i] = item
        prepared = [item for item in items if isinstance(item, PreparedImage)]
        pixels = (
            torch.stack([item.pixels for item in prepared]).to(self.device, non_blocking=True) if prepared else None
        )
        self.timings.decode = _ms_since(start)
        self.timings.batch_size = len(prepared)
        return Batch([item for item in items if not isinstance(item, Admitted)], pixels)

    def infer(self, batch: Batch) -> Inference | RequestError:
        """One forward pass, then DVE, targeted DVE, boxes and stage maps for the whole batch.

        Returns the error every prepared request gets if this shared work fails.
        """
        prepared = batch.prepared
        if not prepared or batch.pixels is None:
            return Inference.empty()
        try:
            return self._infer(prepared, batch.pixels)
        except Exception as error:  # the batch's shared work failed: its requests, not the worker
            return failure(error, "answering a batch")

    # Without autograd's bookkeeping: each of the many small operations of a batch of one
    # costs less (about 8 % of DVE's time on a CPU).
    @torch.inference_mode()
    def _infer(self, batch: list[PreparedImage], pixels: torch.Tensor) -> Inference:
        start = time.perf_counter()
        staged = [b for b, item in enumerate(batch) if item.options.stages]
        stage_features: list[torch.Tensor] = []
        if staged:  # only then: the others' batches run exactly as before
            logits, features, stage_features = self.forward_stages(pixels)
        else:
            logits, features = self.forward(pixels)
        probabilities = logits.float().softmax(dim=1)
        k = max(item.options.topk for item in batch)
        top_p, top_i = (t.cpu() for t in probabilities.topk(k, dim=1))
        classes = [
            int(top_i[b, 0]) if item.options.target is None else item.options.target for b, item in enumerate(batch)
        ]
        chosen = probabilities.gather(1, torch.tensor(classes, device=probabilities.device)[:, None])[:, 0].tolist()
        _sync(self.device)
        self.timings.forward = _ms_since(start)

        start = time.perf_counter()
        explanation, boxes, box_valid = None, [], []
        if any(item.options.explanations for item in batch):
            explanation = self._explain(
                features, self.config.dve, self.input_size, self._channel_weights(batch, features, classes)
            )
            boxes_and_validity = torch.cat([explanation.boxes, explanation.box_valid[:, None]], dim=1).tolist()
            boxes = [row[:4] for row in boxes_and_validity]
            box_valid = [bool(row[4]) for row in boxes_and_validity]
        stage_maps = self._stage_maps(stage_features, staged)
        _sync(self.device)
        self.timings.dve = _ms_since(start)
        return Inference(top_p, top_i, list(zip(classes, chosen)), explanation, boxes, box_valid, stage_maps)

    def postprocess(self, batch: Batch, inference: Inference | RequestError) -> list[Result]:
        """Every request's answer: its maps drawn together on the device, PNGs encoded in
        parallel, then its JSON; a failure while drawing or encoding stays with its request."""
        start = time.perf_counter()
        results: list[Result | None] = [
            Result.error(item) if isinstance(item, RequestError) else None for item in batch.items
        ]
        rows = [i for i, item in enumerate(batch.items) if isinstance(item, PreparedImage)]
        if isinstance(inference, RequestError):
            for i in rows:
                results[i] = Result.error(inference)
        elif rows:
            for i, result in zip(rows, self._answers(batch.prepared, inference)):
                results[i] = result
        self.timings.encode = _ms_since(start)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _answers(self, batch: list[PreparedImage], inference: Inference) -> list[Result]:
        drawings: list[rendering.Drawing] = []
        owners: list[tuple[int, str, int | None]] = []  # (row, explanation name or "stage", stage index)
        for b, item in enumerate(batch):
            size = item.geometry.map_size(item.options.map_size)
            photo = item.photo
            if inference.explanation is not None:
                for name in item.options.explanations:
                    grid = (inference.explanation.dve if name == "dve" else inference.explanation.targeted)[b]
                    drawings.append(rendering.Drawing(grid, item.geometry, size, item.options.format, photo))
                    owners.append((b, name, None))
            for s, grid in enumerate(inference.stage_maps.get(b, [])):
                drawings.append(
                    rendering.Drawing(
                        _stage_grid(grid, item.geometry, size[0]), item.geometry, size, item.options.format, photo
                    )
                )
                owners.append((b, "stage", s))
        pictures: list[np.ndarray | bytes | Exception] = list(rendering.draw(drawings))
        to_encode = {
            i: picture
            for i, (drawing, picture) in enumerate(zip(drawings, pictures))
            if drawing.format != "array" and isinstance(picture, np.ndarray)
        }
        for i, encoded in zip(to_encode, rendering.encode_pngs(list(to_encode.values()))):
            pictures[i] = encoded
        entries: list[dict[tuple[str, int | None], dict[str, Any]]] = [{} for _ in batch]
        problems: dict[int, Exception] = {}
        for (b, name, stage), drawing, picture in zip(owners, drawings, pictures):
            if isinstance(picture, Exception):
                problems.setdefault(b, picture)
                continue
            width, height = drawing.size
            data = _b64(picture) if isinstance(picture, bytes) else picture.tolist()
            entries[b][(name, stage)] = {"format": drawing.format, "width": width, "height": height, "data": data}
        results = []
        for b, item in enumerate(batch):
            try:  # each answer on its own: one failure is one request's
                if b in problems:
                    raise problems[b]
                results.append(Result(200, self._body(b, item, inference, entries[b])))
            except RequestError as error:
                results.append(Result.error(error))
            except Exception as error:
                results.append(Result.error(failure(error, "drawing and encoding an answer")))
        return results

    def _body(
        self, b: int, item: PreparedImage, inference: Inference, entries: dict[tuple[str, int | None], dict[str, Any]]
    ) -> dict[str, Any]:
        """Batch row ``b``'s answer: its predictions and its encoded maps."""
        topk = item.options.topk
        body: dict[str, Any] = {
            "predictions": [
                {"index": int(index), "label": self.labels[index], "probability": round(float(p), 6)}
                for p, index in zip(inference.top_p[b, :topk].tolist(), inference.top_i[b, :topk].tolist())
            ],
            "image": {"width": item.geometry.width, "height": item.geometry.height},
            "explanations": {
                name: entries[(name, None)] for name in item.options.explanations if (name, None) in entries
            },
            "layer": str(self.layer),
        }
        if item.options.class_conditional:
            index, probability = inference.explained[b]
            body["explained_class"] = {
                "index": index,
                "label": self.labels[index],
                "probability": round(probability, 6),
            }
        if "targeted_dve" in body["explanations"]:
            valid = inference.box_valid[b]
            body["explanations"]["targeted_dve"]["box"] = (
                item.geometry.box_to_original(inference.boxes[b]) if valid else None
            )
        if b in inference.stage_maps:
            body["stages"] = [
                {"layer": str(stage), "shape": list(stage.shape), "dve": entries[("stage", s)]}
                for s, stage in enumerate(self.stages)
            ]
        return body

    def _channel_weights(
        self, batch: list[PreparedImage], features: torch.Tensor, classes: list[int]
    ) -> torch.Tensor | None:
        """B x C weights for ``dve.explain``: the classifier's row for each row's explained
        class (``classes``: its target or its top class) where a request asked for
        class-conditional maps, ones (the paper's DVE) elsewhere; None when nobody asked."""
        rows = [b for b, item in enumerate(batch) if item.options.class_conditional]
        if not rows:
            return None
        assert self.classifier is not None  # admit() refused class-conditional requests without one
        chosen = self.classifier.weight.detach()[torch.tensor([classes[b] for b in rows], device=features.device)]
        if len(rows) == len(batch):
            return chosen.float()
        weights = torch.ones(features.shape[:2], device=features.device)
        weights[torch.tensor(rows, device=features.device)] = chosen.float()
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


class CompiledExplain:
    """``dve.explain`` through ``torch.compile(mode="reduce-overhead")``: CUDA graphs per shape.

    The first failure (a compiler missing, a graph that cannot be captured) is logged
    once and every later call runs eagerly. Results equal eager ones within float rounding.
    """

    def __init__(self) -> None:
        self.compiled = torch.compile(dve.explain, mode="reduce-overhead", dynamic=False)
        self.failed = False

    def __call__(
        self, features: torch.Tensor, params: dve.DVEParams, input_size: tuple[int, int], weights: torch.Tensor | None
    ) -> dve.Explanation:
        if not self.failed:
            try:
                out = self.compiled(features, params, input_size, weights)
                # A CUDA graph's outputs are overwritten by its next replay: keep copies.
                return dve.Explanation(out.dve.clone(), out.targeted.clone(), out.boxes.clone(), out.box_valid.clone())
            except Exception:
                logger.warning("compiled DVE failed; running it eagerly from now on", exc_info=True)
                self.failed = True
        return dve.explain(features, params, input_size, weights)


def _stage_grid(stage_map: torch.Tensor, geometry: imaging.CropGeometry, width: int) -> torch.Tensor:
    """A stage's map (h x w), ready to draw at ``width`` pixels across the whole image.

    An early stage's map (112 x 112 for VGG-16's pool1) can be finer than the place of the
    crop in the drawn map: it is first averaged down to that size and normalised again,
    so small maps do not alias and their maximum is still 1.
    """
    side = max(1, math.ceil(geometry.side * width / geometry.width))
    if max(stage_map.shape) > side:
        return dve.normalize_maps(F.adaptive_avg_pool2d(stage_map[None, None], side)[0])[0]
    return stage_map


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
