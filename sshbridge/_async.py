"""asyncio front ends: ``AsyncSandboxSSH`` and ``AsyncFleet``.

No second protocol implementation: every call runs the synchronous :class:`SandboxSSH`
method in a worker thread owned by the object (so closing it leaves no thread behind).

Cancellation: a cancelled ``await shell.run(...)`` stops the remote command before it
re-raises ``CancelledError``. Each command carries a token (``_cancel``); on cancel a
second channel runs the one kill script through ``_runner.stop_remote``, the same path as
a ``run()`` timeout (TERM, a short grace, KILL, whole process trees), and the await only
returns once the worker thread has finished. A cancelled transfer is aborted at its next
chunk (the atomic put/get leave nothing behind).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import functools
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import paramiko

from ._exceptions import CommandTimeout, InvalidArgument
from ._fleet import (
    DEFAULT_MAX_CONNECTIONS,
    Commands,
    Fleet,
    FleetResult,
    FleetResults,
    PathArg,
    ProgressArg,
    _check_progress,
    _Control,
    _kill_on,
    _MapOp,
    _Op,
    _Outcome,
    _Progress,
)
from ._jobs import Job, JobStatus, check_interval
from ._result import CommandResult
from ._runner import build_command, check_timeout
from ._sandbox import SandboxSSH

log = logging.getLogger("sshbridge.async")

T = TypeVar("T")


def _consume(fut: asyncio.Future[Any]) -> None:
    # A result nobody awaits any more (the caller was cancelled) must not be logged as
    # "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


async def _finish_in_thread(fn: Callable[[], object]) -> None:
    """Run blocking cleanup in a thread of its own and wait for it, even if cancelled
    again meanwhile: the worker pool may be full, and the cleanup must finish."""
    done: cf.Future[None] = cf.Future()

    def target() -> None:
        try:
            fn()
        except Exception:
            log.debug("cancel cleanup failed", exc_info=True)
        finally:
            done.set_result(None)

    threading.Thread(target=target, name="sshbridge-async-cancel", daemon=True).start()
    waiter = asyncio.wrap_future(done)
    while not waiter.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(waiter)


async def _await_call(fut: cf.Future[T], ctl: _Control | None) -> T:
    """Await a worker-thread call; on cancellation stop it (kill its remote command when
    ``ctl`` allows it) and wait until the thread is done, then re-raise."""
    wrapped = asyncio.wrap_future(fut)
    wrapped.add_done_callback(_consume)
    try:
        return await asyncio.shield(wrapped)
    except asyncio.CancelledError:
        if fut.cancel():
            raise  # it never started
        if ctl is not None:
            await _finish_in_thread(functools.partial(ctl.stop, fut))
        else:
            # Not killable (a short SFTP or API call): let it end before we report.
            await _finish_in_thread(functools.partial(cf.wait, [fut]))
        raise


async def _wait_all(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Wait for every task, whatever cancellations arrive meanwhile."""
    while not all(t.done() for t in tasks):
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait(tasks)


class AsyncSandboxSSH:
    """``SandboxSSH`` for asyncio code::

        async with AsyncSandboxSSH("sbx_123", ttl_seconds=900) as shell:
            r = await shell.run("python -V")
            await shell.put("data.tar", "/workspace/")
            job = await shell.spawn("python train.py")

    Options are those of :class:`SandboxSSH`. ``max_workers`` bounds the calls running at
    once (each holds a thread while it runs); more wait their turn. Output callbacks
    (``on_stdout``...) are called from that worker thread.
    """

    def __init__(self, sandbox_id: str, *, max_workers: int = 16, **options: Any) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise InvalidArgument("max_workers must be a positive int")
        self._shell = SandboxSSH(sandbox_id, **options)
        self._pool = cf.ThreadPoolExecutor(max_workers, thread_name_prefix="sshbridge-async")

    def __repr__(self) -> str:
        return f"Async{self._shell!r}"

    @property
    def sync(self) -> SandboxSSH:
        """The underlying synchronous object (its blocking methods block the loop)."""
        return self._shell

    @property
    def sandbox_id(self) -> str:
        return self._shell.sandbox_id

    @property
    def closed(self) -> bool:
        return self._shell.closed

    @property
    def session(self) -> Any:
        return self._shell.session

    @property
    def renewals(self) -> int:
        return self._shell.renewals

    async def __aenter__(self) -> AsyncSandboxSSH:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        if self._shell.closed:
            raise InvalidArgument(f"{self!r} is closed; create a new one")
        return await _await_call(self._pool.submit(fn, *args, **kw), None)

    async def connect(self) -> AsyncSandboxSSH:
        await self._call(self._shell.connect)
        return self

    async def close(self) -> None:
        """Close the connection, DELETE every session, and end the worker threads."""
        if not self._shell.closed:
            # Not on the pool: it may be full of calls that only this close ends.
            await _finish_in_thread(self._shell.close)
        # close() failed whatever was still running, so this joins idle threads only.
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- commands --------------------------------------------------------------------------

    async def run(
        self,
        command: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        input: str | bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
        pty: bool = False,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
        line_buffered: bool = False,
        encoding: str = "utf-8",
    ) -> CommandResult:
        """As :meth:`SandboxSSH.run`; cancelling the awaiting task stops the command."""
        build_command(command, cwd=cwd, env=env)
        check_timeout(timeout)
        if self._shell.closed:
            raise InvalidArgument(f"{self!r} is closed; create a new one")
        ctl = _Control()
        ctl.killer = _kill_on(self._shell)

        def call() -> CommandResult:
            ctl.check()
            return self._shell.run(
                command,
                cwd=cwd,
                env=ctl.env(env),
                input=input,
                timeout=timeout,
                check=check,
                pty=pty,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                line_buffered=line_buffered,
                encoding=encoding,
            )

        return await _await_call(self._pool.submit(call), ctl)

    async def spawn(
        self,
        command: str | Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> AsyncJob:
        """Start a durable job (see :meth:`SandboxSSH.spawn`); cancelling this await does
        not stop a job that already started: use ``await job.kill()``."""
        job = await self._call(self._shell.spawn, command, cwd=cwd, env=env)
        return AsyncJob(self, job)

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self._call(self._shell.job, job_id))

    # -- files -----------------------------------------------------------------------------

    async def put(
        self,
        local: str | os.PathLike[str],
        remote: str,
        *,
        preserve_mode: bool = True,
        callback: Callable[[int, int], None] | None = None,
    ) -> str:
        """As :meth:`SandboxSSH.put`; a cancelled upload is aborted, the target untouched."""
        ctl = _Control()
        fut = self._pool.submit(
            self._shell.put,
            local,
            remote,
            preserve_mode=preserve_mode,
            callback=ctl.callback(callback),
        )
        return await _await_call(fut, ctl)

    async def get(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        preserve_mode: bool = True,
        callback: Callable[[int, int], None] | None = None,
    ) -> Path:
        """As :meth:`SandboxSSH.get`; a cancelled download leaves no local file."""
        ctl = _Control()
        fut = self._pool.submit(
            self._shell.get,
            remote,
            local,
            preserve_mode=preserve_mode,
            callback=ctl.callback(callback),
        )
        return await _await_call(fut, ctl)

    async def read_bytes(self, path: str) -> bytes:
        return await self._call(self._shell.read_bytes, path)

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read_bytes(path)).decode(encoding)

    async def write_bytes(self, path: str, data: bytes) -> None:
        await self._call(self._shell.write_bytes, path, data)

    async def write_text(self, path: str, text: str, encoding: str = "utf-8") -> None:
        await self.write_bytes(path, text.encode(encoding))

    async def listdir(self, path: str = ".") -> list[str]:
        return await self._call(self._shell.listdir, path)

    async def stat(self, path: str) -> paramiko.SFTPAttributes:
        return await self._call(self._shell.stat, path)

    async def exists(self, path: str) -> bool:
        return await self._call(self._shell.exists, path)

    async def makedirs(self, path: str, mode: int = 0o755, exist_ok: bool = True) -> None:
        await self._call(self._shell.makedirs, path, mode, exist_ok)

    async def remove(self, path: str) -> None:
        await self._call(self._shell.remove, path)


class AsyncJob:
    """A durable job (see :class:`Job`) with awaitable methods."""

    def __init__(self, shell: AsyncSandboxSSH, job: Job) -> None:
        self.shell = shell
        self.sync = job
        self.id = job.id
        self.directory = job.directory
        self.command = job.command

    def __repr__(self) -> str:
        return f"Async{self.sync!r}"

    async def status(self) -> JobStatus:
        return await self.shell._call(self.sync.status)

    async def poll(self) -> int | None:
        return await self.shell._call(self.sync.poll)

    async def stdout(self) -> str:
        return await self.shell._call(lambda: self.sync.stdout)

    async def stderr(self) -> str:
        return await self.shell._call(lambda: self.sync.stderr)

    async def kill(self, signal: str = "TERM") -> None:
        await self.shell._call(self.sync.kill, signal)

    async def wait(self, timeout: float | None = None, poll_interval: float = 0.2) -> CommandResult:
        """Wait for the job to end (polling without holding a thread between polls)."""
        timeout = check_timeout(timeout)
        poll_interval = check_interval(poll_interval)
        # Job.wait itself sleeps in its thread; polling here keeps cancellation prompt.
        loop = asyncio.get_running_loop()
        start = loop.time()
        delay = min(poll_interval, 0.05)
        while True:
            code = await self.poll()
            if code is not None:
                return await self.shell._call(self.sync.result, code, loop.time() - start)
            if timeout is not None and loop.time() - start >= timeout:
                partial = await self.shell._call(self.sync.result, -1, loop.time() - start)
                raise CommandTimeout(
                    f"job {self.id} still running after {timeout:g} s (it keeps running; "
                    "wait again, or kill() it)",
                    result=partial,
                    timeout=timeout,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, poll_interval)

    async def stream(self, which: str = "stdout", poll_interval: float = 0.2) -> AsyncIterator[str]:
        """Yield the job's output as it grows, until it ends."""
        chunks = self.sync.stream(which, poll_interval)
        done = object()
        while True:
            chunk = await self.shell._call(next, chunks, done)
            if chunk is done:
                return
            assert isinstance(chunk, str)
            yield chunk


class AsyncFleet:
    """:class:`Fleet` for asyncio code::

        async with AsyncFleet(sandbox_ids, max_connections=64, api_key=...) as fleet:
            results = await fleet.run("python -V")

    Same arguments and results as :class:`Fleet`. Cancelling an awaiting batch stops
    every member command still running (and leaves the members open for reuse, or
    closed by ``close()``); queued members never start.
    """

    def __init__(
        self,
        sandbox_ids: Iterable[str],
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        keep_open: bool = True,
        executor: cf.Executor | None = None,
        progress: ProgressArg = None,
        connections_per_member: int | None = None,
        **options: Any,
    ) -> None:
        self._fleet = Fleet(
            sandbox_ids,
            max_connections=max_connections,
            keep_open=keep_open,
            executor=executor,
            progress=progress,
            connections_per_member=connections_per_member,
            **options,
        )

    def __repr__(self) -> str:
        return f"Async{self._fleet!r}"

    @property
    def sync(self) -> Fleet:
        return self._fleet

    @property
    def sandbox_ids(self) -> tuple[str, ...]:
        return self._fleet.sandbox_ids

    async def __aenter__(self) -> AsyncFleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every member; waits in a thread of its own (no loop thread blocked)."""
        await _finish_in_thread(self._fleet.close)

    async def run(
        self,
        command: Commands,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        input: str | bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
        pty: bool = False,
        encoding: str = "utf-8",
        sandboxes: Iterable[str] | None = None,
        raise_on_error: bool = False,
        progress: ProgressArg = None,
    ) -> FleetResults[CommandResult]:
        ops = self._fleet._run_ops(
            command, cwd, env, input, timeout, check, pty, encoding, sandboxes
        )
        return await self._batch(ops, raise_on_error, progress, "run")

    async def put(
        self,
        local: PathArg | Callable[[str], PathArg],
        remote: str | Callable[[str], str],
        *,
        preserve_mode: bool = True,
        sandboxes: Iterable[str] | None = None,
        raise_on_error: bool = False,
        progress: ProgressArg = None,
    ) -> FleetResults[str]:
        ops = self._fleet._put_ops(local, remote, preserve_mode, sandboxes)
        return await self._batch(ops, raise_on_error, progress, "put")

    async def get(
        self,
        remote: str | Callable[[str], str],
        local: PathArg | Callable[[str], PathArg],
        *,
        preserve_mode: bool = True,
        sandboxes: Iterable[str] | None = None,
        raise_on_error: bool = False,
        progress: ProgressArg = None,
    ) -> FleetResults[Path]:
        ops = self._fleet._get_ops(remote, local, preserve_mode, sandboxes)
        return await self._batch(ops, raise_on_error, progress, "get")

    async def map(
        self,
        fn: Callable[[SandboxSSH], T],
        *,
        sandboxes: Iterable[str] | None = None,
        raise_on_error: bool = False,
        progress: ProgressArg = None,
    ) -> FleetResults[T]:
        """``fn(shell)`` per member, in worker threads (``fn`` is synchronous)."""
        if not callable(fn):
            raise InvalidArgument("fn must be callable with one SandboxSSH")
        op: _Op[T] = _MapOp(fn)
        ops = dict.fromkeys(self._fleet._select(sandboxes), op)
        return await self._batch(ops, raise_on_error, progress, "map")

    async def _batch(
        self,
        ops: Mapping[str, _Op[T]],
        raise_on_error: bool,
        progress: ProgressArg,
        what: str,
    ) -> FleetResults[T]:
        fleet = self._fleet
        fleet._check_open()
        reporter = _Progress(
            fleet.progress if progress is None else _check_progress(progress), len(ops), what
        )
        # Same bound as the sync path: at most max_connections calls submitted at once.
        slots = asyncio.Semaphore(fleet.max_connections)
        results: dict[str, FleetResult[T]] = {}

        async def one(sandbox_id: str, op: _Op[T]) -> None:
            async with slots:
                fut: cf.Future[_Outcome]
                fut, ctl = fleet._submit(sandbox_id, op)
                await _await_call(fut, ctl)
                results[sandbox_id] = fleet._collect(sandbox_id, op, fut)
                reporter.advance(sandbox_id)

        tasks = [asyncio.ensure_future(one(sid, op)) for sid, op in ops.items()]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # Cancelled, or the progress callback raised: stop every member, then report.
            for task in tasks:
                task.cancel()
            await _wait_all(tasks)
            raise
        finally:
            reporter.close()
        out = FleetResults({sid: results[sid] for sid in ops})
        if raise_on_error:
            out.raise_on_error()
        return out
