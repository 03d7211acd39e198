"""Interop: the same library against OpenSSH's sshd, behind the emulator's HTTP API.

The emulator answers sessions with the sshd's host/port and its login user as
``session_id``; authorizing a key appends it to the sshd's authorized_keys file.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SECRET_KEY, running_emulator
from emu_helpers import wait_until
from sshd_server import PreambleFront, SSHDServer, find_sshd, start_sshd

from sshbridge import CommandTimeout, HostKeyMismatch, RemotePathError, SandboxSSH
from sshbridge.emulator import Emulator, OpenSSHTarget

if find_sshd() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the OpenSSH interop tests, but sshd is not installed")
    pytest.skip(
        "OpenSSH sshd is not installed (apt-get install openssh-server)", allow_module_level=True
    )

pytestmark = [pytest.mark.timeout(120), pytest.mark.contracts]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHDServer]:
    server = start_sshd(tmp_path_factory.mktemp("sshd"))  # MaxSessions 10, as shipped
    yield server
    server.stop()


@pytest.fixture
def openssh_emu(sshd: SSHDServer, contract: str) -> Iterator[Emulator]:
    """Contract A: the sshd itself. Contract B: a front that requires the session
    preamble of a live session before a byte reaches the sshd."""
    holder: list[Emulator] = []

    def live(session_id: str) -> bool:
        return any(
            r.wire_session_id == session_id and r.deleted_at is None
            for r in (holder[0].sessions if holder else [])
        )

    with contextlib.ExitStack() as stack:
        host, port = sshd.host, sshd.port
        front: PreambleFront | None = None
        if contract == "vm":
            front = stack.enter_context(PreambleFront((sshd.host, sshd.port), live))
            host, port = front.host, front.port
        target = OpenSSHTarget(host, port, sshd.username, sshd.authorized_keys_file)
        emulator = stack.enter_context(
            running_emulator(api_key=SECRET_KEY, openssh=target, contract=contract)
        )
        holder.append(emulator)
        yield emulator
        assert emulator.open_sessions() == []
        if front is not None:
            assert front.accepted >= 1 and front.rejected == 0


@pytest.fixture
def shell(openssh_emu: Emulator) -> Iterator[SandboxSSH]:
    sandbox = openssh_emu.create_sandbox()
    with SandboxSSH(sandbox, api_key=openssh_emu.api_key, base_url=openssh_emu.base_url) as s:
        yield s


def test_run_and_argv(shell: SandboxSSH, sshd: SSHDServer) -> None:
    r = shell.run("echo $HOME; echo err >&2; exit 4")
    assert (r.exit_code, r.stdout, r.stderr) == (4, f"{sshd.home}\n", "err\n")
    tricky = ["a b", "it's", "$HOME", "ü"]
    assert shell.run(["printf", "%s|", *tricky]).stdout == "|".join(tricky) + "|"
    r = shell.run('pwd; echo "$X"', cwd="/tmp", env={"X": "y z"}, input="ignored")
    assert r.stdout == "/tmp\ny z\n"
    assert shell.run("cat", input="round trip").stdout == "round trip"


def test_large_output_on_both_streams(shell: SandboxSSH) -> None:
    n = 50 * 1024 * 1024
    r = shell.run(f"head -c {n} /dev/zero; head -c {n} /dev/zero >&2")
    assert len(r.stdout_bytes) == n and len(r.stderr_bytes) == n and r.ok


def test_sixty_four_concurrent_past_maxsessions(shell: SandboxSSH) -> None:
    outs: list[str] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            outs.append(shell.run(f"sleep 0.2; echo {i}").stdout)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(outs) == sorted(f"{i}\n" for i in range(64))


def test_fast_commands_with_eof_do_not_drop_the_connection(shell: SandboxSSH) -> None:
    # sshd drops the whole connection on an EOF for a freed channel; many fast commands
    # from several threads are where that race shows.
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(40):
                assert shell.run("true").ok
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert shell.reconnects == 0


def test_timeout_kills_remote_process(shell: SandboxSSH) -> None:
    with pytest.raises(CommandTimeout):
        shell.run("sleep 27.1828", timeout=0.5)
    wait_until(
        lambda: shell.run("ps -eo args | grep -c '^sleep 27.1828'").stdout.strip() == "0",
        timeout=5,
        what="the timed-out command's process to end",
        interval=0.1,
    )
    assert shell.run("ps -eo args | grep -c '^sleep 27.1828'").stdout.strip() == "0"


def test_sftp_round_trip_and_atomicity(shell: SandboxSSH, tmp_path: Path) -> None:
    remote_dir = str(tmp_path / "remote dir ü")
    shell.makedirs(remote_dir)
    for size in (0, 1, 1_000_003, 5 * 1024 * 1024 + 1):
        data = os.urandom(size)
        local = tmp_path / "in.bin"
        local.write_bytes(data)
        target = shell.put(local, remote_dir + "/it's.bin")
        assert Path(target).read_bytes() == data
        assert shell.get(target, tmp_path / "out.bin").read_bytes() == data

    def fail(done: int, total: int) -> None:
        if done > 1024 * 1024:
            raise RuntimeError("stop")

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(4 * 1024 * 1024))
    with pytest.raises(RuntimeError):
        shell.put(big, remote_dir + "/it's.bin", callback=fail)
    assert Path(remote_dir, "it's.bin").stat().st_size == 5 * 1024 * 1024 + 1
    assert [n for n in os.listdir(remote_dir) if n.endswith(".part")] == []
    with pytest.raises(RemotePathError, match="no/such"):
        shell.get("/no/such/file", tmp_path / "x")


def test_host_key_pinned_against_a_different_server(
    openssh_emu: Emulator, sshd: SSHDServer, tmp_path: Path, contract: str
) -> None:
    other = start_sshd(tmp_path / "other")
    with contextlib.ExitStack() as stack:
        stack.callback(other.stop)
        host, port = other.host, other.port
        if contract == "vm":
            front = stack.enter_context(PreambleFront((other.host, other.port), lambda _: True))
            host, port = front.host, front.port
        sandbox = openssh_emu.create_sandbox()
        with SandboxSSH(
            sandbox, api_key=openssh_emu.api_key, base_url=openssh_emu.base_url, ttl_seconds=1
        ) as shell:
            shell.run("true")
            # The sandbox's next session is served by a server with another host key.
            openssh_emu.openssh = OpenSSHTarget(
                host, port, other.username, other.authorized_keys_file
            )
            time.sleep(1.2)  # the behaviour: the 1 s session expires, the next is new
            with pytest.raises(HostKeyMismatch) as info:
                shell.run("true")
            assert "pinned" in str(info.value)


def test_durable_job_and_renewal_on_openssh(openssh_emu: Emulator) -> None:
    sandbox = openssh_emu.create_sandbox()
    with SandboxSSH(
        sandbox, api_key=openssh_emu.api_key, base_url=openssh_emu.base_url, ttl_seconds=3
    ) as shell:
        job = shell.spawn("for i in 1 2 3 4 5 6 7 8; do echo $i; sleep 0.5; done; exit 5")
        outs = []
        while job.poll() is None:
            outs.append(shell.run("echo tick").stdout)
            time.sleep(0.1)  # pacing: other commands run alongside the job, not a wait
        result = job.wait()
        assert result.exit_code == 5
        assert result.stdout == "".join(f"{i}\n" for i in range(1, 9))
        assert shell.renewals >= 1
        assert set(outs) == {"tick\n"}
        assert shell.job(job.id).wait().stdout == result.stdout
