"""``SandboxSSH``: the context manager users hold."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import paramiko
import requests

from . import _jobs, _runner, _sftp, _transfer, _trees, _tunnels
from ._api import (
    DEFAULT_TTL,
    APIClient,
    validate_sandbox_id,
)
from ._broker import SessionBroker
from ._config import Config
from ._exceptions import (
    ConnectionLost,
    InvalidArgument,
    SandboxError,
    SessionExpired,
    SSHBridgeError,
)
from ._hostkeys import HostKeyPolicy, KnownHostsFile, PinFirstHostKey
from ._jobs import Job
from ._lifecycle import SessionManager
from ._link import Link
from ._models import Sandbox, SSHSession
from ._options import SSHOptions
from ._result import CommandResult
from ._transfer import Verify

log = logging.getLogger("sshbridge")



def _release(manager: SessionManager, api: APIClient) -> None:
    """Close what a SandboxSSH opened. Runs on close(), when an unclosed object is
    garbage collected, or at interpreter exit: sessions never outlive their owner."""
    try:
        with contextlib.suppress(Exception):
            manager.close()
    finally:
        api.close()


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
        renew_before: float | None = None,
        auto_renew: bool = True,
        on_renew: Callable[[SSHSession, SSHSession], None] | None = None,
        http: requests.Session | None = None,
    ) -> None:
        self._setup(
            sandbox_id,
            SSHOptions(
                ttl_seconds=ttl_seconds,
                api_key=api_key,
                base_url=base_url,
                team_id=team_id,
                known_hosts=known_hosts,
                host_key_policy=host_key_policy,
                connect_timeout=connect_timeout,
                keepalive=keepalive,
                max_connections=max_connections,
                api_timeout=api_timeout,
                rate_limit_wait=rate_limit_wait,
                renew_before=renew_before,
                auto_renew=auto_renew,
                on_renew=on_renew,
                http=http,
            ),
        )

    @classmethod
    def from_options(cls, sandbox_id: str, options: SSHOptions) -> SandboxSSH:
        """A ``SandboxSSH`` from an :class:`SSHOptions` (validated once, reusable)."""
        if not isinstance(options, SSHOptions):
            raise InvalidArgument("options must be an SSHOptions")
        shell = cls.__new__(cls)
        shell._setup(sandbox_id, options)
        return shell

    def _setup(self, sandbox_id: str, options: SSHOptions) -> None:
        self.sandbox_id = validate_sandbox_id(sandbox_id)
        self.options = options
        self.ttl_seconds = options.ttl_seconds
        self.connect_timeout = options.connect_timeout
        policy: HostKeyPolicy
        if options.known_hosts is not None:
            policy = KnownHostsFile(os.fspath(options.known_hosts))
        else:
            policy = options.host_key_policy or PinFirstHostKey()
        self.host_key_policy = policy
        self._api = APIClient(
            api_key=options.api_key,
            base_url=options.base_url,
            team_id=options.team_id,
            timeout=options.api_timeout,
            rate_limit_wait=options.rate_limit_wait,
            http=options.http,
        )
        self._broker = SessionBroker(
            self._api,
            self.sandbox_id,
            ttl_seconds=self.ttl_seconds,
            policy=policy,
            connect_timeout=self.connect_timeout,
            keepalive=options.keepalive,
            max_connections=options.max_connections,
        )
        self._manager = SessionManager(
            self._broker,
            connect_timeout=self.connect_timeout,
            renew_before=options.renew_before,
            auto_renew=options.auto_renew,
            on_renew=options.on_renew,
        )
        # weakref.finalize also runs at interpreter exit (atexit) for objects still alive.
        self._finalizer = weakref.finalize(self, _release, self._manager, self._api)

    # -- lifecycle -------------------------------------------------------------------------

    def __repr__(self) -> str:
        link = self._manager.link
        state = "closed" if self.closed else ("open" if link is not None else "idle")
        sid = link.session.session_id if link is not None else None
        return f"SandboxSSH({self.sandbox_id!r}, state={state}, session_id={sid!r})"

    def __enter__(self) -> SandboxSSH:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> SandboxSSH:
        """Create a session for a fresh key (either contract) and connect."""
        self._current_link()
        return self

    def close(self) -> None:
        """Close every channel and transport and DELETE every session this object opened."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._manager.closed

    @property
    def config(self) -> Config:
        return self._api.config

    @property
    def api(self) -> APIClient:
        return self._api

    @property
    def session(self) -> SSHSession | None:
        """The current session (``session_id``, ``host``, ``port``, ``expires_at``, ...)."""
        link = self._manager.link
        return link.session if link is not None else None

    @property
    def expires_at(self) -> datetime | None:
        link = self._manager.link
        return link.session.expires_at if link is not None else None

    def sandbox(self) -> Sandbox:
        """Fetch the sandbox's current record from the API."""
        return self._api.get_sandbox(self.sandbox_id)

    def _current_link(self) -> Link:
        return self._manager.current()

    def channel_source(self) -> _runner.ChannelSource:
        """Where one call opens its channels: the current session's link, followed across
        renewals and reconnects. For code built on sshbridge (the CLI's streamed exec,
        the kill path of a cancelled fleet or async call), not needed for plain use."""
        if self.closed:
            raise InvalidArgument(f"{self!r} is closed; create a new one")
        return self._manager.source()

    @property
    def renewals(self) -> int:
        """How many times the session was renewed in the background."""
        return self._manager.renewals

    @property
    def reconnects(self) -> int:
        """How many times a dropped connection was re-established."""
        return self._manager.reconnects

    def renew(self) -> SSHSession:
        """Renew the session now (blocking); new work moves to the new session."""
        return self._manager.renew_now()

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
        try:
            return self._execute(
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
        except ConnectionLost as lost:
            if isinstance(lost, SessionExpired):
                raise
            self._raise_if_stopped(lost)
            raise

    def _raise_if_stopped(self, lost: ConnectionLost) -> None:
        """A dropped connection may mean the sandbox stopped: say so if it did."""
        try:
            self._broker.check_sandbox()
        except SandboxError as stopped:
            raise stopped from lost
        except SSHBridgeError:
            return

    def _execute(self, command: str | Sequence[str], **kw: Any) -> CommandResult:
        return _runner.execute(
            self._manager.source(),
            command,
            **kw,
        )

    # -- durable jobs ------------------------------------------------------------------------

    def spawn(
        self,
        command: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Job:
        """Start ``command`` detached in the sandbox and return a :class:`Job` handle.

        The job outlives this session and this object: its output and exit status are
        kept in files in the sandbox, and ``job(job.id)`` re-attaches later.
        """
        return _jobs.start(self, command, cwd=cwd, env=env)

    def job(self, job_id: str) -> Job:
        """Re-attach to a job started by ``spawn`` (from any process or session)."""
        return _jobs.attach(self, job_id)

    # -- files -----------------------------------------------------------------------------

    def put(
        self,
        local: str | os.PathLike[str],
        remote: str,
        *,
        preserve_mode: bool = True,
        callback: Callable[[int, int], None] | None = None,
        verify: Verify = "size",
        resume: bool = False,
    ) -> str:
        """Upload a file atomically (temporary name, then rename); returns the remote path.

        A remote path ending in ``/`` or naming a directory receives the file under its
        local name. ``verify="sha256"`` checks a checksum computed on both ends;
        ``resume=True`` continues an interrupted upload from its kept partial file.
        """
        return _sftp.put(
            self._manager.source(),
            local,
            remote,
            preserve_mode=preserve_mode,
            callback=callback,
            verify=verify,
            resume=resume,
        )

    def get(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        preserve_mode: bool = True,
        callback: Callable[[int, int], None] | None = None,
        verify: Verify = "size",
        resume: bool = False,
    ) -> Path:
        """Download a file; the local file appears whole or not at all."""
        return _sftp.get(
            self._manager.source(),
            remote,
            local,
            preserve_mode=preserve_mode,
            callback=callback,
            verify=verify,
            resume=resume,
        )

    def put_dir(
        self,
        local_dir: str | os.PathLike[str],
        remote_dir: str,
        *,
        preserve_mode: bool = True,
        preserve_times: bool = True,
        verify: Verify = "size",
        callback: Callable[[int, int], None] | None = None,
        method: _transfer.Method = "auto",
    ) -> list[str]:
        """Upload a directory tree (modes, mtimes and empty directories kept).

        Files go pipelined over SFTP, many in flight, each atomic (temporary name, then
        rename). ``method="tar"`` streams one tar archive into ``tar -x`` instead
        (unpacked aside, then renamed into place); without tar there, SFTP is used.
        """
        return _trees.put_dir(
            self._manager.source(),
            local_dir,
            remote_dir,
            preserve_mode=preserve_mode,
            preserve_times=preserve_times,
            verify=verify,
            callback=callback,
            method=_trees.check_method(method),
        )

    def get_dir(
        self,
        remote_dir: str,
        local_dir: str | os.PathLike[str],
        *,
        preserve_mode: bool = True,
        preserve_times: bool = True,
        verify: Verify = "size",
        callback: Callable[[int, int], None] | None = None,
        method: _transfer.Method = "auto",
    ) -> list[Path]:
        """Download a directory tree (modes, mtimes and empty directories kept).

        ``method="auto"`` streams one ``tar -c`` archive where the sandbox has tar
        (unpacked here into temporary names, renamed into place once complete), else
        pipelined SFTP; ``verify="sha256"`` always uses SFTP.
        """
        return _trees.get_dir(
            self._manager.source(),
            remote_dir,
            local_dir,
            preserve_mode=preserve_mode,
            preserve_times=preserve_times,
            verify=verify,
            callback=callback,
            method=_trees.check_method(method),
        )

    def sync(
        self,
        local_dir: str | os.PathLike[str],
        remote_dir: str,
        *,
        delete: bool = False,
        checksum: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> _transfer.SyncResult:
        """Make ``remote_dir`` a copy of ``local_dir``, sending only what changed.

        A file is sent when its size or mtime differs (with ``checksum=True``: its size
        or sha256). ``delete=True`` also removes what is not in ``local_dir``. An
        unchanged tree costs one remote listing.
        """
        return _trees.sync_up(self._manager.source(), local_dir, remote_dir, delete=delete,
                              checksum=checksum, progress=progress)

    def sync_down(
        self,
        remote_dir: str,
        local_dir: str | os.PathLike[str],
        *,
        delete: bool = False,
        checksum: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> _transfer.SyncResult:
        """Make ``local_dir`` a copy of ``remote_dir``, fetching only what changed."""
        return _trees.sync_down(self._manager.source(), remote_dir, local_dir, delete=delete,
                                checksum=checksum, progress=progress)

    def putfo(
        self,
        fileobj: IO[bytes],
        remote: str,
        *,
        mode: int | None = None,
        callback: Callable[[int, int], None] | None = None,
        verify: Verify = "size",
    ) -> str:
        """Upload from a binary file object, atomically."""
        return _sftp.putfo(
            self._manager.source(), fileobj, remote, mode=mode, callback=callback, verify=verify
        )

    def getfo(
        self,
        remote: str,
        fileobj: IO[bytes],
        *,
        callback: Callable[[int, int], None] | None = None,
        verify: Verify = "size",
    ) -> int:
        """Download into a binary file object; returns the byte count."""
        return _sftp.getfo(
            self._manager.source(), remote, fileobj, callback=callback, verify=verify
        )

    def open(self, path: str, mode: str = "r", bufsize: int = -1) -> _sftp.RemoteFile:
        """Open a remote file over SFTP (a context manager, like ``open``)."""
        return _sftp.open_remote(self._manager.source(), path, mode, bufsize)

    def listdir(self, path: str = ".") -> list[str]:
        return _sftp.listdir(self._manager.source(), path)

    def stat(self, path: str) -> paramiko.SFTPAttributes:
        return _sftp.stat(self._manager.source(), path)

    def exists(self, path: str) -> bool:
        return _sftp.exists(self._manager.source(), path)

    def makedirs(self, path: str, mode: int = 0o755, exist_ok: bool = True) -> None:
        _sftp.makedirs(self._manager.source(), path, mode=mode, exist_ok=exist_ok)

    def remove(self, path: str) -> None:
        _sftp.remove(self._manager.source(), path)

    def read_bytes(self, path: str) -> bytes:
        with self.open(path, "rb") as fh:
            return bytes(fh.read())

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(path).decode(encoding)

    def write_bytes(self, path: str, data: bytes) -> str:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument("data must be bytes")
        return self.putfo(io.BytesIO(bytes(data)), path)

    def write_text(self, path: str, text: str, encoding: str = "utf-8") -> str:
        if not isinstance(text, str):
            raise InvalidArgument("text must be a str")
        return self.write_bytes(path, text.encode(encoding))


    # -- port forwarding and interactive sessions (sshbridge._tunnels, _interactive) -------

    def forward(
        self,
        remote_port: int,
        local_port: int = 0,
        remote_host: str = "127.0.0.1",
        local_host: str = "127.0.0.1",
        *,
        max_connections: int = 64,
    ) -> _tunnels.LocalForward:
        """Forward a local port to ``remote_host:remote_port`` as seen inside the sandbox.

        ::

            with shell.forward(8888) as port:     # local_port=0: a free port is chosen
                requests.get(f"http://127.0.0.1:{port}/")

        The listener binds loopback unless ``local_host`` says otherwise. Returns a
        ``LocalForward`` (a context manager yielding the bound local port; also
        ``start()``/``close()``). Each connection uses the session current when it is
        accepted, so the forward survives a change of session.
        """
        return _tunnels.LocalForward(
            self._current_link,
            remote_port,
            local_port,
            remote_host,
            local_host,
            max_connections=max_connections,
            sandbox_id=self.sandbox_id,
        )

    def forward_remote(
        self,
        remote_port: int,
        local_port: int,
        local_host: str = "127.0.0.1",
        remote_host: str = "127.0.0.1",
        *,
        max_connections: int = 64,
    ) -> _tunnels.RemoteForward:
        """Listen on ``remote_host:remote_port`` inside the sandbox and carry each
        connection to ``local_host:local_port`` here (``ssh -R``).

        ::

            with shell.forward_remote(0, 5432) as port:   # port: bound in the sandbox
                shell.run(f"psql -h 127.0.0.1 -p {port} ...")

        Returns a ``RemoteForward`` (a context manager yielding the port bound in the
        sandbox). Raises ``PortForwardError`` (an :class:`SSHError`) when the server
        refuses to listen. The listener ends with the SSH connection it was made on.
        """
        return _tunnels.RemoteForward(
            self._current_link,
            remote_port,
            local_port,
            local_host,
            remote_host,
            max_connections=max_connections,
            sandbox_id=self.sandbox_id,
        )

    def interactive(
        self,
        command: str | Sequence[str] | None = None,
        *,
        pty: bool | None = None,
        term: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: int = 0,
        stdout: int = 1,
        stderr: int = 2,
    ) -> int:
        """Attach a remote shell (or ``command``) to this process's terminal; return its
        exit status (-1 if it ended without one).

        With a terminal on ``stdin`` a PTY is allocated (``pty=None``), the local terminal
        goes raw (Ctrl-C reaches the remote side) and window changes follow; the terminal
        is restored however the session ends.
        """
        from ._interactive import interactive

        return interactive(
            self._current_link,
            command,
            pty=pty,
            term=term,
            env=env,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
        )
