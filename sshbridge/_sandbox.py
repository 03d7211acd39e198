"""``SandboxSSH``: the context manager users hold."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO

import paramiko
import requests

from . import _runner, _sftp
from ._api import DEFAULT_TTL, APIClient, validate_sandbox_id, validate_ttl
from ._broker import SessionBroker
from ._config import Config
from ._exceptions import (
    InvalidArgument,
    SSHConnectError,
)
from ._hostkeys import HostKeyPolicy, KnownHostsFile, PinFirstHostKey
from ._link import Link
from ._models import Sandbox, SSHSession
from ._result import CommandResult

log = logging.getLogger("sshbridge")

_live: weakref.WeakSet[SandboxSSH] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # Objects never closed still must not leak sessions.
    for shell in list(_live):
        with contextlib.suppress(Exception):
            shell.close()


def _positive(name: str, value: object, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{name} must be a number of seconds, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)


class SandboxSSH:
    """A real SSH connection into a Prime Intellect sandbox.

    ::

        with SandboxSSH("sbx_123") as shell:
            print(shell.run("python -V").stdout)
            shell.put("data.tar", "/workspace/data.tar")

    The connection opens on ``__enter__`` (or :meth:`connect`, or the first call), and
    ``__exit__``/:meth:`close` closes channels and transports and DELETEs every session
    it created, on exceptions and Ctrl-C too. ``run``/``put``/``get`` are safe to call
    from many threads at once over one connection.
    """

    def __init__(
        self,
        sandbox_id: str,
        *,
        ttl_seconds: int = DEFAULT_TTL,
        api_key: str | None = None,
        base_url: str | None = None,
        team_id: str | None = None,
        known_hosts: str | os.PathLike[str] | None = None,
        host_key_policy: HostKeyPolicy | None = None,
        connect_timeout: float = 30.0,
        keepalive: float = 15.0,
        max_connections: int = 16,
        api_timeout: float | tuple[float, float] = (5.0, 30.0),
        rate_limit_wait: float = 120.0,
        http: requests.Session | None = None,
    ) -> None:
        self.sandbox_id = validate_sandbox_id(sandbox_id)
        self.ttl_seconds = validate_ttl(ttl_seconds)
        self.connect_timeout = _positive("connect_timeout", connect_timeout)
        keepalive = _positive("keepalive", keepalive, allow_zero=True)
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or not (
            1 <= max_connections <= 256
        ):
            raise InvalidArgument("max_connections must be an int between 1 and 256")
        if known_hosts is not None and host_key_policy is not None:
            raise InvalidArgument("pass known_hosts or host_key_policy, not both")
        if host_key_policy is not None and not isinstance(host_key_policy, HostKeyPolicy):
            raise InvalidArgument("host_key_policy must be a sshbridge HostKeyPolicy")
        policy: HostKeyPolicy
        if known_hosts is not None:
            policy = KnownHostsFile(os.fspath(known_hosts))
        else:
            policy = host_key_policy or PinFirstHostKey()
        self.host_key_policy = policy
        self._api = APIClient(
            api_key=api_key,
            base_url=base_url,
            team_id=team_id,
            timeout=api_timeout,
            rate_limit_wait=rate_limit_wait,
            http=http,
        )
        self._broker = SessionBroker(
            self._api,
            self.sandbox_id,
            ttl_seconds=self.ttl_seconds,
            policy=policy,
            connect_timeout=self.connect_timeout,
            keepalive=keepalive,
            max_connections=max_connections,
        )
        self._link: Link | None = None
        self._lock = threading.RLock()
        self._closed = False
        self.reconnects = 0
        _live.add(self)

    # -- lifecycle -------------------------------------------------------------------------

    def __repr__(self) -> str:
        link = self._link
        state = "closed" if self._closed else ("open" if link is not None else "idle")
        sid = link.session.session_id if link is not None else None
        return f"SandboxSSH({self.sandbox_id!r}, state={state}, session_id={sid!r})"

    def __enter__(self) -> SandboxSSH:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> SandboxSSH:
        """Check the sandbox, create a session, authorize a key and connect."""
        self._current_link()
        return self

    def close(self) -> None:
        """Close every channel and transport and DELETE every session this object opened."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._link = None
        try:
            self._broker.close_all()
        finally:
            self._api.close()
            _live.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def config(self) -> Config:
        return self._api.config

    @property
    def api(self) -> APIClient:
        return self._api

    @property
    def session(self) -> SSHSession | None:
        """The current session (``session_id``, ``host``, ``port``, ``expires_at``, ...)."""
        link = self._link
        return link.session if link is not None else None

    @property
    def expires_at(self) -> datetime | None:
        link = self._link
        return link.session.expires_at if link is not None else None

    def sandbox(self) -> Sandbox:
        """Fetch the sandbox's current record from the API."""
        return self._api.get_sandbox(self.sandbox_id)

    def _current_link(self) -> Link:
        link = self._link
        if link is not None and not link.closed and not link.expired and link.alive:
            return link
        with self._lock:
            if self._closed:
                raise InvalidArgument(
                    f"SandboxSSH({self.sandbox_id!r}) is closed; create a new one"
                )
            link = self._link
            if link is not None and not link.closed and not link.expired and link.alive:
                return link
            if link is not None and not link.closed and not link.expired:
                # Dropped while idle: the session is still valid, so reconnect to it.
                try:
                    link.connect(time.monotonic() + min(self.connect_timeout, 10.0))
                    self.reconnects += 1
                    log.info("sandbox %s: reconnected to session %s", self.sandbox_id,
                             link.session.session_id)
                    return link
                except SSHConnectError:
                    log.info("sandbox %s: session %s unreachable; opening a new one",
                             self.sandbox_id, link.session.session_id)
            if link is not None:
                self._broker.close_link(link)
                self._link = None
            new = self._broker.open_link()
            if link is not None:
                self.reconnects += 1
            self._link = new
            return new

    # -- commands --------------------------------------------------------------------------

    def run(
        self,
        command: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        input: str | bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
        pty: bool = False,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
        line_buffered: bool = False,
        encoding: str = "utf-8",
    ) -> CommandResult:
        """Run ``command`` and return its :class:`CommandResult`.

        ``command`` is a shell string, or an argv list that is quoted safely. ``cwd`` and
        ``env`` apply to this command only. ``input`` is fed to stdin (EOF follows; without
        it stdin is at EOF at once). ``timeout`` raises :class:`CommandTimeout` and stops
        the remote process. ``check=True`` raises :class:`CommandError` on a non-zero exit.
        ``on_stdout``/``on_stderr`` receive decoded text as it arrives (whole lines with
        ``line_buffered=True``). ``pty=True`` allocates a terminal (stderr merges into
        stdout).
        """
        # Validate before touching the network: bad input costs no session.
        _runner.build_command(command, cwd=cwd, env=env)
        link = self._current_link()
        return _runner.execute(
            link,
            command,
            cwd=cwd,
            env=env,
            input=input,
            timeout=timeout,
            check=check,
            pty=pty,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            line_buffered=line_buffered,
            encoding=encoding,
        )

    # -- files -----------------------------------------------------------------------------

    def put(
        self,
        local: str | os.PathLike[str],
        remote: str,
        *,
        preserve_mode: bool = True,
        callback: Callable[[int, int], None] | None = None,
    ) -> str:
        """Upload a file atomically (temporary name, then rename); returns the remote path.

        A remote path ending in ``/`` or naming a directory receives the file under its
        local name.
        """
        return _sftp.put(
            self._current_link(), local, remote, preserve_mode=preserve_mode, callback=callback
        )

    def get(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        preserve_mode: bool = True,
        callback: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Download a file; the local file appears whole or not at all."""
        return _sftp.get(
            self._current_link(), remote, local, preserve_mode=preserve_mode, callback=callback
        )

    def putfo(
        self,
        fileobj: IO[bytes],
        remote: str,
        *,
        mode: int | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> str:
        """Upload from a binary file object, atomically."""
        return _sftp.putfo(self._current_link(), fileobj, remote, mode=mode, callback=callback)

    def getfo(
        self,
        remote: str,
        fileobj: IO[bytes],
        *,
        callback: Callable[[int, int], None] | None = None,
    ) -> int:
        """Download into a binary file object; returns the byte count."""
        return _sftp.getfo(self._current_link(), remote, fileobj, callback=callback)

    def open(self, path: str, mode: str = "r", bufsize: int = -1) -> _sftp.RemoteFile:
        """Open a remote file over SFTP (a context manager, like ``open``)."""
        return _sftp.open_remote(self._current_link(), path, mode, bufsize)

    def listdir(self, path: str = ".") -> list[str]:
        return _sftp.listdir(self._current_link(), path)

    def stat(self, path: str) -> paramiko.SFTPAttributes:
        return _sftp.stat(self._current_link(), path)

    def exists(self, path: str) -> bool:
        return _sftp.exists(self._current_link(), path)

    def makedirs(self, path: str, mode: int = 0o755, exist_ok: bool = True) -> None:
        _sftp.makedirs(self._current_link(), path, mode=mode, exist_ok=exist_ok)

    def remove(self, path: str) -> None:
        _sftp.remove(self._current_link(), path)

    def read_bytes(self, path: str) -> bytes:
        with self.open(path, "rb") as fh:
            return bytes(fh.read())

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(path).decode(encoding)

    def write_bytes(self, path: str, data: bytes) -> str:
        import io

        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument("data must be bytes")
        return self.putfo(io.BytesIO(bytes(data)), path)

    def write_text(self, path: str, text: str, encoding: str = "utf-8") -> str:
        if not isinstance(text, str):
            raise InvalidArgument("text must be a str")
        return self.write_bytes(path, text.encode(encoding))

