"""The session broker: sandbox check, session, key authorization, connect, and close."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from ._api import APIClient
from ._exceptions import APIError, SandboxNotRunning, SandboxNotSupported, SSHBridgeError
from ._hostkeys import HostKeyPolicy
from ._link import Link, session_life
from ._models import Sandbox
from ._transport import generate_key

log = logging.getLogger("sshbridge.broker")


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
        sandbox = self.api.get_sandbox(self.sandbox_id)
        if sandbox.vm:
            raise SandboxNotSupported(
                f"sandbox {self.sandbox_id} is a VM sandbox; the SSH sidecar serves container "
                "sandboxes only",
                sandbox_id=self.sandbox_id,
                status=sandbox.status,
            )
        if sandbox.status != "RUNNING":
            raise SandboxNotRunning(
                f"sandbox {self.sandbox_id} is {sandbox.status}, not RUNNING; start it (or wait "
                "for it to finish provisioning) and try again",
                sandbox_id=self.sandbox_id,
                status=sandbox.status,
            )
        return sandbox

    def open_link(self, *, check: bool = True, budget_wait: float | None = None) -> Link:
        """Create a session, authorize a fresh key and connect. Nothing leaks on failure."""
        if check:
            self.check_sandbox()
        wall, mono = time.time(), time.monotonic()
        session = self.api.create_ssh_session(
            self.sandbox_id, self.ttl_seconds, budget_wait=budget_wait
        )
        self.sessions_created += 1
        link = Link(
            session,
            generate_key(),
            sandbox_id=self.sandbox_id,
            policy=self.policy,
            expires_monotonic=session_life(session, wall, mono),
            keepalive=self.keepalive,
            connect_timeout=self.connect_timeout,
            max_connections=self.max_connections,
        )
        with self._lock:
            self._open[id(link)] = link
        try:
            self.api.authorize_key(session, link.key.public_line)
            link.connect()
        except BaseException:
            self.close_link(link)
            raise
        log.info(
            "sandbox %s: SSH session %s ready (expires %s)",
            self.sandbox_id,
            session.session_id,
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
