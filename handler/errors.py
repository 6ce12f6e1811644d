"""The one error type a single request can fail with."""


class RequestError(ValueError):
    """A problem with one request; ``status`` is the HTTP code that request is answered with.

    The handler answers the request with this status and message, and the other
    requests of the same batch go on.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
