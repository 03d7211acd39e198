"""The retry vocabulary: tenacity for retried calls, ``Backoff`` for poll loops.

Retried calls (HTTP requests, SSH connects, job queries) use tenacity with
``StopAtDeadline``. Loops that wait for a state rather than retry a call (a channel slot,
a job's exit, a renewal's next attempt) take their pauses from one ``Backoff``.
"""

from __future__ import annotations

import time

from tenacity import RetryCallState
from tenacity.stop import stop_base


class StopAtDeadline(stop_base):
    """tenacity stop: give up once ``time.monotonic()`` reaches ``deadline``."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return time.monotonic() >= self.deadline


class Backoff:
    """Pauses that double from ``first`` up to ``cap``: ``pause = backoff.next()``."""

    __slots__ = ("_next", "cap")

    def __init__(self, first: float, cap: float) -> None:
        self._next = min(first, cap)
        self.cap = cap

    def next(self) -> float:
        pause = self._next
        self._next = min(pause * 2, self.cap)
        return pause
