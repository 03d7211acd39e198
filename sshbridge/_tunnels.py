"""TCP port forwarding over a sandbox's SSH connection.

:class:`LocalForward` listens on a local port and carries each accepted connection to a
host:port as seen from inside the sandbox (``ssh -L``); :class:`RemoteForward` asks the
sidecar to listen inside the sandbox and carries its connections back here (``ssh -R``).

Each forwarded connection is a local socket and an SSH channel pumped by two threads, one
per direction, so a slow reader on one side never stalls the other direction. The number
of simultaneous connections is capped, which bounds the threads; further connections wait
in the listen backlog (local) or are refused (remote).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType

import paramiko

from ._compat import wait_channel, wake_channel_waiters
from ._exceptions import InvalidArgument, PortForwardError
from ._link import CHANNEL_OPEN_TIMEOUT, Link
from ._runner import send_eof

log = logging.getLogger("sshbridge.forward")

LinkSource = Callable[[], Link]

_CHUNK = 32768
DEFAULT_MAX_CONNECTIONS = 64
_JOIN_TIMEOUT = 5.0


# -- validation --------------------------------------------------------------------------


def check_port(value: object, name: str, *, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise InvalidArgument(
            f"{name} must be an int between {low} and 65535"
            + (" (0 picks a free port)" if allow_zero else "")
            + f", got {value!r}"
        )
    return value


def check_host(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise InvalidArgument(f"{name} must be a non-empty host name or address, got {value!r}")
    return value.strip()


# -- one forwarded connection --------------------------------------------------------------


class _Pipe:
    """A local socket and an SSH channel, pumped both ways with half-close preserved."""

    def __init__(self, sock: socket.socket, chan: paramiko.Channel, name: str) -> None:
        self.sock = sock
        self.chan = chan
        self.name = name
        self._up_done = threading.Event()
        self._aborted = False

    def run(self) -> None:
        """Pump until both directions end; runs in the calling thread plus one more."""
        down = threading.Thread(target=self._down, name=f"{self.name}-down", daemon=True)
        down.start()
        try:
            self._up()
        finally:
            down.join()
            self._close()

    def abort(self) -> None:
        """Stop both directions now (from any thread)."""
        self._aborted = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self.chan.close()

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self.chan.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def _up(self) -> None:
        """Local socket -> channel; local EOF becomes a channel EOF."""
        try:
            while True:
                try:
                    data = self.sock.recv(_CHUNK)
                except OSError:
                    self.abort()  # reset by the local peer: tear the remote end down too
                    return
                if not data:
                    send_eof(self.chan)
                    return
                try:
                    self.chan.sendall(data)
                except (OSError, EOFError, paramiko.SSHException):
                    self.abort()
                    return
        finally:
            self._up_done.set()
            wake_channel_waiters(self.chan)

    def _down(self) -> None:
        """Channel -> local socket; channel EOF becomes a local half-close."""
        while True:
            try:
                data = self.chan.recv(_CHUNK)
            except (OSError, EOFError, paramiko.SSHException):
                data = b""
            if not data:
                break
            try:
                self.sock.sendall(data)
            except OSError:
                self.abort()
                return
        if self._aborted:
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        # The local side may keep sending after our EOF (half-close), so wait for it to
        # finish, unless the remote end closes the channel outright: then nobody can
        # read what it sends, and the local side is told by a full shutdown.
        wait_channel(self.chan, self._up_done.is_set)
        if not self._up_done.is_set():
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RD)


class _PipeSet:
    """The live pipes of one forward, for shutdown and leak-free joins."""

    def __init__(self, limit: int) -> None:
        self.slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._pipes: set[_Pipe] = set()
        self._threads: set[threading.Thread] = set()
        self.closed = False

    def add_thread(self, thread: threading.Thread) -> bool:
        with self._lock:
            if self.closed:
                return False
            self._threads.add(thread)
            return True

    def thread_done(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.discard(thread)

    def add_pipe(self, pipe: _Pipe) -> bool:
        with self._lock:
            if self.closed:
                return False
            self._pipes.add(pipe)
            return True

    def pipe_done(self, pipe: _Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._threads)

    def close(self, timeout: float) -> None:
        with self._lock:
            self.closed = True
            pipes = list(self._pipes)
            threads = list(self._threads)
        for pipe in pipes:
            pipe.abort()
        end = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))
            if thread.is_alive():
                log.debug("forward thread %s did not stop in time", thread.name)


# -- local forwarding (ssh -L) -----------------------------------------------------------


class LocalForward:
    """Listen on ``local_host:local_port``; carry each connection to ``remote_host:remote_port``
    inside the sandbox.

    A context manager whose ``__enter__`` returns the bound local port::

        with shell.forward(8888) as port:
            requests.get(f"http://127.0.0.1:{port}/")

    Each new connection takes the sandbox's current session when it is accepted, so a
    forward outlives a change of session; connections open at the change end with it.
    """

    def __init__(
        self,
        links: LinkSource,
        remote_port: int,
        local_port: int = 0,
        remote_host: str = "127.0.0.1",
        local_host: str = "127.0.0.1",
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        sandbox_id: str = "",
    ) -> None:
        self.remote_port = check_port(remote_port, "remote_port", allow_zero=False)
        self.local_port = check_port(local_port, "local_port", allow_zero=True)
        self.remote_host = check_host(remote_host, "remote_host")
        self.local_host = check_host(local_host, "local_host")
        if (
            isinstance(max_connections, bool)
            or not isinstance(max_connections, int)
            or (max_connections < 1)
        ):
            raise InvalidArgument("max_connections must be a positive int")
        self.sandbox_id = sandbox_id
        self._links = links
        self._pipes = _PipeSet(max_connections)
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stop = threading.Event()
        self._state_lock = threading.Lock()
        self.connections = 0  # accepted so far

    def __repr__(self) -> str:
        return (
            f"LocalForward({self.local_host}:{self.local_port} -> "
            f"{self.remote_host}:{self.remote_port}, active={self.active_connections})"
        )

    @property
    def active_connections(self) -> int:
        return self._pipes.active

    def __enter__(self) -> int:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> int:
        """Connect (so configuration errors surface now), listen, and return the local port."""
        with self._state_lock:
            if self._stop.is_set():
                raise InvalidArgument("this forward was closed; create a new one")
            if self._listener is not None:
                return self.local_port
            self._links()
            self._listener = _listen(self.local_host, self.local_port)
            self.local_port = int(self._listener.getsockname()[1])
            self._wake_r, self._wake_w = socket.socketpair()
            self._acceptor = threading.Thread(
                target=self._accept_loop,
                name=f"sshbridge-forward-{self.local_port}",
                daemon=True,
            )
            self._acceptor.start()
        log.info(
            "forwarding %s:%d -> sandbox %s %s:%d",
            self.local_host,
            self.local_port,
            self.sandbox_id,
            self.remote_host,
            self.remote_port,
        )
        return self.local_port

    def close(self) -> None:
        """Stop listening, end every forwarded connection and join every thread."""
        with self._state_lock:
            if self._stop.is_set():
                return
            self._stop.set()
            if self._wake_w is not None:
                with contextlib.suppress(OSError):
                    self._wake_w.send(b"x")
        if self._acceptor is not None:
            self._acceptor.join(_JOIN_TIMEOUT)
        self._pipes.close(_JOIN_TIMEOUT)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept_loop(self) -> None:
        listener, wake = self._listener, self._wake_r
        assert listener is not None and wake is not None
        sel = selectors.DefaultSelector()
        try:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(wake, selectors.EVENT_READ)
            while not self._stop.is_set():
                # At the cap, stop accepting: clients wait in the backlog, not in threads.
                if not self._pipes.slots.acquire(timeout=0.2):
                    continue
                taken = False
                try:
                    while not self._stop.is_set() and not taken:
                        for key, _ in sel.select():
                            if key.fileobj is wake:
                                return
                            try:
                                sock, addr = listener.accept()
                            except (BlockingIOError, InterruptedError):
                                continue
                            except OSError:
                                if self._stop.is_set():
                                    return
                                log.debug("accept failed", exc_info=True)
                                time.sleep(0.05)
                                continue
                            taken = self._spawn(sock, addr)
                finally:
                    if not taken:
                        self._pipes.slots.release()
        finally:
            sel.close()

    def _spawn(self, sock: socket.socket, addr: tuple[str, int]) -> bool:
        self.connections += 1
        thread = threading.Thread(
            target=self._serve,
            args=(sock, addr),
            name=f"sshbridge-forward-{self.local_port}-{self.connections}",
            daemon=True,
        )
        if not self._pipes.add_thread(thread):
            sock.close()
            return False
        thread.start()
        return True

    def _serve(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        me = threading.current_thread()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                link = self._links()
                # Moves to another transport (opening one if allowed) when a connection
                # refuses for lack of room; a refusal that cannot be about room is final.
                chan = link.open_channel(
                    "direct-tcpip",
                    (self.remote_host, self.remote_port),
                    (str(addr[0]), int(addr[1])),
                    timeout=CHANNEL_OPEN_TIMEOUT,
                )
            except Exception as exc:  # noqa: BLE001 - one failed connection must not end the forward
                log.warning(
                    "forward %s:%d -> %s:%d: %s",
                    self.local_host,
                    self.local_port,
                    self.remote_host,
                    self.remote_port,
                    exc,
                )
                sock.close()
                return
            pipe = _Pipe(sock, chan, me.name)
            if not self._pipes.add_pipe(pipe):
                pipe.abort()
                pipe._close()
                return
            try:
                pipe.run()
            finally:
                self._pipes.pipe_done(pipe)
        finally:
            self._pipes.thread_done(me)
            self._pipes.slots.release()


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidArgument(f"cannot resolve local address {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    try:
        return socket.create_server(address, family=family, backlog=128)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


# -- remote forwarding (ssh -R) ----------------------------------------------------------


class _Dispatcher:
    """paramiko keeps ONE forwarded-tcpip handler per transport; this one routes each
    incoming channel to the forward whose port it arrived on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.routes: dict[int, RemoteForward] = {}

    def __call__(
        self,
        chan: paramiko.Channel,
        origin: tuple[str, int],
        server: tuple[str, int],
    ) -> None:
        # Runs on paramiko's transport thread: hand off at once, never block here.
        with self.lock:
            target = self.routes.get(int(server[1]))
        if target is None:
            log.debug("forwarded connection for unknown port %s; closing it", server[1])
            chan.close()
            return
        target._incoming(chan, origin)


_dispatchers: weakref.WeakKeyDictionary[paramiko.Transport, _Dispatcher] = (
    weakref.WeakKeyDictionary()
)
_dispatch_lock = threading.Lock()
# paramiko's global_request keeps one reply slot per transport: one request at a time.
_request_locks: weakref.WeakKeyDictionary[paramiko.Transport, threading.Lock] = (
    weakref.WeakKeyDictionary()
)


def _dispatcher_for(transport: paramiko.Transport) -> tuple[_Dispatcher, threading.Lock]:
    with _dispatch_lock:
        disp = _dispatchers.get(transport)
        if disp is None:
            disp = _dispatchers[transport] = _Dispatcher()
        lock = _request_locks.get(transport)
        if lock is None:
            lock = _request_locks[transport] = threading.Lock()
        return disp, lock


class RemoteForward:
    """Ask the sidecar to listen on ``remote_host:remote_port`` inside the sandbox and carry
    each connection to ``local_host:local_port`` here.

    A context manager whose ``__enter__`` returns the port bound in the sandbox (useful
    with ``remote_port=0``). The listener lives on one SSH connection: it ends when that
    connection does (the session ends or drops).
    """

    def __init__(
        self,
        links: LinkSource,
        remote_port: int,
        local_port: int,
        local_host: str = "127.0.0.1",
        remote_host: str = "127.0.0.1",
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        sandbox_id: str = "",
    ) -> None:
        self.remote_port = check_port(remote_port, "remote_port", allow_zero=True)
        self.local_port = check_port(local_port, "local_port", allow_zero=False)
        self.local_host = check_host(local_host, "local_host")
        self.remote_host = check_host(remote_host, "remote_host")
        if (
            isinstance(max_connections, bool)
            or not isinstance(max_connections, int)
            or (max_connections < 1)
        ):
            raise InvalidArgument("max_connections must be a positive int")
        self.sandbox_id = sandbox_id
        self._links = links
        self._pipes = _PipeSet(max_connections)
        self._transport: paramiko.Transport | None = None
        self._bound_port: int | None = None
        self._state_lock = threading.Lock()
        self._closed = False
        self.connections = 0

    def __repr__(self) -> str:
        return (
            f"RemoteForward(sandbox {self.remote_host}:{self._bound_port or self.remote_port} "
            f"-> {self.local_host}:{self.local_port}, active={self.active_connections})"
        )

    @property
    def active_connections(self) -> int:
        return self._pipes.active

    @property
    def active(self) -> bool:
        """True while the listener's SSH connection is up."""
        t = self._transport
        return t is not None and t.is_active() and not self._closed

    def __enter__(self) -> int:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> int:
        with self._state_lock:
            if self._closed:
                raise InvalidArgument("this forward was closed; create a new one")
            if self._bound_port is not None:
                return self._bound_port
            link = self._links()
            transports = link.transports()
            if not transports:
                raise link.lost_error("before the remote forward could be requested")
            transport = transports[0]
            disp, lock = _dispatcher_for(transport)
            if self.remote_port:
                with disp.lock:
                    if self.remote_port in disp.routes:
                        raise PortForwardError(
                            f"sandbox {self.sandbox_id}: port {self.remote_port} is already "
                            "forwarded on this connection"
                        )
                    disp.routes[self.remote_port] = self
            try:
                with lock:
                    port = transport.request_port_forward(
                        self.remote_host, self.remote_port, handler=disp
                    )
            except (paramiko.SSHException, EOFError, OSError) as exc:
                with disp.lock:
                    disp.routes.pop(self.remote_port, None)
                if not transport.is_active():
                    raise link.lost_error("while requesting a remote forward") from None
                raise PortForwardError(
                    f"sandbox {self.sandbox_id}: the server refused to listen on "
                    f"{self.remote_host}:{self.remote_port} ({exc}); the port may be in use, "
                    "privileged, or not on loopback"
                ) from None
            with disp.lock:
                disp.routes[int(port)] = self
            self._transport = transport
            self._bound_port = int(port)
        log.info(
            "forwarding sandbox %s %s:%d -> %s:%d",
            self.sandbox_id,
            self.remote_host,
            port,
            self.local_host,
            self.local_port,
        )
        return int(port)

    @property
    def port(self) -> int | None:
        """The port bound inside the sandbox, once started."""
        return self._bound_port

    def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            transport, port = self._transport, self._bound_port
        if transport is not None and port is not None:
            disp, lock = _dispatcher_for(transport)
            with disp.lock:
                if disp.routes.get(port) is self:
                    del disp.routes[port]
            if transport.is_active():
                # Not transport.cancel_port_forward(): it drops the handler of every
                # other forward on this transport.
                try:
                    with lock:
                        transport.global_request(
                            "cancel-tcpip-forward", (self.remote_host, port), wait=True
                        )
                except (paramiko.SSHException, EOFError, OSError):
                    log.debug("cancel-tcpip-forward failed", exc_info=True)
        self._pipes.close(_JOIN_TIMEOUT)

    def _incoming(self, chan: paramiko.Channel, origin: tuple[str, int]) -> None:
        if self._closed or not self._pipes.slots.acquire(blocking=False):
            log.warning(
                "remote forward %s:%s: refusing a connection (closed or %s at the limit)",
                self.remote_host,
                self._bound_port,
                self.active_connections,
            )
            chan.close()
            return
        self.connections += 1
        thread = threading.Thread(
            target=self._serve,
            args=(chan,),
            name=f"sshbridge-rforward-{self._bound_port}-{self.connections}",
            daemon=True,
        )
        if not self._pipes.add_thread(thread):
            self._pipes.slots.release()
            chan.close()
            return
        thread.start()

    def _serve(self, chan: paramiko.Channel) -> None:
        me = threading.current_thread()
        try:
            try:
                sock = socket.create_connection((self.local_host, self.local_port), timeout=10)
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                log.warning(
                    "remote forward -> %s:%d: cannot connect: %s",
                    self.local_host,
                    self.local_port,
                    exc.strerror or exc,
                )
                chan.close()
                return
            pipe = _Pipe(sock, chan, me.name)
            if not self._pipes.add_pipe(pipe):
                pipe.abort()
                pipe._close()
                return
            try:
                pipe.run()
            finally:
                self._pipes.pipe_done(pipe)
        finally:
            self._pipes.thread_done(me)
            self._pipes.slots.release()
