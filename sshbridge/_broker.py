"""The session broker: session (either contract), key, connect, close; and, on failure,
asking the API what became of the sandbox."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from ._api import APIClient
from ._exceptions import (
    APIError,
    APIStatusError,
    SandboxNotRunning,
    SandboxNotSupported,
    SSHBridgeError,
    SSHConnectError,
)
from ._hostkeys import HostKeyPolicy
from ._link import Link, session_life
from ._models import Sandbox, SidecarSSHSession
from ._transport import generate_key

log = logging.getLogger("sshbridge.broker")


class OpenCancelled(SSHBridgeError):
    """``open_link`` stopped because its owner closed; what it had made is closed."""


def _never() -> bool:
    return False


class SessionBroker:
    """Mints links for one sandbox and closes every session it opened."""

    def __init__(
        self,
        api: APIClient,
        sandbox_id: str,
        *,
        ttl_seconds: int,
        policy: HostKeyPolicy,
        connect_timeout: float,
        keepalive: float,
        max_connections: int,
    ) -> None:
        self.api = api
        self.sandbox_id = sandbox_id
        self.ttl_seconds = ttl_seconds
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.max_connections = max_connections
        # Keyed by the link itself: a server may reuse one session_id (e.g. a login name)
        # for several sessions, and each one must still be closed.
        self._open: dict[int, Link] = {}
        self._lock = threading.Lock()
        self.sessions_created = 0

    def check_sandbox(self) -> Sandbox:
        """Ask the API about the sandbox; raise :class:`SandboxNotRunning` unless RUNNING.

        Only called to explain a failure (a refused POST, a dropped connection): the
        hot path never pays this round trip.
        """
        sandbox = self.api.get_sandbox(self.sandbox_id)
        if sandbox.status != "RUNNING":
            raise SandboxNotRunning(
                f"sandbox {self.sandbox_id} is {sandbox.status}, not RUNNING; start it (or wait "
                "for it to finish provisioning) and try again",
                sandbox_id=self.sandbox_id,
                status=sandbox.status,
            )
        return sandbox

    def explain(self, error: SSHBridgeError) -> SSHBridgeError:
        """The most useful error for a failed session: a stopped sandbox says so."""
        try:
            sandbox = self.check_sandbox()
        except SandboxNotRunning as stopped:
            return stopped
        except SSHBridgeError:
            return error  # the API cannot tell more (unknown sandbox, API down)
        if isinstance(error, APIStatusError) and error.status_code == 400 and _unsupported(error):
            unsupported = SandboxNotSupported(
                f"sandbox {self.sandbox_id}: the API does not offer SSH for it "
                f"({error.detail or error}); check the sandbox type with `prime sandbox get`",
                sandbox_id=self.sandbox_id,
                status=sandbox.status,
            )
            return unsupported
        return error

    def open_link(
        self,
        *,
        check: bool = False,
        budget_wait: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Link:
        """Create a session for a fresh key and connect. Nothing leaks on failure.

        Both contracts: the key goes in the POST; a contract-A answer (token, gateway)
        is then authorized at the gateway, a contract-B answer already is, and its
        connections start with the session preamble (the link handles that).

        ``cancelled`` is asked between steps: once it answers True the session made so
        far is closed (DELETEd) by this thread and :class:`OpenCancelled` is raised. The
        SSH connect itself stops when the link is closed (``close_all``).
        """
        stop = cancelled or _never
        if check:
            self.check_sandbox()
        if stop():
            raise OpenCancelled(f"sandbox {self.sandbox_id}: cancelled before the session POST")
        key = generate_key()
        wall, mono = time.time(), time.monotonic()
        try:
            session = self.api.create_ssh_session(
                self.sandbox_id,
                self.ttl_seconds,
                public_key=key.public_line,
                budget_wait=budget_wait,
            )
        except APIStatusError as exc:
            explained = self.explain(exc) if exc.status_code in (400, 404, 409) else exc
            if explained is exc:
                raise
            raise explained from exc
        self.sessions_created += 1
        link = Link(
            session,
            key,
            sandbox_id=self.sandbox_id,
            policy=self.policy,
            expires_monotonic=session_life(session, wall, mono),
            keepalive=self.keepalive,
            connect_timeout=self.connect_timeout,
            max_connections=self.max_connections,
        )
        with self._lock:
            self._open[id(link)] = link
        # Asked only after the link is registered: an owner closing concurrently either
        # finds it in close_all() or is seen here, so the session is never missed.
        try:
            if stop():
                raise OpenCancelled(
                    f"sandbox {self.sandbox_id}: cancelled after session "
                    f"{session.session_id} was created"
                )
            if isinstance(session, SidecarSSHSession):
                self.api.authorize_key(session, key.public_line)
            if stop():
                raise OpenCancelled(f"sandbox {self.sandbox_id}: cancelled before connecting")
            link.connect()
            if stop():
                raise OpenCancelled(f"sandbox {self.sandbox_id}: cancelled while connecting")
        except OpenCancelled:
            self.close_link(link)
            raise
        except SSHBridgeError as exc:
            self.close_link(link)
            if stop():
                # e.g. close_all() closed the link under its connect: not a failure to
                # explain (that would cost another API call), the owner is gone.
                raise OpenCancelled(
                    f"sandbox {self.sandbox_id}: cancelled while connecting"
                ) from exc
            if not isinstance(exc, SSHConnectError):
                raise
            explained = self.explain(exc)
            if explained is exc:
                raise
            raise explained from exc
        except BaseException:
            self.close_link(link)
            raise
        log.info(
            "sandbox %s: SSH session %s ready (%s contract, expires %s)",
            self.sandbox_id,
            session.session_id,
            session.contract,
            session.expires_at.isoformat(),
        )
        return link

    def close_link(self, link: Link) -> None:
        """Close the link's transports and DELETE its session (best effort, never raises)."""
        link.close()
        with self._lock:
            known = self._open.pop(id(link), None)
        if known is None:
            return
        try:
            self.api.close_ssh_session(self.sandbox_id, link.session.session_id)
        except (APIError, SSHBridgeError) as exc:
            log.warning(
                "sandbox %s: could not close SSH session %s: %s",
                self.sandbox_id,
                link.session.session_id,
                exc,
            )

    def close_all(self) -> None:
        with self._lock:
            links = list(self._open.values())
        for link in links:
            with contextlib.suppress(Exception):
                self.close_link(link)

    @property
    def open_sessions(self) -> list[str]:
        with self._lock:
            return [link.session.session_id for link in self._open.values()]


def _unsupported(error: APIStatusError) -> bool:
    text = (error.detail or "").lower()
    return "not supported" in text or "unsupported" in text
