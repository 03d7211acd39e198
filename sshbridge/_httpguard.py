"""One bound on a whole HTTP call, not only on each socket read.

requests' read timeout applies to every ``recv``: an answer dripped a byte at a time
never trips it. Here each call arms a timer; when it fires, the socket of the connection
the call is using is shut down, the blocked read fails at once, and the caller reports a
timeout. The connection classes of our own session record which connection a call uses.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

__all__ = ["CallGuard", "guarded", "guarded_session"]

_current = threading.local()


class CallGuard:
    """The deadline of one call; ``expired`` once it cut the call's connection."""

    def __init__(self) -> None:
        self.expired = False
        self._conn: HTTPConnection | None = None
        self._lock = threading.Lock()

    def attach(self, conn: HTTPConnection) -> None:
        with self._lock:
            self._conn = conn
            if self.expired:
                _shutdown(conn)

    def fire(self) -> None:
        with self._lock:
            self.expired = True
            if self._conn is not None:
                _shutdown(self._conn)


def _shutdown(conn: HTTPConnection) -> None:
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _register(conn: HTTPConnection) -> None:
    guard = getattr(_current, "guard", None)
    if isinstance(guard, CallGuard):
        guard.attach(conn)


class _GuardedHTTPConnection(HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _register(self)
        super().request(*args, **kwargs)


class _GuardedHTTPSConnection(HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _register(self)
        super().request(*args, **kwargs)


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }


def guarded_session() -> requests.Session:
    """A ``requests.Session`` whose calls :func:`guarded` can cut at their deadline."""
    session = requests.Session()
    adapter = _GuardedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@contextlib.contextmanager
def guarded(seconds: float) -> Iterator[CallGuard]:
    """Bound the calls made in this block (on a :func:`guarded_session`) to ``seconds``."""
    guard = CallGuard()
    timer = threading.Timer(seconds, guard.fire)
    timer.name = "sshbridge-http-deadline"
    timer.daemon = True
    previous = getattr(_current, "guard", None)
    _current.guard = guard
    timer.start()
    try:
        yield guard
    finally:
        timer.cancel()
        timer.join()  # returns at once after cancel(): no timer thread outlives the call
        _current.guard = previous
