"""Client-side budget for session-creating API calls.

The API allows 20 ``POST .../ssh-session`` per 60 s per sandbox per token. Every client
in the process shares one sliding-window log per (base URL, key, sandbox), so many
``SandboxSSH`` objects on one sandbox never trip the server's limit. A caller waits for a
slot, up to a bound, then gets :class:`RateBudgetExhausted`.

Hand-written rather than a library: it must block with a bound, be shared by key, and
accept the server's ``Retry-After`` as a floor; that is a deque and a condition variable.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque

from ._exceptions import RateBudgetExhausted

DEFAULT_LIMIT = 20
DEFAULT_WINDOW = 60.0


class SlidingWindowBudget:
    """At most ``limit`` acquisitions in any ``window`` seconds (monotonic clock)."""

    def __init__(self, limit: int = DEFAULT_LIMIT, window: float = DEFAULT_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._stamps: deque[float] = deque()
        self._blocked_until = 0.0
        self._cond = threading.Condition()

    def _wait_needed(self, now: float) -> float:
        while self._stamps and self._stamps[0] <= now - self.window:
            self._stamps.popleft()
        wait = max(0.0, self._blocked_until - now)
        if len(self._stamps) >= self.limit:
            wait = max(wait, self._stamps[0] + self.window - now)
        return wait

    def acquire(self, max_wait: float, what: str = "session request") -> float:
        """Take a slot, waiting at most ``max_wait`` seconds; return the time waited."""
        start = time.monotonic()
        with self._cond:
            while True:
                now = time.monotonic()
                wait = self._wait_needed(now)
                if wait <= 0:
                    self._stamps.append(now)
                    return now - start
                if now + wait - start > max_wait:
                    raise RateBudgetExhausted(
                        f"{what}: the session budget ({self.limit} per {self.window:g} s per "
                        f"sandbox) is spent and the next slot is {wait:.1f} s away, past the "
                        f"{max_wait:g} s wait allowed; retry later or raise rate_limit_wait",
                        wait=wait,
                    )
                self._cond.wait(timeout=wait)

    def block_for(self, seconds: float) -> None:
        """Honour a server ``Retry-After``: no acquisition before ``seconds`` from now."""
        with self._cond:
            self._blocked_until = max(self._blocked_until, time.monotonic() + seconds)
            self._cond.notify_all()

    def used(self) -> int:
        with self._cond:
            self._wait_needed(time.monotonic())
            return len(self._stamps)


_registry: dict[tuple[str, str, str], SlidingWindowBudget] = {}
_registry_lock = threading.Lock()


def budget_for(base_url: str, api_key: str, sandbox_id: str) -> SlidingWindowBudget:
    """The process-wide budget for one (base URL, key, sandbox)."""
    # Keyed by a digest so the registry never holds the key itself.
    digest = hashlib.sha256(api_key.encode()).hexdigest()
    key = (base_url, digest, sandbox_id)
    with _registry_lock:
        budget = _registry.get(key)
        if budget is None:
            budget = _registry[key] = SlidingWindowBudget()
        return budget
