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
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar, overload

from ._api import APIClient
from ._cancel import CallControl
from ._config import Config
from ._exceptions import CommandTimeout, InvalidArgument
from ._fleet import DEFAULT_MAX_CONNECTIONS, Fleet, FleetResult, FleetResults
from ._jobs import Job, JobStatus, check_interval
from ._members import (
    Commands,
    MapOp,
    Op,
    Outcome,
    PathArg,
    ProgressArg,
    ProgressReporter,
    check_progress,
)
from ._models import SSHSession
from ._options import SSHOptions, check_int
from ._result import CommandResult
from ._retry import Backoff
from ._runner import ChannelSource, build_command, check_timeout, stop_remote
from ._sandbox import SandboxSSH
from ._sftp import RemoteFile

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


async def _await_call(fut: cf.Future[T], ctl: CallControl | None) -> T:
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


P = ParamSpec("P")
R = TypeVar("R")


def _public_signature(method: Callable[..., Any]) -> inspect.Signature:
    sig = inspect.signature(method)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


class _Blocking(Generic[P, R]):
    """``SandboxSSH.<name>`` as a coroutine method of ``AsyncSandboxSSH``: the same
    parameters (checked by a test), run on the object's worker threads.

    A keyword ``callback`` (every transfer has one) is where a cancelled await aborts
    the transfer, at its next chunk; the await returns once the thread is done.
    """

    def __init__(self, method: Callable[Concatenate[SandboxSSH, P], R]) -> None:
        self.method = method
        self.name = method.__name__
        self.signature = _public_signature(method)
        callback = self.signature.parameters.get("callback")
        self.aborts = callback is not None and callback.kind is inspect.Parameter.KEYWORD_ONLY
        self.__doc__ = f"As :meth:`SandboxSSH.{self.name}`, awaitable.\n\n{method.__doc__ or ''}"

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> _Blocking[P, R]: ...

    @overload
    def __get__(
        self, obj: AsyncSandboxSSH, owner: type[Any]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    def __get__(
        self, obj: AsyncSandboxSSH | None, owner: type[Any]
    ) -> _Blocking[P, R] | Callable[P, Coroutine[Any, Any, R]]:
        if obj is None:
            return self
        spec = self

        async def call(*args: P.args, **kwargs: P.kwargs) -> R:
            return await obj._blocking(spec, args, kwargs)

        call.__name__ = call.__qualname__ = self.name
        call.__doc__ = self.__doc__
        call.__signature__ = self.signature  # type: ignore[attr-defined]
        return call


class AsyncSandboxSSH:
    """``SandboxSSH`` for asyncio code::

        async with AsyncSandboxSSH("sbx_123", ttl_seconds=900) as shell:
            r = await shell.run("python -V")
            await shell.put("data.tar", "/workspace/")
            job = await shell.spawn("python train.py")

    Every method of :class:`SandboxSSH` is here with the same parameters, as a
    coroutine (``interactive()``, which takes over the terminal, is the exception).
    Options are those of :class:`SandboxSSH` (keywords, or ``options=`` an
    :class:`SSHOptions`). ``max_workers`` bounds the calls running at
    once (each holds a thread while it runs); more wait their turn. Output callbacks
    (``on_stdout``...) are called from that worker thread.
    """

    def __init__(
        self,
        sandbox_id: str,
        *,
        max_workers: int = 16,
        options: SSHOptions | None = None,
        **kwargs: Any,
    ) -> None:
        check_int("max_workers", max_workers, 1, 1024)
        self._shell = SandboxSSH.from_options(sandbox_id, SSHOptions.of(options, **kwargs))
        self._pool = cf.ThreadPoolExecutor(max_workers, thread_name_prefix="sshbridge-async")

    @classmethod
    def from_options(cls, sandbox_id: str, options: SSHOptions) -> AsyncSandboxSSH:
        """An ``AsyncSandboxSSH`` from an :class:`SSHOptions` (16 worker threads)."""
        shell = cls.__new__(cls)
        shell._shell = SandboxSSH.from_options(sandbox_id, options)
        shell._pool = cf.ThreadPoolExecutor(16, thread_name_prefix="sshbridge-async")
        return shell

    def __repr__(self) -> str:
        return f"Async{self._shell!r}"

    @property
    def blocking(self) -> SandboxSSH:
        """The underlying synchronous object (its blocking methods block the loop)."""
        return self._shell

    @property
    def sandbox_id(self) -> str:
        return self._shell.sandbox_id

    @property
    def closed(self) -> bool:
        return self._shell.closed

    @property
    def config(self) -> Config:
        return self._shell.config

    @property
    def api(self) -> APIClient:
        return self._shell.api

    @property
    def session(self) -> SSHSession | None:
        return self._shell.session

    @property
    def expires_at(self) -> datetime | None:
        return self._shell.expires_at

    @property
    def renewals(self) -> int:
        return self._shell.renewals

    @property
    def reconnects(self) -> int:
        return self._shell.reconnects

    def channel_source(self) -> ChannelSource:
        return self._shell.channel_source()

    async def __aenter__(self) -> AsyncSandboxSSH:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._shell.closed:
            raise InvalidArgument(f"{self!r} is closed; create a new one")

    async def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        self._check_open()
        return await _await_call(self._pool.submit(fn, *args, **kw), None)

    async def _blocking(
        self, spec: _Blocking[Any, R], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> R:
        self._check_open()
        ctl: CallControl | None = None
        if spec.aborts:
            ctl = CallControl()
            kwargs = {**kwargs, "callback": ctl.callback(kwargs.get("callback"))}
        fut = self._pool.submit(spec.method, self._shell, *args, **kwargs)
        return await _await_call(fut, ctl)

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

    # -- session and sandbox -------------------------------------------------------------

    sandbox = _Blocking(SandboxSSH.sandbox)
    renew = _Blocking(SandboxSSH.renew)

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
        self._check_open()
        ctl = CallControl()
        shell = self._shell

        def kill(token: str) -> None:
            if not shell.closed:
                stop_remote(shell.channel_source(), token)

        ctl.killer = kill

        def call() -> CommandResult:
            ctl.check()
            return shell.run(
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
        """Re-attach to a job started by ``spawn`` (see :meth:`SandboxSSH.job`)."""
        return AsyncJob(self, await self._call(self._shell.job, job_id))

    # -- files -----------------------------------------------------------------------------

    put = _Blocking(SandboxSSH.put)
    get = _Blocking(SandboxSSH.get)
    put_dir = _Blocking(SandboxSSH.put_dir)
    get_dir = _Blocking(SandboxSSH.get_dir)
    sync = _Blocking(SandboxSSH.sync)
    sync_down = _Blocking(SandboxSSH.sync_down)
    putfo = _Blocking(SandboxSSH.putfo)
    getfo = _Blocking(SandboxSSH.getfo)
    listdir = _Blocking(SandboxSSH.listdir)
    stat = _Blocking(SandboxSSH.stat)
    exists = _Blocking(SandboxSSH.exists)
    makedirs = _Blocking(SandboxSSH.makedirs)
    remove = _Blocking(SandboxSSH.remove)
    read_bytes = _Blocking(SandboxSSH.read_bytes)
    read_text = _Blocking(SandboxSSH.read_text)
    write_bytes = _Blocking(SandboxSSH.write_bytes)
    write_text = _Blocking(SandboxSSH.write_text)

    async def open(self, path: str, mode: str = "r", bufsize: int = -1) -> AsyncRemoteFile:
        """As :meth:`SandboxSSH.open`; the file's methods are coroutines::

        async with await shell.open("/etc/hostname") as fh:
            text = await fh.read()
        """
        fh = await self._call(self._shell.open, path, mode, bufsize)
        return AsyncRemoteFile(self, fh)

    # -- port forwarding -----------------------------------------------------------------

    def forward(
        self,
        remote_port: int,
        local_port: int = 0,
        remote_host: str = "127.0.0.1",
        local_host: str = "127.0.0.1",
        *,
        max_connections: int = 64,
    ) -> AsyncForward:
        """As :meth:`SandboxSSH.forward`: ``async with shell.forward(8888) as port``."""
        return AsyncForward(
            self,
            self._shell.forward(
                remote_port, local_port, remote_host, local_host, max_connections=max_connections
            ),
        )

    def forward_remote(
        self,
        remote_port: int,
        local_port: int,
        local_host: str = "127.0.0.1",
        remote_host: str = "127.0.0.1",
        *,
        max_connections: int = 64,
    ) -> AsyncForward:
        """As :meth:`SandboxSSH.forward_remote`: ``async with shell.forward_remote(0, 5432)
        as port`` (the port bound inside the sandbox)."""
        return AsyncForward(
            self,
            self._shell.forward_remote(
                remote_port, local_port, local_host, remote_host, max_connections=max_connections
            ),
        )


class _Forward(Protocol):
    def start(self) -> int: ...

    def close(self) -> None: ...


class AsyncForward:
    """A port forward for asyncio code: ``async with`` starts it (returning the port)
    and closes it; ``await start()`` / ``await close()`` do the same by hand."""

    def __init__(self, shell: AsyncSandboxSSH, forward: _Forward) -> None:
        self.shell = shell
        self.blocking = forward

    def __repr__(self) -> str:
        return f"Async{self.blocking!r}"

    async def start(self) -> int:
        return await self.shell._call(self.blocking.start)

    async def close(self) -> None:
        await _finish_in_thread(self.blocking.close)

    async def __aenter__(self) -> int:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncRemoteFile:
    """A remote file for asyncio code (see :meth:`AsyncSandboxSSH.open`)."""

    def __init__(self, shell: AsyncSandboxSSH, fh: RemoteFile) -> None:
        self.shell = shell
        self.blocking = fh
        self.path = fh.path

    def __repr__(self) -> str:
        return f"Async{self.blocking!r}"

    async def read(self, size: int | None = None) -> bytes:
        return bytes(await self.shell._call(self.blocking.read, size))

    async def write(self, data: bytes) -> None:
        await self.shell._call(self.blocking.write, data)

    async def seek(self, offset: int, whence: int = 0) -> None:
        await self.shell._call(self.blocking.seek, offset, whence)

    async def tell(self) -> int:
        return int(await self.shell._call(self.blocking.tell))

    async def flush(self) -> None:
        await self.shell._call(self.blocking.flush)

    async def close(self) -> None:
        await _finish_in_thread(self.blocking.close)

    async def __aenter__(self) -> AsyncRemoteFile:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncJob:
    """A durable job (see :class:`Job`) with awaitable methods."""

    def __init__(self, shell: AsyncSandboxSSH, job: Job) -> None:
        self.shell = shell
        self.blocking = job
        self.id = job.id
        self.directory = job.directory
        self.command = job.command

    def __repr__(self) -> str:
        return f"Async{self.blocking!r}"

    async def status(self) -> JobStatus:
        return await self.shell._call(self.blocking.status)

    async def poll(self) -> int | None:
        return await self.shell._call(self.blocking.poll)

    async def stdout(self) -> str:
        return await self.shell._call(lambda: self.blocking.stdout)

    async def stderr(self) -> str:
        return await self.shell._call(lambda: self.blocking.stderr)

    async def kill(self, signal: str = "TERM") -> None:
        await self.shell._call(self.blocking.kill, signal)

    async def wait(self, timeout: float | None = None, poll_interval: float = 0.2) -> CommandResult:
        """Wait for the job to end (polling without holding a thread between polls)."""
        timeout = check_timeout(timeout)
        poll_interval = check_interval(poll_interval)
        # Job.wait itself sleeps in its thread; polling here keeps cancellation prompt.
        loop = asyncio.get_running_loop()
        start = loop.time()
        backoff = Backoff(0.05, poll_interval)
        while True:
            code = await self.poll()
            if code is not None:
                return await self.shell._call(self.blocking.result, code, loop.time() - start)
            if timeout is not None and loop.time() - start >= timeout:
                partial = await self.shell._call(self.blocking.result, -1, loop.time() - start)
                raise CommandTimeout(
                    f"job {self.id} still running after {timeout:g} s (it keeps running; "
                    "wait again, or kill() it)",
                    result=partial,
                    timeout=timeout,
                )
            await asyncio.sleep(backoff.next())

    async def stream(self, which: str = "stdout", poll_interval: float = 0.2) -> AsyncIterator[str]:
        """Yield the job's output as it grows, until it ends."""
        chunks = self.blocking.stream(which, poll_interval)
        done = object()
        while True:
            chunk = await self.shell._call(next, chunks, done)
            if chunk is done:
                return
            assert isinstance(chunk, str)
            yield chunk


class _BatchFleet(Fleet):
    """The sync fleet, with the steps of a batch callable one by one, so that the
    asyncio front end can await each member call (and cancel it) on its own."""

    def select(self, sandboxes: Iterable[str] | None) -> list[str]:
        return self._select(sandboxes)

    def run_ops(
        self,
        command: Commands,
        cwd: str | None,
        env: Mapping[str, str] | None,
        input: str | bytes | None,
        timeout: float | None,
        check: bool,
        pty: bool,
        encoding: str,
        sandboxes: Iterable[str] | None,
    ) -> dict[str, Op[CommandResult]]:
        return self._run_ops(command, cwd, env, input, timeout, check, pty, encoding, sandboxes)

    def put_ops(
        self,
        local: PathArg | Callable[[str], PathArg],
        remote: str | Callable[[str], str],
        preserve_mode: bool,
        sandboxes: Iterable[str] | None,
    ) -> dict[str, Op[str]]:
        return self._put_ops(local, remote, preserve_mode, sandboxes)

    def get_ops(
        self,
        remote: str | Callable[[str], str],
        local: PathArg | Callable[[str], PathArg],
        preserve_mode: bool,
        sandboxes: Iterable[str] | None,
    ) -> dict[str, Op[Path]]:
        return self._get_ops(remote, local, preserve_mode, sandboxes)

    def check_open(self) -> None:
        self._check_open()

    def submit(self, sandbox_id: str, op: Op[T]) -> tuple[cf.Future[Outcome], CallControl]:
        return self._submit(sandbox_id, op)

    def collect(self, sandbox_id: str, op: Op[T], fut: cf.Future[Outcome]) -> FleetResult[T]:
        return self._collect(sandbox_id, op, fut)


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
        options: SSHOptions | None = None,
        **kwargs: Any,
    ) -> None:
        self._fleet = _BatchFleet(
            sandbox_ids,
            max_connections=max_connections,
            keep_open=keep_open,
            executor=executor,
            progress=progress,
            connections_per_member=connections_per_member,
            options=options,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"Async{self._fleet!r}"

    @property
    def blocking(self) -> Fleet:
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
        ops = self._fleet.run_ops(
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
        ops = self._fleet.put_ops(local, remote, preserve_mode, sandboxes)
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
        ops = self._fleet.get_ops(remote, local, preserve_mode, sandboxes)
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
        op: Op[T] = MapOp(fn)
        ops = dict.fromkeys(self._fleet.select(sandboxes), op)
        return await self._batch(ops, raise_on_error, progress, "map")

    async def _batch(
        self,
        ops: Mapping[str, Op[T]],
        raise_on_error: bool,
        progress: ProgressArg,
        what: str,
    ) -> FleetResults[T]:
        fleet = self._fleet
        fleet.check_open()
        reporter = ProgressReporter(
            fleet.progress if progress is None else check_progress(progress), len(ops), what
        )
        # Same bound as the sync path: at most max_connections calls submitted at once.
        slots = asyncio.Semaphore(fleet.max_connections)
        results: dict[str, FleetResult[T]] = {}

        async def one(sandbox_id: str, op: Op[T]) -> None:
            async with slots:
                fut: cf.Future[Outcome]
                fut, ctl = fleet.submit(sandbox_id, op)
                await _await_call(fut, ctl)
                results[sandbox_id] = fleet.collect(sandbox_id, op, fut)
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
