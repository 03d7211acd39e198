"""Commands that must stop when told to, start when asked, and report what really happened.

Against real servers on loopback: the emulator's AsyncSSH sidecar (both contracts, via
the ``emu`` fixture), OpenSSH's sshd behind the emulator's API, and ``MinimalServer`` (a
paramiko server that SIGKILLs a command's process group when its channel closes and
refuses exec past a per-connection cap, as x/crypto/ssh-based servers do). Every
process lives on this machine, so the tests look at /proc directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET_KEY, running_emulator
from emu_helpers import alive, opts, pids_with, wait_until
from sshd_server import SSHDServer, find_sshd, start_sshd

from sshbridge import (
    AsyncSandboxSSH,
    CommandError,
    CommandTimeout,
    ConnectionLost,
    Fleet,
    InvalidArgument,
    Job,
    SandboxSSH,
)
from sshbridge._exceptions import ChannelRequestRefused
from sshbridge.emulator import Emulator, OpenSSHTarget

pytestmark = pytest.mark.timeout(60)

needs_sshd = pytest.mark.skipif(
    find_sshd() is None and not os.environ.get("CI"), reason="OpenSSH sshd is not installed"
)


# -- helpers --------------------------------------------------------------------------------


def read_pid(path: Path, timeout: float = 5.0) -> int:
    assert wait_until(
        lambda: path.exists() and path.read_text().strip() != "", timeout, f"a pid in {path}"
    )
    return int(path.read_text())


def all_gone(pids: list[int], needle: str) -> bool:
    return not any(alive(p) for p in pids) and not pids_with(needle)


def unique(tag: str) -> str:
    """A sleep duration (about 61 s) nobody else uses, so its processes can be found by
    command line; ``tag`` (digits) tells the tests apart."""
    return f"61.{time.monotonic_ns() % 10**6:06d}{tag}"


def interrupt_when(path: Path) -> threading.Thread:
    """Send this process a real SIGINT (Ctrl-C) once ``path`` appears (the command runs)."""

    def fire() -> None:
        try:
            wait_until(path.exists, 10, f"{path} to appear")
        except AssertionError:
            return  # the command never ran: no Ctrl-C (the test fails on its own)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=fire, name="test-ctrl-c", daemon=True)
    thread.start()
    return thread


def trapping_script(d: Path, seconds: str) -> str:
    """The brief's case: a script that ignores TERM, then would leave a mark."""
    return f"trap '' TERM; echo $$ > {d}/top.pid; sleep {seconds}; touch {d}/F"


# -- servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHDServer]:
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def ossh(sshd: SSHDServer) -> Iterator[Emulator]:
    """The emulator's API handing out sessions on a real OpenSSH sshd."""
    target = OpenSSHTarget(sshd.host, sshd.port, sshd.username, sshd.authorized_keys_file)
    with running_emulator(
        api_key=SECRET_KEY, openssh=target, contract="sidecar", check_closed=True
    ) as emulator:
        yield emulator


@pytest.fixture
def mini_factory(tmp_path: Path) -> Iterator[Callable[..., Emulator]]:
    """The emulator's API in front of a MinimalServer (made with the given options)."""
    from minimal_server import MinimalServer

    with contextlib.ExitStack() as stack:

        def make(**kw: Any) -> Emulator:
            root = tmp_path / "mini-root"
            root.mkdir(exist_ok=True)
            keys = tmp_path / "mini_authorized_keys"
            keys.touch()
            server = MinimalServer(root, keys, **kw)
            stack.callback(server.close)
            target = OpenSSHTarget(server.host, server.port, server.username, keys)
            return stack.enter_context(
                running_emulator(
                    api_key=SECRET_KEY, openssh=target, contract="sidecar", check_closed=True
                )
            )

        yield make


def shell_on(emu: Emulator, **kw: Any) -> SandboxSSH:
    return SandboxSSH(emu.create_sandbox(), **opts(emu), **kw)


# -- bug 1: one cancellation path that stops TERM-ignoring scripts -------------------------


def test_timeout_stops_a_term_trapping_script(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    d = emu.sandbox_dir(sid)
    secs = unique("1")
    with SandboxSSH(sid, **opts(emu)) as shell:
        started = time.monotonic()
        with pytest.raises(CommandTimeout):
            shell.run(trapping_script(d, secs), timeout=0.5)
        assert time.monotonic() - started < 3  # TERM, a short grace, KILL
        top = read_pid(d / "top.pid")
        assert wait_until(lambda: all_gone([top], f"sleep {secs}"), 5)
        assert not (d / "F").exists()  # the shell is dead: F can never appear now
        assert shell.run("echo ok").stdout == "ok\n"


@needs_sshd
def test_timeout_stops_a_term_trapping_script_on_openssh(ossh: Emulator, tmp_path: Path) -> None:
    secs = unique("2")
    with shell_on(ossh) as shell:
        with pytest.raises(CommandTimeout):
            shell.run(trapping_script(tmp_path, secs), timeout=0.5)
        top = read_pid(tmp_path / "top.pid")
        assert wait_until(lambda: all_gone([top], f"sleep {secs}"), 5)
        assert not (tmp_path / "F").exists()


def test_ctrl_c_during_run_stops_a_term_trapping_script(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    d = emu.sandbox_dir(sid)
    secs = unique("3")
    with SandboxSSH(sid, **opts(emu)) as shell:
        interrupt_when(d / "top.pid")
        with pytest.raises(KeyboardInterrupt):
            shell.run(trapping_script(d, secs), timeout=20)
        top = read_pid(d / "top.pid")
        assert wait_until(lambda: all_gone([top], f"sleep {secs}"), 5)
        assert not (d / "F").exists()


@needs_sshd
def test_ctrl_c_during_run_on_openssh(ossh: Emulator, tmp_path: Path) -> None:
    secs = unique("4")
    with shell_on(ossh) as shell:
        interrupt_when(tmp_path / "top.pid")
        with pytest.raises(KeyboardInterrupt):
            shell.run(trapping_script(tmp_path, secs), timeout=20)
        top = read_pid(tmp_path / "top.pid")
        assert wait_until(lambda: all_gone([top], f"sleep {secs}"), 5)
        assert not (tmp_path / "F").exists()


@needs_sshd
def test_cancel_reaches_children_that_scrubbed_their_environment(
    ossh: Emulator, tmp_path: Path
) -> None:
    # The child carries the token nowhere (env -i, its own command line): only the
    # process tree ties it to the command. It also ignores TERM (and HUP).
    secs = unique("5")
    child = (
        f'env -i /bin/sh -c \'trap "" TERM HUP; echo $$ > {tmp_path}/kid.pid; '
        f"sleep {secs}; touch {tmp_path}/G' & wait"
    )
    with shell_on(ossh) as shell:
        with pytest.raises(CommandTimeout):
            shell.run(child, timeout=0.7)
        kid = read_pid(tmp_path / "kid.pid")
        assert wait_until(lambda: all_gone([kid], f"sleep {secs}"), 5)
        assert not (tmp_path / "G").exists()


def test_asyncio_cancel_and_fleet_timeout_use_the_same_kill(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    d = emu.sandbox_dir(sid)
    secs = unique("6")

    async def main() -> None:
        async with AsyncSandboxSSH(sid, **opts(emu)) as shell:
            task = asyncio.ensure_future(shell.run(trapping_script(d, secs)))
            await asyncio.to_thread(read_pid, d / "top.pid")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    top = read_pid(d / "top.pid")
    assert wait_until(lambda: all_gone([top], f"sleep {secs}"), 5)
    assert not (d / "F").exists()

    (d / "top.pid").unlink()
    secs = unique("7")
    with Fleet([sid], **opts(emu)) as fleet:
        results = fleet.run(trapping_script(d, secs), timeout=0.5)
    assert isinstance(results[sid].error, CommandTimeout)
    top = read_pid(d / "top.pid")
    assert wait_until(lambda: all_gone([top], f"sleep {secs}"), 5)
    assert not (d / "F").exists()


def test_kill_touches_only_its_own_command(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    mine, other = unique("8"), unique("9")
    with SandboxSSH(sid, **opts(emu)) as shell, cf.ThreadPoolExecutor(1) as pool:
        bystander = pool.submit(shell.run, f"sleep {other}", timeout=20)
        assert wait_until(lambda: bool(pids_with(f"sleep {other}")), 5)
        with pytest.raises(CommandTimeout):
            shell.run(f"sleep {mine}", timeout=0.3)
        assert wait_until(lambda: not pids_with(f"sleep {mine}"), 5)
        assert pids_with(f"sleep {other}") and not bystander.done()
        for pid in pids_with(f"sleep {other}"):
            os.kill(pid, signal.SIGKILL)
        bystander.result(10)


# -- bug 8: timeouts are checked before anything happens -----------------------------------

BAD_TIMEOUTS = [math.nan, math.inf, -math.inf, -1, 0, True, "5"]


def test_bad_timeouts_are_refused_before_any_request(emu: Emulator, tmp_path: Path) -> None:
    sid = emu.create_sandbox()
    d = emu.sandbox_dir(sid)
    for bad in BAD_TIMEOUTS:
        shell = SandboxSSH(sid, **opts(emu))  # not connected: a channel would need a session
        try:
            with pytest.raises(InvalidArgument, match="timeout"):
                shell.run(f"touch {d}/ran", timeout=bad)  # type: ignore[arg-type]
            job = Job(shell, "j0123456789ab", str(d), "true")
            with pytest.raises(InvalidArgument, match="timeout"):
                job.wait(timeout=bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument, match="poll_interval"):
                job.wait(timeout=1, poll_interval=bad)  # type: ignore[arg-type]
        finally:
            shell.close()
        with Fleet([sid], **opts(emu)) as fleet, pytest.raises(InvalidArgument):
            fleet.run(f"touch {d}/ran", timeout=bad)  # type: ignore[arg-type]

        async def via_asyncio(bad: object = bad) -> None:
            shell = AsyncSandboxSSH(sid, **opts(emu))
            try:
                with pytest.raises(InvalidArgument, match="timeout"):
                    await shell.run(f"touch {d}/ran", timeout=bad)  # type: ignore[arg-type]
            finally:
                await shell.close()

        asyncio.run(via_asyncio())
    assert not (d / "ran").exists()
    assert [c for c in emu.api_calls if c.endpoint == "create_session"] == []


# -- bug 10: a cwd starting with '-' is a path --------------------------------------------


def test_cwd_starting_with_a_dash_is_a_path(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    d = emu.sandbox_dir(sid).resolve()
    with SandboxSSH(sid, **opts(emu)) as shell:
        r = shell.run("pwd", cwd="-")
        assert r.exit_code == 125, r  # no such directory: never $OLDPWD
        for name in ("-", "-P", "--", "-x y"):
            (d / name).mkdir()
            assert shell.run("pwd", cwd=name).stdout == f"{d}/{name}\n"
        job = shell.spawn("pwd", cwd="-")
        assert job.wait(timeout=5).stdout == f"{d}/-\n"


# -- bug 11: a pty's stdin gets EOF ----------------------------------------------------------


def _pty_eof(shell: SandboxSSH) -> None:
    started = time.monotonic()
    r = shell.run("cat", pty=True, timeout=5)  # no input: EOF at once, like ssh -n
    assert r.exit_code == 0
    r = shell.run("cat", pty=True, input="data", timeout=5)
    assert r.exit_code == 0 and r.stdout.count("data") == 2  # the echo, then cat
    r = shell.run("cat", pty=True, input=b"a\nb\n", timeout=5)
    assert r.exit_code == 0 and r.stdout.count("b") == 2
    # The bytes arrive exactly: no newline is added before the EOF.
    python = shlex.quote(sys.executable)
    r = shell.run(
        f"{python} -c 'import sys; print(repr(sys.stdin.read()))'",
        pty=True,
        input="no newline",
        timeout=5,
    )
    assert "'no newline'" in r.stdout, r
    assert time.monotonic() - started < 4  # nothing waited for a timeout


def test_pty_stdin_gets_eof(emu: Emulator) -> None:
    with shell_on(emu) as shell:
        _pty_eof(shell)


@needs_sshd
def test_pty_stdin_gets_eof_on_openssh(ossh: Emulator) -> None:
    with shell_on(ossh) as shell:
        _pty_eof(shell)


# -- bug 12: spawn() runs in the same shell as run() ------------------------------------------

BASHISMS = "[[ 1 == 1 ]] && arr=(a b) && echo ${arr[1]}"


def _same_shell(shell: SandboxSSH) -> str:
    r = shell.run(BASHISMS)
    j = shell.spawn(BASHISMS).wait(timeout=5)
    assert (j.exit_code, j.stdout) == (r.exit_code, r.stdout), (r, j)
    exe = "readlink /proc/$$/exe"
    assert shell.spawn(exe).wait(timeout=5).stdout == shell.run(exe).stdout
    return r.stdout


def test_spawn_and_run_use_the_same_shell(emu: Emulator) -> None:
    with shell_on(emu) as shell:
        _same_shell(shell)  # the sidecar's login shell is /bin/sh: the same error twice


@needs_sshd
def test_spawn_and_run_use_the_same_shell_on_openssh(ossh: Emulator) -> None:
    with shell_on(ossh) as shell:
        assert _same_shell(shell) == "b\n"  # bash, the user's login shell, both times


# -- bug 14: spawn() on servers that kill the channel's process group ------------------------


def test_spawn_survives_a_server_that_kills_the_channel_process_group(
    mini_factory: Callable[..., Emulator],
) -> None:
    emu = mini_factory()
    with shell_on(emu) as shell:
        jobs = [shell.spawn(f"sleep 0.2; echo job {i}") for i in range(20)]
        for i, job in enumerate(jobs):
            result = job.wait(timeout=10)
            assert (result.exit_code, result.stdout) == (0, f"job {i}\n"), job


def test_a_job_that_never_started_is_an_error(
    emu: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A setsid that fails: the detached process never comes up. The sidecar gives
    # sandbox commands this process's PATH.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "setsid").write_text("#!/bin/sh\nexit 1\n")
    (shim / "setsid").chmod(0o755)
    with shell_on(emu) as shell:
        monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
        started = time.monotonic()
        with pytest.raises(CommandError, match="never started") as info:
            shell.spawn("echo should-not-run")
        assert not isinstance(info.value, CommandTimeout)
        assert time.monotonic() - started < 3
        monkeypatch.undo()
        assert shell.spawn("echo fine").wait(timeout=5).stdout == "fine\n"


def test_reattaching_to_a_job_whose_spawner_died_is_an_error(emu: Emulator) -> None:
    # What a spawner killed mid-start leaves behind: the job's files, no pid, and a
    # start deadline (the sandbox's clock) long past.
    sid = emu.create_sandbox()
    d = emu.sandbox_dir(sid) / ".sshbridge" / "jobs" / "j0123456789ab"
    d.mkdir(parents=True)
    (d / "cmd").write_text("echo late")
    (d / "start_by").write_text("1\n")
    with SandboxSSH(sid, **opts(emu)) as shell:
        job = shell.job("j0123456789ab")
        started = time.monotonic()
        with pytest.raises(CommandError, match="never started") as info:
            job.wait(timeout=5)
        assert not isinstance(info.value, CommandTimeout)
        assert time.monotonic() - started < 2
        assert (d / "started").is_dir()  # claimed: a late runner exits without running
        assert job.status().state == "failed"


# -- bug 15: a refused exec or pty request ---------------------------------------------------


def test_refused_exec_and_pty_requests_are_retried_elsewhere(
    mini_factory: Callable[..., Emulator],
) -> None:
    emu = mini_factory(max_exec_channels=3)
    with shell_on(emu) as shell:
        outs: dict[int, str] = {}
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                r = shell.run(f"sleep 0.3; echo {i}", pty=i % 2 == 1)
                outs[i] = r.stdout.strip()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert errors == []
        assert outs == {i: str(i) for i in range(9)}
        assert shell.reconnects == 0


def test_refused_exec_is_bounded_by_the_timeout_and_never_a_lost_connection(
    mini_factory: Callable[..., Emulator],
) -> None:
    emu = mini_factory(max_exec_channels=3)
    secs = f"1.{time.monotonic_ns() % 10**6:06d}"  # findable among others' sleeps
    with shell_on(emu, max_connections=1) as shell, cf.ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(shell.run, f"sleep {secs}") for _ in range(3)]
        assert wait_until(lambda: len(pids_with(f"sleep {secs}")) >= 3, 5)
        started = time.monotonic()
        with pytest.raises(ChannelRequestRefused) as info:
            shell.run("echo never", timeout=0.4)
        assert info.value.request == "exec" and "never started" in str(info.value)
        assert not isinstance(info.value, ConnectionLost)
        assert time.monotonic() - started < 1.5
        # Without a timeout it is retried until the connection has room again.
        assert shell.run("echo later").stdout == "later\n"
        assert all(f.result(10).ok for f in busy)
        assert shell.reconnects == 0


@needs_sshd
def test_refused_pty_is_reported_as_refused_not_lost(tmp_path: Path) -> None:
    sshd = start_sshd(tmp_path / "sshd", extra_config="PermitTTY no")
    try:
        target = OpenSSHTarget(sshd.host, sshd.port, sshd.username, sshd.authorized_keys_file)
        with Emulator(api_key=SECRET_KEY, openssh=target, contract="sidecar") as emu:
            with shell_on(emu) as shell:
                assert shell.run("echo up").ok
                started = time.monotonic()
                with pytest.raises(ChannelRequestRefused) as info:
                    shell.run(f"touch {tmp_path}/ran", pty=True)
                assert info.value.request == "pty-req"
                assert "never started" in str(info.value)
                assert time.monotonic() - started < 2  # refused for good: not retried
                assert not (tmp_path / "ran").exists()
                assert shell.run("echo still up").stdout == "still up\n"
                assert shell.reconnects == 0
            assert emu.open_sessions() == []
    finally:
        sshd.stop()
