"""``Fleet``: one command (or transfer) across many sandboxes, with bounded concurrency.

Every member sandbox gets its own :class:`SandboxSSH`: its own session, its own background
renewal and its own slice of the per-sandbox rate budget, so one member's expiry or failure
never touches another. Results come back per sandbox (:class:`FleetResult`); a failing
member is reported, not raised, unless ``raise_on_error=True``.

With ``executor=`` (any :class:`concurrent.futures.Executor`, e.g. a ``dask.distributed``
client's ``get_executor()``) each member call is a self-contained, picklable task that
opens, uses and closes its own ``SandboxSSH`` on whichever worker runs it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import importlib
import io
import logging
import os
import pickle
import stat as stat_mod
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeAlias, TypeVar, cast

from ._api import validate_sandbox_id
from ._cancel import CANCEL_VAR as CANCEL_VAR  # re-exported: the one token variable
from ._cancel import CallControl, Interrupted
from ._cancel import kill_script as kill_script  # re-exported: the one kill script
from ._config import load_config
from ._exceptions import (
    CommandError,
    InvalidArgument,
    RemotePathError,
    SSHBridgeError,
)
from ._hostkeys import PinFirstHostKey
from ._options import SSHOptions
from ._result import CommandResult
from ._runner import build_command, check_timeout, stop_remote
from ._sandbox import SandboxSSH

log = logging.getLogger("sshbridge.fleet")

T = TypeVar("T")

Command: TypeAlias = "str | Sequence[str]"
Commands: TypeAlias = "Command | Mapping[str, Command] | Callable[[str], Command]"
ProgressCallback: TypeAlias = "Callable[[int, int, str], None]"
ProgressArg: TypeAlias = "bool | ProgressCallback | None"
PathArg: TypeAlias = "str | os.PathLike[str]"

DEFAULT_MAX_CONNECTIONS = 64


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetResult(Generic[T]):
    """What one member produced: ``result`` on success, else ``error`` (typed)."""

    sandbox_id: str
    result: T | None = None
    error: Exception | None = None
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        """No error and, for a command, exit status 0."""
        if self.error is not None:
            return False
        if isinstance(self.result, CommandResult):
            return self.result.ok
        return True

    def unwrap(self) -> T:
        """The result, or raise the member's error."""
        if self.error is not None:
            raise self.error
        return cast(T, self.result)

    def __repr__(self) -> str:
        what = f"error={self.error!r}" if self.error is not None else f"result={self.result!r}"
        return f"FleetResult({self.sandbox_id!r}, ok={self.ok}, {what})"


class FleetError(SSHBridgeError):
    """Raised by ``raise_on_error=True`` once the whole batch has finished.

    ``results`` holds every member's :class:`FleetResult`, ``errors`` the failed ones.
    """

    def __init__(self, message: str, *, results: FleetResults[Any]) -> None:
        super().__init__(message)
        self.results = results

    @property
    def errors(self) -> dict[str, Exception]:
        return self.results.errors


class FleetResults(Mapping[str, FleetResult[T]]):
    """sandbox id -> :class:`FleetResult`, in the order the sandboxes were given."""

    def __init__(self, results: Mapping[str, FleetResult[T]]) -> None:
        self._results = dict(results)

    def __getitem__(self, sandbox_id: str) -> FleetResult[T]:
        return self._results[sandbox_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    @property
    def ok(self) -> bool:
        """Every member succeeded (and every command exited 0)."""
        return all(r.ok for r in self._results.values())

    @property
    def errors(self) -> dict[str, Exception]:
        return {s: r.error for s, r in self._results.items() if r.error is not None}

    @property
    def failed(self) -> dict[str, FleetResult[T]]:
        """Members that raised or whose command exited non-zero."""
        return {s: r for s, r in self._results.items() if not r.ok}

    @property
    def succeeded(self) -> dict[str, FleetResult[T]]:
        return {s: r for s, r in self._results.items() if r.ok}

    def raise_on_error(self) -> FleetResults[T]:
        """Raise :class:`FleetError` if any member raised; else return self."""
        errors = self.errors
        if errors:
            shown = "; ".join(
                f"{sid}: {type(e).__name__}: {e}" for sid, e in list(errors.items())[:3]
            )
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            raise FleetError(
                f"{len(errors)} of {len(self)} sandboxes failed: {shown}{more}", results=self
            )
        return self

    def __repr__(self) -> str:
        errors = len(self.errors)
        bad = len(self.failed) - errors
        return (
            f"FleetResults({len(self)} sandboxes: {len(self) - errors - bad} ok, "
            f"{bad} non-zero exit, {errors} errors)"
        )


# -- cancellation ------------------------------------------------------------------------


def _kill_on(shell: SandboxSSH) -> Callable[[str], None]:
    # The same stop as a run() timeout: _runner.stop_remote, the one kill path.
    def kill(token: str) -> None:
        if not shell.closed:
            stop_remote(shell.channel_source(), token)

    return kill


def _kill_elsewhere(sandbox_id: str, options: SSHOptions) -> Callable[[str], None]:
    # Executor mode: the command runs on a worker, but the token reaches it from any
    # session of the same sandbox, so a short session from here stops it.
    def kill(token: str) -> None:
        shell = SandboxSSH.from_options(sandbox_id, options)
        try:
            stop_remote(shell.channel_source(), token)
        finally:
            shell.close()

    return kill


# -- operations --------------------------------------------------------------------------


class Op(Generic[T]):
    """One member call. ``local`` runs in this process on a kept member; ``portable``
    gives what an executor task runs (``remote``), and ``finish`` turns its picklable
    value into the result here."""

    def local(self, shell: SandboxSSH, ctl: CallControl) -> T:
        raise NotImplementedError

    def portable(self) -> Op[Any]:
        return self

    def remote(self, shell: SandboxSSH, ctl: CallControl) -> Any:
        return self.local(shell, ctl)

    def finish(self, sandbox_id: str, value: Any) -> T:
        return cast(T, value)


@dataclass
class _RunOp(Op[CommandResult]):
    command: Command
    env: Mapping[str, str] | None
    kwargs: dict[str, Any]

    def local(self, shell: SandboxSSH, ctl: CallControl) -> CommandResult:
        ctl.check()
        return shell.run(self.command, env=ctl.env(self.env), **self.kwargs)


@dataclass
class MapOp(Op[T]):
    fn: Callable[[SandboxSSH], T]

    def local(self, shell: SandboxSSH, ctl: CallControl) -> T:
        ctl.check()
        return self.fn(shell)


@dataclass
class _PutOp(Op[str]):
    path: Path
    remote_path: str
    preserve_mode: bool
    cache: dict[Path, tuple[bytes, int]] = field(repr=False)

    def local(self, shell: SandboxSSH, ctl: CallControl) -> str:
        ctl.check()
        return shell.put(
            self.path,
            self.remote_path,
            preserve_mode=self.preserve_mode,
            callback=ctl.callback(None),
        )

    def portable(self) -> Op[Any]:
        # The file lives on this machine, not on the worker: ship its bytes (read once
        # per batch, however many members receive it).
        if self.path not in self.cache:
            self.cache[self.path] = (self.path.read_bytes(), self.path.stat().st_mode & 0o7777)
        data, mode = self.cache[self.path]
        return _PutBytesOp(
            data, self.path.name, self.remote_path, mode if self.preserve_mode else None
        )


@dataclass
class _PutBytesOp(Op[str]):
    data: bytes = field(repr=False)
    name: str
    remote_path: str
    mode: int | None

    def local(self, shell: SandboxSSH, ctl: CallControl) -> str:
        target = self.remote_path
        if target.endswith("/"):
            target += self.name
        else:
            with contextlib.suppress(RemotePathError):
                if stat_mod.S_ISDIR(shell.stat(target).st_mode or 0):
                    target = target.rstrip("/") + "/" + self.name
        return shell.putfo(io.BytesIO(self.data), target, mode=self.mode)


@dataclass
class _GetOp(Op[Path]):
    remote_path: str
    target: Path  # a file path, or a directory when ``is_dir``
    is_dir: bool
    preserve_mode: bool

    def local(self, shell: SandboxSSH, ctl: CallControl) -> Path:
        ctl.check()
        if self.is_dir:
            self.target.mkdir(parents=True, exist_ok=True)
        else:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        return shell.get(
            self.remote_path,
            self.target,
            preserve_mode=self.preserve_mode,
            callback=ctl.callback(None),
        )

    def portable(self) -> Op[Any]:
        return _GetBytesOp(self.remote_path, self.preserve_mode)

    def finish(self, sandbox_id: str, value: Any) -> Path:
        data, mode = cast(tuple[bytes, int | None], value)
        target = self.target
        if self.is_dir:
            target = target / self.remote_path.rstrip("/").rsplit("/", 1)[-1]
        target.parent.mkdir(parents=True, exist_ok=True)
        # Like SandboxSSH.get: the local file appears whole or not at all.
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return target


@dataclass
class _GetBytesOp(Op[Any]):
    remote_path: str
    preserve_mode: bool

    def local(self, shell: SandboxSSH, ctl: CallControl) -> tuple[bytes, int | None]:
        buf = io.BytesIO()
        shell.getfo(self.remote_path, buf)
        mode = None
        if self.preserve_mode:
            mode = (shell.stat(self.remote_path).st_mode or 0o644) & 0o7777
        return buf.getvalue(), mode


# -- executor tasks: self-contained and picklable ----------------------------------------


@dataclass(frozen=True)
class _PortableError:
    """An exception in a form that always unpickles (ours take keyword-only arguments,
    which plain pickling of exceptions cannot rebuild)."""

    module: str
    qualname: str
    args: tuple[Any, ...]
    attrs: dict[str, Any]

    @classmethod
    def of(cls, exc: BaseException) -> _PortableError:
        attrs: dict[str, Any] = {}
        extra = dict(vars(exc))
        if isinstance(exc, OSError):
            extra.update(errno=exc.errno, strerror=exc.strerror, filename=exc.filename)
        for name, value in extra.items():
            try:
                pickle.dumps(value)
            except Exception:  # noqa: BLE001 - unpicklable attributes are dropped
                continue
            attrs[name] = value
        args: list[Any] = []
        for arg in exc.args:
            try:
                pickle.dumps(arg)
                args.append(arg)
            except Exception:  # noqa: BLE001
                args.append(repr(arg))
        return cls(type(exc).__module__, type(exc).__qualname__, tuple(args), attrs)

    def restore(self) -> Exception:
        try:
            kind = getattr(importlib.import_module(self.module), self.qualname)
            if not (isinstance(kind, type) and issubclass(kind, Exception)):
                raise TypeError(kind)
            exc: Exception = kind.__new__(kind)
            exc.args = self.args
            for name, value in self.attrs.items():
                setattr(exc, name, value)
            return exc
        except Exception:  # noqa: BLE001 - any class we cannot rebuild stays readable
            message = self.args[0] if self.args else ""
            return SSHBridgeError(f"{self.qualname}: {message}")


@dataclass(frozen=True)
class Outcome:
    value: Any
    error: Exception | _PortableError | None
    duration: float


def _task(sandbox_id: str, options: SSHOptions, op: Op[Any], token: str) -> Outcome:
    """What an executor runs: open a session, do one thing, close it. Never raises."""
    start = time.monotonic()
    try:
        shell = SandboxSSH.from_options(sandbox_id, options)
        try:
            value = op.remote(shell, CallControl(token))  # connects on first use
        finally:
            shell.close()  # also after a failed connect: no session, thread or socket left
        return Outcome(value, None, time.monotonic() - start)
    except Exception as exc:  # noqa: BLE001 - reported per member
        return Outcome(None, _PortableError.of(exc), time.monotonic() - start)


# -- the member pool ---------------------------------------------------------------------


def _keeps_member(error: BaseException | None) -> bool:
    """Errors of the command or the files, not of the connection: the member stays."""
    if error is None:
        return True
    if isinstance(error, (CommandError, RemotePathError, InvalidArgument, Interrupted)):
        return True
    return isinstance(error, OSError) and not isinstance(error, SSHBridgeError)


class _Members:
    """Open SandboxSSH objects, at most ``limit`` at once; idle ones are closed least
    recently used first when a new member needs the room. A member being closed keeps
    its slot until its session is DELETEd, so the bound holds at every instant."""

    def __init__(self, factory: Callable[[str], SandboxSSH], limit: int, keep_open: bool) -> None:
        self._factory = factory
        self._limit = limit
        self._keep_open = keep_open
        self._open: OrderedDict[str, SandboxSSH] = OrderedDict()
        self._busy: dict[str, int] = {}
        self._closing = 0
        self._cond = threading.Condition()
        self._closed = False

    def _close_unlocked(self, shell: SandboxSSH) -> None:
        # Called with the lock held and one _closing slot taken; closes without the lock.
        self._cond.release()
        try:
            shell.close()
        finally:
            self._cond.acquire()
            self._closing -= 1
            self._cond.notify_all()

    def acquire(self, sandbox_id: str) -> SandboxSSH:
        with self._cond:
            while True:
                if self._closed:
                    raise InvalidArgument("the Fleet is closed; create a new one")
                shell = self._open.get(sandbox_id)
                if shell is not None and not shell.closed:
                    break
                if shell is not None:
                    del self._open[sandbox_id]
                if len(self._open) + self._closing < self._limit:
                    shell = self._factory(sandbox_id)
                    self._open[sandbox_id] = shell
                    break
                idle = next((s for s in self._open if not self._busy.get(s)), None)
                if idle is not None:
                    self._closing += 1
                    self._close_unlocked(self._open.pop(idle))
                    continue
                self._cond.wait(1.0)
            self._busy[sandbox_id] = self._busy.get(sandbox_id, 0) + 1
            self._open.move_to_end(sandbox_id)
            return shell

    def release(self, sandbox_id: str, shell: SandboxSSH, error: BaseException | None) -> None:
        with self._cond:
            left = self._busy.get(sandbox_id, 1) - 1
            if left > 0:
                self._busy[sandbox_id] = left
                return
            self._busy.pop(sandbox_id, None)
            # A member whose connection or sandbox failed is closed, so a stopped
            # sandbox holds no session, thread or slot until the next batch.
            drop = not self._keep_open or not _keeps_member(error)
            if drop and self._open.get(sandbox_id) is shell:
                del self._open[sandbox_id]
                self._closing += 1
                self._close_unlocked(shell)
            self._cond.notify_all()

    def open_ids(self) -> list[str]:
        with self._cond:
            return [s for s, shell in self._open.items() if shell.session is not None]

    def close_all(self) -> list[SandboxSSH]:
        with self._cond:
            self._closed = True
            shells = list(self._open.values())
            self._open.clear()
            self._cond.notify_all()
        return shells


# -- progress ----------------------------------------------------------------------------


class ProgressReporter:
    def __init__(self, progress: ProgressArg, total: int, description: str) -> None:
        self.done = 0
        self.total = total
        self.callback: ProgressCallback | None = None
        self._bar: Any = None
        self._task: Any = None
        if progress is True:
            try:
                rich_progress = importlib.import_module("rich.progress")
            except ImportError:
                log.info("progress=True needs rich (pip install rich); no bar shown")
            else:
                self._bar = rich_progress.Progress(
                    rich_progress.TextColumn("{task.description}"),
                    rich_progress.BarColumn(),
                    rich_progress.MofNCompleteColumn(),
                    rich_progress.TimeElapsedColumn(),
                )
                self._task = self._bar.add_task(description, total=total)
                self._bar.start()
        elif callable(progress):
            self.callback = progress
        elif progress not in (None, False):
            raise InvalidArgument("progress must be True, False, None or a callable")

    def advance(self, sandbox_id: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1)
        if self.callback is not None:
            self.callback(self.done, self.total, sandbox_id)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# -- the fleet ---------------------------------------------------------------------------


def check_progress(progress: object) -> ProgressArg:
    if progress is None or isinstance(progress, bool) or callable(progress):
        return cast(ProgressArg, progress)
    raise InvalidArgument("progress must be True, False, None or a callable (done, total, sid)")


class Fleet:
    """Run commands and transfers across many sandboxes with bounded concurrency.

    ::

        with Fleet(sandbox_ids, max_connections=64, ttl_seconds=900) as fleet:
            results = fleet.run("python -V")            # or {sid: cmd} or lambda sid: cmd
            for sid, r in results.items():
                print(sid, r.ok, r.result.stdout if r.ok else r.error)
            fleet.put("model.bin", "/workspace/")
            fleet.get("/workspace/out.json", "results/{sid}.json")

    ``max_connections`` members are connected at once; a member connects on first use
    and, with ``keep_open=True`` (the default), stays open (and renewed) for the next
    batch, while the least recently used idle member is closed when another needs the
    room. Every other keyword is an option of each member's :class:`SandboxSSH`
    (``connections_per_member`` becomes its ``max_connections``); ``options=`` takes
    them as one :class:`SSHOptions` instead (keywords given as well override it).

    With ``executor=`` every member call is a self-contained task (sandbox id, options,
    operation) that opens and closes its own session on the executor's worker.
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
        if isinstance(sandbox_ids, str):
            raise InvalidArgument("sandbox_ids must be an iterable of ids, not one string")
        ids = [validate_sandbox_id(s) for s in sandbox_ids]
        if len(set(ids)) != len(ids):
            dup = next(s for s in ids if ids.count(s) > 1)
            raise InvalidArgument(f"sandbox {dup!r} is listed twice; results are keyed by id")
        if (
            isinstance(max_connections, bool)
            or not isinstance(max_connections, int)
            or not (1 <= max_connections <= 4096)
        ):
            raise InvalidArgument("max_connections must be an int between 1 and 4096")
        if executor is not None and not isinstance(executor, cf.Executor):
            raise InvalidArgument("executor must be a concurrent.futures.Executor")
        if "max_connections" in kwargs:
            raise InvalidArgument("max_connections is the fleet's bound here")
        if connections_per_member is not None:
            kwargs["max_connections"] = connections_per_member
        opts = SSHOptions.of(options, **kwargs)  # validated once, for every member
        self.sandbox_ids: tuple[str, ...] = tuple(ids)
        self.max_connections = max_connections
        self.keep_open = keep_open
        self.executor = executor
        self.progress = check_progress(progress)
        if executor is not None:
            # Tasks carry the options to the workers: they must pickle.
            try:
                pickle.dumps(opts)
            except Exception as exc:
                raise InvalidArgument(
                    f"with an executor, SandboxSSH options must be picklable: {exc}"
                ) from exc
        elif opts.known_hosts is None and opts.host_key_policy is None:
            # One pin store for the whole fleet: a member closed (LRU, failure) and
            # reopened must still present the host key it presented before.
            opts = dataclasses.replace(opts, host_key_policy=PinFirstHostKey())
        self.options = opts
        if executor is None:
            # Missing credentials fail here, before any session exists.
            load_config(api_key=opts.api_key, base_url=opts.base_url, team_id=opts.team_id)
        self._members = _Members(self._new_member, max_connections, keep_open)
        self._pool: cf.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        mode = "executor" if self.executor is not None else "local"
        return (
            f"Fleet({len(self.sandbox_ids)} sandboxes, max_connections={self.max_connections}, "
            f"{mode}, {'closed' if self._closed else 'open'})"
        )

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connected(self) -> list[str]:
        """Sandboxes with an open member right now (local mode)."""
        return self._members.open_ids()

    def close(self) -> None:
        """Close every member (DELETE every session) and stop the fleet's threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
        shells = self._members.close_all()
        try:
            if pool is not None and len(shells) > 1:
                list(pool.map(SandboxSSH.close, shells))
            else:
                for shell in shells:
                    shell.close()
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    # -- public operations -------------------------------------------------------------

    def run(
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
        """Run a command on every member (or ``sandboxes``), at most ``max_connections`` at
        once. ``command`` is one command for all, a mapping ``{sid: command}`` (those
        sandboxes only) or a callable ``sid -> command``. Other arguments as in
        :meth:`SandboxSSH.run`."""
        return self._batch(
            self._run_ops(command, cwd, env, input, timeout, check, pty, encoding, sandboxes),
            raise_on_error,
            progress,
            "run",
        )

    def put(
        self,
        local: PathArg | Callable[[str], PathArg],
        remote: str | Callable[[str], str],
        *,
        preserve_mode: bool = True,
        sandboxes: Iterable[str] | None = None,
        raise_on_error: bool = False,
        progress: ProgressArg = None,
    ) -> FleetResults[str]:
        """Upload to every member (atomically, as :meth:`SandboxSSH.put`). ``local`` and
        ``remote`` may be callables ``sid -> path``. Results are the remote paths."""
        return self._batch(
            self._put_ops(local, remote, preserve_mode, sandboxes), raise_on_error, progress, "put"
        )

    def get(
        self,
        remote: str | Callable[[str], str],
        local: PathArg | Callable[[str], PathArg],
        *,
        preserve_mode: bool = True,
        sandboxes: Iterable[str] | None = None,
        raise_on_error: bool = False,
        progress: ProgressArg = None,
    ) -> FleetResults[Path]:
        """Download from every member. ``local`` is a template with ``{sid}`` (and
        optionally ``{name}``, the remote file name), e.g. ``"out/{sid}.log"``; or a
        directory, and each file lands in ``<dir>/<sid>/<name>``; or a callable
        ``sid -> path``. Results are the local paths."""
        return self._batch(
            self._get_ops(remote, local, preserve_mode, sandboxes), raise_on_error, progress, "get"
        )

    def map(
        self,
        fn: Callable[[SandboxSSH], T],
        *,
        sandboxes: Iterable[str] | None = None,
        raise_on_error: bool = False,
        progress: ProgressArg = None,
    ) -> FleetResults[T]:
        """Call ``fn(shell)`` once per member with its connected :class:`SandboxSSH`.
        With an executor ``fn`` must pickle (dask uses cloudpickle, so lambdas do)."""
        if not callable(fn):
            raise InvalidArgument("fn must be callable with one SandboxSSH")
        op: Op[T] = MapOp(fn)
        return self._batch(
            dict.fromkeys(self._select(sandboxes), op), raise_on_error, progress, "map"
        )

    # -- building operations (all input checked before any network) ---------------------

    def _select(self, sandboxes: Iterable[str] | None) -> list[str]:
        if sandboxes is None:
            return list(self.sandbox_ids)
        if isinstance(sandboxes, str):
            raise InvalidArgument("sandboxes must be an iterable of ids, not one string")
        chosen = list(dict.fromkeys(sandboxes))
        self._check_members(chosen)
        return chosen

    def _check_members(self, ids: Iterable[str]) -> None:
        known = set(self.sandbox_ids)
        unknown = [s for s in ids if s not in known]
        if unknown:
            raise InvalidArgument(f"not members of this fleet: {unknown[:5]}")

    def _run_ops(
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
        if isinstance(command, Mapping):
            if sandboxes is not None:
                raise InvalidArgument("pass a {sid: command} mapping or sandboxes=, not both")
            commands: dict[str, Command] = dict(command)
            self._check_members(commands)
        elif callable(command):
            commands = {sid: command(sid) for sid in self._select(sandboxes)}
        else:
            commands = dict.fromkeys(self._select(sandboxes), command)
        check_timeout(timeout)
        for sid, cmd in commands.items():
            try:
                build_command(cmd, cwd=cwd, env=env)
            except InvalidArgument as exc:
                raise InvalidArgument(f"sandbox {sid}: {exc}") from None
        kwargs: dict[str, Any] = dict(
            cwd=cwd, input=input, timeout=timeout, check=check, pty=pty, encoding=encoding
        )
        return {sid: _RunOp(cmd, env, kwargs) for sid, cmd in commands.items()}

    def _put_ops(
        self,
        local: PathArg | Callable[[str], PathArg],
        remote: str | Callable[[str], str],
        preserve_mode: bool,
        sandboxes: Iterable[str] | None,
    ) -> dict[str, Op[str]]:
        cache: dict[Path, tuple[bytes, int]] = {}
        ops: dict[str, Op[str]] = {}
        for sid in self._select(sandboxes):
            path = Path(local(sid) if callable(local) else local)
            if not path.is_file():
                raise InvalidArgument(f"local file {str(path)!r} does not exist (sandbox {sid})")
            target = remote(sid) if callable(remote) else remote
            if not isinstance(target, str) or not target:
                raise InvalidArgument(f"remote path for {sid} must be a non-empty string")
            ops[sid] = _PutOp(path, target, preserve_mode, cache)
        return ops

    def _get_ops(
        self,
        remote: str | Callable[[str], str],
        local: PathArg | Callable[[str], PathArg],
        preserve_mode: bool,
        sandboxes: Iterable[str] | None,
    ) -> dict[str, Op[Path]]:
        template: str | None = None
        if not callable(local):
            text = os.fspath(local)
            if "{sid}" in text:
                template = text
            elif "{name}" in text:
                raise InvalidArgument("a local template needs {sid}, or every file collides")
        ops: dict[str, Op[Path]] = {}
        for sid in self._select(sandboxes):
            source = remote(sid) if callable(remote) else remote
            if not isinstance(source, str) or not source:
                raise InvalidArgument(f"remote path for {sid} must be a non-empty string")
            name = source.rstrip("/").rsplit("/", 1)[-1]
            if callable(local):
                target, is_dir = Path(local(sid)), False
            elif template is not None:
                target = Path(template.replace("{sid}", sid).replace("{name}", name))
                is_dir = False
            else:
                target, is_dir = Path(os.fspath(local)) / sid, True
            ops[sid] = _GetOp(source, target, is_dir, preserve_mode)
        return ops

    # -- execution ---------------------------------------------------------------------

    def _new_member(self, sandbox_id: str) -> SandboxSSH:
        return SandboxSSH.from_options(sandbox_id, self.options)

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument("the Fleet is closed; create a new one")

    def _thread_pool(self) -> cf.ThreadPoolExecutor:
        with self._lock:
            self._check_open()
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(
                    self.max_connections, thread_name_prefix="sshbridge-fleet"
                )
            return self._pool

    def _submit(self, sandbox_id: str, op: Op[T]) -> tuple[cf.Future[Outcome], CallControl]:
        ctl = CallControl()
        if self.executor is None:
            return self._thread_pool().submit(self._call_local, sandbox_id, op, ctl), ctl
        ctl.killer = _kill_elsewhere(sandbox_id, self.options)
        try:
            task = op.portable()
        except OSError as exc:
            done: cf.Future[Outcome] = cf.Future()
            done.set_result(Outcome(None, exc, 0.0))
            return done, ctl
        return self.executor.submit(_task, sandbox_id, self.options, task, ctl.token), ctl

    def _call_local(self, sandbox_id: str, op: Op[Any], ctl: CallControl) -> Outcome:
        start = time.monotonic()
        try:
            ctl.check()
            shell = self._members.acquire(sandbox_id)
        except Exception as exc:  # noqa: BLE001 - reported per member
            return Outcome(None, exc, time.monotonic() - start)
        error: BaseException | None = None
        try:
            ctl.killer = _kill_on(shell)
            value = op.local(shell, ctl)
            return Outcome(value, None, time.monotonic() - start)
        except Exception as exc:  # noqa: BLE001 - reported per member
            error = exc
            return Outcome(None, exc, time.monotonic() - start)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._members.release(sandbox_id, shell, error)

    def _collect(self, sandbox_id: str, op: Op[T], fut: cf.Future[Outcome]) -> FleetResult[T]:
        try:
            outcome = fut.result()
        except Exception as exc:  # noqa: BLE001 - e.g. the executor lost its worker
            return FleetResult(sandbox_id, error=exc)
        error = outcome.error
        if isinstance(error, _PortableError):
            error = error.restore()
        if error is not None:
            return FleetResult(sandbox_id, error=error, duration=outcome.duration)
        value = outcome.value
        if self.executor is not None:
            try:
                value = op.finish(sandbox_id, value)
            except Exception as exc:  # noqa: BLE001 - e.g. the local write failed
                return FleetResult(sandbox_id, error=exc, duration=outcome.duration)
        return FleetResult(sandbox_id, cast(T, value), None, outcome.duration)

    def _batch(
        self,
        ops: Mapping[str, Op[T]],
        raise_on_error: bool,
        progress: ProgressArg,
        what: str,
    ) -> FleetResults[T]:
        self._check_open()
        reporter = ProgressReporter(
            self.progress if progress is None else check_progress(progress), len(ops), what
        )
        results: dict[str, FleetResult[T]] = {}
        pending = iter(ops.items())
        inflight: dict[cf.Future[Outcome], tuple[str, Op[T], CallControl]] = {}
        try:
            while True:
                # Submitted lazily: at most max_connections calls exist at once, so an
                # executor is never flooded and an abort has little to undo.
                while len(inflight) < self.max_connections:
                    item = next(pending, None)
                    if item is None:
                        break
                    fut, ctl = self._submit(item[0], item[1])
                    inflight[fut] = (item[0], item[1], ctl)
                if not inflight:
                    break
                done, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    sid, op, _ctl = inflight.pop(fut)
                    results[sid] = self._collect(sid, op, fut)
                    reporter.advance(sid)
        except BaseException:
            # Ctrl-C, or the progress callback raised: stop what runs, then re-raise.
            _abort([(fut, ctl) for fut, (_s, _o, ctl) in inflight.items()])
            raise
        finally:
            reporter.close()
        out = FleetResults({sid: results[sid] for sid in ops})
        if raise_on_error:
            out.raise_on_error()
        return out


def _abort(calls: Sequence[tuple[cf.Future[Outcome], CallControl]]) -> None:
    """Cancel queued calls and kill running ones, in parallel, then wait for them."""
    running = []
    for fut, ctl in calls:
        ctl.event.set()
        if not fut.cancel():
            running.append((fut, ctl))
    if not running:
        return
    with cf.ThreadPoolExecutor(
        min(32, len(running)), thread_name_prefix="sshbridge-fleet-cancel"
    ) as pool:
        list(pool.map(lambda call: call[1].stop(call[0]), running))
