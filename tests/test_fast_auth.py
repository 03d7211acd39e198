"""Pipelined publickey authentication: the USERAUTH_REQUEST goes out right behind the
SERVICE_REQUEST, one round trip before paramiko would send it.

Checked on real servers over real sockets: OpenSSH, Dropbear, AsyncSSH and the minimal
paramiko server each authenticate pipelined, and through benchmarks/latency_proxy.py
(100 ms round trip) the pipelined connect waits for one answer fewer than paramiko's
order: the proxy counts the client's flights. A real TCP front that drops any connection
whose client sends its second encrypted packet before the server answered the first (a
server taking nothing early) shows the fallback: one reconnect in paramiko's order, and
that order kept for the host:port. A wrong key is still reported as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
from minimal_server import MinimalServer
from sshd_server import DropbearStartError, find_dropbear, find_sshd, start_dropbear, start_sshd

from sshbridge import SSHConnectError
from sshbridge import _transport as transport_mod
from sshbridge._hostkeys import PinFirstHostKey
from sshbridge._transport import EphemeralKey, connect, generate_key

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from latency_proxy import LatencyProxy

pytestmark = pytest.mark.timeout(120)

RTT = 0.1
SERVERS = ("openssh", "dropbear", "asyncssh", "minimal")


@dataclass
class Server:
    name: str
    host: str
    port: int
    username: str
    add_key: Callable[[str], None]


@pytest.fixture(scope="module")
def key() -> EphemeralKey:
    return generate_key()


def _asyncssh_server(public_line: str) -> Iterator[Server]:
    asyncssh = pytest.importorskip("asyncssh")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="asyncssh-test", daemon=True)
    thread.start()

    async def start() -> object:
        return await asyncssh.create_server(
            asyncssh.SSHServer,
            "127.0.0.1",
            0,
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            authorized_client_keys=asyncssh.import_authorized_keys(public_line + "\n"),
            process_factory=lambda process: process.exit(0),  # every command is `true`
        )

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def add_key(line: str) -> None:
        raise AssertionError("this server knows only the module's key")

    try:
        yield Server("asyncssh", "127.0.0.1", port, "user", add_key)
    finally:
        server.close()  # type: ignore[attr-defined]
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


@pytest.fixture(scope="module", params=SERVERS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, key: EphemeralKey
) -> Iterator[Server]:
    name = str(request.param)
    tmp = tmp_path_factory.mktemp(name)
    if name == "openssh":
        if find_sshd() is None:
            pytest.skip("OpenSSH sshd is not installed")
        sshd = start_sshd(tmp)
        try:
            yield Server(name, sshd.host, sshd.port, sshd.username, sshd.add_authorized_key)
        finally:
            sshd.stop()
    elif name == "dropbear":
        if find_dropbear() is None:
            pytest.skip("Dropbear is not installed")
        try:
            dropbear = start_dropbear(tmp)
        except DropbearStartError as exc:
            pytest.skip(f"Dropbear could not be started: {exc}")
        try:
            yield Server(
                name, dropbear.host, dropbear.port, dropbear.username, dropbear.add_authorized_key
            )
        finally:
            dropbear.stop()
    elif name == "asyncssh":
        yield from _asyncssh_server(key.public_line)
    else:
        (tmp / "root").mkdir()
        keys = tmp / "authorized_keys"
        keys.write_text("")

        def add(line: str) -> None:
            with keys.open("a") as fh:
                fh.write(line + "\n")

        with MinimalServer(tmp / "root", keys) as minimal:
            yield Server(name, minimal.host, minimal.port, minimal.username, add)


@pytest.fixture(scope="module")
def authorized(server: Server, key: EphemeralKey) -> Server:
    if server.name != "asyncssh":  # its fixture starts with the key
        server.add_key(key.public_line)
    return server


def _connect(
    host: str, port: int, username: str, key: EphemeralKey, within: float = 10.0
) -> paramiko.Transport:
    return connect(
        host,
        port,
        username,
        key,
        sandbox_id="sbx_fast_auth",
        policy=PinFirstHostKey(),
        deadline=time.monotonic() + within,
        keepalive=0,
    )


def _run_true(t: paramiko.Transport) -> int:
    chan = t.open_session()
    chan.exec_command("true")
    return chan.recv_exit_status()


@contextlib.contextmanager
def _forget(host: str, port: int) -> Iterator[None]:
    """Leave no process-wide "plain order" mark behind for a port the OS may reuse."""
    try:
        yield
    finally:
        transport_mod._plain_auth_only.discard((host, port))


def test_pipelined_connect_is_one_round_trip_shorter(authorized: Server, key: EphemeralKey) -> None:
    # Round trips are counted, not timed: the proxy counts the client's flights, each
    # after the first one an answer it waited for.
    with (
        LatencyProxy((authorized.host, authorized.port), rtt=RTT, bandwidth=None) as fast,
        LatencyProxy((authorized.host, authorized.port), rtt=RTT, bandwidth=None) as plain,
        _forget(fast.host, fast.port),
        _forget(plain.host, plain.port),
    ):
        transport_mod._stop_pipelining(plain.host, plain.port)
        flights: dict[str, list[int]] = {"fast": [], "plain": []}
        for _ in range(3):
            for label, link in (("fast", fast), ("plain", plain)):
                t = _connect(link.host, link.port, authorized.username, key)
                flights[label].append(link.flights[-1])
                try:
                    assert t.is_authenticated()
                    assert _run_true(t) == 0
                finally:
                    t.close()
        # One connection per connect: no fallback reconnect, and pipelining stays on.
        assert fast.connections == 3 and plain.connections == 3
        assert transport_mod._pipelining_allowed(fast.host, fast.port)
        saved = statistics.median(flights["plain"]) - statistics.median(flights["fast"])
        assert saved == 1, (authorized.name, flights)


def test_pipelined_auth_takes_one_round_trip(authorized: Server, key: EphemeralKey) -> None:
    # The client's flights up to the USERAUTH_SUCCESS (by then the proxy has read all it
    # sent): pipelined, the requests go out with the client's NEWKEYS; in paramiko's
    # order the USERAUTH_REQUEST waits for the SERVICE_ACCEPT.
    flights: dict[bool, int] = {}
    with LatencyProxy((authorized.host, authorized.port), rtt=RTT, bandwidth=None) as link:
        for pipeline in (True, False):
            sock = socket.create_connection((link.host, link.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = paramiko.Transport(sock)
            try:
                t.start_client(timeout=10)
                transport_mod._authenticate(
                    t, link.host, link.port, authorized.username, key, pipeline=pipeline
                )
                flights[pipeline] = link.flights[-1]
                assert t.is_authenticated()
                assert _run_true(t) == 0
            finally:
                t.close()
    assert flights[False] - flights[True] == 1, (authorized.name, flights)


def test_wrong_key_is_reported_as_before(authorized: Server) -> None:
    stranger = generate_key()
    with pytest.raises(SSHConnectError, match="did not accept the session key"):
        _connect(authorized.host, authorized.port, authorized.username, stranger, within=1.5)
    # A refusal of the key is the server's verdict, not a sign against pipelining.
    assert transport_mod._pipelining_allowed(authorized.host, authorized.port)


# -- a server that takes nothing early --------------------------------------------------------


class EarlyRefusingFront:
    """A TCP front that drops a connection whose client sends a second encrypted packet
    before the server could answer the first, as a server would that reads no
    USERAUTH_REQUEST before it accepted the service.

    It follows the client's packet framing: the banner line, plaintext packets up to
    NEWKEYS, then AES-GCM packets (length in clear, 16-byte tag). It holds the first
    encrypted packet back for ``window`` seconds: anything more from the client in that
    time arrived before any answer could have. Everything else is relayed as is.
    """

    def __init__(self, target: tuple[str, int], window: float = 0.3) -> None:
        self.target = target
        self.window = window
        self.connections = 0
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self._listener.getsockname()[:2]
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._closed = False
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def close(self) -> None:
        self._closed = True
        for sock in [self._listener, *self._socks]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in [self._accepting, *self._threads]:
            thread.join(5)

    def __enter__(self) -> EarlyRefusingFront:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        up = socket.create_connection(self.target)
        self._socks += [conn, up]
        for sock in (conn, up):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=self._copy, args=(up, conn), daemon=True)
        self._threads.append(back)
        back.start()
        try:
            self._client_side(conn, up)
        except OSError:
            pass
        finally:
            for sock in (conn, up):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _client_side(self, conn: socket.socket, up: socket.socket) -> None:
        buf = b""

        def need(n: int) -> bytes:
            nonlocal buf
            while len(buf) < n:
                data = conn.recv(65536)
                if not data:
                    raise OSError("client closed")
                buf += data
            out, buf = buf[:n], buf[n:]
            return out

        line = b""
        while not line.endswith(b"\n"):
            line += need(1)
        up.sendall(line)
        while True:  # plaintext packets up to the client's NEWKEYS (21)
            head = need(5)
            (length,) = struct.unpack(">I", head[:4])
            body = need(length - 1)
            up.sendall(head + body)
            if body[0] == 21:
                break
        (length,) = struct.unpack(">I", need(4))
        first = struct.pack(">I", length) + need(length + 16)
        conn.settimeout(self.window)
        try:
            early = buf or conn.recv(65536)
        except TimeoutError:
            early = b""
        conn.settimeout(None)
        if early:
            self.dropped += 1
            return
        up.sendall(first)
        self._copy(conn, up)

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, key: EphemeralKey) -> Iterator[Server]:
    if find_sshd() is None:
        pytest.skip("OpenSSH sshd is not installed")
    server = start_sshd(tmp_path_factory.mktemp("sshd-front"))
    server.add_authorized_key(key.public_line)
    try:
        yield Server(
            "openssh", server.host, server.port, server.username, server.add_authorized_key
        )
    finally:
        server.stop()


def test_front_lets_paramikos_order_through(sshd: Server, key: EphemeralKey) -> None:
    with EarlyRefusingFront((sshd.host, sshd.port)) as front, _forget(front.host, front.port):
        transport_mod._stop_pipelining(front.host, front.port)
        t = _connect(front.host, front.port, sshd.username, key)
        try:
            assert t.local_cipher.startswith("aes") and t.local_cipher.endswith("gcm@openssh.com")
            assert _run_true(t) == 0
        finally:
            t.close()
        assert (front.connections, front.dropped) == (1, 0)


def test_fallback_when_the_server_takes_nothing_early(sshd: Server, key: EphemeralKey) -> None:
    with EarlyRefusingFront((sshd.host, sshd.port)) as front, _forget(front.host, front.port):
        t = _connect(front.host, front.port, sshd.username, key)
        try:
            assert t.is_authenticated() and _run_true(t) == 0
        finally:
            t.close()
        # The pipelined attempt was dropped, the reconnect in paramiko's order worked ...
        assert (front.connections, front.dropped) == (2, 1)
        assert not transport_mod._pipelining_allowed(front.host, front.port)
        # ... and is what this host:port gets from now on: one connection, nothing dropped.
        t = _connect(front.host, front.port, sshd.username, key)
        try:
            assert _run_true(t) == 0
        finally:
            t.close()
        assert (front.connections, front.dropped) == (3, 1)
    # Other hosts still pipeline.
    assert transport_mod._pipelining_allowed(sshd.host, sshd.port)


def test_fallback_keeps_wrong_key_semantics(sshd: Server) -> None:
    # Dropped pipelined, refused in order: the key's refusal is what is reported (as
    # paramiko's order alone reports it), and the answer in order, where the early
    # request got none, is enough to keep to that order here.
    stranger = generate_key()
    with EarlyRefusingFront((sshd.host, sshd.port)) as front, _forget(front.host, front.port):
        with pytest.raises(SSHConnectError, match="did not accept the session key"):
            _connect(front.host, front.port, sshd.username, stranger, within=1.5)
        assert front.dropped == 1 and front.connections >= 2
        assert not transport_mod._pipelining_allowed(front.host, front.port)
