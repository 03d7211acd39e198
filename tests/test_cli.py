"""The `sshbridge` command line, run as a real subprocess against the local emulator."""

# ruff: noqa: F811 - pytest fixtures imported from cli_helpers are parameters here
from __future__ import annotations

import fcntl
import filecmp
import os
import re
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import (  # noqa: F401 - fixtures are used by name
    CLI,
    PtyReader,
    cli_env,
    contract,
    emu,
    one_error_line,
    run_cli,
    sandbox,
    spawn,
    start_echo_server,
    stop_echo_server,
)
from emu_helpers import pids_with, wait_until

from sshbridge.emulator import Emulator

pytestmark = pytest.mark.timeout(60)


# -- exec ------------------------------------------------------------------------------------


@pytest.mark.contracts
def test_exec_streams_output_before_exit_and_passes_status(
    sandbox: str, cli_env: dict[str, str]
) -> None:
    proc = spawn(
        [*CLI, "exec", sandbox, "--", "echo first; echo oops >&2; sleep 1.5; echo second; exit 3"],
        env=cli_env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        first = proc.stdout.readline()
        seen_at = time.monotonic()
        # The first line is here while the command is still sleeping.
        assert first == b"first\n"
        assert proc.poll() is None
        second = proc.stdout.readline()
        assert second == b"second\n"
        assert time.monotonic() - seen_at > 1.0
        assert proc.wait(20) == 3
        assert proc.stderr.read() == b"oops\n"
    finally:
        proc.kill()
        proc.wait()


def test_exec_env_cwd_argv_and_binary_output(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    (emu.sandbox_dir(sandbox) / "sub dir").mkdir()
    r = run_cli(
        "exec",
        "-e",
        "A=1",
        "--env",
        "B=two words",
        "--cwd",
        "sub dir",
        sandbox,
        "--",
        "sh",
        "-c",
        'printf "%s|%s|%s" "$A" "$B" "$(basename "$PWD")"',
        env=cli_env,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"1|two words|sub dir"
    # Several words are an argv: shell metacharacters arrive literally.
    r = run_cli("exec", sandbox, "--", "echo", "$HOME", "a;b", env=cli_env)
    assert r.stdout == b"$HOME a;b\n"
    # One word is a shell command line.
    r = run_cli("exec", sandbox, "--", "echo a && echo b", env=cli_env)
    assert r.stdout == b"a\nb\n"
    # Output is passed through byte for byte, not decoded.
    blob = bytes(range(256)) * 64
    (emu.sandbox_dir(sandbox) / "blob").write_bytes(blob)
    r = run_cli("exec", sandbox, "--", "cat blob", env=cli_env)
    assert r.returncode == 0 and r.stdout == blob


def test_exec_stdin_and_timeout(sandbox: str, cli_env: dict[str, str]) -> None:
    r = run_cli("exec", "-i", sandbox, "--", "tr a-z A-Z", env=cli_env, input=b"hello\n")
    assert (r.returncode, r.stdout) == (0, b"HELLO\n")
    start = time.monotonic()
    r = run_cli("exec", "--timeout", "0.5", sandbox, "--", "echo started; sleep 30", env=cli_env)
    assert time.monotonic() - start < 15
    assert r.returncode == 124
    assert r.stdout == b"started\n"
    assert "did not finish within 0.5 s" in one_error_line(r.stderr)


# -- cp --------------------------------------------------------------------------------------


@pytest.mark.contracts
def test_cp_file_round_trip(
    emu: Emulator, sandbox: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    data = os.urandom(300_000) + b"\x00\r\n\xff"
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    src.chmod(0o640)
    r = run_cli("cp", str(src), f"{sandbox}:up.bin", env=cli_env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""  # piped: no progress bar
    remote = emu.sandbox_dir(sandbox) / "up.bin"
    assert remote.read_bytes() == data
    assert remote.stat().st_mode & 0o777 == 0o640
    # Into an existing directory, under the file's own name.
    (emu.sandbox_dir(sandbox) / "dir").mkdir()
    assert run_cli("cp", str(src), f"{sandbox}:dir", env=cli_env).returncode == 0
    assert (emu.sandbox_dir(sandbox) / "dir" / "data.bin").read_bytes() == data

    back = tmp_path / "back.bin"
    r = run_cli("cp", f"{sandbox}:up.bin", str(back), env=cli_env)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == data
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert run_cli("cp", f"{sandbox}:up.bin", str(out_dir), env=cli_env).returncode == 0
    assert (out_dir / "up.bin").read_bytes() == data


def _make_tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "top.txt").write_text("top\n")
    (root / "a" / "mid.bin").write_bytes(os.urandom(70_000))
    (root / "a" / "b" / "deep.bin").write_bytes(os.urandom(1234) + b"\x00")
    (root / "a" / "b" / "zero").write_bytes(b"")
    (root / "a" / "b" / "run.sh").write_text("#!/bin/sh\n")
    (root / "a" / "b" / "run.sh").chmod(0o755)
    (root / "linked").symlink_to("a/b")  # kept as a link, as put_dir/get_dir do
    os.utime(root / "top.txt", (1_600_000_000, 1_600_000_000))


def _assert_same_tree(left: Path, right: Path) -> None:
    cmp = filecmp.dircmp(left, right)
    assert not cmp.left_only and not cmp.right_only, (cmp.left_only, cmp.right_only)
    for name in cmp.common_files:
        a, b = left / name, right / name
        assert a.read_bytes() == b.read_bytes(), name
        assert a.stat().st_mode & 0o777 == b.stat().st_mode & 0o777, name
    for name in cmp.common_dirs:
        _assert_same_tree(left / name, right / name)


def test_cp_recursive_round_trip(
    emu: Emulator, sandbox: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    _make_tree(tree)
    box = emu.sandbox_dir(sandbox)

    r = run_cli("cp", "-r", str(tree), f"{sandbox}:copy", env=cli_env)
    assert r.returncode == 0, r.stderr
    _assert_same_tree(tree, box / "copy")
    # An existing remote directory receives the tree under its own name (scp -r).
    r = run_cli("cp", "-r", str(tree), f"{sandbox}:copy", env=cli_env)
    assert r.returncode == 0, r.stderr
    _assert_same_tree(tree, box / "copy" / "tree")

    r = run_cli("cp", "-r", f"{sandbox}:copy/tree", str(tmp_path / "down"), env=cli_env)
    assert r.returncode == 0, r.stderr
    _assert_same_tree(tree, tmp_path / "down")
    r = run_cli("cp", "--recursive", f"{sandbox}:copy/tree", str(tmp_path / "down"), env=cli_env)
    assert r.returncode == 0, r.stderr
    _assert_same_tree(tree, tmp_path / "down" / "tree")
    # The library's tree copy underneath: links stay links, mtimes are kept, both ways.
    for copied in (box / "copy" / "tree", tmp_path / "down" / "tree"):
        assert (copied / "linked").is_symlink() and os.readlink(copied / "linked") == "a/b"
        assert (copied / "top.txt").stat().st_mtime == 1_600_000_000
    # ~/ is the sandbox's home, where relative paths start.
    r = run_cli("cp", "-r", str(tree), f"{sandbox}:~/tilde", env=cli_env)
    assert r.returncode == 0, r.stderr
    _assert_same_tree(tree, box / "tilde")


def test_cp_download_never_writes_through_a_local_symlink(
    emu: Emulator, sandbox: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    box = emu.sandbox_dir(sandbox)
    (box / "t" / "sub").mkdir(parents=True)
    (box / "t" / "sub" / "f.txt").write_text("remote\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    down = tmp_path / "down"
    down.mkdir()
    (down / "sub").symlink_to(outside)  # a trap: writing through it would land outside
    r = run_cli("cp", "-r", f"{sandbox}:t/.", str(down), env=cli_env)
    assert r.returncode != 0
    one_error_line(r.stderr)
    assert list(outside.iterdir()) == []


def test_cp_errors(emu: Emulator, sandbox: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    r = run_cli("cp", str(tmp_path / "d"), f"{sandbox}:x", env=cli_env)
    assert r.returncode == 2 and "use -r" in one_error_line(r.stderr)
    r = run_cli("cp", "a", "b", env=cli_env)
    assert r.returncode == 2 and "SANDBOX:PATH" in one_error_line(r.stderr)
    r = run_cli("cp", f"{sandbox}:missing.txt", str(tmp_path / "m"), env=cli_env)
    assert r.returncode == 1 and "missing.txt" in one_error_line(r.stderr)
    r = run_cli("cp", str(tmp_path / "nope"), f"{sandbox}:x", env=cli_env)
    assert r.returncode == 1 and "no such file" in one_error_line(r.stderr)


# -- forward ---------------------------------------------------------------------------------


def _echo_round_trip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                return got
            got += chunk


def test_forward_carries_tcp_until_ctrl_c(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    remote_port = start_echo_server(emu, sandbox)
    proc = spawn([*CLI, "forward", sandbox, f"0:127.0.0.1:{remote_port}"], env=cli_env)
    assert proc.stderr is not None
    try:
        line = proc.stderr.readline().decode()
        m = re.search(r"forwarding 127\.0\.0\.1:(\d+) -> ", line)
        assert m, line
        local_port = int(m.group(1))
        results: dict[int, bool] = {}

        def client(i: int) -> None:
            payload = os.urandom(50_000 + i)
            results[i] = _echo_round_trip(local_port, payload) == payload

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == {i: True for i in range(12)}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 130  # Ctrl-C, as for every command
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", local_port), timeout=2).close()
    finally:
        proc.kill()
        proc.wait()
        stop_echo_server(emu, sandbox)


def test_forward_bad_spec_is_usage_error(sandbox: str, cli_env: dict[str, str]) -> None:
    for spec in ("notaport", "1:2:3:4:5", "8080:70000", "8080::80"):
        r = run_cli("forward", sandbox, spec, env=cli_env)
        assert r.returncode == 2, (spec, r.stderr)
        one_error_line(r.stderr)


# -- ssh (interactive) -----------------------------------------------------------------------


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@pytest.mark.contracts
def test_ssh_through_a_real_terminal(sandbox: str, cli_env: dict[str, str]) -> None:
    master, slave = os.openpty()
    _set_size(slave, 24, 80)
    before = termios.tcgetattr(slave)
    env = dict(cli_env, TERM="xterm")
    proc = subprocess.Popen(
        [*CLI, "ssh", sandbox],
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    reader = PtyReader(master)
    try:
        os.write(master, b"echo hi-$((40+2))\r")
        reader.expect(rb"hi-42")
        # Raw mode: our terminal no longer echoes or edits lines itself.
        during = termios.tcgetattr(slave)
        assert not during[3] & termios.ICANON and not during[3] & termios.ECHO

        _set_size(master, 40, 100)
        proc.send_signal(signal.SIGWINCH)

        def remote_size_is_new() -> bool:  # the window change travels beside the input
            os.write(master, b"stty size\r")
            return reader.expect(rb"(?<![\d ])(\d+ \d+)\r\n").group(1) == b"40 100"

        wait_until(remote_size_is_new, 15, "the remote terminal to take the new size", 0.05)
        os.write(master, b"stty size\r")
        reader.expect(rb"40 100")

        # Ctrl-C goes to the remote foreground job, not to sshbridge.
        os.write(master, b"sleep 30.2718\r")
        wait_until(lambda: pids_with("sleep 30.2718"), 15, "the remote sleep to start")
        os.write(master, b"\x03")
        os.write(master, b"echo after-$((2+2))\r")
        reader.expect(rb"after-4", timeout=10)
        assert proc.poll() is None

        os.write(master, b"exit 3\r")
        assert proc.wait(15) == 3
        # The terminal is restored.
        assert termios.tcgetattr(slave) == before
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
        os.close(slave)


def test_ssh_restores_the_terminal_on_sigterm(sandbox: str, cli_env: dict[str, str]) -> None:
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [*CLI, "ssh", sandbox],
        env=dict(cli_env, TERM="xterm"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    reader = PtyReader(master)
    try:
        os.write(master, b"echo up-$((1+1))\r")
        reader.expect(rb"up-2")
        assert termios.tcgetattr(slave) != before
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 128 + signal.SIGTERM
        assert termios.tcgetattr(slave) == before
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)
def test_exec_interrupted_is_one_line(
    sandbox: str, cli_env: dict[str, str], sig: int, code: int, line: str
) -> None:
    proc = spawn([*CLI, "exec", sandbox, "--", "echo started; sleep 30"], env=cli_env)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.readline() == b"started\n"
        proc.send_signal(sig)
        assert proc.wait(15) == code
        assert one_error_line(proc.stderr.read()) == f"sshbridge: error: {line}"
    finally:
        proc.kill()
        proc.wait()


def test_ssh_without_a_terminal(sandbox: str, cli_env: dict[str, str]) -> None:
    r = run_cli("ssh", sandbox, env=cli_env, input=b"echo via-stdin\nexit 4\n")
    assert r.returncode == 4
    assert r.stdout == b"via-stdin\n"
    r = run_cli("ssh", sandbox, "--", "echo one; exit 5", env=cli_env, input=b"")
    assert (r.returncode, r.stdout) == (5, b"one\n")


# -- errors, configuration, doctor, emulator ---------------------------------------------------


def test_usage_errors_are_one_line_exit_2(sandbox: str, cli_env: dict[str, str]) -> None:
    cases = [
        ("exec",),
        ("exec", sandbox),
        ("exec", "--env", "NOEQUALS", sandbox, "--", "true"),
        ("exec", "--timeout", "soon", sandbox, "--", "true"),
        ("exec", "not a sandbox id!", "--", "true"),
        ("--ttl", "0", "exec", sandbox, "--", "true"),
        ("--no-such-option",),
        ("frobnicate",),
    ]
    for args in cases:
        r = run_cli(*args, env=cli_env)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        one_error_line(r.stderr)


def test_missing_api_key_is_one_line_naming_the_variable(
    sandbox: str, cli_env: dict[str, str]
) -> None:
    env = {k: v for k, v in cli_env.items() if k != "PRIME_API_KEY"}
    r = run_cli("exec", sandbox, "--", "true", env=env)
    assert r.returncode == 1
    assert "PRIME_API_KEY" in one_error_line(r.stderr)
    r = run_cli("doctor", env=env)
    assert r.returncode == 1
    assert b"PRIME_API_KEY" in r.stdout


@pytest.mark.contracts
def test_unknown_sandbox_and_wrong_key(emu: Emulator, cli_env: dict[str, str]) -> None:
    r = run_cli("exec", "sbx_doesnotexist", "--", "true", env=cli_env)
    assert r.returncode == 1
    one_error_line(r.stderr)
    r = run_cli("exec", "sbx_x", "--", "true", env=dict(cli_env, PRIME_API_KEY="wrong-key-12345"))
    assert r.returncode == 1
    assert "wrong-key" not in one_error_line(r.stderr)


@pytest.mark.contracts
def test_doctor(emu: Emulator, sandbox: str, cli_env: dict[str, str]) -> None:
    r = run_cli("doctor", sandbox, env=cli_env)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "PRIME_API_KEY" in out and emu.api_key[-4:] in out
    assert emu.api_key not in out and emu.api_key not in r.stderr.decode()
    assert 'run("true")' in out and "FAIL" not in out
    assert ("contract B" in out) == (emu.contract == "vm"), out
    r = run_cli("doctor", env=cli_env)
    assert r.returncode == 0 and "reachable" in r.stdout.decode()
    emu.set_status(stopped := emu.create_sandbox(), "PAUSED")
    r = run_cli("doctor", stopped, env=cli_env)
    assert r.returncode == 1 and "PAUSED" in r.stdout.decode()


def test_version(cli_env: dict[str, str]) -> None:
    from sshbridge import __version__

    r = run_cli("--version", env=cli_env)
    assert (r.returncode, r.stdout.decode().strip()) == (0, f"sshbridge {__version__}")


def test_emulator_command(cli_env: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in cli_env.items() if not k.startswith("PRIME_")}
    proc = spawn([*CLI, "emulator", "--sandboxes", "2"], env=env)
    assert proc.stdout is not None
    try:
        exports: dict[str, str] = {}
        ids: list[str] = []
        while len(ids) < 2:
            line = proc.stdout.readline().decode()
            assert line, "the emulator exited early"
            if m := re.match(r"export (\w+)=(\S+)", line):
                exports[m.group(1)] = m.group(2)
            elif m := re.match(r"# sandbox (\S+)", line):
                ids.append(m.group(1))
        assert set(exports) == {"PRIME_API_KEY", "PRIME_API_BASE_URL"}
        r = run_cli("exec", ids[1], "--", "echo from-emulator", env=dict(env, **exports))
        assert (r.returncode, r.stdout) == (0, b"from-emulator\n"), r.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("persist", ["--no-persist", "--persist=60"])
def test_exec_exits_255_when_the_connection_is_lost(
    emu: Emulator, sandbox: str, cli_env: dict[str, str], persist: str
) -> None:
    """As ssh does: a connection lost mid-command is 255, never the remote's status."""
    proc = spawn([*CLI, persist, "exec", sandbox, "--", "echo started; sleep 7.3141"], env=cli_env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"
        emu.cut_connections()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 255, err
    assert "sshbridge: error: " in err.decode()
