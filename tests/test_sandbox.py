"""SandboxSSH end to end against the local emulator: HTTP API, gateway and SSH sidecar."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SECRET_KEY
from emu_helpers import pids_with, settle_threads, wait_until

from sshbridge import (
    AcceptAnyHostKey,
    AuthenticationError,
    CommandError,
    CommandTimeout,
    HostKeyMismatch,
    InvalidArgument,
    KnownHostsFile,
    NotFound,
    RemotePathError,
    SandboxNotRunning,
    SandboxSSH,
    SidecarSSHSession,
    SSHConnectError,
)
from sshbridge.emulator import Emulator

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def sandbox(emu: Emulator) -> str:
    return emu.create_sandbox()


def connect(emu: Emulator, sandbox_id: str, **kw: object) -> SandboxSSH:
    return SandboxSSH(sandbox_id, api_key=emu.api_key, base_url=emu.base_url, **kw)  # type: ignore[arg-type]


@pytest.fixture
def shell(emu: Emulator, sandbox: str) -> Iterator[SandboxSSH]:
    with connect(emu, sandbox) as s:
        yield s


# -- the main flow ------------------------------------------------------------------------


@pytest.mark.contracts
def test_run_basics(shell: SandboxSSH, emu: Emulator, sandbox: str) -> None:
    r = shell.run("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, "out\n", "err\n", False)
    assert r.stdout_bytes == b"out\n" and r.duration > 0
    assert shell.run("pwd").stdout.strip() == str(emu.sandbox_dir(sandbox).resolve())
    session = shell.session
    assert session is not None and session.sandbox_id == sandbox
    assert shell.expires_at is not None and shell.expires_at.tzinfo is not None


def test_argv_is_quoted(shell: SandboxSSH) -> None:
    tricky = ["a b", "it's", '"q"', "$HOME", "`id`", "ünï", "x;y", ""]
    r = shell.run(["printf", "%s|", *tricky], check=True)
    assert r.stdout == "|".join(tricky) + "|"


def test_cwd_env_input_check(shell: SandboxSSH) -> None:
    shell.makedirs("my dir/sub")
    r = shell.run('pwd; echo "$A|$B"', cwd="my dir/sub", env={"A": "1", "B": "two words 'q'"})
    lines = r.stdout.splitlines()
    assert lines[0].endswith("/my dir/sub")
    assert lines[1] == "1|two words 'q'"
    assert shell.run("cat", input="data\nmore").stdout == "data\nmore"
    assert shell.run("cat", input=b"\x00\xff").stdout_bytes == b"\x00\xff"
    assert shell.run("cat").stdout == ""  # stdin at EOF: does not hang
    with pytest.raises(CommandError) as info:
        shell.run("echo nope >&2; exit 7", check=True)
    assert info.value.result.exit_code == 7 and "nope" in str(info.value)
    r = shell.run("true", cwd="/nonexistent/dir")
    assert r.exit_code == 125


def test_output_decoding_keeps_raw_bytes(shell: SandboxSSH) -> None:
    r = shell.run(r"printf 'ok \377\376 é\n'")
    assert r.stdout_bytes == b"ok \xff\xfe \xc3\xa9\n"
    assert r.stdout == "ok \ufffd\ufffd é\n"


def test_streaming_callbacks(shell: SandboxSSH) -> None:
    chunks: list[str] = []
    lines: list[str] = []
    errs: list[str] = []
    shell.run(
        "printf 'a\\nb'; sleep 0.2; printf 'c\\nd\\n'; echo e >&2",
        on_stdout=chunks.append,
        on_stderr=errs.append,
    )
    assert "".join(chunks) == "a\nbc\nd\n" and len(chunks) >= 2
    assert errs == ["e\n"]
    shell.run(
        "printf 'a\\nb'; sleep 0.2; printf 'c\\nd'", on_stdout=lines.append, line_buffered=True
    )
    assert lines == ["a\n", "bc\n", "d"]


def test_pty(shell: SandboxSSH) -> None:
    r = shell.run("test -t 1 && echo tty; echo err >&2", pty=True)
    assert "tty" in r.stdout and "err" in r.stdout  # stderr merges on a terminal
    assert shell.run("test -t 1 || echo notty").stdout == "notty\n"


def test_fifty_mib_on_each_stream_does_not_deadlock(shell: SandboxSSH) -> None:
    n = 50 * 1024 * 1024
    r = shell.run(
        f"head -c {n} /dev/zero; head -c {n} /dev/zero >&2; head -c {n} /dev/zero; echo done >&2"
    )
    assert len(r.stdout_bytes) == 2 * n
    assert len(r.stderr_bytes) == n + 5 and r.stderr_bytes.endswith(b"done\n")
    assert r.exit_code == 0


def test_interleaved_streams_large(shell: SandboxSSH) -> None:
    # Writes alternate between the streams in blocks larger than a window.
    r = shell.run(
        "for i in 1 2 3 4 5 6; do head -c 3000000 /dev/zero; head -c 3000000 /dev/zero >&2; done"
    )
    assert len(r.stdout_bytes) == len(r.stderr_bytes) == 18_000_000


def test_concurrent_runs_from_eight_threads(shell: SandboxSSH) -> None:
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(5):
                results[i * 10 + j] = shell.run(f"echo {i}-{j}; sleep 0.05").stdout
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == {i * 10 + j: f"{i}-{j}\n" for i in range(8) for j in range(5)}


def test_timeout_stops_the_remote_process(shell: SandboxSSH) -> None:
    with pytest.raises(CommandTimeout) as info:
        shell.run("echo started; sleep 31.4159; echo never", timeout=1)
    assert info.value.result.stdout == "started\n"
    assert isinstance(info.value, TimeoutError)
    wait_until(lambda: pids_with("sleep 31.4159") == [], 5, "the remote sleep to end", 0.1)
    assert pids_with("sleep 31.4159") == []


@pytest.mark.contracts
def test_channel_cap_opens_more_connections(emu: Emulator, sandbox: str) -> None:
    emu.max_channels_per_connection = 3
    with connect(emu, sandbox) as shell:
        outs: list[str] = []

        def work(i: int) -> None:
            outs.append(shell.run(f"sleep 0.3; echo {i}").stdout)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outs) == sorted(f"{i}\n" for i in range(12))
        session = shell.session
        assert session is not None
    assert len([s for s in emu.sessions if s.sandbox_id == sandbox]) == 1


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"command": ""},
        {"command": []},
        {"command": ["ok", 3]},
        {"command": 42},
        {"command": "true", "timeout": 0},
        {"command": "true", "timeout": -1},
        {"command": "true", "timeout": "5"},
        {"command": "true", "env": {"1BAD": "x"}},
        {"command": "true", "env": {"A": 1}},
        {"command": "true", "cwd": ""},
        {"command": "true", "input": 5},
        {"command": "true", "encoding": "no-such-codec"},
    ],
)
def test_run_rejects_bad_input(shell: SandboxSSH, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        shell.run(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl_seconds": 0},
        {"ttl_seconds": 4000},
        {"ttl_seconds": 1.5},
        {"connect_timeout": 0},
        {"max_connections": 0},
        {"keepalive": -1},
        {"connect_timeout": float("nan")},
        {"connect_timeout": float("inf")},
        {"keepalive": float("nan")},
        {"rate_limit_wait": float("nan")},
        {"renew_before": float("nan")},
        {"api_timeout": (5,)},
        {"api_timeout": (0, 0)},
        {"api_timeout": (-1, -1)},
        {"api_timeout": (float("nan"), 5)},
    ],
)
def test_constructor_rejects_bad_input(
    emu: Emulator, sandbox: str, kwargs: dict[str, object]
) -> None:
    with pytest.raises(InvalidArgument):
        connect(emu, sandbox, **kwargs)
    assert emu.api_calls == []


def test_bad_sandbox_id_makes_no_request(emu: Emulator) -> None:
    with pytest.raises(InvalidArgument):
        connect(emu, "../../admin")
    assert emu.api_calls == []


# -- sandbox states and API errors ---------------------------------------------------------


@pytest.mark.contracts
@pytest.mark.parametrize(
    "status", ["PENDING", "PROVISIONING", "PAUSED", "ERROR", "TERMINATED", "TIMEOUT"]
)
def test_not_running_sandbox(emu: Emulator, status: str) -> None:
    sid = emu.create_sandbox(status=status)
    with pytest.raises(SandboxNotRunning) as info:
        connect(emu, sid).connect()
    assert info.value.status == status and status in str(info.value)


@pytest.mark.contracts
def test_unknown_sandbox_and_bad_key(emu: Emulator, sandbox: str) -> None:
    with pytest.raises(NotFound):
        connect(emu, "sbx_doesnotexist").connect()
    with pytest.raises(AuthenticationError) as info:
        SandboxSSH(sandbox, api_key="wrong-key", base_url=emu.base_url).connect()
    assert "PRIME_API_KEY" in str(info.value)


def test_config_from_environment(
    emu: Emulator, sandbox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in emu.env().items():
        monkeypatch.setenv(k, v)
    with SandboxSSH(sandbox) as shell:
        assert shell.run("echo ok").stdout == "ok\n"


# -- session lifecycle ----------------------------------------------------------------------


@pytest.mark.contracts
def test_exit_deletes_session_on_exception_and_interrupt(emu: Emulator, sandbox: str) -> None:
    with pytest.raises(RuntimeError), connect(emu, sandbox) as shell:
        shell.run("true")
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), connect(emu, sandbox) as shell:
        shell.run("true")
        raise KeyboardInterrupt
    deletes = [c for c in emu.api_calls if c.method == "DELETE"]
    assert len(deletes) == 2 and all(c.status < 300 for c in deletes)
    assert emu.open_sessions() == []
    assert emu.ssh_connections() == 0


def test_closed_object_refuses_calls(shell: SandboxSSH) -> None:
    shell.close()
    with pytest.raises(InvalidArgument, match="closed"):
        shell.run("true")
    shell.close()  # idempotent


@pytest.mark.contracts
def test_slow_exposure_is_waited_for(emu: Emulator, sandbox: str) -> None:
    emu.exposure_delay = 1.5
    start = time.monotonic()
    with connect(emu, sandbox) as shell:
        assert time.monotonic() - start >= 1.4
        assert shell.run("echo ready").stdout == "ready\n"
    assert len(emu.sessions) == 1  # retried the connect, not the session


@pytest.mark.contracts
def test_unreachable_exposure_times_out_and_closes_session(emu: Emulator, sandbox: str) -> None:
    emu.exposure_delay = 30
    with pytest.raises(SSHConnectError, match="connect_timeout"):
        connect(emu, sandbox, connect_timeout=1.0).connect()
    assert emu.open_sessions() == []


@pytest.mark.contracts
def test_reconnects_with_a_new_session_after_expiry(emu: Emulator, sandbox: str) -> None:
    emu.cut_at_expiry = True
    with connect(emu, sandbox, ttl_seconds=2, auto_renew=False) as shell:
        first = shell.session
        assert shell.run("echo 1").stdout == "1\n"
        time.sleep(2.5)  # the behaviour: the 2 s session expires
        assert shell.run("echo 2").stdout == "2\n"
        second = shell.session
        assert first is not None and second is not None
        assert first.session_id != second.session_id
    assert len(emu.sessions) == 2


@pytest.mark.contracts
def test_server_error_on_create_is_reported(emu: Emulator, sandbox: str) -> None:
    emu.fail_next(1, 500, endpoint="create_session")
    with pytest.raises(Exception) as info:
        connect(emu, sandbox).connect()
    assert "500" in str(info.value)
    emu.fail_next(1, 503, retry_after=1, endpoint="create_session")
    with connect(emu, sandbox) as shell:
        assert shell.run("echo ok").stdout == "ok\n"


# -- host keys ------------------------------------------------------------------------------


@pytest.mark.contracts
def test_host_key_pinned_across_sessions(emu: Emulator, sandbox: str) -> None:
    emu.cut_at_expiry = True
    with connect(emu, sandbox, ttl_seconds=1) as shell:
        shell.run("true")
        emu.rotate_host_key = True
        time.sleep(1.3)  # the behaviour: the 1 s session expires, the next has a new key
        with pytest.raises(HostKeyMismatch) as info:
            shell.run("true")
        assert info.value.expected != info.value.actual
    assert emu.open_sessions() == []


def test_accept_any_is_explicit_opt_in(emu: Emulator, sandbox: str) -> None:
    emu.cut_at_expiry = True
    emu.rotate_host_key = True
    with connect(emu, sandbox, ttl_seconds=1, host_key_policy=AcceptAnyHostKey()) as shell:
        shell.run("true")
        time.sleep(1.3)  # the behaviour: the 1 s session expires, the next has a new key
        assert shell.run("echo again").stdout == "again\n"


@pytest.mark.contracts
def test_known_hosts_file(emu: Emulator, sandbox: str, tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    with connect(emu, sandbox, host_key_policy=KnownHostsFile(path, accept_new=True)) as shell:
        shell.run("true")
    assert sandbox in path.read_text()
    with connect(emu, sandbox, known_hosts=path) as shell:
        shell.run("true")
    emu.rotate_host_key = True
    with pytest.raises(HostKeyMismatch):
        connect(emu, sandbox, known_hosts=path).connect()
    with pytest.raises(InvalidArgument):
        connect(emu, sandbox, known_hosts=tmp_path / "missing")


# -- SFTP -------------------------------------------------------------------------------------


@pytest.mark.contracts
def test_put_get_round_trip_odd_names(shell: SandboxSSH, tmp_path: Path) -> None:
    shell.makedirs("dir one")
    for name, size in [("empty", 0), ("one", 1), ('it\'s a "file" ü.bin', 1_000_003)]:
        local = tmp_path / "src.bin"
        data = os.urandom(size)
        local.write_bytes(data)
        remote = shell.put(local, f"dir one/{name}")
        assert remote == f"dir one/{name}"
        assert shell.stat(remote).st_size == size
        back = shell.get(remote, tmp_path / "back.bin")
        assert back.read_bytes() == data
    assert sorted(shell.listdir("dir one")) == sorted(["empty", "one", 'it\'s a "file" ü.bin'])


def test_put_into_directory_and_modes(shell: SandboxSSH, tmp_path: Path) -> None:
    local = tmp_path / "run.sh"
    local.write_text("#!/bin/sh\necho hi\n")
    local.chmod(0o750)
    shell.makedirs("bin")
    assert shell.put(local, "bin/") == "bin/run.sh"
    assert shell.stat("bin/run.sh").st_mode is not None
    assert (shell.stat("bin/run.sh").st_mode or 0) & 0o777 == 0o750
    assert shell.run("./bin/run.sh").stdout == "hi\n"
    got = shell.get("bin/run.sh", tmp_path / "dl")
    assert got.read_text() == "#!/bin/sh\necho hi\n"


def test_small_file_helpers_and_open(shell: SandboxSSH) -> None:
    shell.write_text("notes.txt", "héllo\n")
    assert shell.read_text("notes.txt") == "héllo\n"
    assert shell.read_bytes("notes.txt") == "héllo\n".encode()
    with shell.open("notes.txt", "a") as fh:
        fh.write(b"more\n")
    with shell.open("notes.txt", "rb") as fh:
        assert fh.read() == "héllo\nmore\n".encode()
    assert shell.exists("notes.txt") and not shell.exists("nope.txt")
    shell.remove("notes.txt")
    assert not shell.exists("notes.txt")


def test_remote_errors_are_clear(shell: SandboxSSH, tmp_path: Path) -> None:
    with pytest.raises(RemotePathError) as info:
        shell.get("does/not/exist.bin", tmp_path / "x")
    assert "does/not/exist.bin" in str(info.value) and info.value.is_not_found
    assert not (tmp_path / "x").exists()
    with pytest.raises(RemotePathError):
        shell.remove("nope")
    local = tmp_path / "f"
    local.write_bytes(b"x")
    with pytest.raises(RemotePathError) as info2:
        shell.put(local, "/proc/forbidden/f")
    assert "/proc/forbidden/f" in str(info2.value)
    with pytest.raises(InvalidArgument, match="does not exist"):
        shell.put(tmp_path / "missing", "x")
    with pytest.raises(InvalidArgument):
        shell.put(local, "")


def test_upload_is_atomic_under_failure(shell: SandboxSSH, tmp_path: Path) -> None:
    shell.write_text("target.bin", "old content")
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(8 * 1024 * 1024))

    def fail(done: int, total: int) -> None:
        if done >= 2 * 1024 * 1024:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        shell.put(local, "target.bin", callback=fail)
    assert shell.read_text("target.bin") == "old content"
    assert [n for n in shell.listdir(".") if ".part" in n] == []
    shell.put(local, "target.bin")
    assert shell.read_bytes("target.bin") == local.read_bytes()


# -- secrets ---------------------------------------------------------------------------------


@pytest.mark.contracts
def test_no_secret_in_logs_or_reprs(
    emu: Emulator, sandbox: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with connect(emu, sandbox) as shell:
        shell.run("echo hi")
        session = shell.session
        assert session is not None
        # Contract A's token is a secret; contract B has none (its key is the secret).
        token = (
            session.token.get_secret_value()
            if isinstance(session, SidecarSSHSession)
            else "no-token-in-contract-b"
        )
        texts = [repr(shell), repr(session), str(session), repr(shell.api), repr(shell.config)]
        emu.fail_next(1, 401, endpoint="get_sandbox")
        with pytest.raises(AuthenticationError) as info:
            shell.sandbox()
        texts.append(str(info.value))
    texts.append(caplog.text)
    for text in texts:
        assert SECRET_KEY not in text
        assert token not in text
        assert "PRIVATE KEY" not in text


def test_spare_channel_respects_the_cap_and_leaves_nothing(emu: Emulator, sandbox: str) -> None:
    """A channel opened ahead of need must never cost a connection or a refusal-driven
    retry: with one channel per connection allowed, twenty commands in a row still use
    one connection, and closing leaves no thread behind."""
    emu.max_channels_per_connection = 1
    with connect(emu, sandbox) as shell:
        for i in range(20):
            assert shell.run(f"echo {i}").stdout == f"{i}\n"
        session = shell.session
        assert session is not None
        assert emu.ssh_connections(session.session_id) == 1
    assert settle_threads() == []


def test_spare_channel_serves_sequential_commands(emu: Emulator, sandbox: str) -> None:
    with connect(emu, sandbox) as shell:
        shell.run("true")
        session = shell.session
        assert session is not None
        # The next command's channel is opened in the background, ahead of need: one
        # channel stays open between commands, never more.
        wait_until(lambda: emu.ssh_channels(session.session_id) >= 1, 5, "the spare channel")
        assert emu.ssh_channels(session.session_id) == 1
        for _ in range(5):
            assert shell.run("echo x").stdout == "x\n"
            assert emu.ssh_channels(session.session_id) <= 2
    wait_until(lambda: emu.ssh_channels() == 0, 5, "the channels to close")
    assert emu.ssh_channels() == 0
    assert settle_threads() == []
