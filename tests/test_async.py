"""AsyncSandboxSSH and AsyncFleet against the emulator: calls, cancellation, cleanup.

Sandbox processes run on this machine under the emulator, so whether a cancelled command
really stopped is checked in the local /proc.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from pathlib import Path

import pytest
from emu_helpers import alive, opts, settle_threads, wait_until

from sshbridge import CommandTimeout, SandboxNotRunning
from sshbridge._async import AsyncFleet, AsyncSandboxSSH
from sshbridge.emulator import Emulator

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _cut_at_expiry(emu: Emulator) -> None:
    # Nothing may lean on a connection outliving its session.
    emu.cut_at_expiry = True


async def appear(*paths: Path, timeout: float = 10.0) -> list[int]:
    """The pids written to ``paths``, once all are there (polled off the event loop)."""
    await asyncio.to_thread(
        wait_until,
        lambda: all(p.exists() and p.read_text().strip() for p in paths),
        timeout,
        f"{paths} to appear",
    )
    return [int(p.read_text()) for p in paths]


@pytest.mark.contracts
def test_run_put_get_and_files(emu: Emulator, tmp_path: Path) -> None:
    sid = emu.create_sandbox()
    local = tmp_path / "up.bin"
    local.write_bytes(os.urandom(100_000))

    async def main() -> None:
        async with AsyncSandboxSSH(sid, **opts(emu)) as shell:
            assert shell.session is not None
            r = await shell.run("echo out; echo err >&2; exit 3", env={"A": "1"})
            assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 3)
            assert (await shell.run(["printf", "%s", "a b"])).stdout == "a b"
            # Many calls at once over one connection, from one event loop.
            many = await asyncio.gather(*(shell.run(f"echo {i}") for i in range(40)))
            assert [m.stdout for m in many] == [f"{i}\n" for i in range(40)]

            seen: list[int] = []
            assert await shell.put(local, "up.bin", callback=lambda d, t: seen.append(d)) == (
                "up.bin"
            )
            assert seen and seen[-1] == 100_000
            back = await shell.get("up.bin", tmp_path / "back.bin")
            assert back.read_bytes() == local.read_bytes()
            await shell.write_text("notes.txt", "hello")
            assert await shell.read_text("notes.txt") == "hello"
            assert "notes.txt" in await shell.listdir(".")
            assert await shell.exists("notes.txt")
            await shell.remove("notes.txt")
            assert not await shell.exists("notes.txt")

            job = await shell.spawn("echo from-job; exit 4")
            result = await job.wait(timeout=10)
            assert (result.exit_code, result.stdout) == (4, "from-job\n")
            slow = await shell.spawn("sleep 30")
            with pytest.raises(CommandTimeout):
                await slow.wait(timeout=0.3)
            await slow.kill()
            assert (await slow.wait(timeout=10)).exit_code != 0
        assert shell.closed

    asyncio.run(main())
    assert emu.open_sessions() == []
    assert settle_threads() == []


@pytest.mark.parametrize(
    "command",
    [
        # a child in the background, the shell waiting on it
        "echo $$ > top.pid; sleep 300 & echo $! > child.pid; wait",
        # a shell loop: the shell itself must die, not just its current child
        "echo $$ > top.pid; while true; do sleep 1; done",
        # the command replaces the shell
        "echo $$ > top.pid; exec sleep 300",
        # busy printing
        "echo $$ > top.pid; while true; do echo tick; sleep 0.01; done",
    ],
)
def test_cancel_stops_the_remote_process(emu: Emulator, command: str) -> None:
    sid = emu.create_sandbox()
    top = emu.sandbox_dir(sid) / "top.pid"

    async def main() -> None:
        async with AsyncSandboxSSH(sid, **opts(emu)) as shell:
            task = asyncio.ensure_future(shell.run(command))
            [pid] = await appear(top)
            children = [top.parent / "child.pid"] if "child.pid" in command else []
            pids = [pid, *(await appear(*children))]
            await asyncio.sleep(0.2)  # the behaviour: cancel a command that has run a while
            assert all(alive(p) for p in pids)
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The await returns once the remote side is stopped, not before.
            assert time.monotonic() - started < 10
            assert not any(alive(p) for p in pids), pids
            # The shell stays usable after a cancellation.
            assert (await shell.run("echo ok")).stdout == "ok\n"

    asyncio.run(main())
    assert emu.open_sessions() == []
    assert settle_threads() == []


def test_wait_for_timeout_and_cancel_on_close(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    d = emu.sandbox_dir(sid)

    async def main() -> None:
        async with AsyncSandboxSSH(sid, **opts(emu)) as shell:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(shell.run("echo $$ > a.pid; exec sleep 300"), 1.0)
            [pid] = await appear(d / "a.pid")
            assert not alive(pid)

        # Leaving the block while a task still runs a command: the task fails, the
        # session is closed, nothing is left behind.
        shell = AsyncSandboxSSH(sid, **opts(emu))
        await shell.connect()
        task = asyncio.ensure_future(shell.run("echo $$ > b.pid; exec sleep 300"))
        [pid] = await appear(d / "b.pid")
        await shell.close()
        with pytest.raises(Exception):  # noqa: B017 - the connection was closed under it
            await task
        assert emu.open_sessions() == []

    asyncio.run(main())
    assert settle_threads() == []


def test_cancelled_upload_leaves_target_untouched(emu: Emulator, tmp_path: Path) -> None:
    sid = emu.create_sandbox()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 * 1024 * 1024))
    (emu.sandbox_dir(sid) / "big.bin").write_bytes(b"old")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with AsyncSandboxSSH(sid, **opts(emu)) as shell:
            task: asyncio.Future[str] | None = None

            def on_chunk(done: int, total: int) -> None:
                if task is not None and done < total:
                    loop.call_soon_threadsafe(task.cancel)

            task = asyncio.ensure_future(shell.put(big, "big.bin", callback=on_chunk))
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (emu.sandbox_dir(sid) / "big.bin").read_bytes() == b"old"
            assert [p.name for p in emu.sandbox_dir(sid).iterdir() if ".part" in p.name] == []

    asyncio.run(main())


@pytest.mark.contracts
def test_async_fleet_run_errors_and_cancel(emu: Emulator) -> None:
    ids = [emu.create_sandbox() for _ in range(40)]
    stopped = ids[3]
    emu.set_status(stopped, "TERMINATED")
    progress: list[int] = []

    async def main() -> None:
        async with AsyncFleet(ids, max_connections=16, **opts(emu)) as fleet:
            results = await fleet.run(
                'echo "${HOME##*/}"', progress=lambda done, total, sid: progress.append(done)
            )
            assert isinstance(results[stopped].error, SandboxNotRunning)
            for sid in ids:
                if sid != stopped:
                    assert results[sid].unwrap().stdout == f"{sid}\n"
            assert progress == list(range(1, 41))

            live = [s for s in ids if s != stopped]
            batch = asyncio.ensure_future(
                fleet.run("echo $$ > top.pid; exec sleep 300", sandboxes=live)
            )

            # max_connections=16: 16 start, the other 23 wait their turn.
            def started() -> list[str]:
                return [s for s in live if (emu.sandbox_dir(s) / "top.pid").exists()]

            await asyncio.to_thread(
                wait_until, lambda: len(started()) >= 16, 20, "16 members to start", 0.05
            )
            await asyncio.sleep(0.3)  # room for a 17th to start wrongly: none may
            first = started()
            assert len(first) == 16
            pids = await appear(*(emu.sandbox_dir(s) / "top.pid" for s in first))
            batch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await batch
            assert not any(alive(p) for p in pids)
            # Queued members never started.
            assert sorted(started()) == sorted(first)
            # The fleet is still usable.
            again = await fleet.run("true", sandboxes=live)
            assert again.ok
        assert emu.open_sessions() == []

    asyncio.run(main())
    assert settle_threads() == []


def test_async_fleet_over_an_executor_cancels_through_a_fresh_session(emu: Emulator) -> None:
    # The executor path: self-contained tasks, each opening its own session; a cancel
    # reaches the command by its token from a session of its own.
    import concurrent.futures as cf

    ids = [emu.create_sandbox() for _ in range(6)]

    async def main() -> None:
        with cf.ThreadPoolExecutor(6, thread_name_prefix="sshbridge-test-exec") as pool:
            async with AsyncFleet(ids, executor=pool, **opts(emu)) as fleet:
                results = await fleet.run('echo "${HOME##*/}"', raise_on_error=True)
                assert all(results[s].unwrap().stdout == f"{s}\n" for s in ids)
                batch = asyncio.ensure_future(fleet.run("echo $$ > top.pid; exec sleep 300"))
                pids = await appear(*(emu.sandbox_dir(s) / "top.pid" for s in ids))
                await asyncio.sleep(0.2)  # the behaviour: cancel commands that run a while
                batch.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await batch
                assert not any(alive(p) for p in pids)
        assert emu.open_sessions() == []

    asyncio.run(main())
    assert settle_threads() == []


# -- the async surface is the sync one ------------------------------------------------------

# Sync-only on purpose: interactive() takes over this process's terminal.
SYNC_ONLY = {"interactive"}


def _public(cls: type) -> dict[str, object]:
    return {n: v for n, v in vars(cls).items() if not n.startswith("_")}


def _params(sig: inspect.Signature) -> list[tuple[str, object, object, object]]:
    return [(p.name, p.kind, p.default, p.annotation) for p in sig.parameters.values()]


def test_async_surface_matches_sync() -> None:
    from sshbridge import SandboxSSH

    sync = _public(SandboxSSH)
    async_ = _public(AsyncSandboxSSH)
    missing = set(sync) - set(async_) - SYNC_ONLY
    assert not missing, f"AsyncSandboxSSH lacks {sorted(missing)}"
    for name, member in sync.items():
        if name in SYNC_ONLY:
            continue
        mirror = async_[name]
        if isinstance(member, property):
            assert isinstance(mirror, property), name
            continue
        if isinstance(member, classmethod):
            assert isinstance(mirror, classmethod), name
            got_cm = _params(inspect.signature(getattr(AsyncSandboxSSH, name)))
            assert got_cm == _params(inspect.signature(getattr(SandboxSSH, name))), name
            continue
        assert callable(member), name
        want = inspect.signature(member)
        want = want.replace(parameters=list(want.parameters.values())[1:])
        sig = getattr(mirror, "signature", None)
        if sig is None:  # written out by hand: the same parameters all the same
            got = inspect.signature(mirror)  # type: ignore[arg-type]
            sig = got.replace(parameters=list(got.parameters.values())[1:])
        assert _params(sig) == _params(want), name


def test_async_surface_methods_are_coroutines(emu: Emulator, tmp_path: Path) -> None:
    sandbox = emu.create_sandbox()
    local = tmp_path / "tree"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "a.txt").write_text("alpha")

    async def main() -> None:
        async with AsyncSandboxSSH(sandbox, **opts(emu)) as shell:
            assert inspect.signature(shell.put_dir).parameters.keys() == inspect.signature(
                shell.blocking.put_dir
            ).parameters.keys()
            await shell.put_dir(local, "/tmp/tree")
            back = await shell.get_dir("/tmp/tree", tmp_path / "back")
            assert (tmp_path / "back" / "sub" / "a.txt").read_text() == "alpha"
            assert back
            async with await shell.open("/tmp/tree/sub/a.txt", "rb") as fh:
                assert await fh.read() == b"alpha"
            assert await shell.write_text("/tmp/x.txt", "x") == "/tmp/x.txt"
            assert (await shell.sandbox()).id == sandbox
            await shell.run("python3 -m http.server --help >/dev/null 2>&1 || true")

    asyncio.run(main())
