"""The ``sshbridge`` command line: ssh, exec, cp, forward, emulator, doctor.

Every failure ends as one line on stderr and an exit status: 2 for usage errors, 1 for
other errors, 130 on Ctrl-C; ``exec`` and ``ssh`` pass the remote exit status through.
Needs the ``cli`` extra (typer, rich).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn, TypeVar

try:
    import typer
    from typer.core import TyperArgument, TyperOption
except ModuleNotFoundError as _missing:  # `python -m sshbridge.cli` without the extra
    if __name__ != "__main__":
        raise
    sys.stderr.write(
        f"sshbridge: error: the command line needs the 'cli' extra ({_missing.name} is "
        "missing): pip install 'sshbridge[cli]'\n"
    )
    sys.exit(1)

from sshbridge_fast import _jsonout, _protocol, persist_seconds
from sshbridge_fast._protocol import PERSIST_ENV

from ._api import APIClient, validate_sandbox_id
from ._config import config_file_path, describe_config, load_config
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    AuthenticationError,
    ConfigurationError,
    InvalidArgument,
    NotFound,
    SandboxError,
    SandboxNotRunning,
    SandboxNotSupported,
    SSHBridgeError,
    SSHError,
)
from ._holder import (
    HolderStartError,
    Report,
    close_holder,
    download,
    ensure_holder,
    list_holders,
    upload,
)
from ._runner import build_command, check_timeout
from ._sandbox import SandboxSSH
from ._stream import StreamOutcome, stream_command
from ._version import __version__

log = logging.getLogger("sshbridge.cli")

F = TypeVar("F", bound=Callable[..., Any])

_verbosity = 0
# A remote path in cp: "SANDBOX:PATH" where SANDBOX is a plain id (as the API accepts).
# Anything else, like "./a:b" or "/tmp/x:y", is a local path, as with scp.
_REMOTE_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]{0,127}):(.*)$", re.DOTALL)
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class CLIError(Exception):
    """A failure the CLI reports itself: one line, a chosen exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


app = typer.Typer(
    name="sshbridge",
    help="Real SSH into Prime Intellect sandboxes: shells, commands, files and ports.",
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class Globals:
    api_key: str | None = None
    base_url: str | None = None
    ttl: int = 900
    verbose: int = 0
    persist: float | None = None  # idle seconds a session holder lingers; None: off


# -- plumbing ------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _err(message: str) -> None:
    sys.stderr.write(f"sshbridge: {message}\n")
    sys.stderr.flush()


class _PlainFormatter(logging.Formatter):
    """``sshbridge: warning: ...``, one line like every other message."""

    def format(self, record: logging.LogRecord) -> str:
        return f"sshbridge: {record.levelname.lower()}: {_one_line(record.getMessage())}"


class _Terminated(SystemExit):
    """SIGTERM: a BaseException, so every cleanup (sessions, remote processes) still runs."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(128 + signum)


def _setup_logging(verbose: int) -> None:
    global _verbosity
    _verbosity = verbose
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S")
        )
    else:
        handler.setFormatter(_PlainFormatter())
    root = logging.getLogger("sshbridge")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.propagate = False
    # paramiko is chatty and its transport thread logs tracebacks on routine disconnects;
    # show it only at -vv.
    para = logging.getLogger("paramiko")
    para.handlers[:] = [handler] if verbose >= 2 else []
    para.setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)
    para.propagate = False
    if verbose >= 2:
        for name in ("urllib3",):
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).setLevel(logging.DEBUG)


def _globals(ctx: typer.Context) -> Globals:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Globals) else Globals()


@contextlib.contextmanager
def _connect(ctx: typer.Context, sandbox: str) -> Iterator[SandboxSSH]:
    g = _globals(ctx)
    with SandboxSSH(sandbox, api_key=g.api_key, base_url=g.base_url, ttl_seconds=g.ttl) as shell:
        yield shell


def _interrupts_as_keyboard() -> contextlib.AbstractContextManager[None]:
    """SIGTERM behaves like Ctrl-C, so long-running commands clean up either way."""

    @contextlib.contextmanager
    def manager() -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, old)

    return manager()


def _command_words(command: Sequence[str] | None) -> list[str]:
    # Without interspersed options click keeps the "--" separator as an argument.
    words = list(command or [])
    if words and words[0] == "--":
        words = words[1:]
    return words


def _command_argv(command: Sequence[str]) -> str | list[str]:
    """One argument is a shell command line; several are an argv, quoted safely."""
    if len(command) == 1:
        return command[0]
    return list(command)


def _usage(message: str) -> Exception:
    return typer.BadParameter(message)


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not _ENV_RE.fullmatch(name):
            raise typer.BadParameter(
                f"{pair!r} is not NAME=VALUE with a valid variable name", param_hint="'--env'"
            )
        env[name] = value
    return env


def _guard(func: F) -> F:
    """Ctrl-C inside a command becomes one line and status 130 (typer would swallow it)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            raise CLIError("interrupted", 130) from None

    return wrapper  # type: ignore[return-value]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"sshbridge {__version__}")
        raise typer.Exit()


SandboxArg = Annotated[
    str, typer.Argument(metavar="SANDBOX", help="Sandbox id (as `prime sandbox list` shows).")
]


@app.callback()
def _main_options(
    ctx: typer.Context,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            metavar="KEY",
            help="API key (default: $PRIME_API_KEY, then ~/.prime/config.json). "
            "Prefer the environment: command lines are visible to other users.",
            show_default=False,
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url",
            metavar="URL",
            help="API base URL (default: $PRIME_API_BASE_URL, config file, "
            "https://api.primeintellect.ai).",
            show_default=False,
        ),
    ] = None,
    ttl: Annotated[
        int,
        typer.Option(
            "--ttl", min=1, max=3600, metavar="SECONDS", help="Lifetime of each SSH session."
        ),
    ] = 900,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose", "-v", count=True, help="Debug logging (-vv adds paramiko). No secrets."
        ),
    ] = 0,
    persist: Annotated[
        float | None,
        typer.Option(
            "--persist",
            min=0,
            metavar="SECONDS",
            help="Keep the sandbox's session open in a background holder for this many idle "
            "seconds, shared by later calls (default: $SSHBRIDGE_PERSIST, else 600; 0: off).",
            show_default=False,
        ),
    ] = None,
    no_persist: Annotated[
        bool,
        typer.Option("--no-persist", help="No session holder: connect, run, disconnect."),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    _setup_logging(verbose)
    try:
        linger = persist_seconds(None if persist is None else format(persist, "g"), no_persist)
    except ValueError:
        given = os.environ.get(PERSIST_ENV) if persist is None else format(persist, "g")
        raise typer.BadParameter(
            f"{given!r} is not a number of seconds (0 turns persistence off)",
            param_hint="--persist" if persist is not None else f"${PERSIST_ENV}",
        ) from None
    ctx.obj = Globals(api_key=api_key, base_url=base_url, ttl=ttl, verbose=verbose, persist=linger)


# -- ssh -----------------------------------------------------------------------------------


@app.command(
    "ssh",
    context_settings={"allow_interspersed_args": False},
    epilog="Example: `sshbridge ssh sbx_abc123` (a shell), `sshbridge ssh sbx_abc123 -- ls -la`",
)
@_guard
def ssh_cmd(
    ctx: typer.Context,
    sandbox: SandboxArg,
    command: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="COMMAND",
            help="Command to run instead of a login shell. Like ssh, the words are joined "
            "with spaces for the remote shell.",
            show_default=False,
        ),
    ] = None,
    tty: Annotated[
        bool | None,
        typer.Option(
            "--tty/--no-tty",
            "-t/-T",
            help="Force or disable a remote terminal (default: when stdin is a terminal).",
            show_default=False,
        ),
    ] = None,
) -> int:
    """Open an interactive shell (with a terminal) in SANDBOX, or run COMMAND in one.

    The local terminal goes raw, so Ctrl-C, Ctrl-Z and arrows reach the remote side;
    window resizes follow. The remote exit status becomes sshbridge's.
    """
    words = _command_words(command)
    if words and words[0].startswith("-") and command and command[0] != "--":
        raise _usage(
            f"{words[0]!r} after SANDBOX: options go before it "
            "(sshbridge ssh [OPTIONS] SANDBOX [COMMAND...]); use -- to run a command "
            "that starts with '-'"
        )
    # Like ssh: the words are joined with spaces and the remote shell splits them, so
    # `rsync -e 'sshbridge ssh'` and GIT_SSH_COMMAND='sshbridge ssh' work.
    argv = " ".join(words) if words else None
    validate_sandbox_id(sandbox)
    if argv is not None and not argv.strip():
        raise InvalidArgument("command is empty")
    g = _globals(ctx)
    use_pty = sys.stdin.isatty() if tty is None else tty
    if g.persist is not None and not use_pty:
        # No terminal (rsync -e, GIT_SSH_COMMAND, a pipe): through the session holder.
        job = {"env": {}, "pty": False, "stdin": True, "ssh": True, "persist": g.persist}
        job.update({"command": [argv]} if argv else {"login": True})
        fds = (sys.stdin.fileno(), sys.stdout.fileno(), sys.stderr.fileno())
        held = _in_holder(g, sandbox, job, fds, ssh=True)
        if held is not None:
            status, error = held
            if error:
                raise CLIError(error, status)
            return status
    try:
        with _connect(ctx, sandbox) as shell:
            status = shell.interactive(argv, pty=tty)
    except (SSHError, APIConnectionError, SandboxError) as exc:
        raise CLIError(str(exc), 255) from None  # as ssh: 255 when the connection fails
    if status < 0:
        _err("the remote side ended without an exit status (killed by a signal?)")
        return 255
    return status


# -- exec ----------------------------------------------------------------------------------


@app.command(
    "exec",
    context_settings={"allow_interspersed_args": False},
    epilog="Example: `sshbridge exec --timeout 60 -e DEBUG=1 sbx_abc123 -- python train.py`",
)
@_guard
def exec_cmd(
    ctx: typer.Context,
    sandbox: SandboxArg,
    command: Annotated[
        list[str],
        typer.Argument(
            metavar="COMMAND",
            help="The command (after `--`). One argument is a shell command line; several "
            "are run as an argv, each argument quoted.",
            show_default=False,
        ),
    ],
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0.001,
            metavar="SECONDS",
            help="Stop the command after this many seconds (exit status 124).",
            show_default=False,
        ),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            "-e",
            metavar="NAME=VALUE",
            help="A variable for the command; repeatable.",
            show_default=False,
        ),
    ] = None,
    cwd: Annotated[
        str | None,
        typer.Option(
            "--cwd",
            "-w",
            metavar="DIR",
            help="Working directory in the sandbox.",
            show_default=False,
        ),
    ] = None,
    stdin: Annotated[
        bool,
        typer.Option(
            "--stdin", "-i", help="Accepted for compatibility: stdin is forwarded by default."
        ),
    ] = False,
    no_stdin: Annotated[
        bool,
        typer.Option("-n", help="Give the command an empty stdin (like ssh -n)."),
    ] = False,
    tty: Annotated[
        bool,
        typer.Option("--tty", "-t", help="Run under a terminal (stderr merges into stdout)."),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Capture the output and print one JSON object instead: sandbox, command, "
            "exit_code, stdout, stderr, stdout_encoding and stderr_encoding (`utf-8`, or "
            "`base64` of the exact bytes when they are not valid UTF-8), duration_seconds, "
            "timed_out, error (null, or the message also printed on stderr). Printed "
            "whenever the arguments were valid, failures included; the exit status is "
            "still the command's.",
        ),
    ] = False,
) -> int:
    """Run a command in SANDBOX, streaming stdin, stdout and stderr; exit with its status.

    Our stdin is forwarded as it arrives (`-n` for none). With a live session holder
    (the default; see `--persist`) the call reuses its session.
    """
    words = _command_words(command)
    if not words:
        raise _usage("missing the command to run (sshbridge exec SANDBOX -- COMMAND...)")
    variables = _parse_env(env or [])
    validate_sandbox_id(sandbox)
    if timeout is not None and not math.isfinite(timeout):
        raise typer.BadParameter("must be a finite number of seconds", param_hint="'--timeout'")
    if cwd is not None and not cwd.strip():
        raise typer.BadParameter("must be a non-empty path", param_hint="'--cwd'")
    # Bad input costs no session (and no holder).
    build_command(_command_argv(words), cwd=cwd, env=variables or None)
    check_timeout(timeout)
    run = _ExecRun(ctx, sandbox, words, cwd, variables, timeout, tty, no_stdin)
    if not as_json:
        status, error = run.execute(sys.stdout.fileno(), sys.stderr.fileno())
        if error:
            raise CLIError(error, status)
        return status
    out, err = _jsonout.capture_files()
    with out, err:
        try:
            status, error = run.execute(out.fileno(), err.fileno())
        except KeyboardInterrupt:
            status, error = 130, "interrupted"
        except CLIError as exc:
            status, error = exc.code, str(exc)
        except SSHBridgeError as exc:
            status = 2 if isinstance(exc, InvalidArgument) else 1
            error = _cli_message(str(exc))
        result = _jsonout.exec_result(sandbox, words, status, error, out, err, run.duration)
    sys.stdout.flush()
    _jsonout.write_json(result)
    if error:
        raise CLIError(error, status)
    return status


class _ExecRun:
    """One ``exec``: through the session holder when there is one, else directly."""

    def __init__(
        self,
        ctx: typer.Context,
        sandbox: str,
        words: list[str],
        cwd: str | None,
        variables: dict[str, str],
        timeout: float | None,
        tty: bool,
        no_stdin: bool,
    ) -> None:
        self.ctx = ctx
        self.sandbox = sandbox
        self.words = words
        self.cwd = cwd
        self.variables = variables
        self.timeout = timeout
        self.tty = tty
        self.no_stdin = no_stdin
        self.started: float | None = None
        self.ended: float | None = None

    @property
    def duration(self) -> float:
        """Seconds the command itself ran (session set-up excluded), 0 if it never did."""
        if self.started is None:
            return 0.0
        return (self.ended or time.monotonic()) - self.started

    def execute(self, stdout_fd: int, stderr_fd: int) -> tuple[int, str | None]:
        """(exit status, message for the user or None)."""
        g = _globals(self.ctx)
        if g.persist is not None:
            job = {
                "command": self.words,
                "env": self.variables,
                "cwd": self.cwd,
                "timeout": self.timeout,
                "pty": self.tty,
                "stdin": not self.no_stdin,
                "persist": g.persist,
            }
            fds = (sys.stdin.fileno(), stdout_fd, stderr_fd)
            held = _in_holder(g, self.sandbox, job, fds, timing=self)
            if held is not None:
                return held
        try:
            outcome = self._direct(stdout_fd, stderr_fd)
        except (SSHError, APIConnectionError) as exc:
            return 255, str(exc)  # as ssh: 255 when the connection fails
        finally:
            if self.started is not None:
                self.ended = time.monotonic()
        return outcome.status, outcome.message

    def _direct(self, stdout_fd: int, stderr_fd: int) -> StreamOutcome:
        with _connect(self.ctx, self.sandbox) as shell:
            self.started = time.monotonic()
            return stream_command(
                shell.channel_source(),
                _command_argv(self.words),
                cwd=self.cwd,
                env=self.variables or None,
                timeout=self.timeout,
                pty=self.tty,
                stdin_fd=None if self.no_stdin else sys.stdin.fileno(),
                stdout_fd=stdout_fd,
                stderr_fd=stderr_fd,
            )


def _in_holder(
    g: Globals,
    sandbox: str,
    job: dict[str, Any],
    fds: Sequence[int] = (),
    *,
    ssh: bool = False,
    timing: _ExecRun | None = None,
    on_message: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[int, str | None] | None:
    """Run ``job`` (exec, or ``op`` cp) in this sandbox's session holder, started if need
    be: (status, message). None if holders cannot be used here."""
    assert g.persist is not None
    config = load_config(api_key=g.api_key, base_url=g.base_url)
    for _attempt in range(3):
        try:
            path = ensure_holder(config, sandbox, ttl=g.ttl, persist=g.persist, verbose=g.verbose)
        except HolderStartError as exc:
            raise CLIError(str(exc), exc.ssh_code if ssh else exc.code) from None
        if path is None:
            return None
        old: Any = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, _protocol.on_sigterm)
        try:
            sys.stdout.flush()
            if timing is not None:
                timing.started = time.monotonic()
            status, error = _protocol.attach_exec(path, job, fds, on_message)
        except _protocol.HolderUnavailable:
            if timing is not None:
                timing.started = None
            continue  # it was exiting (idle) as we came: start another
        except _protocol.Interrupted as exc:
            raise CLIError(str(exc), exc.code) from None
        except _protocol.ProtocolError as exc:
            return 255 if job.get("op", "exec") == "exec" else 1, str(exc)
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
            if timing is not None and timing.started is not None:
                timing.ended = time.monotonic()
        return status, error
    raise CLIError("could not reach a session holder (try --no-persist)", 255)


# -- ls ------------------------------------------------------------------------------------

_STATUS_RE = re.compile(r"^[A-Za-z_]{1,32}$")
_PER_PAGE_MAX = 100  # the API's (and _api.list_sandboxes') largest page
_MAX_PAGES = 100_000  # a server that always says hasNext cannot keep us here forever


def _cell(value: Any) -> str:
    # A name with a tab or escape sequence must not break the table or the terminal.
    if value is None:
        return "-"
    return "".join(c if c.isprintable() else "?" for c in str(value)) or "-"


def _when(value: Any) -> str | None:
    if value is None:
        return None
    # The models parse times as aware UTC datetimes; shown to the second, with a Z.
    text = str(value.isoformat(timespec="seconds")) if hasattr(value, "isoformat") else str(value)
    return text.replace("+00:00", "Z")


@app.command(
    "ls",
    epilog="Example: `sshbridge ls --status RUNNING --limit 20`",
)
@_guard
def ls_cmd(
    ctx: typer.Context,
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            "-s",
            metavar="STATUS",
            help="Only sandboxes with this status (RUNNING, PENDING, PROVISIONING, PAUSED, "
            "ERROR, TERMINATED, TIMEOUT; any case); repeatable.",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            "-l",
            min=1,
            metavar="N",
            help="At most N sandboxes (default: all, every page followed).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON array of {id, name, status, created_at, docker_image, vm}.",
        ),
    ] = False,
) -> int:
    """List your sandboxes (the team's, with PRIME_TEAM_ID): id, name, status, created."""
    wanted: set[str] = set()
    for word in status or []:
        if not _STATUS_RE.fullmatch(word):
            raise typer.BadParameter(f"{word!r} is not a sandbox status", param_hint="'--status'")
        wanted.add(word.upper())
    g = _globals(ctx)
    config = load_config(api_key=g.api_key, base_url=g.base_url)
    rows: list[dict[str, Any]] = []
    per_page = _PER_PAGE_MAX if limit is None or wanted else min(limit, _PER_PAGE_MAX)
    # The documented endpoint has no status filter, so it is applied here, page by page.
    with APIClient(config) as api:
        page = 1
        while page <= _MAX_PAGES and (limit is None or len(rows) < limit):
            answer = api.list_sandboxes(page=page, per_page=per_page)
            for sb in answer.sandboxes:
                if wanted and sb.status.upper() not in wanted:
                    continue
                rows.append(
                    {
                        "id": sb.id,
                        "name": sb.name,
                        "status": sb.status,
                        "created_at": _when(sb.created_at),
                        "docker_image": sb.docker_image,
                        "vm": sb.vm,
                    }
                )
            if not answer.has_next or not answer.sandboxes:
                break
            page += 1
    if limit is not None:
        rows = rows[:limit]
    if as_json:
        sys.stdout.flush()
        _jsonout.write_json(rows)
        return 0
    if not rows:
        _err("no sandboxes" + (f" with status {', '.join(sorted(wanted))}" if wanted else ""))
        return 0
    table = [["ID", "NAME", "STATUS", "CREATED"]] + [
        [_cell(r["id"]), _cell(r["name"]), _cell(r["status"]), _cell(r["created_at"])] for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    for line in table:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[3]
        )
    return 0


# -- sessions, close -------------------------------------------------------------------------


@app.command("sessions", epilog="Example: `sshbridge sessions --json`")
@_guard
def sessions_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> int:
    """List this user's persistent sessions (session holders)."""
    import json

    holders = list_holders()
    rows = [
        {
            "sandbox": h.sandbox,
            "session_id": h.session_id,
            "expires_at": h.expires_at,
            "idle_seconds": h.idle,
            "active": h.active,
            "persist": h.persist,
            "pid": h.pid,
            "base_url": h.base_url,
        }
        for h in holders
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        _err("no persistent sessions")
        return 0
    print(f"{'SANDBOX':<24} {'SESSION':<28} {'EXPIRES':<26} {'IDLE':>6} PID")
    for r in rows:
        idle = "busy" if r["active"] else f"{float(r['idle_seconds'] or 0):.0f}s"
        print(
            f"{r['sandbox']:<24} {r['session_id'] or '-':<28} {r['expires_at'] or '-':<26} "
            f"{idle:>6} {r['pid']}"
        )
    return 0


@app.command("close", epilog="Example: `sshbridge close sbx_abc123` (or `sshbridge close --all`)")
@_guard
def close_cmd(
    sandbox: Annotated[
        str | None,
        typer.Argument(metavar="SANDBOX", help="Close this sandbox's holders.", show_default=False),
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Close every holder of this user.")] = False,
) -> int:
    """Close persistent sessions: their holders DELETE the sessions and exit."""
    if (sandbox is None) == (not all_):
        raise _usage("give a SANDBOX or --all")
    if sandbox is not None:
        validate_sandbox_id(sandbox)
    closed = 0
    for h in list_holders():
        if all_ or h.sandbox == sandbox:
            closed += close_holder(h.path)
    if sandbox is not None and not closed:
        _err(f"no persistent session for {sandbox}")
    return 0


# -- cp ------------------------------------------------------------------------------------


def _split_remote(spec: str) -> tuple[str, str] | None:
    m = _REMOTE_RE.match(spec)
    if m is None:
        return None
    path = m.group(2) or "."
    # As scp: ~ is the remote home, where relative SFTP paths start anyway.
    if path == "~":
        path = "."
    elif path.startswith("~/"):
        path = path[2:] or "."
    return m.group(1), path


class _Progress:
    """One rich progress bar over all bytes of a copy (updated directly, or from a
    session holder's progress messages); a no-op when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar: Any = None
        self._task: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._bar.add_task("", total=total)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, name: str, done: int, total: int) -> None:
        if self._bar is not None:
            short = name if len(name) <= 40 else "..." + name[-37:]
            self._bar.update(self._task, description=short, completed=done, total=total)

    def report(self) -> Report | None:
        return self.update if self._bar is not None else None

    def message(self, message: dict[str, Any]) -> None:
        """A progress line from a session holder: [name, done, total]."""
        item = message.get("progress")
        if isinstance(item, list) and len(item) == 3:
            name, done, total = item
            if isinstance(name, str) and isinstance(done, int) and isinstance(total, int):
                self.update(name, done, total)


@app.command(
    "cp",
    epilog="Example: `sshbridge cp -r ./src sbx_abc123:work/` and "
    "`sshbridge cp sbx_abc123:out/log.txt .`",
)
@_guard
def cp_cmd(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(metavar="SRC", help="Local path or SANDBOX:PATH.")],
    dst: Annotated[str, typer.Argument(metavar="DST", help="Local path or SANDBOX:PATH.")],
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Copy directory trees.")
    ] = False,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Progress bar (default: when stderr is a terminal).",
            show_default=False,
        ),
    ] = None,
) -> int:
    """Copy files between here and a sandbox, like scp: one side is SANDBOX:PATH.

    Relative remote paths start in the sandbox's home directory. A destination that is an
    existing directory receives the source under its own name.
    """
    rsrc, rdst = _split_remote(src), _split_remote(dst)
    if (rsrc is None) == (rdst is None):
        raise typer.BadParameter(
            "exactly one of SRC and DST must be SANDBOX:PATH"
            if rsrc is None
            else "copying between two sandbox paths is not supported; copy via a local path"
        )
    show = sys.stderr.isatty() if progress is None else progress
    if rdst is not None:
        sandbox, rpath = rdst
        local_arg, shown = src, src
        if not Path(src).exists():
            raise CLIError(f"{src!r}: no such file or directory")
    else:
        assert rsrc is not None
        sandbox, rpath = rsrc
        local_arg, shown = dst, dst
    validate_sandbox_id(sandbox)
    # Absolute here: the holder runs elsewhere (as this user; it checks that).
    local = Path(os.path.join(os.getcwd(), local_arg))
    g = _globals(ctx)
    with _Progress(show, 0) as bar:
        if g.persist is not None:
            job = {
                "op": "cp",
                "direction": "put" if rdst is not None else "get",
                "local": os.fspath(local),
                "shown": shown,
                "remote": rpath,
                "recursive": recursive,
                "progress": show,
                "umask": _current_umask(),
                "persist": g.persist,
            }
            held = _in_holder(g, sandbox, job, on_message=bar.message)
            if held is not None:
                status, error = held
                if error or status:
                    raise CLIError(error or f"the copy failed (status {status})", status or 1)
                return 0
        with _connect(ctx, sandbox) as shell:
            if rdst is not None:
                upload(shell, local, shown, rpath, recursive, bar.report())
            else:
                download(shell, rpath, local, shown, recursive, bar.report())
    return 0


def _current_umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


# -- forward -------------------------------------------------------------------------------


_SPEC_RE = re.compile(r"\[[^\]]*\]|[^:]+")


def _parse_spec(spec: str) -> tuple[str | None, int, str, int]:
    """(bind, listen_port, target_host, target_port) from [BIND:]PORT[:HOST]:PORT or PORT."""
    parts = _SPEC_RE.findall(spec)
    if ":".join(parts) != spec or not 1 <= len(parts) <= 4:
        raise typer.BadParameter(f"{spec!r}: expected LISTEN_PORT[:HOST]:PORT")
    bind: str | None = None
    host = "127.0.0.1"
    if len(parts) == 4:
        bind = parts.pop(0).strip("[]")
    if len(parts) == 3:
        host = parts.pop(1).strip("[]")
    if len(parts) == 1:
        parts = [parts[0], parts[0]]
    try:
        listen, target = int(parts[0]), int(parts[1])
    except ValueError:
        raise typer.BadParameter(f"{spec!r}: ports must be numbers") from None
    # 0 on the listening side picks a free port.
    if not (0 <= listen <= 65535 and 1 <= target <= 65535):
        raise typer.BadParameter(f"{spec!r}: ports must be in 1..65535 (0 to pick one)")
    if not host:
        raise typer.BadParameter(f"{spec!r}: empty host")
    return bind, listen, host, target


@app.command(
    "forward",
    epilog="Example: `sshbridge forward sbx_abc123 8888:8888` (then open http://127.0.0.1:8888)",
)
@_guard
def forward_cmd(
    ctx: typer.Context,
    sandbox: SandboxArg,
    specs: Annotated[
        list[str],
        typer.Argument(
            metavar="LOCAL_PORT[:REMOTE_HOST]:REMOTE_PORT",
            help="What to forward; REMOTE_HOST defaults to 127.0.0.1 (inside the sandbox), "
            "LOCAL_PORT 0 picks a free port. With -R: REMOTE_PORT[:LOCAL_HOST]:LOCAL_PORT.",
            show_default=False,
        ),
    ],
    bind: Annotated[
        str,
        typer.Option("--bind", metavar="ADDRESS", help="Local address to listen on (not with -R)."),
    ] = "127.0.0.1",
    reverse: Annotated[
        bool,
        typer.Option(
            "--reverse", "-R", help="Listen inside the sandbox and connect out from here."
        ),
    ] = False,
) -> int:
    """Forward ports between here and SANDBOX until Ctrl-C (like ssh -L, or -R)."""
    parsed = [_parse_spec(s) for s in specs]
    with _interrupts_as_keyboard(), _connect(ctx, sandbox) as shell, contextlib.ExitStack() as st:
        for spec_bind, listen, host, target in parsed:
            if reverse:
                port = st.enter_context(
                    shell.forward_remote(
                        listen, target, local_host=host, remote_host=spec_bind or "127.0.0.1"
                    )
                )
                _err(f"forwarding sandbox {spec_bind or '127.0.0.1'}:{port} -> {host}:{target}")
            else:
                local_host = spec_bind or bind
                port = st.enter_context(shell.forward(target, listen, host, local_host))
                _err(f"forwarding {local_host}:{port} -> sandbox {sandbox} {host}:{target}")
        _err("press Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            _err("stopping")
    return 0


# -- emulator ------------------------------------------------------------------------------


@app.command("emulator", epilog="Example: `sshbridge emulator --sandboxes 2 --env-file emu.env`")
@_guard
def emulator_cmd(
    ctx: typer.Context,
    sandboxes: Annotated[
        int,
        typer.Option(
            "--sandboxes", "-n", min=0, max=1000, metavar="N", help="Sandboxes to create."
        ),
    ] = 1,
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            metavar="DIR",
            help="Directory for the sandboxes' files (default: a temporary one, removed).",
            show_default=False,
        ),
    ] = None,
    contract: Annotated[
        str,
        typer.Option(
            "--contract",
            metavar="vm|sidecar",
            help="Session contract to serve: `vm` (the provider's service today: key in the "
            "request, session preamble) or `sidecar` (token and gateway, as specified).",
        ),
    ] = "vm",
    env_file: Annotated[
        Path | None,
        typer.Option(
            "--env-file",
            metavar="PATH",
            help="Also write the printed lines to this file (mode 0600, atomically), for a "
            "script to source once it exists; removed when the emulator exits.",
            show_default=False,
        ),
    ] = None,
) -> int:
    """Run a local emulator of the sandbox service in the foreground until Ctrl-C.

    Prints `export` lines to point sshbridge (or the library) at it, and the ids of
    ready sandboxes. Everything listens on 127.0.0.1 only.
    """
    if contract not in ("vm", "sidecar"):
        raise typer.BadParameter(
            f"{contract!r} is not one of 'vm', 'sidecar'", param_hint="'--contract'"
        )
    try:
        from .emulator import Emulator
    except ImportError as exc:
        raise ConfigurationError(
            f"the emulator needs the 'emulator' extra ({exc.name or exc}): "
            "pip install 'sshbridge[emulator]'"
        ) from None

    def write_private_atomically(path: Path, text: str) -> os.stat_result:
        # A script polling for the file must never source a partial one.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                os.fchmod(fh.fileno(), 0o600)
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return path.stat()

    g = _globals(ctx)
    written: os.stat_result | None = None
    with (
        _interrupts_as_keyboard(),
        Emulator(api_key=g.api_key, root_dir=root, contract=contract) as emu,
    ):
        try:
            ids = [emu.create_sandbox() for _ in range(sandboxes)]
            lines = [f"export {k}={shlex.quote(v)}" for k, v in emu.env().items()]
            lines += [f"# sandbox {sid} (files in {emu.sandbox_dir(sid)})" for sid in ids]
            text = "\n".join(lines) + "\n"
            if env_file is not None:
                written = write_private_atomically(env_file, text)
            print(text, end="", flush=True)
            example = ids[0] if ids else "SANDBOX"
            _err(
                f"emulator ready ({contract} contract); in another shell run the export "
                f"lines, then `sshbridge ssh {example}`. Ctrl-C stops it."
            )
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                _err("stopping the emulator")
        finally:
            if env_file is not None and written is not None:
                with contextlib.suppress(OSError):
                    now = env_file.stat()
                    # Only our own file: someone may have put another one there since.
                    if (now.st_dev, now.st_ino) == (written.st_dev, written.st_ino):
                        env_file.unlink()
    return 0


# -- doctor --------------------------------------------------------------------------------


class _Report:
    """The doctor's findings: printed as they come, or kept for one JSON object."""

    def __init__(self, as_json: bool = False) -> None:
        self.console: Any = None
        if not as_json:
            from rich.console import Console

            self.console = Console(highlight=False, soft_wrap=True)
        self.failures = 0
        self.checks: list[dict[str, str | None]] = []
        self._section = ""

    def section(self, title: str, key: str | None = None) -> None:
        self._section = key or title.lower()
        if self.console is not None:
            self.console.print(f"[bold]{title}[/bold]")

    def _record(self, status: str, text: str, fix: str | None = None) -> None:
        self.checks.append(
            {"section": self._section, "status": status, "message": text, "fix": fix}
        )

    def ok(self, text: str) -> None:
        self._record("ok", text)
        if self.console is not None:
            self.console.print(f"  [green]ok[/green]    {text}", markup=True)

    def info(self, text: str) -> None:
        self._record("info", text)
        if self.console is not None:
            self.console.print(f"  [dim]info[/dim]  {text}")

    def fail(self, text: str, fix: str) -> None:
        self.failures += 1
        text = _cli_message(text)
        self._record("fail", text, fix)
        if self.console is not None:
            self.console.print(f"  [red]FAIL[/red]  {text}")
            self.console.print(f"        [yellow]fix:[/yellow] {fix}")


def _source_label(source: str) -> str:
    if source == "argument":
        return "the command line"
    if source == "default":
        return "the default"
    return f"the {source}" if source.endswith("variable") else source


def _key_hint(key: str) -> str:
    # The last 4 characters identify a key among several without revealing it.
    return f"...{key[-4:]}" if len(key) >= 16 else "(short key, not shown)"


@app.command(
    "doctor",
    epilog="Example: `sshbridge doctor sbx_abc123` (or `sshbridge doctor --json` for scripts)",
)
@_guard
def doctor_cmd(
    ctx: typer.Context,
    sandbox: Annotated[
        str | None,
        typer.Argument(
            metavar="SANDBOX", help="Also check this sandbox and SSH to it.", show_default=False
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON object instead: ok (true when nothing failed), sandbox, "
            "and checks, a list of {section: configuration|api|sandbox|ssh, status: "
            "ok|info|fail, message, fix}.",
        ),
    ] = False,
) -> int:
    """Check configuration, API reachability and (with SANDBOX) an SSH round trip.

    Exits 0 when every check passed, 1 otherwise.
    """
    if sandbox is not None:
        validate_sandbox_id(sandbox)
    r = _Report(as_json)
    _doctor(ctx, sandbox, r)
    code = 0 if r.failures == 0 else 1
    if as_json:
        sys.stdout.flush()
        _jsonout.write_json({"ok": code == 0, "sandbox": sandbox, "checks": r.checks})
    return code


def _doctor(ctx: typer.Context, sandbox: str | None, r: _Report) -> int:
    g = _globals(ctx)
    r.section("Configuration")
    try:
        # Where each setting comes from is the config module's answer, not re-derived here.
        sources = describe_config(api_key=g.api_key, base_url=g.base_url)
    except (ConfigurationError, InvalidArgument) as exc:
        r.fail(_one_line(str(exc)), "correct the value named above")
        return 1
    if sources.api_key is None:
        r.fail(
            "no API key found",
            'export PRIME_API_KEY=... (or put "api_key" in '
            f"{config_file_path()}, or pass --api-key)",
        )
        return 1
    try:
        config = load_config(api_key=g.api_key, base_url=g.base_url)
    except (ConfigurationError, InvalidArgument) as exc:
        r.fail(_one_line(str(exc)), "correct the value named above")
        return 1
    r.ok(f"API key from {_source_label(sources.api_key)} {_key_hint(config.api_key)}")
    r.ok(f"base URL {config.base_url} (from {_source_label(sources.base_url)})")
    if sources.context:
        r.info(f"context {sources.context} (PRIME_CONTEXT)")
    if config.team_id:
        r.info(f"team {config.team_id} (from {_source_label(sources.team_id)})")

    r.section("API")
    api = APIClient(config, timeout=(5.0, 15.0), max_retries=1, retry_deadline=20.0)
    try:
        start = time.monotonic()
        probe = sandbox or "sshbridge-doctor-probe"
        try:
            found = api.get_sandbox(probe)
        except NotFound:
            found = None
            if sandbox is None:
                r.ok(f"reachable, key accepted ({_ms(start)})")
            else:
                r.fail(
                    f"sandbox {sandbox} not found for this key",
                    "check the id with `prime sandbox list` (and the team, PRIME_TEAM_ID)",
                )
                return 1
        except AuthenticationError as exc:
            r.fail(
                f"the API rejected the key ({exc.status_code})",
                "create a new key at https://app.primeintellect.ai and set PRIME_API_KEY",
            )
            return 1
        except APIConnectionError as exc:
            r.fail(
                f"cannot reach {config.base_url}: {_one_line(str(exc))}",
                "check the network, a proxy (HTTPS_PROXY) or --base-url",
            )
            return 1
        except APIStatusError as exc:
            if sandbox is not None:
                r.fail(_one_line(str(exc)), "see the message; retry later for 429/5xx")
                return 1
            found = None
            r.ok(f"reachable (answered {exc.status_code}, {_ms(start)})")
        except APIError as exc:
            r.fail(_one_line(str(exc)), "retry later")
            return 1
        if found is None or sandbox is None:
            if sandbox is None:
                r.info("pass a SANDBOX id to check a sandbox and an SSH round trip")
            return 0 if r.failures == 0 else 1
        r.ok(f"reachable, key accepted ({_ms(start)})")
    finally:
        api.close()

    r.section(f"Sandbox {sandbox}", "sandbox")
    if found.status != "RUNNING":
        r.fail(
            f"status {found.status}, not RUNNING",
            "start the sandbox, or wait for it to finish provisioning",
        )
        return 1
    r.ok(f"status RUNNING{f', image {found.docker_image}' if found.docker_image else ''}")

    r.section("SSH")
    start = time.monotonic()
    try:
        with SandboxSSH(
            sandbox, api_key=g.api_key, base_url=g.base_url, ttl_seconds=min(g.ttl, 300)
        ) as shell:
            session = shell.session
            how = (
                "contract A: token, key authorized at the gateway"
                if session is not None and session.contract == "sidecar"
                else "contract B: key in the request, session preamble"
            )
            r.ok(f"session created ({how}), connected ({_ms(start)})")
            t = time.monotonic()
            result = shell.run("true", timeout=30)
            if result.exit_code == 0:
                r.ok(f'round trip run("true") in {_ms(t)}')
            else:
                r.fail(
                    f'run("true") exited {result.exit_code}',
                    "the sandbox shell looks broken; check its image",
                )
    except (SandboxNotRunning, SandboxNotSupported) as exc:
        r.fail(_one_line(str(exc)), "start the sandbox and retry")
    except SSHBridgeError as exc:
        r.fail(
            _one_line(str(exc)),
            "retry; if it persists run `sshbridge -v doctor SANDBOX` and check the network "
            "to the sandbox's SSH endpoint",
        )
    return 0 if r.failures == 0 else 1


def _ms(start: float) -> str:
    ms = (time.monotonic() - start) * 1000
    return f"{ms:.0f} ms" if ms < 10000 else f"{ms / 1000:.1f} s"


# -- entry point ---------------------------------------------------------------------------


class _PlainArgument(TyperArgument):
    """An argument shown as NAME (or [NAME], NAME...), without typer's ``{NAME}`` and
    ``<type>`` labels, which read as syntax to type."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.metavar or (self.name or "").upper()
        if not self.required:
            name = f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")


class _PlainOption(TyperOption):
    """An option shown with its metavar (SECONDS), and flags with nothing after them."""

    def display_type_rich(self, ctx: Any) -> str | None:
        if self.is_flag or self.count:
            return None
        if self.metavar is not None:
            return self.metavar
        return (self.name or "value").upper()


def _plain_param(param: Any) -> None:
    if type(param) is TyperArgument:
        param.__class__ = _PlainArgument
    elif type(param) is TyperOption:
        param.__class__ = _PlainOption


def _plain_help(command: Any) -> None:
    """Plain metavars throughout the command tree (typer's own options included)."""
    todo = [command]
    while todo:
        cmd = todo.pop()
        todo.extend(getattr(cmd, "commands", {}).values())
        for param in cmd.params:
            _plain_param(param)
            if set(getattr(param, "opts", ())) & set(_COMPLETION_OPTIONS):
                param.help = (param.help or "").rstrip(".") + (
                    " (or the shell named after it: bash, zsh, fish, powershell)."
                )
        make_help = getattr(cmd, "get_help_option", None)
        if callable(make_help):
            # The --help option is made on first use, so it is fixed up as it is made.
            def plain_help_option(ctx: Any, make: Callable[[Any], Any] = make_help) -> Any:
                option = make(ctx)
                _plain_param(option)
                return option

            cmd.get_help_option = plain_help_option


_SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")
_COMPLETION_OPTIONS = ("--show-completion", "--install-completion")


def _names_a_shell(args: Sequence[str]) -> bool:
    """Whether ``--show-completion``/``--install-completion`` are given a shell name."""
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in _COMPLETION_OPTIONS:
            return (value if eq else (args[i + 1] if i + 1 < len(args) else "")) in _SHELLS
        if not arg.startswith("-"):
            return False  # a command: its own arguments are not ours to read
    return False


def _click_classes(name: str) -> tuple[type[Exception], ...]:
    # typer >= 0.20 vendors click as typer._click; older typer uses click itself.
    found: list[type[Exception]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, Exception) and cls not in found:
            found.append(cls)
    return tuple(found)


_USAGE_ERRORS = _click_classes("UsageError")
_ABORTS = _click_classes("Abort")
_CLICK_ERRORS = _click_classes("ClickException")


def _click_message(exc: BaseException) -> str:
    fmt = getattr(exc, "format_message", None)
    return str(fmt()) if callable(fmt) else str(exc)


# Library messages speak of Python keywords (``api_key=...``); a CLI user needs the flag
# or variable instead. Only what a CLI run can reach is listed.
_CLI_WORDING: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bor pass api_key=\.\.\."), "or pass --api-key"),
    (re.compile(r"\bpass api_key=\.\.\."), "pass --api-key"),
    (re.compile(r"\(from (the )?argument\)"), "(from --base-url)"),
    (re.compile(r"\bbase_url\b"), "base URL"),
    (re.compile(r"^sandbox_id\b"), "sandbox id"),
    (re.compile(r"^ttl_seconds must\b"), "--ttl must"),
    (re.compile(r"^timeout must\b"), "--timeout must"),
    (re.compile(r"^cwd must\b"), "--cwd must"),
    (re.compile(r"^env must\b"), "--env must"),
    (re.compile(r"^local_host must\b"), "--bind must"),
    (re.compile(r"\(or None\), "), ""),
    (
        re.compile(
            r"If the server rotates its keys by design, use known_hosts=\.\.\. or "
            r"host_key_policy=AcceptAnyHostKey\(\)"
        ),
        "If the server rotates its keys by design, run the command again",
    ),
)


def _cli_message(message: str) -> str:
    """A library message in the CLI's terms (flags and variables, not keywords)."""
    text = _one_line(message)
    for pattern, replacement in _CLI_WORDING:
        text = pattern.sub(replacement, text)
    return text


def _fail(message: str, code: int) -> int:
    _err(f"error: {_cli_message(message)}")
    return code


# What to install when an optional dependency is missing (top-level module -> extra).
_EXTRAS = {
    "typer": "cli",
    "click": "cli",
    "rich": "cli",
    "shellingham": "cli",
    "asyncssh": "emulator",
}


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    top = (exc.name or "").partition(".")[0]
    extra = _EXTRAS.get(top)
    if extra is None:
        return None
    what = "the command line" if extra == "cli" else f"the {extra}"
    return f"{what} needs the {extra!r} extra ({top} is missing): pip install 'sshbridge[{extra}]'"


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = list(argv) if argv is not None else sys.argv[1:]
    if _names_a_shell(args):
        # typer's switch from "detect the running shell" to "take the shell named".
        os.environ["_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION"] = "1"
    command = typer.main.get_command(app)
    _plain_help(command)
    old_term: Any = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rv = command.main(
            args=args,
            prog_name="sshbridge",
            standalone_mode=False,
        )
    except _Terminated as exc:
        _err("error: terminated")
        return int(exc.code or 143)
    except _USAGE_ERRORS as exc:
        if not _click_message(exc).strip():
            return 2  # `sshbridge` alone: the help was shown
        ctx = getattr(exc, "ctx", None)
        where = getattr(ctx, "command_path", None) or "sshbridge"
        return _fail(f"{_click_message(exc)} (see `{where} --help`)", 2)
    except _ABORTS:
        return _fail("aborted", 1)
    except _CLICK_ERRORS as exc:
        return _fail(_click_message(exc), int(getattr(exc, "exit_code", 1)))
    except CLIError as exc:
        return _fail(str(exc), exc.code)
    except InvalidArgument as exc:
        return _fail(str(exc), 2)
    except SSHBridgeError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except ModuleNotFoundError as exc:
        hint = _missing_extra(exc)
        if hint is None:
            if _verbosity:
                traceback.print_exc()
            return _fail(f"internal error: {exc} (run with -v for details)", 1)
        return _fail(hint, 1)
    except OSError as exc:
        text = exc.strerror or str(exc)
        if exc.filename:
            text = f"{exc.filename}: {text}"
        return _fail(text, 1)
    except Exception as exc:  # noqa: BLE001 - a bug: still one line unless -v asks for more
        if _verbosity:
            traceback.print_exc()
        return _fail(f"internal error: {type(exc).__name__}: {exc} (run with -v for details)", 1)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if isinstance(rv, bool) or not isinstance(rv, int):
        return 0
    return rv


def _quiet_stdout() -> None:
    # stdout went away (`| head`): stop quietly, and keep Python from complaining.
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main() -> NoReturn:
    """Console-script entry point."""
    code = run()
    try:
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe would warn
    except BrokenPipeError:
        _quiet_stdout()
        code = code or 141
    sys.exit(code)


if __name__ == "__main__":
    main()
