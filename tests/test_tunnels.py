"""Port forwarding (SandboxSSH.forward / forward_remote) against the local emulator."""

# ruff: noqa: F811 - pytest fixtures imported from cli_helpers are parameters here
from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (  # noqa: F401 - fixtures are used by name
    ECHO_SERVER,
    contract,
    emu,
    forward_threads,
    sandbox,
    start_echo_server,
    stop_echo_server,
)
from emu_helpers import wait_until

from sshbridge import InvalidArgument, SandboxSSH, SSHError
from sshbridge._tunnels import PortForwardError
from sshbridge.emulator import Emulator

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def shell(emu: Emulator, sandbox: str) -> Iterator[SandboxSSH]:
    with SandboxSSH(sandbox, api_key=emu.api_key, base_url=emu.base_url) as s:
        yield s
    assert forward_threads() == []


@pytest.fixture
def echo_port(emu: Emulator, sandbox: str) -> Iterator[int]:
    port = start_echo_server(emu, sandbox)
    yield port
    stop_echo_server(emu, sandbox)


def echo(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    with socket.create_connection((host, port), timeout=20) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)  # half-close: the reply still flows back
        chunks = []
        while chunk := c.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.contracts
def test_many_simultaneous_connections(shell: SandboxSSH, echo_port: int) -> None:
    with shell.forward(echo_port) as port:
        assert 0 < port < 65536
        errors: list[str] = []
        barrier = threading.Barrier(40)

        def client(i: int) -> None:
            payload = os.urandom(100_000 + 997 * i)
            barrier.wait(10)
            try:
                got = echo(port, payload)
            except OSError as exc:
                errors.append(f"{i}: {exc}")
                return
            if got != payload:
                errors.append(f"{i}: {len(got)} of {len(payload)} bytes")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        assert errors == []
    assert forward_threads() == []


def test_connections_beyond_the_cap_wait_their_turn(shell: SandboxSSH, echo_port: int) -> None:
    with shell.forward(echo_port, max_connections=2) as port:
        results: list[bool] = []

        def client() -> None:
            payload = os.urandom(20_000)
            results.append(echo(port, payload) == payload)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [True] * 8


def test_clean_shutdown_ends_open_connections(shell: SandboxSSH, echo_port: int) -> None:
    fwd = shell.forward(echo_port, local_port=0)
    port = fwd.start()
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
    for c in clients:
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
    assert fwd.active_connections == 5
    fwd.close()
    assert forward_threads() == []
    for c in clients:
        # The forward closed its end: EOF (or a reset), never a hang.
        with contextlib.suppress(ConnectionResetError):
            assert c.recv(10) == b""
        c.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    fwd.close()  # idempotent


def test_refused_destination_does_not_end_the_forward(shell: SandboxSSH, echo_port: int) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    with (
        shell.forward(dead_port) as port,
        socket.create_connection(("127.0.0.1", port), timeout=10) as c,
        contextlib.suppress(ConnectionResetError),
    ):
        assert c.recv(10) == b""
    # ... and a good forward on the same connection still works afterwards.
    with shell.forward(echo_port) as port:
        assert echo(port, b"still fine") == b"still fine"


@pytest.mark.contracts
def test_forward_survives_a_new_session(shell: SandboxSSH, echo_port: int) -> None:
    with shell.forward(echo_port) as port:
        assert echo(port, b"one") == b"one"
        first = shell.session
        assert first is not None
        # A connection open across the renewal keeps its (draining) session ...
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        shell.renew()
        assert shell.session is not None and shell.session.session_id != first.session_id
        # ... new connections take the new one.
        assert echo(port, b"two") == b"two"
        held.sendall(b"y")
        assert held.recv(1) == b"y"
        held.close()


def test_validation(shell: SandboxSSH) -> None:
    for bad in (0, -1, 65536, "80", True, 1.5):
        with pytest.raises(InvalidArgument):
            shell.forward(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        shell.forward(80, local_port=70000)
    with pytest.raises(InvalidArgument):
        shell.forward(80, remote_host="")
    with pytest.raises(InvalidArgument):
        shell.forward_remote(80, 0)
    with pytest.raises(InvalidArgument):
        shell.forward_remote(-1, 80)


def test_local_port_in_use(shell: SandboxSSH, echo_port: int) -> None:
    with shell.forward(echo_port) as port, pytest.raises(OSError, match="cannot listen"):
        shell.forward(echo_port, local_port=port).start()


# -- remote forwarding -------------------------------------------------------------------------


class LocalEcho:
    """An echo server here, on the test machine, for remote forwards to reach."""

    def __init__(self, prefix: bytes = b"") -> None:
        self.prefix = prefix
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c: socket.socket) -> None:
        with c:
            c.sendall(self.prefix)
            while data := c.recv(65536):
                c.sendall(data)
            c.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


CLIENTS = r"""
import socket, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
ok = []
def one(i):
    payload = (b"%d-" % i) * 5000
    c = socket.create_connection(("127.0.0.1", port), timeout=20)
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        d = c.recv(65536)
        if not d:
            break
        got += d
    ok.append(got == sys.argv[3].encode() + payload)
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in ts]
[t.join() for t in ts]
print(sum(ok), "of", n)
"""


@pytest.mark.contracts
def test_forward_remote_carries_connections_back(
    emu: Emulator, sandbox: str, shell: SandboxSSH
) -> None:
    (emu.sandbox_dir(sandbox) / "clients.py").write_text(CLIENTS)
    local = LocalEcho(b"hi:")
    try:
        with shell.forward_remote(0, local.port) as rport:
            assert rport > 0
            r = shell.run(f"python3 clients.py {rport} 20 hi:", timeout=30)
            assert r.stdout.strip() == "20 of 20", r.stderr
        assert forward_threads() == []
        # Closed: nothing listens in the sandbox any more.
        r = shell.run(
            f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {rport}), 2)\"",
            timeout=20,
        )
        assert r.exit_code != 0
    finally:
        local.close()


def test_two_remote_forwards_on_one_connection(
    emu: Emulator, sandbox: str, shell: SandboxSSH
) -> None:
    (emu.sandbox_dir(sandbox) / "clients.py").write_text(CLIENTS)
    a, b = LocalEcho(b"A:"), LocalEcho(b"B:")
    try:
        with shell.forward_remote(0, a.port) as pa:
            with shell.forward_remote(0, b.port) as pb:
                assert shell.run(f"python3 clients.py {pa} 3 A:").stdout.strip() == "3 of 3"
                assert shell.run(f"python3 clients.py {pb} 3 B:").stdout.strip() == "3 of 3"
            # Closing one leaves the other working.
            assert shell.run(f"python3 clients.py {pa} 3 A:").stdout.strip() == "3 of 3"
    finally:
        a.close()
        b.close()


def test_forward_remote_refused_is_an_ssh_error(shell: SandboxSSH) -> None:
    # The emulated sidecar only listens on loopback inside the sandbox.
    with pytest.raises(PortForwardError) as info:
        shell.forward_remote(0, 9, remote_host="0.0.0.0").start()
    assert isinstance(info.value, SSHError)
    assert "refused" in str(info.value)
    # The connection stays usable after a refusal.
    assert shell.run("echo ok").stdout == "ok\n"


@pytest.mark.parametrize("code", [4, 1], ids=["resource-shortage", "prohibited"])
def test_channel_cap_moves_connections_to_more_transports(
    emu: Emulator, shell: SandboxSSH, echo_port: int, code: int
) -> None:
    # Like sshd's MaxSessions: each SSH connection takes only a few channels at once.
    emu.max_channels_per_connection = 3
    emu.channel_cap_failure_code = code
    try:
        with shell.forward(echo_port) as port:
            clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(10)]
            for i, c in enumerate(clients):
                c.sendall(b"%d" % i)
            for i, c in enumerate(clients):
                assert c.recv(10) == b"%d" % i
            link = shell._current_link()
            assert len(link._conns) >= 4
            for c in clients:
                c.close()
    finally:
        emu.max_channels_per_connection = None
        emu.channel_cap_failure_code = 4


def test_prohibited_destination_opens_no_extra_connections(shell: SandboxSSH) -> None:
    # The emulated sidecar forwards to loopback only; a refusal that is not about room
    # must not make the link open more SSH connections.
    with shell.forward(80, remote_host="192.0.2.1") as port:
        for _ in range(3):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as c,
                contextlib.suppress(ConnectionResetError),
            ):
                assert c.recv(10) == b""
        assert len(shell._current_link()._conns) == 1


# -- interop: the same forwards against OpenSSH's sshd ------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from sshd_server import find_sshd, start_sshd

    if find_sshd() is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI must run the OpenSSH interop tests, but sshd is missing")
        pytest.skip("OpenSSH sshd is not installed (apt-get install openssh-server)")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))  # MaxSessions 10, as shipped
    yield server
    server.stop()


@pytest.mark.timeout(120)
def test_forwards_against_openssh(sshd: Any, tmp_path: Path) -> None:
    from sshd_server import PreambleFront

    from sshbridge.emulator import OpenSSHTarget

    # Contract B, as the service runs today: every connection (the forward's channels'
    # included) goes through a front that requires the session preamble.
    front = PreambleFront((sshd.host, sshd.port), lambda sid: sid == sshd.username)
    target = OpenSSHTarget(front.host, front.port, sshd.username, sshd.authorized_keys_file)
    script = tmp_path / "echo.py"
    script.write_text(ECHO_SERVER)
    os.chmod(tmp_path, 0o755)
    port_file = tmp_path / "echo.port"
    with front, Emulator(openssh=target) as emu:
        sid = emu.create_sandbox()
        with SandboxSSH(sid, api_key=emu.api_key, base_url=emu.base_url) as shell:
            shell.run(
                f"nohup python3 {script} {port_file} >/dev/null 2>&1 & echo $! > {tmp_path}/pid",
                check=True,
            )
            wait_until(port_file.exists, 10, "the echo server to start")
            remote_port = int(port_file.read_text())
            try:
                # More simultaneous channels than sshd's MaxSessions: direct-tcpip is not
                # counted against it, and the link grows if a server does count it.
                with shell.forward(remote_port) as port:
                    results: list[bool] = []

                    def client(i: int) -> None:
                        payload = os.urandom(30_000 + i)
                        results.append(echo(port, payload) == payload)

                    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join(60)
                    assert results == [True] * 24
                local = LocalEcho(b"R:")
                try:
                    with shell.forward_remote(0, local.port) as rport:
                        (tmp_path / "clients.py").write_text(CLIENTS)
                        r = shell.run(f"python3 {tmp_path}/clients.py {rport} 5 R:", timeout=60)
                        assert r.stdout.strip() == "5 of 5", r.stderr
                finally:
                    local.close()
            finally:
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int((tmp_path / "pid").read_text()), 15)
        assert emu.open_sessions() == []
        assert front.rejected == 0 and front.accepted >= 1
    assert forward_threads() == []
