"""The one error type a single request can fail with, and the last resort for bugs."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "internal error: the server could not answer this request; its log has the details"
OUT_OF_MEMORY_MESSAGE = (
    "the server ran out of memory answering this request; try again later, or ask for less "
    "(a smaller map_size, fewer maps, format 'png')"
)
OUT_OF_MEMORY = (MemoryError, torch.OutOfMemoryError)  # the host's, and CUDA's


class RequestError(ValueError):
    """A problem with one request; ``status`` is the HTTP code that request is answered with.

    The handler answers the request with this status and message, and the other
    requests of the same batch go on.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def internal_error(stage: str) -> RequestError:
    """A 500 for one request after an unexpected exception, whose traceback is logged.

    Call it inside an ``except`` block. Only the traceback is logged, never the
    request (its image, options or headers): a bug must not fail the whole batch,
    and the log must not hold what users sent.
    """
    logger.exception("unexpected error while %s; the request is answered with 500", stage)
    return RequestError(INTERNAL_ERROR_MESSAGE, 500)


def failure(error: Exception, stage: str) -> RequestError:
    """The answer for one request after an unexpected exception: call it inside ``except``.

    Running out of memory (host or CUDA) is the server's momentary state, not the
    request's fault nor a bug: 503, so that clients retry later, with one log line.
    Anything else is a bug: ``internal_error``.
    """
    if isinstance(error, OUT_OF_MEMORY):
        logger.error("out of memory while %s (%s); the request is answered with 503", stage, type(error).__name__)
        return RequestError(OUT_OF_MEMORY_MESSAGE, 503)
    return internal_error(stage)
