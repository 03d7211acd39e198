"""`Emulator`: the in-process stand-in for the Prime Intellect sandbox SSH service."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncssh

from ._processes import kill_tagged
from ._sidecar import Sidecar
from ._state import (
    CONTRACTS,
    ENDPOINTS,
    APICall,
    FailRule,
    OpenSSHTarget,
    Sandbox,
    Session,
    SessionRecord,
    State,
    new_id,
    utcnow,
)

logger = logging.getLogger("sshbridge.emulator")

_KEY_MARK = "sshbridge-emulator:"
_TERMINAL = frozenset({"TERMINATED", "TIMEOUT", "ERROR"})


class Emulator:
    """Local emulator of the sandbox API and SSH service, in either contract.

    ``contract="vm"`` (the default) is the provider's service as it runs today: the POST
    carries the public key, every session shares one SSH port, and each TCP connection
    starts with ``PRIME-SSH-SESSION <session_id>\\n``. ``contract="sidecar"`` is the
    project's specification: a token, a gateway that authorizes keys, one port per session.

    Everything binds 127.0.0.1 on ephemeral ports. The switch attributes below may be
    changed at any time from any thread; they are read when they matter.
    """

    def __init__(
        self,
        api_key: str | None = None,
        root_dir: str | os.PathLike[str] | None = None,
        openssh: OpenSSHTarget | None = None,
        contract: str = "vm",
    ) -> None:
        if contract not in CONTRACTS:
            raise ValueError(f"contract must be one of {', '.join(map(repr, CONTRACTS))}")
        self._contract = contract
        self.api_key: str = api_key or "emu_" + secrets.token_urlsafe(24)
        self.openssh = openssh
        self._root_arg = Path(root_dir) if root_dir is not None else None
        self._root: Path | None = None
        self._own_root = False

        self.cut_at_expiry: bool = False
        self.max_channels_per_connection: int | None = None
        # Open-failure reason code used for the channel cap (4 = resource shortage;
        # set 1, administratively prohibited, to answer like sshd's MaxSessions).
        self.channel_cap_failure_code: int = asyncssh.OPEN_RESOURCE_SHORTAGE
        self.exposure_delay: float = 0.0
        self.rotate_host_key: bool = False
        self.rate_limit: tuple[int, float] = (20, 60.0)
        self.rate_limit_retry_after: bool = True
        self.time_format: str = "Z"
        # 422 for POST body fields the contract does not define, instead of FastAPI's
        # default of ignoring them (sidecar knows ttl_seconds; vm also public_key).
        self.reject_unknown_fields: bool = False
        # Called with each 200 session answer after the session exists; what it returns
        # is sent instead (bytes verbatim, anything else as JSON).
        self.session_answer_hook: Callable[[dict[str, Any]], Any] | None = None
        # vm contract: how long the shared port waits for the preamble line.
        self.preamble_timeout: float = 10.0

        # The service state, shared with the HTTP and SSH sides (which also call the
        # session operations below: mint_session, end_session, authorize_key).
        self.state = State()
        self._sidecar: Sidecar | None = None
        self._http: Any = None  # _http.APIServer, imported lazily to keep modules acyclic
        self._http_thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()
        self._keys_lock = threading.Lock()
        self._started = False
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Emulator:
        from ._http import APIServer

        with self._lifecycle:
            if self._started:
                return self
            if self._stopped:
                raise RuntimeError("an Emulator cannot be restarted; create a new one")
            if self._root_arg is None:
                self._root = Path(tempfile.mkdtemp(prefix="sshbridge-emu-"))
                self._own_root = True
            else:
                self._root = self._root_arg
                self._root.mkdir(parents=True, exist_ok=True)
            try:
                if self.openssh is None:
                    self._sidecar = Sidecar(self, self.state, shared_port=self.contract == "vm")
                    self._sidecar.start()
                self._http = APIServer(self)
                self._http_thread = threading.Thread(
                    target=self._http.serve_forever,
                    kwargs={"poll_interval": 0.05},
                    name="sshbridge-emulator-http",
                    daemon=True,
                )
                self._http_thread.start()
            except BaseException:
                self._started = True
                self._stop_locked()
                raise
            self._started = True
            logger.info("emulator listening on %s", self.base_url)
            return self

    def stop(self) -> None:
        with self._lifecycle:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if not self._started or self._stopped:
            self._stopped = True
            return
        self._stopped = True
        http, thread = self._http, self._http_thread
        if http is not None:
            if thread is not None and thread.is_alive():
                http.shutdown()
            http.server_close()
            http.close_connections(timeout=3.0)
        if thread is not None:
            thread.join(3.0)
        if self._sidecar is not None:
            self._sidecar.stop()
            # Detached (setsid/nohup) sandbox processes outlive their channels by design;
            # they do not outlive the emulator.
            kill_tagged(self._sidecar.tag)
        if self.openssh is not None:
            with self.state.lock:
                open_ids = [s.internal_id for s in self.state.sessions.values()]
            for internal_id in open_ids:
                self._remove_key_lines(internal_id)
        if self._own_root and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------

    @property
    def contract(self) -> str:
        """``"vm"`` or ``"sidecar"``; fixed at construction."""
        return self._contract

    @property
    def ssh_port(self) -> int | None:
        """The shared SSH port of the vm contract (None in sidecar or OpenSSH mode)."""
        if self._sidecar is None:
            return None
        return self._sidecar.shared_port

    @property
    def preamble_rejections(self) -> int:
        """Connections the shared port closed at the preamble (vm contract)."""
        return self._sidecar.preamble_rejections if self._sidecar is not None else 0

    @property
    def base_url(self) -> str:
        if self._http is None:
            raise RuntimeError("the emulator is not started")
        port: int = self._http.server_address[1]
        return f"http://127.0.0.1:{port}"

    def env(self) -> dict[str, str]:
        return {"PRIME_API_KEY": self.api_key, "PRIME_API_BASE_URL": self.base_url}

    @property
    def root_dir(self) -> Path:
        if self._root is None:
            raise RuntimeError("the emulator is not started")
        return self._root

    # -- sandboxes ---------------------------------------------------------------

    def create_sandbox(
        self, status: str = "RUNNING", vm: bool | None = None, name: str | None = None
    ) -> str:
        """A new sandbox; ``vm`` defaults to what the contract serves (True for "vm")."""
        if vm is None:
            vm = self.contract == "vm"
        root = self.root_dir
        sid = new_id("sbx_")
        directory = root / sid
        directory.mkdir(parents=True)
        now = utcnow()
        sandbox = Sandbox(
            id=sid,
            name=name or f"emulated-{sid[4:12]}",
            status=status,
            vm=vm,
            directory=directory,
            created_at=now,
            updated_at=now,
            started_at=now if status == "RUNNING" else None,
            terminated_at=now if status in _TERMINAL else None,
        )
        with self.state.lock:
            self.state.sandboxes[sid] = sandbox
        return sid

    def set_status(self, sandbox_id: str, status: str) -> None:
        with self.state.lock:
            sandbox = self.state.sandboxes[sandbox_id]
            leaving = sandbox.status == "RUNNING" and status != "RUNNING"
            sandbox.status = status
            sandbox.updated_at = utcnow()
            if status == "RUNNING" and sandbox.started_at is None:
                sandbox.started_at = sandbox.updated_at
            if status in _TERMINAL and sandbox.terminated_at is None:
                sandbox.terminated_at = sandbox.updated_at
            affected: list[Session] = []
            if leaving:
                for session in self.state.sessions.values():
                    if session.sandbox_id == sandbox_id and not session.exposure_closed:
                        session.exposure_closed = True
                        affected.append(session)
        if not leaving:
            return
        if self._sidecar is not None:
            self._sidecar.close_sandbox(sandbox_id, f"sandbox is {status}")
        if self.openssh is not None:
            for session in affected:
                self._remove_key_lines(session.internal_id)

    def sandbox_dir(self, sandbox_id: str) -> Path:
        with self.state.lock:
            return self.state.sandboxes[sandbox_id].directory

    # -- fault injection -------------------------------------------------------------

    def fail_next(
        self,
        n: int,
        status: int,
        *,
        retry_after: int | float | str | None = None,
        body: Any = None,
        endpoint: str | None = None,
    ) -> None:
        """Answer the next `n` matching requests with `status` without touching any state."""
        if endpoint is not None and endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be None or one of {ENDPOINTS}")
        if n <= 0:
            return
        with self.state.lock:
            self.state.fail_rules.append(FailRule(n, status, retry_after, body, endpoint))

    def clear_failures(self) -> None:
        """Forget every pending ``fail_next`` rule."""
        with self.state.lock:
            self.state.fail_rules.clear()

    def cut_connections(self, session_id: str | None = None) -> None:
        """Drop the open SSH connections of one session (or all), as a network cut would.

        The session stays valid: a client may reconnect to it until ``expires_at``.
        """
        internal = None
        if session_id is not None:
            matches = [s for s in self.sessions if session_id in (s.session_id, s.wire_session_id)]
            if not matches:
                raise ValueError(f"unknown session {session_id!r}")
            internal = matches[-1].session_id
        if self._sidecar is not None:
            self._sidecar.cut_connections(internal, "connection cut by the emulator")

    # -- records ---------------------------------------------------------------------

    @property
    def api_calls(self) -> list[APICall]:
        with self.state.lock:
            return list(self.state.calls)

    @property
    def sessions(self) -> list[SessionRecord]:
        with self.state.lock:
            return [s.record() for s in self.state.sessions.values()]

    def open_sessions(self, sandbox_id: str | None = None) -> list[str]:
        """Ids of sessions created and never DELETEd (expired or not): what a client leaked."""
        with self.state.lock:
            return [
                s.internal_id
                for s in self.state.sessions.values()
                if s.deleted_at is None and (sandbox_id is None or s.sandbox_id == sandbox_id)
            ]

    def close_session(self, session_id: str) -> None:
        """Close a session as its DELETE would (for tests cleaning up what a client
        could not close, e.g. after an answer it could not read)."""
        session = self.state.session_by_any_id(session_id)
        if session is None:
            raise ValueError(f"unknown session {session_id!r}")
        if session.deleted_at is None:
            self.end_session(session)

    def ssh_channels(self, session_id: str | None = None) -> int:
        """Channels (sessions, forwards) clients hold open now (always 0 in OpenSSH mode)."""
        if self._sidecar is None:
            return 0
        if session_id is None:
            return self._sidecar.channel_count()
        session = self.state.session_by_any_id(session_id)
        return 0 if session is None else self._sidecar.channel_count(session.internal_id)

    def ssh_connections(self, session_id: str | None = None) -> int:
        """Authenticated SSH connections open now (always 0 in OpenSSH mode)."""
        if self._sidecar is None:
            return 0
        if session_id is None:
            return self._sidecar.connection_count()
        session = self.state.session_by_any_id(session_id)
        if session is None:
            return 0
        return self._sidecar.connection_count(session.internal_id)

    # -- used by the HTTP layer ------------------------------------------------------

    def mint_session(
        self, sandbox: Sandbox, ttl: int, key: asyncssh.SSHKey | None = None
    ) -> Session:
        """Create a session (and its exposure); authorize ``key`` for it at once if given."""
        now = utcnow()
        internal_id = new_id("sess_")
        target = self.openssh
        session = Session(
            internal_id=internal_id,
            wire_id=target.username if target is not None else internal_id,
            sandbox_id=sandbox.id,
            exposure_id=new_id("exp_"),
            user_ns=new_id("ns-", 12),
            job_id=new_id("job-", 16),
            token=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=now + timedelta(seconds=ttl),
            ttl_seconds=ttl,
            host=target.host if target is not None else "127.0.0.1",
            port=target.port if target is not None else 0,
        )
        if self._sidecar is not None:
            if self.rotate_host_key:
                session.host_key = asyncssh.generate_private_key("ssh-ed25519")
            else:
                with self.state.lock:
                    if sandbox.host_key is None:
                        sandbox.host_key = asyncssh.generate_private_key("ssh-ed25519")
                    session.host_key = sandbox.host_key
            session.port = self._sidecar.open_exposure(session, max(0.0, self.exposure_delay))
        self.state.add_session(session)
        if key is not None:
            self.authorize_key(session, key)
        return session

    def end_session(self, session: Session) -> None:
        with self.state.lock:
            session.deleted_at = utcnow()
            session.exposure_closed = True
        if self._sidecar is not None:
            self._sidecar.close_exposure(session.internal_id, "session deleted")
        if self.openssh is not None:
            self._remove_key_lines(session.internal_id)

    def authorize_key(self, session: Session, key: asyncssh.SSHKey) -> None:
        with self.state.lock:
            fresh = key.public_data not in session.keys
            session.keys[key.public_data] = key.get_fingerprint()
        if self.openssh is not None and fresh:
            self._append_key_line(session, key)

    # -- OpenSSH mode: authorized_keys upkeep ----------------------------------------

    def _append_key_line(self, session: Session, key: asyncssh.SSHKey) -> None:
        assert self.openssh is not None
        path = self.openssh.authorized_keys_file
        alg, blob = key.export_public_key("openssh").decode().split()[:2]
        # sshd enforces the expiry itself; its timespec is in the server's local time.
        until = session.expires_at.astimezone().strftime("%Y%m%d%H%M%S")
        line = f'expiry-time="{until}" {alg} {blob} {_KEY_MARK}{session.internal_id}\n'
        with self._keys_lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def _remove_key_lines(self, internal_id: str) -> None:
        assert self.openssh is not None
        path = self.openssh.authorized_keys_file
        mark = f" {_KEY_MARK}{internal_id}"
        with self._keys_lock:
            try:
                lines = path.read_text().splitlines(keepends=True)
            except FileNotFoundError:
                return
            kept = [ln for ln in lines if not ln.rstrip("\n").endswith(mark)]
            if len(kept) == len(lines):
                return
            tmp = path.with_name(path.name + ".sshbridge-tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, "".join(kept).encode())
            finally:
                os.close(fd)
            os.replace(tmp, path)

    def __repr__(self) -> str:
        where = self.base_url if self._http is not None else "not started"
        return f"<Emulator {where}>"
