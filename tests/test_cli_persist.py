"""Persistent sessions: the session holder, run as real processes against the emulator."""

# ruff: noqa: F811 - pytest fixtures imported from cli_helpers are parameters here
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
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
    with_console_script,
)

from sshbridge.emulator import Emulator

pytestmark = pytest.mark.timeout(90)


@pytest.mark.contracts
def test_first_call_starts_a_holder_later_calls_attach(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    r = fast("exec", sandbox, "--", "echo one; echo two >&2; exit 7", env=cli_env)
    assert (r.returncode, r.stdout, r.stderr) == (7, b"one\n", b"two\n")
    assert len(emu.open_sessions(sandbox)) == 1  # held open by the holder
    pids = holder_pids(rt_root(cli_env))
    assert len(pids) == 1
    for _ in range(3):
        r = fast("exec", sandbox, "--", "echo", "a b", "$HOME", env=cli_env)
        assert (r.returncode, r.stdout) == (0, b"a b $HOME\n"), r.stderr
    assert creates(emu, sandbox) == 1
    # The directory is private; the socket too; the key appears in no file name.
    d = runtime(cli_env)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    socks = list(d.glob("*.sock"))
    assert len(socks) == 1 and stat.S_IMODE(socks[0].stat().st_mode) == 0o600
    assert all(emu.api_key not in p.name for p in d.iterdir())

    r = run_cli("sessions", "--json", env=cli_env)
    rows = json.loads(r.stdout)
    assert [row["sandbox"] for row in rows] == [sandbox]
    assert rows[0]["session_id"] and rows[0]["expires_at"] and rows[0]["pid"] == pids[0]
    assert rows[0]["idle_seconds"] >= 0
    r = run_cli("sessions", env=cli_env)
    assert sandbox in r.stdout.decode() and "IDLE" in r.stdout.decode()

    r = run_cli("close", sandbox, env=cli_env)
    assert r.returncode == 0, r.stderr
    assert emu.open_sessions(sandbox) == []
    assert wait_gone(pids[0])
    assert list(d.glob("*.sock")) == []


def test_holder_exits_when_idle_and_deletes_its_session(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    r = fast("--persist", "1", "exec", sandbox, "--", "true", env=cli_env)
    assert r.returncode == 0, r.stderr
    [pid] = holder_pids(rt_root(cli_env))
    assert wait_gone(pid, 20)
    assert emu.open_sessions(sandbox) == []
    assert list(runtime(cli_env).glob("*.sock")) == []
    # The environment variable sets it too; 0 disables holders altogether.
    r = fast("exec", sandbox, "--", "true", env=dict(cli_env, SSHBRIDGE_PERSIST="0"))
    assert r.returncode == 0 and holder_pids(rt_root(cli_env)) == []
    r = fast("--no-persist", "exec", sandbox, "--", "true", env=cli_env)
    assert r.returncode == 0 and holder_pids(rt_root(cli_env)) == []
    assert emu.open_sessions(sandbox) == []


def test_sigterm_closes_the_sessions(emu: Emulator, sandbox: str, cli_env: dict[str, str]) -> None:
    assert fast("exec", sandbox, "--", "true", env=cli_env).returncode == 0
    [pid] = holder_pids(rt_root(cli_env))
    assert emu.open_sessions(sandbox) != []
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid)
    assert emu.open_sessions() == []


def test_stale_socket_is_replaced(emu: Emulator, sandbox: str, cli_env: dict[str, str]) -> None:
    assert fast("exec", sandbox, "--", "true", env=cli_env).returncode == 0
    [pid] = holder_pids(rt_root(cli_env))
    os.kill(pid, signal.SIGKILL)  # no cleanup at all: the socket file stays behind
    assert wait_gone(pid)
    [sock] = runtime(cli_env).glob("*.sock")
    for leaked in emu.open_sessions(sandbox):
        emu.close_session(leaked)
    r = fast("exec", sandbox, "--", "echo again", env=cli_env)
    assert (r.returncode, r.stdout) == (0, b"again\n"), r.stderr
    [new_pid] = holder_pids(rt_root(cli_env))
    assert new_pid != pid and sock.exists()


def test_another_key_or_url_gets_another_holder(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    assert fast("exec", sandbox, "--", "true", env=cli_env).returncode == 0
    # A different base URL spelling of the same server: a holder of its own.
    other = dict(cli_env, PRIME_API_BASE_URL=emu.base_url.replace("127.0.0.1", "localhost"))
    assert fast("exec", sandbox, "--", "true", env=other).returncode == 0
    assert len(holder_pids(rt_root(cli_env))) == 2
    # A wrong key never reaches the live holders: it fails as it would without them.
    r = fast("exec", sandbox, "--", "true", env=dict(cli_env, PRIME_API_KEY="wrong-key-12345"))
    assert r.returncode == 1 and "wrong-key" not in one_error_line(r.stderr)


def test_concurrent_first_calls_share_one_holder(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    procs = [spawn([*FAST_CLI, "exec", sandbox, "--", f"echo {i}"], env=cli_env) for i in range(6)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=60)
        assert (p.returncode, out) == (0, f"{i}\n".encode()), err
    assert len(holder_pids(rt_root(cli_env))) == 1
    assert creates(emu, sandbox) == 1


@pytest.mark.slow
def test_hundred_execs_in_a_minute_within_the_session_budget(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    saved = emu.rate_limit
    emu.rate_limit = (20, 60.0)  # the real API's budget per sandbox
    try:
        start = time.monotonic()

        def one(i: int) -> tuple[int, bytes, bytes]:
            r = fast("exec", sandbox, "--", f"echo {i}", env=cli_env, timeout=60)
            return r.returncode, r.stdout, r.stderr

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(100)))
        elapsed = time.monotonic() - start
    finally:
        emu.rate_limit = saved
    assert [(code, out) for code, out, _ in results] == [
        (0, f"{i}\n".encode()) for i in range(100)
    ], [err for _, _, err in results if err][:3]
    assert elapsed < 60
    assert creates(emu, sandbox) <= 3


def test_fast_client_imports_no_heavy_modules(sandbox: str, cli_env: dict[str, str]) -> None:
    assert fast("exec", sandbox, "--", "true", env=cli_env).returncode == 0
    r = run_argv(
        [sys.executable, "-X", "importtime", "-m", "sshbridge_fast", "exec", sandbox, "--", "true"],
        env=cli_env,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    modules = {
        line.split("|")[-1].strip().split(".")[0]
        for line in r.stderr.decode().splitlines()
        if line.startswith("import time:")
    }
    assert "sshbridge_fast" in modules
    assert not modules & {"paramiko", "pydantic", "requests", "rich", "typer", "click"}, modules


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_is_refused(sandbox: str, cli_env: dict[str, str]) -> None:
    """The directory (0700) and the socket (0600) keep other users out; behind them the
    holder checks the peer's uid itself. To reach that check, the test opens the
    filesystem layer (as a misconfigured system might), then connects as nobody."""
    assert fast("exec", sandbox, "--", "true", env=cli_env).returncode == 0
    d = runtime(cli_env)
    [sock] = d.glob("*.sock")
    nobody = 65534

    def run_as_nobody() -> dict[str, object]:
        """Connect from a forked child that has become nobody (no exec: the venv's
        interpreter lives under /root); its outcome comes back on a pipe."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: only socket calls, then _exit
            try:
                os.close(r)
                os.setgid(nobody)
                os.setuid(nobody)
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(str(sock))
                    s.sendall(b'{"op":"info"}\n')
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    os.write(w, data or b'{"eof":true}')
                except OSError as exc:
                    os.write(w, json.dumps({"oserror": exc.errno}).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as fh:
            data = fh.read()
        os.waitpid(pid, 0)
        return dict(json.loads(data))

    # First the filesystem layer alone: no way in.
    assert run_as_nobody() == {"oserror": errno.EACCES}
    parent_modes = [(p, p.stat().st_mode) for p in (d.parent, d)]
    try:
        for p, _ in parent_modes:
            p.chmod(0o711)
        sock.chmod(0o666)
        answer = run_as_nobody()
    finally:
        for p, mode in parent_modes:
            p.chmod(stat.S_IMODE(mode))
        sock.chmod(0o600)
    assert "refused" in str(answer["error"]) and "sandbox" not in answer, answer
    # And the holder still serves its own user.
    assert fast("exec", sandbox, "--", "echo ok", env=cli_env).stdout == b"ok\n"


# -- streams ------------------------------------------------------------------------------

PRODUCER = (
    "import sys\n"
    "chunk = b'y\\n' * 32768\n"
    "try:\n"
    "    for _ in range(int(sys.argv[1])):\n"
    "        sys.stdout.buffer.write(chunk)\n"
    "except BrokenPipeError:\n"
    "    sys.exit(0)\n"
)


def _pipeline(producer_chunks: int, cli: list[str], env: dict[str, str]) -> tuple[int, bytes, int]:
    """producer | cli; (cli status, cli stdout, cli peak RSS in KiB)."""
    producer = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, str(producer_chunks)], stdout=subprocess.PIPE
    )
    assert producer.stdout is not None
    try:
        proc = subprocess.Popen(
            cli, env=env, stdin=producer.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        producer.stdout.close()
        assert proc.stdout is not None and proc.stderr is not None
        out = proc.stdout.read()
        proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode, out, usage.ru_maxrss
    finally:
        producer.kill()
        producer.wait()


@pytest.mark.parametrize("persist", [True, False], ids=["holder", "direct"])
def test_endless_stdin_into_head_returns_promptly(
    sandbox: str, cli_env: dict[str, str], persist: bool
) -> None:
    cli = [*FAST_CLI, *([] if persist else ["--no-persist"]), "exec", sandbox, "--", "head -1"]
    start = time.monotonic()
    status, out, _ = _pipeline(10**6, cli, cli_env)  # 64 GB if it were read whole
    assert (status, out) == (0, b"y\n")
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("persist", [True, False], ids=["holder", "direct"])
def test_stdin_streams_with_flat_memory(
    sandbox: str, cli_env: dict[str, str], persist: bool
) -> None:
    chunks = 1536  # 96 MiB through the command, counted at the far end
    cli = [*FAST_CLI, *([] if persist else ["--no-persist"]), "exec", sandbox, "--", "wc -c"]

    def holder_hwm() -> int:
        if not persist:
            return 0
        [pid] = holder_pids(rt_root(cli_env))
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        return int(next(x for x in status if x.startswith("VmHWM")).split()[1])

    status, out, small_rss = _pipeline(1, cli, cli_env)
    assert (status, out.strip()) == (0, b"65536")
    small_hwm = holder_hwm()
    status, out, rss = _pipeline(chunks, cli, cli_env)
    assert (status, out.strip()) == (0, str(chunks * 65536).encode())
    # Reading stdin whole would add the 96 MiB at least.
    assert rss - small_rss < 40 * 1024, (small_rss, rss)
    assert holder_hwm() - small_hwm < 40 * 1024, (small_hwm, holder_hwm())


def test_no_stdin_and_compat_flag(sandbox: str, cli_env: dict[str, str]) -> None:
    r = fast("exec", "-n", sandbox, "--", "cat; echo end", env=cli_env, input=b"dropped\n")
    assert (r.returncode, r.stdout) == (0, b"end\n")
    r = fast("exec", "-i", sandbox, "--", "cat", env=cli_env, input=b"kept\n")
    assert (r.returncode, r.stdout) == (0, b"kept\n")
    r = run_cli("exec", sandbox, "--", "cat", env=cli_env, input=b"full cli\n")
    assert (r.returncode, r.stdout) == (0, b"full cli\n")


def test_closed_stdout_is_141(sandbox: str, cli_env: dict[str, str]) -> None:
    for cli in (FAST_CLI, [*FAST_CLI, "--no-persist"], CLI):
        proc = spawn([*cli, "exec", sandbox, "--", "seq 1 10000000"], env=cli_env)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"1\n"
        proc.stdout.close()
        assert proc.wait(30) == 141, cli
        assert proc.stderr is not None and proc.stderr.read() == b""


# -- OpenSSH semantics: rsync and git over `sshbridge ssh` --------------------------------


def test_rsync_over_sshbridge_ssh(
    emu: Emulator, sandbox: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    src = tmp_path / "src dir"
    (src / "sub").mkdir(parents=True)
    (src / "a file.txt").write_text("hello\n")
    (src / "sub" / "blob").write_bytes(os.urandom(200_000))
    env = with_console_script(cli_env)
    rsync(f"{src}/", f"{sandbox}:dest with space/", env=env)
    dest = emu.sandbox_dir(sandbox) / "dest with space"
    assert (dest / "a file.txt").read_text() == "hello\n"
    assert (dest / "sub" / "blob").read_bytes() == (src / "sub" / "blob").read_bytes()
    back = tmp_path / "back"
    rsync(f"{sandbox}:dest with space/", f"{back}/", env=env)
    assert (back / "a file.txt").read_text() == "hello\n"


def test_git_over_sshbridge_ssh(
    emu: Emulator, sandbox: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    bare = emu.sandbox_dir(sandbox) / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True, timeout=30)
    env = git_env(cli_env)
    work = tmp_path / "work"
    url = f"{sandbox}:{bare}"

    git("clone", "-q", url, str(work), env=env)
    (work / "f.txt").write_text("v1\n")
    git("add", "f.txt", cwd=work, env=env)
    git("commit", "-qm", "one", cwd=work, env=env)
    git("push", "-q", "origin", "HEAD:main", cwd=work, env=env)
    git("clone", "-q", "-b", "main", url, str(tmp_path / "again"), env=env)
    assert (tmp_path / "again" / "f.txt").read_text() == "v1\n"


def test_ssh_option_after_sandbox_is_an_error(sandbox: str, cli_env: dict[str, str]) -> None:
    r = run_cli("ssh", sandbox, "-T", "true", env=cli_env)
    assert r.returncode == 2 and "options go before" in one_error_line(r.stderr)
    r = run_cli("ssh", sandbox, "echo", "a  b", env=cli_env, input=b"")
    assert (r.returncode, r.stdout) == (0, b"a b\n")  # joined, split by the remote shell
