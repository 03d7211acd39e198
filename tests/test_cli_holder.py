"""The session holder behind `ssh` (no terminal) and `cp`, and its robustness: start
failures, Ctrl-C while it starts, the runtime directory's files. Real CLI subprocesses,
real holder processes, the real emulator."""

# ruff: noqa: F811 - pytest fixtures imported from cli_helpers are parameters here
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_helpers import (  # noqa: F401 - fixtures are used by name
    CLI,
    FAST_CLI,
    cli_env,
    contract,
    creates,
    emu,
    fast,
    git,
    git_env,
    holder_pids,
    one_error_line,
    rsync,
    rt_root,
    run_argv,
    run_cli,
    runtime,
    sandbox,
    spawn,
    wait_gone,
    wait_until,
    with_console_script,
)

from sshbridge.emulator import Emulator

pytestmark = pytest.mark.timeout(120)


def holder_files(env: dict[str, str]) -> list[str]:
    d = runtime(env)
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def holder_processes(env: dict[str, str]) -> list[int]:
    """Live holder processes started under this test's runtime directory (found by their
    environment, so also before they have written a pid file)."""
    mine = f"XDG_RUNTIME_DIR={env['XDG_RUNTIME_DIR']}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if b"sshbridge._holder" not in cmdline:
                continue
            if mine not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


# -- ssh through the holder ---------------------------------------------------------------


@pytest.mark.contracts
def test_ssh_without_terminal_goes_through_the_holder(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    r = fast("ssh", sandbox, "echo", "out;", "echo err >&2;", "exit 5", env=cli_env)
    assert (r.returncode, r.stdout, r.stderr) == (5, b"out\n", b"err\n")
    [pid] = holder_pids(rt_root(cli_env))
    # stdin streams, binary-safe, both ways.
    blob = os.urandom(3 << 20) + b"\0\r\n\xff"
    r = fast("ssh", sandbox, "cat", env=cli_env, input=blob)
    assert (r.returncode, r.stdout == blob) == (0, True), r.stderr
    # No command: a shell reading its commands from stdin; EOF ends it.
    r = fast("ssh", sandbox, env=cli_env, input=b"echo from-stdin\nexit 3\n")
    assert (r.returncode, r.stdout) == (3, b"from-stdin\n"), r.stderr
    # -T and the full CLI take the same road; "--" keeps a leading dash.
    r = run_cli("ssh", "-T", sandbox, "--", "-n", env=cli_env, input=b"")
    assert r.returncode == 127  # `-n`: not found, and reported by the remote shell
    r = run_cli("ssh", sandbox, "printf", "'a  b'", env=cli_env, input=b"")
    assert (r.returncode, r.stdout) == (0, b"a  b")
    assert holder_pids(rt_root(cli_env)) == [pid]
    assert creates(emu, sandbox) == 1


def test_ssh_connection_failure_through_the_holder_is_255(
    emu: Emulator, cli_env: dict[str, str]
) -> None:
    sid = emu.create_sandbox(status="STOPPED")
    for cli in (FAST_CLI, CLI):
        r = run_argv([*cli, "ssh", sid, "true"], env=cli_env, timeout=60)
        assert r.returncode == 255, r.stderr
        one_error_line(r.stderr)
    assert holder_processes(cli_env) == []


def test_rsync_and_git_share_one_holder(
    emu: Emulator, sandbox: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    src = tmp_path / "src dir"
    (src / "sub").mkdir(parents=True)
    (src / "a file.txt").write_text("hello\n")
    (src / "sub" / "blob").write_bytes(os.urandom(300_000))
    env = with_console_script(cli_env)

    rsync(f"{src}/", f"{sandbox}:dest/", env=env)
    (src / "a file.txt").write_text("changed\n")
    rsync(f"{src}/", f"{sandbox}:dest/", env=env)  # an incremental run
    rsync(f"{sandbox}:dest/", f"{tmp_path / 'back'}/", env=env)
    assert (tmp_path / "back" / "a file.txt").read_text() == "changed\n"
    assert (tmp_path / "back" / "sub" / "blob").read_bytes() == (src / "sub" / "blob").read_bytes()

    bare = emu.sandbox_dir(sandbox) / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True, timeout=30)
    env = git_env(cli_env)

    work = tmp_path / "work"
    git("clone", "-q", f"{sandbox}:{bare}", str(work), env=env)
    (work / "f.bin").write_bytes(os.urandom(100_000))
    git("add", "f.bin", cwd=work, env=env)
    git("commit", "-qm", "one", cwd=work, env=env)
    git("push", "-q", "origin", "HEAD:main", cwd=work, env=env)
    git("clone", "-q", "-b", "main", f"{sandbox}:{bare}", str(tmp_path / "again"), env=env)
    assert (tmp_path / "again" / "f.bin").read_bytes() == (work / "f.bin").read_bytes()
    # Every call above attached to the one holder: one session for all of them.
    assert len(holder_pids(rt_root(cli_env))) == 1
    assert creates(emu, sandbox) == 1


# -- cp through the holder ----------------------------------------------------------------


@pytest.mark.contracts
def test_cp_goes_through_the_holder_with_relative_paths(
    emu: Emulator, sandbox: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    here = tmp_path / "here"
    (here / "tree" / "deep" / "empty").mkdir(parents=True)
    (here / "tree" / "deep" / "x.bin").write_bytes(os.urandom(200_000))
    (here / "tree" / "top.txt").write_text("top\n")
    os.chmod(here / "tree" / "top.txt", 0o750)
    (here / "tree" / "link").symlink_to("top.txt")
    (here / "one.txt").write_text("one\n")
    box = emu.sandbox_dir(sandbox)
    (box / "work").mkdir()

    def cp(*args: str) -> subprocess.CompletedProcess[bytes]:
        return run_cli("cp", *args, env=cli_env, cwd=here)

    # Relative local paths are the client's, not the holder's.
    r = cp("one.txt", f"{sandbox}:work/")
    assert r.returncode == 0, r.stderr
    assert (box / "work" / "one.txt").read_text() == "one\n"
    [pid] = holder_pids(rt_root(cli_env))
    r = cp("-r", "tree", f"{sandbox}:work")
    assert r.returncode == 0, r.stderr
    up = box / "work" / "tree"
    assert (up / "deep" / "x.bin").read_bytes() == (here / "tree" / "deep" / "x.bin").read_bytes()
    assert (up / "deep" / "empty").is_dir() and os.readlink(up / "link") == "top.txt"
    assert (up / "top.txt").stat().st_mode & 0o777 == 0o750
    r = cp(f"{sandbox}:work/one.txt", "copy.txt")
    assert r.returncode == 0, r.stderr
    assert (here / "copy.txt").read_text() == "one\n"
    r = cp("-r", f"{sandbox}:work/tree", "down")
    assert r.returncode == 0, r.stderr
    assert (here / "down" / "deep" / "x.bin").read_bytes() == (up / "deep" / "x.bin").read_bytes()
    assert os.readlink(here / "down" / "link") == "top.txt"
    # Progress comes back from the holder as messages.
    r = cp("--progress", "one.txt", f"{sandbox}:work/again.txt")
    assert r.returncode == 0 and b"one.txt" in r.stderr, r.stderr
    # Failures: the same one-line messages and statuses as without a holder.
    r = cp("tree", f"{sandbox}:work")
    assert r.returncode == 2 and "'tree' is a directory" in one_error_line(r.stderr)
    r = cp(f"{sandbox}:work/tree", "x")
    assert r.returncode == 2 and "use -r" in one_error_line(r.stderr)
    r = cp(f"{sandbox}:work/missing.txt", "x")
    assert r.returncode == 1, r.stderr
    one_error_line(r.stderr)
    r = cp("-r", f"{sandbox}:work/tree", "nowhere/at/all")
    assert r.returncode == 1 and "'nowhere/at'" in one_error_line(r.stderr)
    r = cp("missing.txt", f"{sandbox}:work/")
    assert r.returncode == 1 and "'missing.txt'" in one_error_line(r.stderr)
    assert holder_pids(rt_root(cli_env)) == [pid]
    assert creates(emu, sandbox) == 1
    # Without a holder the same copies still work.
    r = run_cli(
        "--no-persist", "cp", "one.txt", f"{sandbox}:work/direct.txt", env=cli_env, cwd=here
    )
    assert r.returncode == 0 and (box / "work" / "direct.txt").read_text() == "one\n"


# -- start failures -----------------------------------------------------------------------


def test_start_failures_are_reported_not_timed_out(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    stopped = emu.create_sandbox(status="STOPPED")
    cases = [
        ("bad key", dict(cli_env, PRIME_API_KEY="wrong-key-12345"), sandbox, 1),
        ("unknown sandbox", cli_env, "sbx_doesnotexist", 1),
        ("stopped sandbox", cli_env, stopped, 1),
    ]
    for what, env, sid, code in cases:
        for cli in (FAST_CLI, CLI):
            start = time.monotonic()
            r = run_argv([*cli, "exec", sid, "--", "true"], env=env, timeout=60)
            line = one_error_line(r.stderr)
            assert r.returncode == code, (what, line)
            assert "holder" not in line and "timed out" not in line, (what, line)
            assert "wrong-key" not in line
            assert time.monotonic() - start < 50, what
    # Nothing is left behind: no process, no socket, no lock, log or pid file.
    wait_until(lambda: holder_processes(cli_env) == [], timeout=20, what="failed holders to exit")
    assert holder_files(cli_env) == []
    assert emu.open_sessions() == []


# -- Ctrl-C while the first call starts the holder -----------------------------------------


def test_ctrl_c_while_the_holder_starts_leaves_nothing(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    emu.exposure_delay = 30.0  # the session's SSH port opens late: the start hangs
    try:
        proc = spawn([*FAST_CLI, "exec", sandbox, "--", "echo never"], env=cli_env)
        # The holder exists and has created its session: it is in the middle of starting.
        wait_until(lambda: creates(emu, sandbox) == 1, timeout=20, what="the holder's session POST")
        assert len(holder_processes(cli_env)) == 1
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and out == b""
        assert "interrupted" in one_error_line(err)
        wait_until(lambda: holder_processes(cli_env) == [], timeout=20, what="the holder to exit")
        wait_until(
            lambda: emu.open_sessions(sandbox) == [], timeout=20, what="its session to be DELETEd"
        )
        assert holder_files(cli_env) == []
    finally:
        emu.exposure_delay = 0.0
    # The next call starts a holder normally.
    r = fast("exec", sandbox, "--", "echo fine", env=cli_env)
    assert (r.returncode, r.stdout) == (0, b"fine\n"), r.stderr
    assert len(holder_processes(cli_env)) == 1


def test_killed_first_client_does_not_leave_a_holder(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    """SIGKILL gives the client no chance to stop its holder: the holder notices that the
    pipe to its starter closed and exits by itself, DELETEing its session."""
    emu.exposure_delay = 30.0
    try:
        proc = subprocess.Popen(
            [*FAST_CLI, "exec", sandbox, "--", "true"],
            env=cli_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: creates(emu, sandbox) == 1, timeout=20, what="the holder's session POST")
        proc.kill()
        proc.wait(10)
        wait_until(lambda: holder_processes(cli_env) == [], timeout=20, what="the holder to exit")
        wait_until(
            lambda: emu.open_sessions(sandbox) == [], timeout=20, what="its session to be DELETEd"
        )
        assert holder_files(cli_env) == []
    finally:
        emu.exposure_delay = 0.0


def test_concurrent_first_calls_after_a_close_share_one_holder(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    for round_ in range(2):
        with ThreadPoolExecutor(6) as pool:
            results = list(
                pool.map(lambda i: fast("exec", sandbox, "--", f"echo {i}", env=cli_env), range(6))
            )
        assert [(r.returncode, r.stdout) for r in results] == [
            (0, f"{i}\n".encode()) for i in range(6)
        ], [r.stderr for r in results]
        assert len(holder_processes(cli_env)) == 1, round_
        assert creates(emu, sandbox) == round_ + 1
        r = run_cli("close", sandbox, env=cli_env)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: holder_processes(cli_env) == [], timeout=20, what="the holder to exit")
        # Its socket, lock, log and pid files went with it.
        assert holder_files(cli_env) == []


# -- the runtime directory ----------------------------------------------------------------


def _holder_stem(sandbox: str, cli_env: dict[str, str]) -> str:
    """The file stem of this sandbox's holder: learned from a real one, then closed."""
    assert fast("exec", sandbox, "--", "true", env=cli_env).returncode == 0
    [sock] = runtime(cli_env).glob("h-*.sock")
    assert run_cli("close", sandbox, env=cli_env).returncode == 0
    wait_until(lambda: holder_processes(cli_env) == [], timeout=20, what="the holder to exit")
    return sock.stem


def test_symlinks_planted_in_the_runtime_dir_are_not_followed(
    emu: Emulator, sandbox: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    stem = _holder_stem(sandbox, cli_env)
    d = runtime(cli_env)
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    # A planted lock: refused, with a message that says why; nothing written through it.
    (d / f"{stem}.lock").symlink_to(victim)
    for cli in (FAST_CLI, CLI):
        r = run_argv([*cli, "exec", sandbox, "--", "true"], env=cli_env, timeout=60)
        assert r.returncode == 1 and "symbolic link" in one_error_line(r.stderr)
    assert holder_processes(cli_env) == []
    (d / f"{stem}.lock").unlink()
    # Planted pid, log and socket names: replaced, never written through.
    for suffix in (".pid", ".log", ".sock"):
        (d / f"{stem}{suffix}").symlink_to(victim)
    r = fast("exec", sandbox, "--", "echo ok", env=cli_env)
    assert (r.returncode, r.stdout) == (0, b"ok\n"), r.stderr
    assert victim.read_text() == "untouched\n"
    for suffix in (".pid", ".log", ".sock"):
        assert not (d / f"{stem}{suffix}").is_symlink(), suffix


def test_runtime_dir_not_private_is_refused(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    d = runtime(cli_env)
    d.mkdir(mode=0o700)
    d.chmod(0o755)
    try:
        for cli in (FAST_CLI, CLI):
            r = run_argv([*cli, "exec", sandbox, "--", "true"], env=cli_env, timeout=60)
            line = one_error_line(r.stderr)
            assert r.returncode == 1 and "0755" in line and "chmod 700" in line, line
        assert holder_processes(cli_env) == []
        assert stat_mode(d) == 0o755  # not "repaired" behind the user's back
        # --no-persist still works.
        r = fast("--no-persist", "exec", sandbox, "--", "echo ok", env=cli_env)
        assert (r.returncode, r.stdout) == (0, b"ok\n")
    finally:
        d.chmod(0o700)
    # A symbolic link in its place (even to a private directory of ours) is refused too.
    elsewhere = rt_root(cli_env) / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    d.rmdir()
    d.symlink_to(elsewhere)
    r = run_cli("exec", sandbox, "--", "true", env=cli_env)
    assert r.returncode == 1 and "not a directory owned" in one_error_line(r.stderr)
    assert list(elsewhere.iterdir()) == []
    d.unlink()
    if os.getuid() == 0:  # another owner: only root can make one
        d.mkdir(mode=0o700)
        os.chown(d, 65534, 65534)
        r = run_cli("exec", sandbox, "--", "true", env=cli_env)
        assert r.returncode == 1 and "not a directory owned" in one_error_line(r.stderr)
        d.rmdir()
    assert holder_processes(cli_env) == []


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_ctrl_c_abandons_a_copy_in_the_holder(
    emu: Emulator, sandbox: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        fh.truncate(1 << 30)  # sparse: cheap here, long to send
    box = emu.sandbox_dir(sandbox)
    assert fast("exec", sandbox, "--", "true", env=cli_env).returncode == 0
    [pid] = holder_pids(rt_root(cli_env))
    proc = spawn([*CLI, "cp", str(big), f"{sandbox}:big.bin"], env=cli_env)

    def partial_growing() -> bool:
        return any(p.name.endswith(".part") and p.stat().st_size > 0 for p in box.iterdir())

    wait_until(partial_growing, timeout=20, what="the upload to start")
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in one_error_line(err)
    # The holder dropped the copy (no destination) and serves on. Its temporary goes as
    # the README promises: at once when the server answers within 5 s, else at the next
    # upload into that directory (a loaded machine can take the slow path).
    assert not (box / "big.bin").exists()
    assert holder_pids(rt_root(cli_env)) == [pid]
    small = tmp_path / "small.txt"
    small.write_text("next\n")
    assert run_cli("cp", str(small), f"{sandbox}:small.txt", env=cli_env).returncode == 0
    wait_until(
        lambda: not any(p.name.endswith(".part") for p in box.iterdir()), timeout=20, what="cleanup"
    )
    assert (box / "small.txt").read_text() == "next\n"
    r = fast("exec", sandbox, "--", "echo still", env=cli_env)
    assert (r.returncode, r.stdout) == (0, b"still\n")
    rows = json.loads(run_cli("sessions", "--json", env=cli_env).stdout)
    assert [row["active"] for row in rows] == [0]


# -- forward through the holder -----------------------------------------------------------


def _start_http_server(sandbox: str, env: dict[str, str], box: Path) -> int:
    """`python3 -m http.server` in the sandbox, started through the holder; its port."""
    r = fast(
        "exec",
        sandbox,
        "--",
        "nohup python3 -u -m http.server 0 --bind 127.0.0.1 </dev/null >http.log 2>&1 &"
        " echo $! > http.pid",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    log = box / "http.log"
    found: list[int] = []

    def serving() -> bool:
        m = re.search(r"port (\d+)", log.read_text() if log.exists() else "")
        if m:
            found.append(int(m.group(1)))
        return bool(m)

    wait_until(serving, 20, "the HTTP server to start in the sandbox")
    return found[0]


def _stop_http_server(box: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((box / "http.pid").read_text().strip()), signal.SIGTERM)


def _start_forward(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[bytes], int]:
    """`sshbridge forward ...` running; the local port it printed."""
    proc = spawn([*CLI, "forward", *args], env=env)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    m = re.match(r"sshbridge: forwarding 127\.0\.0\.1:(\d+) -> sandbox \S+ 127\.0\.0\.1:\d+$", line)
    assert m, (line, proc.stderr.read().decode() if proc.poll() is not None else "")
    assert proc.stderr.readline() == b"sshbridge: press Ctrl-C to stop\n"
    return proc, int(m.group(1))


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False  # caught in the backlog of a listener being closed: not yet
    return False


def _active(env: dict[str, str]) -> list[int]:
    rows = json.loads(run_cli("sessions", "--json", env=env).stdout)
    return [row["active"] for row in rows]


@pytest.mark.contracts
def test_forward_goes_through_the_holder_until_the_client_goes(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    box = emu.sandbox_dir(sandbox)
    (box / "hello.txt").write_text("hello from the sandbox\n")
    try:
        remote = _start_http_server(sandbox, cli_env, box)
        [pid] = holder_pids(rt_root(cli_env))
        # Ctrl-C, SIGTERM and SIGKILL of the client: each time the holder closes that
        # forward (its port refuses connections) and stays.
        for how in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            proc, port = _start_forward(cli_env, sandbox, f"0:127.0.0.1:{remote}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello.txt", timeout=15) as f:
                    assert f.read() == b"hello from the sandbox\n"
                # Attached, the holder is not idle.
                assert _active(cli_env) == [1]
                proc.send_signal(how)
                _out, err = proc.communicate(timeout=30)
            finally:
                proc.kill()
                proc.wait()
            if how == signal.SIGKILL:
                wait_until(lambda p=port: _refused(p), 15, "the holder to close the forward")
            else:
                # As without a holder: "stopping", status 130; the port is closed by then.
                assert (proc.returncode, err) == (130, b"sshbridge: stopping\n")
                assert _refused(port)
            assert holder_pids(rt_root(cli_env)) == [pid]
            wait_until(lambda: _active(cli_env) == [0], 15, "the forward to end in the holder")
        r = fast("exec", sandbox, "--", "echo still", env=cli_env)
        assert (r.returncode, r.stdout) == (0, b"still\n")
        # One session for the server, three forwards and the exec.
        assert creates(emu, sandbox) == 1
    finally:
        _stop_http_server(box)


def test_forward_port_in_use_is_reported_as_without_a_holder(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = run_cli("forward", sandbox, f"{port}:127.0.0.1:9", env=cli_env)
        assert r.returncode == 1, r.stderr
        line = one_error_line(r.stderr)
        assert f"cannot listen on 127.0.0.1:{port}" in line, line
        [pid] = holder_pids(rt_root(cli_env))
        assert creates(emu, sandbox) == 1
        # The direct path: the same line and status, on a session of its own.
        direct = run_cli("--no-persist", "forward", sandbox, f"{port}:127.0.0.1:9", env=cli_env)
        assert (direct.returncode, direct.stderr) == (1, r.stderr)
        assert creates(emu, sandbox) == 2
        # A forward that fails after another started: neither stays open.
        other = socket.create_server(("127.0.0.1", 0))
        free = other.getsockname()[1]
        other.close()
        r = run_cli("forward", sandbox, f"{free}:127.0.0.1:9", f"{port}:127.0.0.1:9", env=cli_env)
        assert r.returncode == 1 and f"127.0.0.1:{port}" in one_error_line(r.stderr)
        assert _refused(free)
    assert holder_pids(rt_root(cli_env)) == [pid]
    assert _active(cli_env) == [0]


def test_reverse_forward_goes_through_the_holder(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        local = server.getsockname()[1]

        def echo_once() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"echo:" + conn.recv(100))

        threading.Thread(target=echo_once, daemon=True).start()
        proc = spawn([*CLI, "forward", "-R", sandbox, f"0:127.0.0.1:{local}"], env=cli_env)
        assert proc.stderr is not None
        try:
            line = proc.stderr.readline().decode()
            m = re.match(
                rf"sshbridge: forwarding sandbox 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:{local}$", line
            )
            assert m, line
            probe = (
                f"import socket; s = socket.create_connection(('127.0.0.1', {m.group(1)})); "
                "s.sendall(b'ping'); print(s.recv(100).decode())"
            )
            r = fast("exec", sandbox, "--", "python3", "-c", probe, env=cli_env)
            assert (r.returncode, r.stdout) == (0, b"echo:ping\n"), r.stderr
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 130  # Ctrl-C, as for every command
        finally:
            proc.kill()
            proc.wait()
    assert creates(emu, sandbox) == 1
    assert _active(cli_env) == [0]


def test_closing_the_holder_ends_an_attached_forward(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    proc, port = _start_forward(cli_env, sandbox, "0:127.0.0.1:9")
    try:
        [pid] = holder_pids(rt_root(cli_env))
        assert run_cli("close", sandbox, env=cli_env).returncode == 0
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1 and "forwarding stopped" in one_error_line(err)
        assert wait_gone(pid) and _refused(port)
    finally:
        proc.kill()
        proc.wait()
