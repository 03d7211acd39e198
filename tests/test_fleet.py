"""Fleet: fan-out over many sandboxes against the emulator (real sockets, loopback).

The emulator runs sandbox processes on this machine, so "did the remote command stop"
is checked in the local /proc.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path

import pytest
from emu_helpers import alive, opts, settle_threads, wait_until

from sshbridge import CommandResult, SandboxNotRunning, SandboxSSH
from sshbridge._fleet import CANCEL_VAR, Fleet, FleetError, FleetResults, kill_script
from sshbridge.emulator import Emulator


@pytest.fixture(autouse=True)
def _cut_at_expiry(emu: Emulator) -> None:
    # Nothing may lean on a connection outliving its session.
    emu.cut_at_expiry = True


def runs_with_token(token: str) -> bool:
    """True once a local (sandbox) process has ``token`` as its cancel token."""
    needle = f"{CANCEL_VAR}={token}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    return True
    return False


def creates(emu: Emulator) -> int:
    return sum(c.endpoint == "create_session" for c in emu.api_calls)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_two_hundred_sandboxes_each_result_from_its_own_sandbox(emu: Emulator) -> None:
    ids = [emu.create_sandbox() for _ in range(200)]
    nonces = {sid: secrets.token_hex(8) for sid in ids}
    for sid, nonce in nonces.items():
        (emu.sandbox_dir(sid) / "nonce").write_text(nonce)
    seen: list[tuple[int, int, str]] = []

    def progress(done: int, total: int, sid: str) -> None:
        seen.append((done, total, sid))

    with Fleet(ids, max_connections=200, **opts(emu)) as fleet:
        # The sandbox identifies itself (a file only it has, its own $HOME): a result
        # filed under the wrong id cannot pass.
        results = fleet.run('cat nonce; echo " ${HOME##*/}"', progress=progress)
        assert isinstance(results, FleetResults)
        assert list(results) == ids
        assert results.ok and not results.errors
        for sid in ids:
            assert results[sid].result is not None
            assert results[sid].result.stdout == f"{nonces[sid]} {sid}\n"
        assert [d for d, _, _ in seen] == list(range(1, 201))
        assert {s for _, _, s in seen} == set(ids) and {t for _, t, _ in seen} == {200}
        assert creates(emu) == 200
        assert len(fleet.connected) == 200

        # Kept open: per-sandbox commands reuse the 200 sessions.
        per_sid = fleet.run(lambda sid: ["echo", sid])
        assert all(per_sid[s].result.stdout == f"{s}\n" for s in ids)  # type: ignore[union-attr]
        subset = {sid: f"exit {i}" for i, sid in enumerate(ids[:5])}
        codes = fleet.run(subset)
        assert list(codes) == ids[:5]
        assert [codes[s].result.exit_code for s in ids[:5]] == [0, 1, 2, 3, 4]  # type: ignore[union-attr]
        assert not codes.ok and set(codes.failed) == set(ids[1:5]) and not codes.errors
        assert creates(emu) == 200
    assert emu.open_sessions() == []
    assert settle_threads() == []


@pytest.mark.contracts
@pytest.mark.timeout(60)
def test_max_connections_bounds_open_sessions_at_every_instant(emu: Emulator) -> None:
    ids = [emu.create_sandbox() for _ in range(24)]
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, len(emu.open_sessions()))
            time.sleep(0.005)  # the sampling rate of the watcher, not a wait

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with Fleet(ids, max_connections=5, **opts(emu)) as fleet:
            first = fleet.run("sleep 0.1; echo ok")
            second = fleet.run("echo again")
    finally:
        stop.set()
        watcher.join()
    assert first.ok and second.ok
    assert all(r.result.stdout == "again\n" for r in second.values())  # type: ignore[union-attr]
    assert 1 <= peak <= 5
    # 24 members through 5 slots: least recently used idle members were closed for room.
    assert creates(emu) >= 48 - 5


@pytest.mark.contracts
@pytest.mark.timeout(60)
def test_member_stopped_mid_batch_reports_typed_error_others_finish(emu: Emulator) -> None:
    ids = [emu.create_sandbox() for _ in range(12)]
    victim = ids[4]

    def stop_victim() -> None:
        wait_until((emu.sandbox_dir(victim) / "started").exists, what="the victim's command")
        emu.set_status(victim, "TERMINATED")

    stopper = threading.Thread(target=stop_victim)
    stopper.start()
    with Fleet(ids, **opts(emu)) as fleet:
        results = fleet.run("touch started; sleep 1.5; echo done")
        stopper.join()
        error = results[victim].error
        assert isinstance(error, SandboxNotRunning)
        assert error.sandbox_id == victim and error.status == "TERMINATED"
        assert not results[victim].ok
        for sid in ids:
            if sid != victim:
                assert results[sid].ok, results[sid]
                assert results[sid].result.stdout == "done\n"  # type: ignore[union-attr]
        # The failed member released its session, thread and slot at once.
        assert victim not in fleet.connected
        assert emu.open_sessions(victim) == []

        with pytest.raises(FleetError) as caught:
            fleet.run("echo again", raise_on_error=True)
        assert set(caught.value.errors) == {victim}
        assert isinstance(caught.value.errors[victim], SandboxNotRunning)
        assert len(caught.value.results) == 12 and len(caught.value.results.succeeded) == 11
    assert settle_threads() == []


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_members_renew_during_a_long_batch(emu: Emulator) -> None:
    ids = [emu.create_sandbox() for _ in range(8)]

    def work(shell: SandboxSSH) -> tuple[int, int, float]:
        # ~9 s of back-to-back commands on 5 s sessions that the emulator cuts at expiry.
        end = time.monotonic() + 9
        n = 0
        last = time.monotonic()
        gap = 0.0
        while time.monotonic() < end:
            n += 1
            r = shell.run(["echo", str(n)])
            assert r.stdout == f"{n}\n", r
            now = time.monotonic()
            gap, last = max(gap, now - last), now
            time.sleep(0.05)  # pacing: ~9 s of commands spread over the renewals
        return n, shell.renewals, gap

    # connect_timeout=5: a close that lands during a renewal's connect otherwise leaves
    # that renewal retrying a DELETEd session's port for the default 30 s (core race).
    with Fleet(ids, ttl_seconds=5, connect_timeout=5, **opts(emu)) as fleet:
        results = fleet.map(work, raise_on_error=True)
        for sid in ids:
            count, renewals, gap = results[sid].unwrap()
            # Commands kept coming through every renewal (how many depends on the
            # machine's load; no renewal held them up for a session's length).
            assert count >= 10 and gap < 5, (sid, count, gap)
            assert renewals >= 2, (sid, renewals)
        assert fleet.run("echo still", raise_on_error=True).ok
    for sid in ids:
        posts = [c for c in emu.api_calls if c.sandbox_id == sid and c.endpoint == "create_session"]
        assert 3 <= len(posts) <= 20


@pytest.mark.timeout(60)
def test_put_and_get_across_members(emu: Emulator, tmp_path: Path) -> None:
    ids = [emu.create_sandbox() for _ in range(10)]
    local = tmp_path / "payload.bin"
    payload = os.urandom(300_000)
    local.write_bytes(payload)
    local.chmod(0o640)
    with Fleet(ids, max_connections=4, keep_open=False, **opts(emu)) as fleet:
        put = fleet.put(local, "payload.bin", raise_on_error=True)
        assert all(r.result == "payload.bin" for r in put.values())
        for sid in ids:
            assert (emu.sandbox_dir(sid) / "payload.bin").read_bytes() == payload
            (emu.sandbox_dir(sid) / "who").write_text(sid)

        per = fleet.put(lambda sid: local, lambda sid: f"copy-{sid[-4:]}.bin")
        assert all((emu.sandbox_dir(s) / f"copy-{s[-4:]}.bin").exists() for s in per)

        got = fleet.get("who", tmp_path / "out" / "{sid}.txt", raise_on_error=True)
        for sid in ids:
            assert got[sid].result == tmp_path / "out" / f"{sid}.txt"
            assert (tmp_path / "out" / f"{sid}.txt").read_text() == sid

        into_dirs = fleet.get("payload.bin", tmp_path / "dirs")
        for sid in ids:
            path = tmp_path / "dirs" / sid / "payload.bin"
            assert into_dirs[sid].result == path and path.read_bytes() == payload
            assert path.stat().st_mode & 0o777 == 0o640

        missing = fleet.get("nope.txt", tmp_path / "x" / "{sid}")
        assert len(missing.errors) == 10
        assert all(isinstance(e, OSError) for e in missing.errors.values())
        # keep_open=False: nothing stays connected between batches.
        assert fleet.connected == []
        assert emu.open_sessions() == []


def test_bad_input_fails_before_any_request(emu: Emulator, tmp_path: Path) -> None:
    ids = [emu.create_sandbox() for _ in range(3)]
    with Fleet(ids, **opts(emu)) as fleet:
        with pytest.raises(ValueError):
            fleet.run({"sbx_not_a_member": "true"})
        with pytest.raises(ValueError):
            fleet.run(lambda sid: "" if sid == ids[1] else "true")
        with pytest.raises(ValueError):
            fleet.put(tmp_path / "missing", "x")
        with pytest.raises(ValueError):
            fleet.get("x", "out/{name}")
    with pytest.raises(ValueError):
        Fleet([ids[0], ids[0]], **opts(emu))
    with pytest.raises(ValueError):
        Fleet(ids, max_connections=0, **opts(emu))
    assert emu.api_calls == []


@pytest.mark.timeout(60)
def test_interrupt_stops_running_commands_and_leaks_nothing(emu: Emulator) -> None:
    ids = [emu.create_sandbox() for _ in range(6)]
    quick, slow = ids[0], ids[1:]

    def command(sid: str) -> str:
        if sid == quick:
            return "sleep 0.5"
        return "echo $$ > top.pid; sleep 300 & echo $! > child.pid; wait"

    def interrupt(done: int, total: int, sid: str) -> None:
        raise KeyboardInterrupt

    pid_files = [emu.sandbox_dir(s) / name for s in slow for name in ("top.pid", "child.pid")]
    start = time.monotonic()
    with Fleet(ids, **opts(emu)) as fleet:
        with pytest.raises(KeyboardInterrupt):
            fleet.run(command, progress=interrupt)
        wait_until(lambda: all(p.exists() for p in pid_files), what="the pid files")
        pids = [int(p.read_text()) for p in pid_files]
        wait_until(lambda: not any(alive(p) for p in pids), timeout=5, what="the commands to end")
    assert time.monotonic() - start < 20
    assert emu.open_sessions() == []
    assert settle_threads() == []


def test_kill_script_stops_its_target_and_never_itself(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    with SandboxSSH(sid, **opts(emu)) as shell:
        with pytest.raises(ValueError):
            kill_script("a; rm -rf /")
        # The token reaches the command's environment.
        env = shell.run("env", env={CANCEL_VAR: "zz"})
        assert f"{CANCEL_VAR}=zz" in env.stdout
        victim: list[CommandResult] = []
        runner = threading.Thread(
            target=lambda: victim.append(
                shell.run("while true; do sleep 1; done", env={CANCEL_VAR: "tok1"})
            )
        )
        runner.start()
        wait_until(lambda: runs_with_token("tok1"), what="the victim to run")
        started = time.monotonic()
        killer = shell.run(kill_script("tok1"))
        runner.join(10)
        assert killer.ok, killer  # it ran to its end: it did not kill itself
        assert victim and not victim[0].ok
        assert time.monotonic() - started < 5


@pytest.mark.contracts
@pytest.mark.timeout(90)
def test_dask_executor_spreads_members_across_workers(emu: Emulator, tmp_path: Path) -> None:
    try:
        import dask
        import distributed
    except ImportError:
        if os.environ.get("CI"):
            raise  # CI must run the executor path
        pytest.skip("dask.distributed is not installed (pip install 'dask[distributed]')")
    ids = [emu.create_sandbox() for _ in range(24)]
    for sid in ids:
        (emu.sandbox_dir(sid) / "who").write_text(sid)
    stopped = ids[7]
    emu.set_status(stopped, "TERMINATED")
    local = tmp_path / "in.txt"
    local.write_text("shipped\n")
    # CPython before 3.11.9 / 3.12.3 can deadlock a whole worker when the dask profiler's
    # sys._current_frames() triggers a collection that frees a threading.local
    # (gh-106883; tenacity's Retrying holds one). Seen here as a task hung forever.
    profiler_safe = sys.version_info >= (3, 12, 3) or (3, 11, 9) <= sys.version_info < (3, 12)
    with (
        dask.config.set({"distributed.worker.profile.enabled": profiler_safe}),
        distributed.LocalCluster(
            processes=True,
            n_workers=2,
            threads_per_worker=2,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
        Fleet(ids, executor=client.get_executor(), max_connections=8, **opts(emu)) as fleet,
    ):
        results = fleet.run("cat who")
        for sid in ids:
            if sid == stopped:
                continue
            assert results[sid].ok, results[sid]
            assert isinstance(results[sid].result, CommandResult)
            assert results[sid].result.stdout == sid  # type: ignore[union-attr]
        # Errors come back typed, with their fields, across the process boundary.
        error = results[stopped].error
        assert isinstance(error, SandboxNotRunning)
        assert error.sandbox_id == stopped and error.status == "TERMINATED"

        pids = fleet.map(lambda shell: os.getpid())
        worker_pids = {r.result for r in pids.values() if r.ok}
        assert len(worker_pids) == 2 and os.getpid() not in worker_pids

        put = fleet.put(local, "in.txt", sandboxes=ids[:4], raise_on_error=True)
        assert all((emu.sandbox_dir(s) / "in.txt").read_text() == "shipped\n" for s in put)
        got = fleet.get("in.txt", tmp_path / "got" / "{sid}", sandboxes=ids[:4])
        assert all(Path(r.unwrap()).read_text() == "shipped\n" for r in got.values())
        # Each task opened and closed its own session on its worker.
        assert emu.open_sessions() == []
