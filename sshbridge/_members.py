"""The machinery of a fleet batch: one operation per member, the pool of kept members,
executor tasks (self-contained and picklable), progress, and cancellation.

``Fleet`` and ``AsyncFleet`` are two fronts over these pieces; neither reaches into the
other.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeAlias, TypeVar, cast

from ._cancel import CallControl, Interrupted
from ._exceptions import CommandError, InvalidArgument, RemotePathError, SSHBridgeError
from ._options import SSHOptions
from ._result import CommandResult
from ._runner import stop_remote
from ._sandbox import SandboxSSH

log = logging.getLogger("sshbridge.fleet")

T = TypeVar("T")

Command: TypeAlias = "str | Sequence[str]"
Commands: TypeAlias = "Command | Mapping[str, Command] | Callable[[str], Command]"
ProgressCallback: TypeAlias = "Callable[[int, int, str], None]"
ProgressArg: TypeAlias = "bool | ProgressCallback | None"
PathArg: TypeAlias = "str | os.PathLike[str]"


# -- cancellation ------------------------------------------------------------------------


def kill_on(shell: SandboxSSH) -> Callable[[str], None]:
    # The same stop as a run() timeout: _runner.stop_remote, the one kill path.
    def kill(token: str) -> None:
        if not shell.closed:
            stop_remote(shell.channel_source(), token)

    return kill


def kill_elsewhere(sandbox_id: str, options: SSHOptions) -> Callable[[str], None]:
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
class RunOp(Op[CommandResult]):
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
class PutOp(Op[str]):
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
        return PutBytesOp(
            data, self.path.name, self.remote_path, mode if self.preserve_mode else None
        )


@dataclass
class PutBytesOp(Op[str]):
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
class GetOp(Op[Path]):
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
        return GetBytesOp(self.remote_path, self.preserve_mode)

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
class GetBytesOp(Op[Any]):
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
class PortableError:
    """An exception in a form that always unpickles (ours take keyword-only arguments,
    which plain pickling of exceptions cannot rebuild)."""

    module: str
    qualname: str
    args: tuple[Any, ...]
    attrs: dict[str, Any]

    @classmethod
    def of(cls, exc: BaseException) -> PortableError:
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
    error: Exception | PortableError | None
    duration: float


def run_task(sandbox_id: str, options: SSHOptions, op: Op[Any], token: str) -> Outcome:
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
        return Outcome(None, PortableError.of(exc), time.monotonic() - start)


# -- the member pool ---------------------------------------------------------------------


def keeps_member(error: BaseException | None) -> bool:
    """Errors of the command or the files, not of the connection: the member stays."""
    if error is None:
        return True
    if isinstance(error, (CommandError, RemotePathError, InvalidArgument, Interrupted)):
        return True
    return isinstance(error, OSError) and not isinstance(error, SSHBridgeError)


class Members:
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
            drop = not self._keep_open or not keeps_member(error)
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
        self.run_task: Any = None
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
                self.run_task = self._bar.add_task(description, total=total)
                self._bar.start()
        elif callable(progress):
            self.callback = progress
        elif progress not in (None, False):
            raise InvalidArgument("progress must be True, False, None or a callable")

    def advance(self, sandbox_id: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(self.run_task, advance=1)
        if self.callback is not None:
            self.callback(self.done, self.total, sandbox_id)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None



def check_progress(progress: object) -> ProgressArg:
    if progress is None or isinstance(progress, bool) or callable(progress):
        return cast(ProgressArg, progress)
    raise InvalidArgument("progress must be True, False, None or a callable (done, total, sid)")



def abort(calls: Sequence[tuple[cf.Future[Outcome], CallControl]]) -> None:
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
