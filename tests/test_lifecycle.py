"""Session lifecycle against the emulator: renewal, drain, durable jobs, faults, cleanup.

Short TTLs make sessions expire within seconds; the emulator cuts connections at
``expires_at`` so nothing can lean on a session outliving its life.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from emu_helpers import library_threads, settle_threads

from sshbridge import (
    CommandTimeout,
    SandboxNotRunning,
    SandboxSSH,
    SessionExpired,
    SSHSession,
)
from sshbridge._lifecycle import default_renew_before
from sshbridge._link import utcnow
from sshbridge.emulator import Emulator

pytestmark = [pytest.mark.timeout(150), pytest.mark.contracts]


@pytest.fixture(autouse=True)
def _cut_at_expiry(emu: Emulator) -> None:
    # Nothing may lean on a connection outliving its session.
    emu.cut_at_expiry = True


def connect(emu: Emulator, sandbox_id: str, **kw: object) -> SandboxSSH:
    return SandboxSSH(sandbox_id, api_key=emu.api_key, base_url=emu.base_url, **kw)  # type: ignore[arg-type]


def max_posts_in_window(emu: Emulator, sandbox_id: str, window: float = 60.0) -> int:
    times = sorted(
        c.time
        for c in emu.api_calls
        if c.sandbox_id == sandbox_id and c.endpoint == "create_session"
    )
    best = 0
    for i, t in enumerate(times):
        best = max(best, len([u for u in times[i:] if u < t + window]))
    return best


class Hammer:
    """Threads running short commands until stopped; counts successes and failures."""

    def __init__(self, shell: SandboxSSH, threads: int) -> None:
        self.shell = shell
        self.ok = 0
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(threads)
        ]

    def _work(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                r = self.shell.run(f"echo {i}-{n}")
                assert r.stdout == f"{i}-{n}\n", r
                with self._lock:
                    self.ok += 1
            except BaseException as exc:  # noqa: BLE001
                with self._lock:
                    self.failures.append(exc)
            time.sleep(0.01)

    def __enter__(self) -> Hammer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_default_margin_scales_with_ttl() -> None:
    assert default_renew_before(8) == pytest.approx(3.2)
    assert default_renew_before(900) == 300
    assert default_renew_before(3600) == 300
    # Renewing every 0.6 * TTL keeps a 6 s TTL at 16.7 sessions a minute, under 20.
    assert 60 / (6 - default_renew_before(6)) < 20


@pytest.mark.slow
@pytest.mark.one_contract
def test_soak_renewals_under_load(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    renewed: list[tuple[str, str]] = []

    def on_renew(old: SSHSession, new: SSHSession) -> None:
        renewed.append((old.session_id, new.session_id))

    start = time.monotonic()
    with connect(emu, sandbox, ttl_seconds=6, on_renew=on_renew) as shell:
        with Hammer(shell, threads=4) as hammer:
            time.sleep(42)
        assert hammer.failures == []
        assert hammer.ok > 500
        assert shell.renewals >= 10
        assert len(renewed) == shell.renewals
        assert all(old != new for old, new in renewed)
    assert time.monotonic() - start >= 40
    assert emu.open_sessions() == []
    assert max_posts_in_window(emu, sandbox) <= 20
    assert settle_threads() == []


def test_renewal_survives_500_503_and_429(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    with connect(emu, sandbox, ttl_seconds=8) as shell:
        first = shell.session
        assert first is not None
        emu.fail_next(1, 500, endpoint="create_session")
        emu.fail_next(1, 503, retry_after=1, endpoint="create_session")
        emu.fail_next(1, 429, retry_after=1, endpoint="create_session")
        with Hammer(shell, threads=2) as hammer:
            time.sleep(9.5)  # past the first session's expiry
        assert hammer.failures == []
        assert shell.renewals >= 1
        current = shell.session
        assert current is not None and current.session_id != first.session_id
    statuses = [c.status for c in emu.api_calls if c.endpoint == "create_session"]
    assert statuses[:5] == [200, 500, 503, 429, 200]


def test_slow_exposure_during_renewal(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    with connect(emu, sandbox, ttl_seconds=6) as shell:
        emu.exposure_delay = 1.5
        with Hammer(shell, threads=2) as hammer:
            time.sleep(7)
        assert hammer.failures == []
        assert shell.renewals >= 1


def test_running_command_cut_at_expiry_says_session_expired(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    with connect(emu, sandbox, ttl_seconds=2, auto_renew=False) as shell:
        with pytest.raises(SessionExpired) as info:
            shell.run("sleep 6")
        assert "expired" in str(info.value) and "spawn()" in str(info.value)
        assert shell.run("echo after").stdout == "after\n"  # a new session serves new work


def test_drain_lets_running_work_finish_then_closes(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    emu.cut_at_expiry = False
    with connect(emu, sandbox, ttl_seconds=30, renew_before=1) as shell:
        old = shell.session
        assert old is not None
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(shell.run("sleep 1.5; echo done").stdout))
        t.start()
        time.sleep(0.3)
        new = shell.renew()
        assert new.session_id != old.session_id
        assert old.session_id in emu.open_sessions()  # still draining
        assert shell.run("echo new").stdout == "new\n"
        t.join()
        assert out == ["done\n"]
        deadline = time.monotonic() + 3
        while old.session_id in emu.open_sessions() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert old.session_id not in emu.open_sessions()


def test_expiry_without_successor_raises_session_expired_not_hang(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    with connect(emu, sandbox, ttl_seconds=3) as shell:
        shell.run("true")
        emu.fail_next(100, 500, endpoint="create_session")
        time.sleep(3.3)
        start = time.monotonic()
        with pytest.raises(SessionExpired) as info:
            shell.run("true")
        assert time.monotonic() - start < 10
        assert "500" in str(info.value)
        emu.clear_failures()  # the API recovers
        assert shell.run("echo back").stdout == "back\n"


def test_sandbox_stopped_fails_fast(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    with connect(emu, sandbox, ttl_seconds=60) as shell:
        shell.run("true")
        emu.set_status(sandbox, "TERMINATED")
        start = time.monotonic()
        with pytest.raises(SandboxNotRunning) as info:
            shell.run("true")
        assert info.value.status == "TERMINATED"
        assert time.monotonic() - start < 15


def test_connection_cut_while_idle_reconnects(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    with connect(emu, sandbox, ttl_seconds=60) as shell:
        shell.run("true")
        session = shell.session
        assert session is not None
        emu.cut_connections(session.session_id)
        deadline = time.monotonic() + 5
        while emu.ssh_connections(session.session_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shell.run("echo again").stdout == "again\n"
        assert shell.reconnects == 1
        same = shell.session
        assert same is not None and same.session_id == session.session_id


def test_sixty_four_concurrent_with_channel_cap(emu: Emulator) -> None:
    emu.max_channels_per_connection = 10
    sandbox = emu.create_sandbox()
    outs: list[str] = []
    with connect(emu, sandbox) as shell:
        def work(i: int) -> None:
            outs.append(shell.run(f"sleep 0.2; echo {i}").stdout)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(outs) == sorted(f"{i}\n" for i in range(64))


# -- durable jobs ----------------------------------------------------------------------------


def test_durable_job_across_renewals_and_reattach(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    script = "for i in $(seq 1 40); do echo line $i; echo err $i >&2; sleep 0.2; done; exit 3"
    expected = "".join(f"line {i}\n" for i in range(1, 41))
    with connect(emu, sandbox, ttl_seconds=3) as shell:
        job = shell.spawn(script, env={"X": "1"})
        streamed = "".join(job.stream())
        result = job.wait(timeout=30)
        assert shell.renewals >= 3
        assert result.exit_code == 3
        assert result.stdout == expected  # full, once
        assert result.stderr == "".join(f"err {i}\n" for i in range(1, 41))
        assert streamed == expected
        job_id = job.id
    with connect(emu, sandbox) as other:
        again = other.job(job_id)
        assert again.poll() == 3
        assert again.wait().stdout == expected


def test_job_kill_and_wait_timeout(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    with connect(emu, sandbox) as shell:
        job = shell.spawn("echo started; sleep 60")
        with pytest.raises(CommandTimeout):
            job.wait(timeout=0.5)
        assert job.poll() is None
        job.kill()
        result = job.wait(timeout=10)
        assert result.exit_code != 0 and result.stdout == "started\n"


def test_job_survives_the_session_that_started_it(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    with connect(emu, sandbox) as shell:
        job = shell.spawn(["sh", "-c", "sleep 1; echo finished"])
    with connect(emu, sandbox) as later:
        assert later.job(job.id).wait(timeout=10).stdout == "finished\n"


# -- cleanup --------------------------------------------------------------------------------


def test_no_thread_survives_exit(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    with connect(emu, sandbox, ttl_seconds=4) as shell:
        shell.run("true")
        assert library_threads() != []
    assert settle_threads() == []


def test_ctrl_c_in_a_real_process_leaves_nothing_open(emu: Emulator, tmp_path: Path) -> None:
    sandbox = emu.create_sandbox()
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, threading, time
            from sshbridge import SandboxSSH
            with SandboxSSH({sandbox!r}) as shell:
                print("ready", flush=True)
                while True:
                    shell.run("sleep 0.3")
            """
        )
    )
    env = {**os.environ, **emu.env()}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.5)
        assert emu.open_sessions(sandbox) != []
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert emu.open_sessions(sandbox) == []
    deadline = time.monotonic() + 5
    while emu.ssh_connections() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emu.ssh_connections() == 0


def test_unclosed_objects_close_when_collected_and_at_exit(emu: Emulator, tmp_path: Path) -> None:
    import gc

    sandbox = emu.create_sandbox()
    shell = connect(emu, sandbox)
    shell.run("true")
    assert emu.open_sessions(sandbox) != []
    del shell
    gc.collect()
    assert emu.open_sessions(sandbox) == []
    assert settle_threads() == []

    script = tmp_path / "forgets.py"
    script.write_text(
        "from sshbridge import SandboxSSH\n"
        f"shell = SandboxSSH({sandbox!r})\n"
        "shell.run('true')\n"
        "print('ran', flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, **emu.env()},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == b"ran"
    assert emu.open_sessions(sandbox) == []


def test_commands_outlive_their_session_on_a_server_that_does_not_cut(emu: Emulator) -> None:
    """The session expires mid-command; the server keeps the connection, so the command
    finishes and its result arrives, with and without background renewal."""
    emu.cut_at_expiry = False
    sandbox = emu.create_sandbox()
    with connect(emu, sandbox, ttl_seconds=2) as shell:
        first = shell.session
        assert first is not None
        r = shell.run("sleep 3; echo done", timeout=30)
        assert (r.exit_code, r.stdout) == (0, "done\n")
        assert shell.renewals >= 1
        assert shell.run("echo new").stdout == "new\n"
        deadline = time.monotonic() + 5
        while first.session_id in emu.open_sessions() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.session_id not in emu.open_sessions()  # DELETEd once drained
    with connect(emu, sandbox, ttl_seconds=2, auto_renew=False) as shell:
        old = shell.session
        assert old is not None
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(shell.run("sleep 3; echo late").stdout))
        t.start()
        while shell.session is not None and not shell.session.expires_at < utcnow():
            time.sleep(0.05)
        # New work after expiry gets a new session; the old command is not cut for it.
        assert shell.run("echo fresh").stdout == "fresh\n"
        t.join(30)
        assert out == ["late\n"]
