"""Shared fixtures and helpers for the CLI and tunnel tests (import the fixtures you use).

The emulator runs in the test process; the CLI runs as a real subprocess against it.
A CLI test module starts with::

    # ruff: noqa: F811 - pytest fixtures imported from cli_helpers are parameters here
    from cli_helpers import (  # noqa: F401 - fixtures are used by name
        cli_env, contract, emu, sandbox, ...
    )
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CONTRACTS, running_emulator
from emu_helpers import wait_until

from sshbridge.emulator import Emulator
from sshbridge_fast._protocol import PERSIST_ENV

CLI = [sys.executable, "-m", "sshbridge.cli"]
# The installed console script's entry: the fast exec path, else the full CLI.
FAST_CLI = [sys.executable, "-m", "sshbridge_fast"]

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
    """Module-scoped, unlike conftest's ``emu``: one emulator for many CLI runs (the
    ``sandbox`` fixture checks each test's sessions ended)."""
    with running_emulator(contract=contract) as emulator:
        # Many short CLI runs per sandbox: the real 20/min budget is not under test here.
        emulator.rate_limit = (100_000, 60.0)
        yield emulator


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def holder_pids(runtime: Path) -> list[int]:
    pids = []
    for pid_file in sorted((runtime / "sshbridge").glob("h-*.pid")):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            if _pid_alive(pid):
                pids.append(pid)
    return pids


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    """Poll (bounded) until process ``pid`` has exited; False if it is still there."""
    with contextlib.suppress(AssertionError):
        return wait_until(lambda: not _pid_alive(pid), timeout, f"process {pid} to exit")
    return False


def stop_holders(runtime: Path) -> None:
    """Close every session holder started under ``runtime`` (DELETEing their sessions);
    kill any that does not go."""
    from sshbridge._holder import close_holder

    directory = runtime / "sshbridge"
    pids = holder_pids(runtime)
    for sock in sorted(directory.glob("h-*.sock")):
        with contextlib.suppress(Exception):
            close_holder(sock)
    for pid in pids:
        if not wait_gone(pid, 15.0):
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
            wait_gone(pid, 5.0)


def runtime_for(tmp_path: Path, create: bool = True) -> Path:
    """The test's private XDG_RUNTIME_DIR: short (socket paths are limited to 107 bytes)
    and derived from its tmp_path, so every fixture of one test agrees on it."""
    import hashlib

    digest = hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"sbrt-{digest}"
    if create:
        path.mkdir(mode=0o700, exist_ok=True)
    return path


def release_runtime(tmp_path: Path) -> None:
    """Stop every holder started under the test's runtime directory; remove it."""
    path = runtime_for(tmp_path, create=False)
    stop_holders(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sandbox(emu: Emulator, tmp_path: Path) -> Iterator[str]:
    sid = emu.create_sandbox()
    yield sid
    # Persistent sessions end with their holder.
    stop_holders(runtime_for(tmp_path, create=False))
    # Every CLI run must have DELETEd the sessions it created, however it ended.
    wait_until(lambda: emu.open_sessions(sid) == [], 5, "the sessions' DELETEs", 0.05)
    assert emu.open_sessions(sid) == []


@pytest.fixture
def cli_env(emu: Emulator, tmp_path: Path) -> Iterator[dict[str, str]]:
    home = tmp_path / "clihome"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    env.update(emu.env())
    env["HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env["XDG_RUNTIME_DIR"] = str(runtime_for(tmp_path))
    env.pop(PERSIST_ENV, None)
    env.pop("COLUMNS", None)
    yield env
    release_runtime(tmp_path)


def run_argv(
    argv: list[str],
    *,
    env: dict[str, str],
    input: bytes | None = None,
    timeout: float = 30,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to its end, output captured, whatever its status; stdin empty unless
    ``input``."""
    return subprocess.run(
        argv,
        env=env,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def run_cli(*args: str, **options: Any) -> subprocess.CompletedProcess[bytes]:
    """The full CLI (``python -m sshbridge.cli``); ``env=`` and the other options of
    ``run_argv`` (stdin empty unless ``input``)."""
    return run_argv([*CLI, *args], **options)


def fast(*args: str, **options: Any) -> subprocess.CompletedProcess[bytes]:
    """The installed console script's path (``sshbridge = sshbridge_fast:main``); options
    as for ``run_cli``."""
    return run_argv([*FAST_CLI, *args], **options)


def spawn(argv: list[str], *, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the background: stdin empty, stdout and stderr piped."""
    return subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def rt_root(env: dict[str, str]) -> Path:
    """The test's XDG_RUNTIME_DIR (the holders' directory is below it: ``runtime``)."""
    return Path(env["XDG_RUNTIME_DIR"])


def runtime(env: dict[str, str]) -> Path:
    """The holders' directory under the test's XDG_RUNTIME_DIR."""
    return rt_root(env) / "sshbridge"


def creates(emu: Emulator, sid: str) -> int:
    """Session POSTs the emulator has seen for sandbox ``sid``."""
    return sum(1 for c in emu.api_calls if c.endpoint == "create_session" and c.sandbox_id == sid)


def with_console_script(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the venv's bin directory first on PATH: ``sshbridge`` runs the
    installed console script, as in ``rsync -e 'sshbridge ssh'``."""
    bin_dir = str(Path(sys.executable).parent)
    assert Path(bin_dir, "sshbridge").exists(), "the console script is not installed"
    return dict(env, PATH=bin_dir + os.pathsep + env.get("PATH", ""))


def git_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for git over ``sshbridge ssh``: the console script on PATH, an identity."""
    return dict(
        with_console_script(env),
        GIT_SSH_COMMAND="sshbridge ssh",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )


def git(*args: str, env: dict[str, str], cwd: Path | None = None) -> None:
    """Run git (stdin empty, 60 s at most); it must succeed."""
    r = run_argv(["git", *args], env=env, cwd=cwd, timeout=60)
    assert r.returncode == 0, (args, r.stderr)


def rsync(*args: str, env: dict[str, str]) -> None:
    """Run ``rsync -a -e 'sshbridge ssh' ARGS`` (stdin empty, 60 s at most); it must
    succeed. ``env`` must put the console script on PATH (``with_console_script``)."""
    r = run_argv(["rsync", "-a", "-e", "sshbridge ssh", *args], env=env, timeout=60)
    assert r.returncode == 0, r.stderr


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
    wait_until(port_file.exists, 10, "the echo server to start in the sandbox")
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
