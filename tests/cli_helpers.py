"""Shared fixtures and helpers for the CLI and tunnel tests (import the fixtures you use).

The emulator runs in the test process; the CLI runs as a real subprocess against it.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CONTRACTS

from sshbridge.emulator import Emulator

CLI = [sys.executable, "-m", "sshbridge.cli"]

# A TCP echo server for the sandbox: binds a free loopback port, writes it to PORT_FILE,
# echoes each connection until the client's EOF, then half-closes back.
ECHO_SERVER = r"""
import socket, sys, threading
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(256)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(s.getsockname()[1]))
import os; os.replace(sys.argv[1] + ".tmp", sys.argv[1])
def serve(c):
    with c:
        while True:
            data = c.recv(65536)
            if not data:
                break
            c.sendall(data)
        c.shutdown(socket.SHUT_WR)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


@pytest.fixture(scope="module", params=CONTRACTS)
def contract(request: pytest.FixtureRequest) -> str:
    """Module-scoped twin of conftest's ``contract``: one emulator per contract per module."""
    return str(request.param)


@pytest.fixture(scope="module")
def emu(contract: str) -> Iterator[Emulator]:
    with Emulator(contract=contract) as emulator:
        # Many short CLI runs per sandbox: the real 20/min budget is not under test here.
        emulator.rate_limit = (100_000, 60.0)
        yield emulator


@pytest.fixture
def sandbox(emu: Emulator) -> Iterator[str]:
    sid = emu.create_sandbox()
    yield sid
    # Every CLI run must have DELETEd the sessions it created, however it ended.
    deadline = time.monotonic() + 5
    while emu.open_sessions(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emu.open_sessions(sid) == []


@pytest.fixture
def cli_env(emu: Emulator, tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "clihome"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    env.update(emu.env())
    env["HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("COLUMNS", None)
    return env


def run_cli(
    *args: str,
    env: dict[str, str],
    input: bytes | None = None,
    timeout: float = 30,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLI, *args],
        env=env,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def one_error_line(stderr: bytes) -> str:
    """Assert stderr is exactly one 'sshbridge: error: ...' line; return it."""
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("sshbridge: error: "), lines
    return lines[0]


def start_echo_server(emu: Emulator, sandbox_id: str, name: str = "echo") -> int:
    """Start the echo server inside the sandbox via the CLI-independent library; its port."""
    from sshbridge import SandboxSSH

    directory = emu.sandbox_dir(sandbox_id)
    (directory / f"{name}.py").write_text(ECHO_SERVER)
    with SandboxSSH(sandbox_id, api_key=emu.api_key, base_url=emu.base_url) as shell:
        shell.run(
            f"nohup python3 {name}.py {name}.port >/dev/null 2>&1 & echo $! > {name}.pid",
            check=True,
        )
    port_file = directory / f"{name}.port"
    deadline = time.monotonic() + 10
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the echo server did not start in the sandbox")
        time.sleep(0.02)
    return int(port_file.read_text())


def stop_echo_server(emu: Emulator, sandbox_id: str, name: str = "echo") -> None:
    pid_file = emu.sandbox_dir(sandbox_id) / f"{name}.pid"
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text().strip()), 15)


class PtyReader:
    """Accumulates what a process writes to a pseudo-terminal; waits for patterns."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    def expect(self, pattern: bytes | str, timeout: float = 15) -> re.Match[bytes]:
        regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.buffer)
            if m is not None:
                self.buffer = self.buffer[m.end() :]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen; got {self.buffer[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the other side closed
                    chunk = b""
                if not chunk:
                    raise AssertionError(
                        f"{pattern!r} not seen before EOF; got {self.buffer[-2000:]!r}"
                    )
                self.buffer += chunk

    def drain(self, seconds: float = 0.2) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                self.buffer += chunk


def forward_threads() -> list[str]:
    import threading

    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith(("sshbridge-forward", "sshbridge-rforward"))
    ]
