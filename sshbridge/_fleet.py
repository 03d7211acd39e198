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
import dataclasses
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from ._api import validate_sandbox_id
from ._cancel import CANCEL_VAR as CANCEL_VAR  # re-exported: the one token variable
from ._cancel import CallControl
from ._cancel import kill_script as kill_script  # re-exported: the one kill script
from ._config import load_config
from ._exceptions import InvalidArgument, SSHBridgeError
from ._hostkeys import PinFirstHostKey
from ._members import (
    Command,
    Commands,
    GetOp,
    MapOp,
    Members,
    Op,
    Outcome,
    PathArg,
    PortableError,
    ProgressArg,
    ProgressReporter,
    PutOp,
    RunOp,
    abort,
    check_progress,
    kill_elsewhere,
    kill_on,
    run_task,
)
from ._options import SSHOptions
from ._result import CommandResult
from ._runner import build_command, check_timeout
from ._sandbox import SandboxSSH

log = logging.getLogger("sshbridge.fleet")

T = TypeVar("T")

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
        self._members = Members(self._new_member, max_connections, keep_open)
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
        return {sid: RunOp(cmd, env, kwargs) for sid, cmd in commands.items()}

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
            ops[sid] = PutOp(path, target, preserve_mode, cache)
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
            ops[sid] = GetOp(source, target, is_dir, preserve_mode)
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
        ctl.killer = kill_elsewhere(sandbox_id, self.options)
        try:
            task = op.portable()
        except OSError as exc:
            done: cf.Future[Outcome] = cf.Future()
            done.set_result(Outcome(None, exc, 0.0))
            return done, ctl
        return self.executor.submit(run_task, sandbox_id, self.options, task, ctl.token), ctl

    def _call_local(self, sandbox_id: str, op: Op[Any], ctl: CallControl) -> Outcome:
        start = time.monotonic()
        try:
            ctl.check()
            shell = self._members.acquire(sandbox_id)
        except Exception as exc:  # noqa: BLE001 - reported per member
            return Outcome(None, exc, time.monotonic() - start)
        error: BaseException | None = None
        try:
            ctl.killer = kill_on(shell)
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
        if isinstance(error, PortableError):
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
            abort([(fut, ctl) for fut, (_s, _o, ctl) in inflight.items()])
            raise
        finally:
            reporter.close()
        out = FleetResults({sid: results[sid] for sid in ops})
        if raise_on_error:
            out.raise_on_error()
        return out

