"""The SSH side: AsyncSSH on its own event loop thread.

Sidecar contract: one listener per session. VM contract: one shared listener that reads
the ``PRIME-SSH-SESSION <id>`` preamble line and hands the socket to that session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.stream import SSHServerStreamSession

from ._processes import (
    TAG_VAR,
    PipeProcess,
    Process,
    PtyProcess,
    signal_name,
)
from ._state import PREAMBLE_PREFIX, Session, State, utcnow

if TYPE_CHECKING:
    from ._emulator import Emulator

logger = logging.getLogger("sshbridge.emulator")

T = TypeVar("T")

_SWEEP_INTERVAL = 0.25
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "ip6-localhost"})
# The preamble line, newline included, may not be longer than this.
PREAMBLE_MAX = 256


def _server_options(exp: _Exposure) -> dict[str, Any]:
    """AsyncSSH server options for one session, shared by both contracts."""
    return {
        "server_factory": lambda: _ConnServer(exp),
        "server_host_keys": [exp.session.host_key],
        "line_editor": False,
        "gss_host": None,
        "x11_forwarding": False,
        "agent_forwarding": False,
        "allow_scp": False,
        "login_timeout": 60,
    }


def parse_preamble(line: bytes) -> str | None:
    """The session id of a ``PRIME-SSH-SESSION <id>\\n`` line, or None if malformed."""
    if not line.startswith(PREAMBLE_PREFIX) or not line.endswith(b"\n"):
        return None
    raw = line[len(PREAMBLE_PREFIX) : -1]
    try:
        session_id = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not session_id or not session_id.isprintable() or any(c.isspace() for c in session_id):
        return None
    return session_id


class Sidecar:
    """Owns the event loop thread; every public method here is safe to call from any thread."""

    def __init__(self, emu: Emulator, state: State, *, shared_port: bool = False) -> None:
        self._emu = emu
        self._state = state
        self._shared = shared_port
        self._listener: socket.socket | None = None
        self._shared_port: int | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._preamble_socks: set[socket.socket] = set()
        self._rejections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._exposures: dict[str, _Exposure] = {}
        self._live: set[_ChannelSession] = set()  # channels whose process is not reaped yet
        self._count_lock = threading.Lock()
        self._auth_counts: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.tag = secrets.token_hex(8)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="sshbridge-emulator-sidecar", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("SSH sidecar loop did not start")
        self.call(self._start_sweeper)
        if self._shared:
            self.call(self._start_shared_listener)

    @property
    def shared_port(self) -> int | None:
        return self._shared_port

    @property
    def preamble_rejections(self) -> int:
        with self._count_lock:
            return self._rejections

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive() and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            except Exception:
                logger.warning("SSH sidecar did not shut down cleanly", exc_info=True)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = None
        self._thread = None

    def call(self, fn: Callable[[], Coroutine[Any, Any, T]], timeout: float = 15.0) -> T:
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the SSH sidecar is not running")
        if threading.current_thread() is self._thread:
            raise RuntimeError("Sidecar.call() from the sidecar thread would deadlock")
        return asyncio.run_coroutine_threadsafe(fn(), loop).result(timeout)

    async def _start_sweeper(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        # Backstop for the per-session expiry timer: also catches cut_at_expiry
        # being switched on after a session already expired.
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            if not self._emu.cut_at_expiry:
                continue
            now = utcnow()
            for exp in list(self._exposures.values()):
                if exp.conns and now >= exp.session.expires_at:
                    exp.cut("session expired")

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        # Cancel before closing: a handshake still has its socket registered for reading.
        handshakes = list(self._handshakes)
        for task in handshakes:
            task.cancel()
        if handshakes:
            await asyncio.wait(handshakes, timeout=1.0)
        for sock in list(self._preamble_socks):
            sock.close()
        self._preamble_socks.clear()
        for exp in list(self._exposures.values()):
            exp.close(abort=True)
        self._exposures.clear()
        for chan_session in list(self._live):
            chan_session.kill()
        deadline = loop.time() + 3.0
        while self._live and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)  # let channel/connection cleanup callbacks run
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        await loop.shutdown_asyncgens()
        await loop.shutdown_default_executor()

    # -- called from the HTTP side -----------------------------------------------

    def open_exposure(self, session: Session, delay: float) -> int:
        return self.call(lambda: self._open_exposure(session, delay))

    def close_exposure(self, internal_id: str, reason: str) -> None:
        async def close() -> None:
            exp = self._exposures.pop(internal_id, None)
            if exp is not None:
                exp.close(reason=reason)

        self._call_quietly(close)

    def cut_connections(self, internal_id: str | None, reason: str) -> None:
        """Drop open SSH connections (a network cut); sessions and listeners stay."""

        async def cut() -> None:
            for key, exp in list(self._exposures.items()):
                if internal_id is None or key == internal_id:
                    exp.cut(reason)

        self._call_quietly(cut)

    def close_sandbox(self, sandbox_id: str, reason: str) -> None:
        async def close() -> None:
            for key, exp in list(self._exposures.items()):
                if exp.session.sandbox_id == sandbox_id:
                    del self._exposures[key]
                    exp.close(reason=reason)

        self._call_quietly(close)

    def connection_count(self, internal_id: str | None = None) -> int:
        with self._count_lock:
            if internal_id is None:
                return sum(self._auth_counts.values())
            return self._auth_counts.get(internal_id, 0)

    def channel_count(self, internal_id: str | None = None) -> int:
        """Channels the clients hold open now (live slots), on the loop thread."""

        async def count() -> int:
            return sum(
                conn.live_channels()
                for key, exp in self._exposures.items()
                if internal_id is None or key == internal_id
                for conn in list(exp.conns)
            )

        try:
            return self.call(count)
        except RuntimeError:
            return 0

    def _call_quietly(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped: nothing left to close
            self.call(fn)

    # -- loop side -----------------------------------------------------------------

    async def _open_exposure(self, session: Session, delay: float) -> int:
        loop = asyncio.get_running_loop()
        if self._shared:
            assert self._shared_port is not None
            exp = _Exposure(self, session, None)
            exp.ready_at = loop.time() + delay
            self._exposures[session.internal_id] = exp
            self._arm_expiry(exp)
            return self._shared_port
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Bound but not listening: the kernel answers SYNs with RST until listen().
            sock.bind(("127.0.0.1", 0))
        except OSError:
            sock.close()
            raise
        port: int = sock.getsockname()[1]
        exp = _Exposure(self, session, sock)
        self._exposures[session.internal_id] = exp
        self._arm_expiry(exp)
        if delay > 0:
            exp.delay_handle = loop.call_later(delay, exp.start_later)
        else:
            await exp.start_listening()
        return port

    def _arm_expiry(self, exp: _Exposure) -> None:
        remaining = (exp.session.expires_at - utcnow()).total_seconds()
        loop = asyncio.get_running_loop()
        exp.expiry_handle = loop.call_later(max(0.0, remaining), self._on_expiry, exp)

    # -- vm contract: the shared port and its preamble ---------------------------------

    async def _start_shared_listener(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self._shared_port = sock.getsockname()[1]
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock))

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _addr = await loop.sock_accept(listener)
            except OSError:
                if self._listener is None:
                    return
                logger.debug("accept on the shared SSH port failed", exc_info=True)
                await asyncio.sleep(0.05)  # e.g. EMFILE: do not spin
                continue
            conn.setblocking(False)
            self._preamble_socks.add(conn)
            task = loop.create_task(self._handshake(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _reject(self, sock: socket.socket, why: str) -> None:
        # Counted before the close, so a client that saw EOF also sees the count.
        with self._count_lock:
            self._rejections += 1
        logger.debug("shared SSH port: closing a connection: %s", why)
        self._preamble_socks.discard(sock)
        sock.close()

    async def _handshake(self, sock: socket.socket) -> None:
        try:
            line = await asyncio.wait_for(
                _read_line(sock, PREAMBLE_MAX), max(0.0, self._emu.preamble_timeout)
            )
        except asyncio.TimeoutError:
            self._reject(sock, "no preamble in time")
            return
        except asyncio.CancelledError:
            self._preamble_socks.discard(sock)
            sock.close()
            raise
        except OSError:
            self._reject(sock, "connection failed during the preamble")
            return
        session_id = parse_preamble(line) if line is not None else None
        if session_id is None:
            self._reject(sock, "missing or malformed preamble")
            return
        exp = self._exposures.get(session_id)
        if exp is None or exp.closed or not self._state.session_usable(exp.session):
            self._reject(sock, "unknown or unusable session")
            return
        if asyncio.get_running_loop().time() < exp.ready_at:
            self._reject(sock, "session not exposed yet")
            return
        self._preamble_socks.discard(sock)
        try:
            await asyncssh.run_server(sock, **_server_options(exp))
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception as exc:  # noqa: BLE001 -- failed logins end here; nothing to report
            logger.debug("SSH login on the shared port ended: %r", exc)
            sock.close()

    def _on_expiry(self, exp: _Exposure) -> None:
        exp.expiry_handle = None
        if self._emu.cut_at_expiry:
            exp.cut("session expired")

    def key_allowed(self, session: Session, username: str, key: asyncssh.SSHKey) -> bool:
        state = self._state
        with state.lock:
            if username != session.wire_id or not state.session_usable(session):
                return False
            return key.public_data in session.keys

    def count(self, internal_id: str, delta: int) -> None:
        with self._count_lock:
            n = self._auth_counts.get(internal_id, 0) + delta
            if n > 0:
                self._auth_counts[internal_id] = n
            else:
                self._auth_counts.pop(internal_id, None)

    def sandbox_dir(self, sandbox_id: str) -> Path:
        with self._state.lock:
            return self._state.sandboxes[sandbox_id].directory

    @property
    def emu(self) -> Emulator:
        return self._emu

    def track(self, chan_session: _ChannelSession, live: bool) -> None:
        if live:
            self._live.add(chan_session)
        else:
            self._live.discard(chan_session)


async def _read_line(sock: socket.socket, limit: int) -> bytes | None:
    """Read up to and including the first newline, never past it (peek, then consume).

    None if the peer closed first or the line would exceed ``limit`` bytes.
    """
    loop = asyncio.get_running_loop()
    buf = b""
    while True:
        try:
            peeked = sock.recv(limit - len(buf), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            fd = sock.fileno()
            ready = loop.create_future()
            loop.add_reader(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            continue
        if not peeked:
            return None
        newline = peeked.find(b"\n")
        take = newline + 1 if newline >= 0 else len(peeked)
        # The peeked bytes are in the kernel buffer, so this returns exactly `take`.
        buf += sock.recv(take)
        if newline >= 0:
            return buf
        if len(buf) >= limit:
            return None


class _Exposure:
    """One session's SSH endpoint and the connections that came through it.

    Sidecar contract: its own listening socket. VM contract: no socket; the shared port
    hands it connections whose preamble named this session.
    """

    def __init__(self, sidecar: Sidecar, session: Session, sock: socket.socket | None) -> None:
        self.sidecar = sidecar
        self.session = session
        self.sock: socket.socket | None = sock
        self.ready_at = 0.0  # loop time before which the shared port turns it away
        self.acceptor: asyncssh.SSHAcceptor | None = None
        self.conns: set[_ConnServer] = set()
        self.closed = False
        self.delay_handle: asyncio.TimerHandle | None = None
        self.expiry_handle: asyncio.TimerHandle | None = None
        self.start_task: asyncio.Task[None] | None = None

    def start_later(self) -> None:
        self.delay_handle = None
        self.start_task = asyncio.get_running_loop().create_task(self.start_listening())

    async def start_listening(self) -> None:
        sock = self.sock
        if self.closed or sock is None:
            return
        try:
            acceptor = await asyncssh.listen(sock=sock, **_server_options(self))
        except Exception:
            logger.exception("could not start the SSH listener for a session")
            sock.close()
            self.sock = None
            return
        self.sock = None  # the asyncio server owns it now
        self.acceptor = acceptor
        if self.closed:
            acceptor.close()
            self.acceptor = None

    def cut(self, reason: str) -> None:
        # Say why, then drop the TCP connection for real: a graceful disconnect alone can
        # leave the connection open while a channel's process keeps it busy.
        for conn in list(self.conns):
            conn.disconnect(reason)
        loop = asyncio.get_running_loop()
        for conn in list(self.conns):
            loop.call_later(0.05, conn.abort)

    def close(self, *, reason: str = "session closed", abort: bool = False) -> None:
        self.closed = True
        for handle in (self.delay_handle, self.expiry_handle):
            if handle is not None:
                handle.cancel()
        self.delay_handle = self.expiry_handle = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None
        for conn in list(self.conns):
            if abort:
                conn.abort()
            else:
                conn.disconnect(reason)


class _Slot:
    """Counts one client-opened channel against max_channels_per_connection."""

    def __init__(self) -> None:
        self.chan: asyncssh.SSHServerChannel[bytes] | asyncssh.SSHTCPChannel[bytes] | None = None
        self.opened = False
        self.done = False
        self._waiter: asyncio.Task[None] | None = None

    def watch(self, chan: asyncssh.SSHServerChannel[bytes] | asyncssh.SSHTCPChannel[bytes]) -> None:
        self.chan = chan
        # wait_closed also fires for opens that failed, which never reach the session.
        self._waiter = asyncio.get_running_loop().create_task(chan.wait_closed())
        self._waiter.add_done_callback(self._finished)

    def _finished(self, _task: asyncio.Task[None]) -> None:
        self.done = True

    def live(self) -> bool:
        if self.done:
            return False
        # A channel that saw CLOSE in either direction no longer counts, even before
        # asyncssh's deferred cleanup runs: the client may reuse the slot right away.
        return not (self.opened and self.chan is not None and self.chan.is_closing())


class _ConnServer(asyncssh.SSHServer):
    """Per-connection policy: who may log in, which channels may open."""

    def __init__(self, exp: _Exposure) -> None:
        self._exp = exp
        self._conn: asyncssh.SSHServerConnection | None = None
        self._authed = False
        self._slots: list[_Slot] = []

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._exp.conns.add(self)
        if self._exp.closed:
            asyncio.get_running_loop().call_soon(conn.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self._exp.conns.discard(self)
        if self._authed:
            self._authed = False
            # asyncio closes the socket just after this callback returns: count the
            # connection gone only then, so "no connections" means the peer can see it.
            asyncio.get_running_loop().call_soon(
                self._exp.sidecar.count, self._exp.session.internal_id, -1
            )

    def disconnect(self, reason: str) -> None:
        if self._conn is not None:
            self._conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason)

    def abort(self) -> None:
        if self._conn is not None:
            self._conn.abort()

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        allowed = self._exp.sidecar.key_allowed(self._exp.session, username, key)
        if allowed:
            # Count here rather than in auth_completed(), which asyncssh calls only after
            # USERAUTH_SUCCESS is on the wire: a client could otherwise see itself
            # connected before ssh_connections() does.
            self.auth_completed()
        return allowed

    def auth_completed(self) -> None:
        if not self._authed:
            self._authed = True
            self._exp.sidecar.count(self._exp.session.internal_id, +1)

    def live_channels(self) -> int:
        self._slots = [s for s in self._slots if s.live()]
        return len(self._slots)

    def _claim_slot(self) -> _Slot:
        emu = self._exp.sidecar.emu
        cap = emu.max_channels_per_connection
        self._slots = [s for s in self._slots if s.live()]
        if cap is not None and len(self._slots) >= cap:
            raise asyncssh.ChannelOpenError(
                emu.channel_cap_failure_code,
                f"too many open channels on this connection (max {cap})",
            )
        slot = _Slot()
        self._slots.append(slot)
        return slot

    def session_requested(self) -> Any:
        assert self._conn is not None
        slot = self._claim_slot()
        chan: asyncssh.SSHServerChannel[bytes] = self._conn.create_server_channel(encoding=None)
        slot.watch(chan)
        return chan, _ChannelSession(self._exp, slot)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Any:
        conn = self._conn
        assert conn is not None
        if dest_host not in _LOOPBACK:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                "only loopback destinations inside the sandbox are allowed",
            )
        slot = self._claim_slot()
        chan: asyncssh.SSHTCPChannel[bytes] = conn.create_tcp_channel()
        slot.watch(chan)

        async def forward() -> asyncssh.SSHForwarder:
            session = await conn.forward_connection(dest_host, dest_port)
            slot.opened = True
            return session

        return chan, forward()

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return listen_host in _LOOPBACK


class _SandboxSFTPServer(asyncssh.SFTPServer):
    """Not chrooted: absolute paths are the real filesystem; relative ones start in the sandbox."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], directory: bytes) -> None:
        super().__init__(chan)
        self._dir = directory

    def map_path(self, path: bytes) -> bytes:
        if path.startswith(b"/"):
            return path
        return os.path.join(self._dir, path) if path else self._dir


class _ChannelSession(asyncssh.SSHServerSession[bytes]):
    """One session channel: exec, shell (with or without pty), or the SFTP subsystem."""

    def __init__(self, exp: _Exposure, slot: _Slot) -> None:
        self._exp = exp
        self._sidecar = exp.sidecar
        self._slot = slot
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._term: tuple[str, tuple[int, int, int, int]] | None = None
        self._command: str | None = None
        self._sftp: SSHServerStreamSession[bytes] | None = None
        self._proc: Process | None = None
        self._pending: list[bytes] = []
        self._pending_eof = False
        self._out_paused = False
        self._input_paused = False
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- asyncssh callbacks ------------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan
        self._slot.opened = True

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Mapping[int, int]
    ) -> bool:
        self._term = (term_type or "xterm", term_size)
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        size = (width, height, pixwidth, pixheight)
        if self._term is not None:
            self._term = (self._term[0], size)
        if isinstance(self._proc, PtyProcess):
            self._proc.resize(size)

    def shell_requested(self) -> bool:
        self._command = None
        return True

    def exec_requested(self, command: str) -> bool:
        self._command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem != "sftp" or self._chan is None:
            return False
        directory = os.fsencode(self._sidecar.sandbox_dir(self._exp.session.sandbox_id))

        def factory(chan: SSHChannel[bytes]) -> asyncssh.SFTPServer:
            assert isinstance(chan, asyncssh.SSHServerChannel)
            return _SandboxSFTPServer(chan, directory)

        # Hand the channel to asyncssh's own SFTP stream session and forward to it.
        sftp: SSHServerStreamSession[bytes] = SSHServerStreamSession(None, factory, 3)
        sftp.connection_made(self._chan)
        if not sftp.subsystem_requested(subsystem):
            return False
        self._sftp = sftp
        return True

    def session_started(self) -> None:
        if self._sftp is not None:
            self._sftp.session_started()
            return
        self._spawn_task(self._start())

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._sftp is not None:
            self._sftp.data_received(data, datatype)
        elif self._proc is not None:
            self._proc.write(data)
        else:
            self._pending.append(data)

    def eof_received(self) -> bool:
        if self._sftp is not None:
            return self._sftp.eof_received()
        if self._proc is not None:
            self._proc.write_eof()
        else:
            self._pending_eof = True
        return True  # keep our side open: output may still follow

    def pause_writing(self) -> None:
        if self._sftp is not None:
            self._sftp.pause_writing()
            return
        self._out_paused = True
        if self._proc is not None:
            self._proc.pause_output()

    def resume_writing(self) -> None:
        if self._sftp is not None:
            self._sftp.resume_writing()
            return
        self._out_paused = False
        if self._proc is not None:
            self._proc.resume_output()

    def signal_received(self, name: str) -> None:
        signum = getattr(signal, "SIG" + name.upper().removeprefix("SIG"), None)
        if self._proc is not None and isinstance(signum, int):
            self._proc.signal(signum)

    def break_received(self, msec: int) -> bool:
        if isinstance(self._proc, PtyProcess):
            self._proc.write(b"\x03")
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._slot.done = True
        if self._sftp is not None:
            self._sftp.connection_lost(exc)
            self._sftp = None
        if self._proc is not None and not self._proc.done:
            self._proc.hangup()

    # -- process side ------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        directory = str(self._sidecar.sandbox_dir(self._exp.session.sandbox_id))
        env = dict(os.environ)
        env.pop("PRIME_API_KEY", None)  # the host's credentials do not belong in the sandbox
        env["HOME"] = directory
        env["PWD"] = directory
        # Survives setsid/nohup, so stop() can find detached leftovers (kill_tagged).
        env[TAG_VAR] = f"{self._sidecar.tag}:{self._exp.session.sandbox_id}"
        if self._chan is not None:
            for key, value in self._chan.get_environment().items():
                if isinstance(key, str) and isinstance(value, str) and "=" not in key:
                    env[key] = value
        if self._term is not None:
            env["TERM"] = self._term[0]
        return env

    def _argv(self) -> list[str]:
        if self._command is not None:
            return ["/bin/sh", "-c", self._command]
        if self._term is not None:
            bash = shutil.which("bash")
            return [bash, "-i"] if bash else ["/bin/sh", "-i"]
        return ["/bin/sh"]

    async def _start(self) -> None:
        chan = self._chan
        if chan is None or self._closed:
            return
        cwd = self._sidecar.sandbox_dir(self._exp.session.sandbox_id)
        proc: Process
        try:
            if self._term is not None:
                pty_proc = PtyProcess(self)
                await pty_proc.spawn(self._argv(), cwd, self._environment(), self._term[1])
                proc = pty_proc
            else:
                pipe_proc = PipeProcess(self)
                await pipe_proc.spawn(self._argv(), cwd, self._environment())
                proc = pipe_proc
        except Exception as exc:
            logger.debug("could not start a sandbox process", exc_info=True)
            if not chan.is_closing():
                msg = f"sshbridge emulator: cannot start process: {exc}\r\n"
                chan.write(msg.encode(), asyncssh.EXTENDED_DATA_STDERR)
                chan.exit(127)
            return
        # Input that arrived while spawning was queued in _pending; from here on it goes direct.
        self._proc = proc
        if proc.done:
            return
        self._sidecar.track(self, True)
        if self._term is not None and isinstance(proc, PtyProcess):
            proc.resize(self._term[1])
        if self._closed:
            proc.hangup()
            return
        for data in self._pending:
            proc.write(data)
        self._pending.clear()
        if self._pending_eof:
            proc.write_eof()
        if self._out_paused:
            proc.pause_output()

    def on_output(self, data: bytes, stderr: bool) -> None:
        chan = self._chan
        if self._closed or chan is None or chan.is_closing():
            return
        chan.write(data, asyncssh.EXTENDED_DATA_STDERR if stderr else None)

    def on_input_pressure(self, paused: bool) -> None:
        chan = self._chan
        if self._closed or chan is None:
            return
        self._input_paused = paused
        if paused:
            chan.pause_reading()
        else:
            # Not synchronously: asyncio's pipe transport calls resume_writing() from
            # inside _write_ready() and closes the pipe right after if write_eof() ran
            # meanwhile, dropping whatever a synchronous resume had just buffered.
            asyncio.get_running_loop().call_soon(self._resume_input)

    def _resume_input(self) -> None:
        if not self._closed and not self._input_paused and self._chan is not None:
            self._chan.resume_reading()

    def on_done(self, returncode: int) -> None:
        self._sidecar.track(self, False)
        if not self._closed:
            self._spawn_task(self._finish(returncode))

    async def _finish(self, returncode: int) -> None:
        chan = self._chan
        if chan is None:
            return
        # Report the status only after all output left, so it is the last thing a client sees.
        while chan.get_write_buffer_size() > 0 and not chan.is_closing():
            await asyncio.sleep(0.005)
        if chan.is_closing():
            return
        chan.write_eof()
        if returncode < 0:
            chan.exit_with_signal(signal_name(-returncode))
        else:
            chan.exit(returncode)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
