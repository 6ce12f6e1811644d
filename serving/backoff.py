"""Retrying HTTP 503 with exponential backoff and jitter, within bounds.

TorchServe answers 503 when the model's job queue is full (``job_queue_size`` in
config.properties): "Model ... has no worker to serve inference request. Please use
scale workers API to add workers." Nothing was computed, so the request may be sent
again, later. ``scripts/client.py`` and the load test's users (``loadtest/locustfile.py``)
do so with this policy:

* at most ``tries`` attempts in all (the first included; 1 means no retry);
* before retry n (n = 1, 2, ...), a wait drawn uniformly from
  [d/2, d], d = min(cap, base * 2**(n-1)) ("equal jitter": clients turned away together
  do not come back together, and no wait collapses to nothing);
* a ``Retry-After`` header (seconds, or an HTTP date), when the answer has one, is the
  least that wait may be;
* the waits add up to at most ``budget`` seconds: a wait that would pass it is not
  waited, and the last 503 is the answer.

Only 503 is retried: every other answer, success or error, is final.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

RETRIED_STATUS = 503

Answer = TypeVar("Answer")


@dataclass(frozen=True)
class Backoff:
    """How often and how long to retry a 503 (see the module's docstring)."""

    tries: int = 5
    base: float = 0.25
    cap: float = 4.0
    budget: float = 15.0

    def __post_init__(self) -> None:
        if self.tries < 1 or self.base < 0 or self.cap < 0 or self.budget < 0:
            raise ValueError(f"need tries >= 1 and non-negative base, cap and budget, got {self}")

    def next_wait(self, tries_done: int, waited: float, retry_after: float | None, rng: random.Random) -> float | None:
        """Seconds to wait before the next try, or None to give up.

        Args:
            tries_done: attempts made so far (1 after the first).
            waited: seconds already waited between them.
            retry_after: the last answer's Retry-After in seconds, if it had one.
            rng: the jitter's source.
        """
        if tries_done >= self.tries:
            return None
        ceiling = min(self.cap, self.base * 2 ** (tries_done - 1))
        wait = rng.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            wait = max(wait, retry_after)
        if waited + wait > self.budget:
            return None
        return wait


NO_RETRY = Backoff(tries=1)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header in seconds from ``now``: delta-seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def call(
    send: Callable[[], Answer],
    status: Callable[[Answer], int],
    headers: Callable[[Answer], Mapping[str, str] | None],
    policy: Backoff = Backoff(),
    *,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> tuple[Answer, int]:
    """Calls ``send()`` until its answer is not a 503 or ``policy`` gives up.

    Returns the last answer and the number of attempts made.
    """
    rng = rng or random.Random()
    tries, waited = 0, 0.0
    while True:
        answer = send()
        tries += 1
        if status(answer) != RETRIED_STATUS:
            return answer, tries
        found = headers(answer) or {}
        wait = policy.next_wait(tries, waited, retry_after_seconds(found.get("Retry-After")), rng)
        if wait is None:
            return answer, tries
        sleep(wait)
        waited += wait
