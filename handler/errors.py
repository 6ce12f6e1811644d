"""The one error type a single request can fail with, and the last resort for bugs."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "internal error: the server could not answer this request; its log has the details"


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
