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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from emu_helpers import library_threads, pids_with, settle_threads, wait_until

from sshbridge import (
    APIClient,
    APIError,
    CommandTimeout,
    InvalidArgument,
    PinFirstHostKey,
    SandboxNotRunning,
    SandboxSSH,
    SessionExpired,
    SSHSession,
)
from sshbridge._broker import SessionBroker
from sshbridge._lifecycle import SessionManager, State, default_renew_before
from sshbridge._link import Link, utcnow
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
            time.sleep(0.01)  # the load's pace, not a wait

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

    with connect(emu, sandbox, ttl_seconds=6, on_renew=on_renew) as shell:
        with Hammer(shell, threads=4) as hammer:
            time.sleep(42)  # the soak's duration
        assert hammer.failures == []
        assert hammer.ok > 500
        assert shell.renewals >= 10
        assert len(renewed) == shell.renewals
        assert all(old != new for old, new in renewed)
    # Every session minted (the first, one per renewal) was DELETEd, none twice.
    ok = [c for c in emu.api_calls if c.sandbox_id == sandbox and 200 <= c.status < 300]
    posts = [c for c in ok if c.method == "POST" and c.endpoint == "create_session"]
    deletes = [c for c in ok if c.method == "DELETE"]
    assert len(posts) == len(deletes) == len(renewed) + 1
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
            time.sleep(7)  # load past a renewal (6 s TTL), the behaviour under test
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
        wait_until(lambda: pids_with("sleep 1.5; echo done"), 5, "the command to start")
        new = shell.renew()
        assert new.session_id != old.session_id
        assert old.session_id in emu.open_sessions()  # still draining
        assert shell.run("echo new").stdout == "new\n"
        t.join()
        assert out == ["done\n"]
        wait_until(lambda: old.session_id not in emu.open_sessions(), 3, "the drained DELETE")
        assert old.session_id not in emu.open_sessions()


@pytest.mark.one_contract
def test_a_busy_connection_never_looks_closed_to_the_liveness_check() -> None:
    # The drain and reconnect decisions ask whether a link's peer is still there while
    # paramiko's reader thread takes what arrives. The check once peeked at data that
    # reader then took: Python's recv on a socket with a timeout waited for more, timed
    # out, and that was read as "closed", so a running command's connection was cut.
    # Real sockets, a real reader thread and a sender; bounded in count and time.
    import socket as socket_mod
    from types import SimpleNamespace

    from sshbridge._link import _peer_open

    server = socket_mod.create_server(("127.0.0.1", 0))
    ours = socket_mod.create_connection(server.getsockname())
    theirs, _ = server.accept()
    ours.settimeout(0.1)  # as paramiko's transport sets it
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                if not ours.recv(65536):
                    return
            except TimeoutError:
                continue

    def sender() -> None:
        # Bursts farther apart than the socket's timeout: a peek that loses its byte to
        # the reader then waits the whole timeout for the next.
        while not stop.is_set():
            theirs.sendall(b"x")
            stop.wait(0.15)

    threads = [threading.Thread(target=reader), threading.Thread(target=sender)]
    for t in threads:
        t.start()
    try:
        transport = SimpleNamespace(sock=ours)
        end = time.monotonic() + 2.0
        checks = closed = 0
        while time.monotonic() < end:
            checks += 1
            closed += not _peer_open(transport)  # type: ignore[arg-type]
        assert closed == 0, f"{closed} of {checks} checks saw a live connection as closed"
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        for sock in (ours, theirs, server):
            sock.close()
    # And a real close is still seen.
    a = socket_mod.create_server(("127.0.0.1", 0))
    b = socket_mod.create_connection(a.getsockname())
    c, _ = a.accept()
    c.sendall(b"bye")
    c.close()
    time.sleep(0.05)  # the FIN crosses loopback
    try:
        assert not _peer_open(SimpleNamespace(sock=b))  # type: ignore[arg-type]
    finally:
        b.close()
        a.close()


def test_expiry_without_successor_raises_session_expired_not_hang(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    with connect(emu, sandbox, ttl_seconds=3) as shell:
        shell.run("true")
        emu.fail_next(100, 500, endpoint="create_session")
        time.sleep(3.3)  # the behaviour: the 3 s session expires with no successor
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
        wait_until(lambda: not emu.ssh_connections(session.session_id), 5, "the cut")
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
        wait_until(lambda: emu.open_sessions(sandbox) != [], 10, "the client's session")
        assert emu.open_sessions(sandbox) != []
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert emu.open_sessions(sandbox) == []
    wait_until(lambda: emu.ssh_connections() == 0, 5, "the client's connections to close")
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
        wait_until(lambda: first.session_id not in emu.open_sessions(), 5, "the drained DELETE")
        assert first.session_id not in emu.open_sessions()  # DELETEd once drained
    with connect(emu, sandbox, ttl_seconds=2, auto_renew=False) as shell:
        old = shell.session
        assert old is not None
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(shell.run("sleep 3; echo late").stdout))
        t.start()
        wait_until(
            lambda: shell.session is None or shell.session.expires_at < utcnow(),
            10,
            "the session to expire",
            0.05,
        )
        # New work after expiry gets a new session; the old command is not cut for it.
        assert shell.run("echo fresh").stdout == "fresh\n"
        t.join(30)
        assert out == ["late\n"]


# -- the state machine: close() from any state, one connect, one renewal --------------------


class HeldAnswers:
    """A ``session_answer_hook``: lets the first ``free`` session answers through, then
    holds each later one until ``release`` is set (the session exists by then, as when
    an API stalls after doing the work), and sends ``replace`` instead if given."""

    def __init__(self, free: int, replace: bytes | None = None) -> None:
        self.free = free
        self.replace = replace
        self.held = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, answer: dict[str, Any]) -> Any:
        with self._lock:
            if self.free > 0:
                self.free -= 1
                return answer
            self.held += 1
        self.entered.set()
        self.release.wait(60)
        return answer if self.replace is None else self.replace


def manager_for(
    emu: Emulator, sandbox_id: str, *, ttl: int, clock: Callable[[], float] | None = None,
    **kw: Any,
) -> tuple[SessionManager, APIClient]:
    api = APIClient(api_key=emu.api_key, base_url=emu.base_url)
    broker = SessionBroker(
        api,
        sandbox_id,
        ttl_seconds=ttl,
        policy=PinFirstHostKey(),
        connect_timeout=30.0,
        keepalive=15.0,
        max_connections=4,
    )
    return SessionManager(broker, connect_timeout=30.0, clock=clock, **kw), api


def session_posts(emu: Emulator, sandbox_id: str) -> list[int]:
    return [
        c.status
        for c in emu.api_calls
        if c.endpoint == "create_session" and c.sandbox_id == sandbox_id
    ]


def test_close_during_a_connect_to_a_slow_exposure(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    emu.exposure_delay = 120.0  # the exposure does not come up during this test
    shell = connect(emu, sandbox, ttl_seconds=60, connect_timeout=60)
    outcome: list[object] = []

    def connecting() -> None:
        try:
            shell.connect()
            outcome.append("connected")
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    caller = threading.Thread(target=connecting, daemon=True)
    caller.start()
    # The session exists: the connect is in its SSH retry loop now.
    wait_until(lambda: emu.open_sessions(sandbox) != [], 20, "the session POST")
    assert shell._manager.state is State.CONNECTING
    start = time.monotonic()
    shell.close()
    took = time.monotonic() - start
    assert took < 3.0, took
    caller.join(10)
    assert not caller.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], InvalidArgument), outcome
    assert "closed" in str(outcome[0])
    assert shell.closed and shell._manager.state is State.CLOSED
    wait_until(lambda: emu.open_sessions(sandbox) == [], 10, "the session's DELETE")
    assert settle_threads(10) == []
    with pytest.raises(InvalidArgument, match="closed"):
        shell.connect()


@pytest.mark.parametrize("answer", ["late", "never"])
def test_close_during_a_renewal_stuck_in_the_api(emu: Emulator, answer: str) -> None:
    """The renewal's POST hangs. close() returns at once; the renewal thread ends, and
    a session answered after close() is DELETEd by the thread that got it."""
    sandbox = emu.create_sandbox()
    held = HeldAnswers(free=1)
    emu.session_answer_hook = held
    try:
        # "never": the API client's own read timeout ends the stuck POST.
        timeout = (5.0, 30.0) if answer == "late" else (2.0, 2.0)
        shell = connect(emu, sandbox, ttl_seconds=30, renew_before=28, api_timeout=timeout)
        shell.connect()
        first = shell.session
        assert first is not None
        assert held.entered.wait(20), "the background renewal never reached the API"
        assert shell._manager.state is State.RENEWING
        start = time.monotonic()
        shell.close()
        took = time.monotonic() - start
        assert took < 3.0, took
        assert first.session_id not in emu.open_sessions()
        if answer == "late":
            held.release.set()  # the answer arrives after close(): nobody may keep it
            wait_until(lambda: emu.open_sessions(sandbox) == [], 15, "the late session's DELETE")
        assert settle_threads(15) == []
        if answer == "never":
            # The client never got this answer, so it could not close that session.
            stuck = emu.open_sessions(sandbox)
            assert len(stuck) == 1
            emu.close_session(stuck[0])
        assert session_posts(emu, sandbox)[0] == 200
    finally:
        held.release.set()


def test_renew_now_joins_the_background_renewal(emu: Emulator) -> None:
    """Two renew_now() calls during a background renewal make one renewal, not three."""
    sandbox = emu.create_sandbox()
    offset = [0.0]
    held = HeldAnswers(free=1)
    emu.session_answer_hook = held
    manager, api = manager_for(
        emu, sandbox, ttl=120, renew_before=30, clock=lambda: time.monotonic() + offset[0]
    )
    try:
        first = manager.current().session
        offset[0] = 100.0  # the injected clock says the renewal is due
        assert held.entered.wait(20), "the background renewal never started"
        assert manager.state is State.RENEWING
        offset[0] = 0.0  # its successor is then due in ~90 s, not during this test
        results: list[SSHSession] = []
        callers = [
            threading.Thread(target=lambda: results.append(manager.renew_now()), daemon=True)
            for _ in range(2)
        ]
        for t in callers:
            t.start()
        wait_until(
            lambda: manager._pending is not None and manager._pending.waiters >= 2,
            10,
            "both renew_now() calls to wait on the renewal in flight",
        )
        held.release.set()
        for t in callers:
            t.join(30)
        link = manager.link
        assert link is not None and link.session.session_id != first.session_id
        assert [r.session_id for r in results] == [link.session.session_id] * 2
        assert manager.renewals == 1
        assert held.held == 1 and session_posts(emu, sandbox) == [200, 200]
        # With none in flight, renew_now() renews on its own.
        again = manager.renew_now()
        assert again.session_id != link.session.session_id and manager.renewals == 2
    finally:
        held.release.set()
        manager.close()
        api.close()
    assert emu.open_sessions(sandbox) == []
    assert settle_threads() == []


def test_concurrent_callers_share_one_connect_and_its_error(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    held = HeldAnswers(free=0, replace=b"not json")
    emu.session_answer_hook = held
    manager, api = manager_for(emu, sandbox, ttl=60)
    try:
        outcomes: list[object] = []
        lock = threading.Lock()

        def call() -> None:
            try:
                got: object = manager.current()
            except BaseException as exc:  # noqa: BLE001
                got = exc
            with lock:
                outcomes.append(got)

        def burst() -> list[threading.Thread]:
            threads = [threading.Thread(target=call, daemon=True) for _ in range(6)]
            for t in threads:
                t.start()
            return threads

        threads = burst()
        assert held.entered.wait(20)
        wait_until(
            lambda: manager._pending is not None and manager._pending.waiters == 6,
            10,
            "all callers to wait on the one connect",
        )
        held.release.set()
        for t in threads:
            t.join(30)
        # One POST; its error reached every caller.
        assert session_posts(emu, sandbox) == [200]
        assert len(outcomes) == 6 and all(isinstance(o, APIError) for o in outcomes), outcomes
        assert len({id(o) for o in outcomes}) == 1
        for leaked in emu.open_sessions(sandbox):  # an answer the client could not read
            emu.close_session(leaked)

        emu.session_answer_hook = None
        outcomes.clear()
        for t in burst():
            t.join(30)
        assert len({id(o) for o in outcomes}) == 1 and isinstance(outcomes[0], Link)
        assert manager.link is outcomes[0] and manager.state is State.OPEN
        assert session_posts(emu, sandbox) == [200, 200]
    finally:
        held.release.set()
        manager.close()
        api.close()
    assert emu.open_sessions(sandbox) == []
    assert settle_threads() == []
