"""TorchServe handler: every response carries the prediction *and* its explanations.

It follows the shape of TorchServe's ``BaseHandler`` (initialize, preprocess, inference,
postprocess) and fixes two things the stock handlers get wrong for this use:

* every request of a batch is read on its own (the stock handler lets request 0 decide
  the options of the whole batch) and is answered with its own status;
* ``/predictions`` and ``/explanations`` return the same thing: the prediction joined
  by DVE and targeted DVE, never an explanation instead of the prediction;
* nothing a request sends can fail the batch: a bug answers its own request with 500
  (logged with its traceback, never with the request).

Under TorchServe's ``kservev2`` service envelope (KServe v2 / Open Inference Protocol)
the handler sees the input tensors of one HTTP request instead of a batch of requests;
each tensor is answered like a request, with the same JSON, as one BYTES output.

It follows TorchServe's steps: ``preprocess`` parses, decodes and crops the batch into
one input tensor on the model's device; ``inference`` runs the forward pass, DVE,
targeted DVE, boxes and stages; ``postprocess`` draws every map on the device and
encodes them in parallel; ``respond`` writes each request's JSON and status. Per batch it
reports each step's time, the batch size, and the requests that failed (``metrics.yaml``).

The work itself is in ``handler.explainer`` (no TorchServe import), so tests and
offline tools run exactly this code path.
"""

from __future__ import annotations

import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ts.metrics.metric_type_enum import MetricTypes

from handler.errors import RequestError, failure, internal_error
from handler.explainer import Batch, Explainer, Inference, Result, Timings
from handler.options import ParsedRequest, is_inference_tensor

if TYPE_CHECKING:
    from ts.context import Context

logger = logging.getLogger(__name__)


class DVEHandler:
    """Prediction + DVE + targeted DVE in one call, per request, for a whole batch."""

    def __init__(self) -> None:
        self.explainer: Explainer | None = None
        self.initialized = False

    @property
    def ready_explainer(self) -> Explainer:
        """The explainer ``initialize`` made; an error before TorchServe has initialised the handler."""
        if self.explainer is None:
            raise RuntimeError("the handler is used before initialize()")
        return self.explainer

    def initialize(self, context: Context) -> None:
        """Loads the model named in ``model-config.yaml`` and finds the layer to explain."""
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        self.explainer = Explainer.from_model_dir(
            Path(properties["model_dir"]),
            context.manifest["model"],
            getattr(context, "model_yaml_config", None),
            device,
        )
        config = self.explainer.config
        logger.info(
            "DVE handler ready: %s on %s, explaining layer %s with feature maps %s",
            config.architecture,
            device,
            self.explainer.layer,
            self.explainer.feature_shape,
        )
        logger.info(
            "stages (request option 'stages'): %s",
            ", ".join(f"{stage} {stage.shape}" for stage in self.explainer.stages),
        )
        self.initialized = True

    def preprocess(self, data: list[dict[str, Any]], context: Context) -> Batch:
        """Parses each request's image and options, then decodes and crops every image into
        one input tensor on the model's device; a bad request becomes its own error."""
        explainer = self.ready_explainer
        parsed: list[ParsedRequest | RequestError] = []
        for idx, request in enumerate(data):
            try:
                parsed.append(explainer.parse(request, _body_content_type(context, idx, request)))
            except Exception:  # a bug must fail its own request only
                parsed.append(internal_error("parsing a request"))
        return explainer.preprocess(parsed)

    def inference(self, batch: Batch) -> Inference | RequestError:
        """One forward pass with the hook, then DVE, targeted DVE, boxes and stages for the batch."""
        return self.ready_explainer.infer(batch)

    def postprocess(self, batch: Batch, inference: Inference | RequestError) -> list[Result]:
        """Each request's answer, its maps drawn on the device and encoded in parallel."""
        return self.ready_explainer.postprocess(batch, inference)

    def respond(self, results: list[Result], context: Context) -> list[bytes]:
        """Compact JSON per request, with that request's own HTTP status."""
        responses = []
        for idx in range(len(results)):
            data = _to_bytes(results, idx)
            context.set_response_content_type(idx, "application/json")
            if results[idx].status != 200:
                context.set_response_status(results[idx].status, _reason_phrase(results[idx].status), idx)
            responses.append(data)
        return responses

    def respond_tensors(self, results: list[Result], context: Context) -> list[str]:
        """Compact JSON per input tensor of one KServe v2 request, as text.

        The envelope turns each text into a BYTES output tensor (bytes would fail its
        type mapping). The one HTTP response takes the first failing tensor's status.
        """
        texts = [_to_bytes(results, idx).decode("utf-8") for idx in range(len(results))]
        context.set_response_content_type(0, "application/json")
        failed = next((result for result in results if result.status != 200), None)
        if failed is not None:
            context.set_response_status(failed.status, _reason_phrase(failed.status), 0)
        return texts

    def handle(self, data: list[dict[str, Any]], context: Context) -> list[bytes] | list[str]:
        """TorchServe's entry point: one JSON response per request (or input tensor), in order."""
        start = time.perf_counter()
        explainer = self.ready_explainer
        explainer.timings = Timings()
        batch = self.preprocess(data, context)
        results = self.postprocess(batch, self.inference(batch))
        responses: list[bytes] | list[str]
        if data and all(is_inference_tensor(request) for request in data):
            responses = self.respond_tensors(results, context)
        else:
            responses = self.respond(results, context)
        timings = explainer.timings
        emit_metrics(context.metrics, results, timings, (time.perf_counter() - start) * 1000.0)
        logger.debug(
            "batch of %d (%d ok): preprocess %.1f ms, forward %.1f ms, dve %.1f ms, postprocess %.1f ms",
            len(data),
            timings.batch_size,
            timings.decode,
            timings.forward,
            timings.dve,
            timings.encode,
        )
        return responses


def emit_metrics(metrics: Any, results: list[Result], timings: Timings, handler_ms: float) -> None:
    """Reports one batch to TorchServe's metrics (declared in the project's ``metrics.yaml``).

    Stage times are counters of milliseconds (their rate over the batch count's rate
    is the mean per batch); the batch size is a histogram; failures are counted by class.
    Each call gets its own dimensions list: TorchServe appends its default dimensions
    to the list it is given, and its own default argument is one shared list.
    """
    metrics.add_time("HandlerTime", round(handler_ms, 2), None, "ms", [])
    for name, value in (
        ("DVEDecodeTime", timings.decode),
        ("DVEForwardTime", timings.forward),
        ("DVEExplainTime", timings.dve),
        ("DVEEncodeTime", timings.encode),
    ):
        metrics.add_metric(name, round(value, 3), "ms", None, [], MetricTypes.COUNTER)
    metrics.add_metric("DVEBatchSize", len(results), "count", None, [], MetricTypes.HISTOGRAM)
    metrics.add_counter("DVEBadRequests", sum(400 <= result.status < 500 for result in results), None, [])
    metrics.add_counter("DVEInternalErrors", sum(result.status >= 500 for result in results), None, [])


def _to_bytes(results: list[Result], idx: int) -> bytes:
    """Request ``idx``'s JSON; if even that fails (out of memory), its error replaces it in ``results``."""
    try:
        return results[idx].to_bytes()
    except Exception as error:
        results[idx] = Result.error(failure(error, "encoding an answer as JSON"))
        return results[idx].to_bytes()


def _reason_phrase(status: int) -> str:
    """The standard HTTP reason phrase; the message itself is in the JSON body.

    TorchServe frames the phrase by its length in characters but sends it as UTF-8, so
    a phrase with a non-ASCII character (an error message quoting a request's value)
    would corrupt the response stream between worker and frontend.
    """
    return HTTPStatus(status).phrase


def _body_content_type(context: Context, idx: int, request: dict[str, Any]) -> str | None:
    """The Content-Type of a request's body, as the frontend recorded it."""
    if is_inference_tensor(request):
        return None  # a tensor of a KServe v2 request: not a request of its own
    for key in ("body", "data"):
        if key in request:
            header = context.get_request_header(idx, key)
            if isinstance(header, dict):
                return header.get("content-type")
    return None
