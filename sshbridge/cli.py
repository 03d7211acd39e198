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
import os
import posixpath
import re
import shlex
import signal
import stat as stat_mod
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from sshbridge_fast import _protocol, persist_seconds
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
    RemotePathError,
    SandboxError,
    SandboxNotRunning,
    SandboxNotSupported,
    SSHBridgeError,
    SSHError,
)
from ._holder import HolderStartError, close_holder, ensure_holder, list_holders
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
    add_completion=False,
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
            help="API key (default: $PRIME_API_KEY, then ~/.prime/config.json). "
            "Prefer the environment: command lines are visible to other users.",
            show_default=False,
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url",
            help="API base URL (default: $PRIME_API_BASE_URL, config file, "
            "https://api.primeintellect.ai).",
            show_default=False,
        ),
    ] = None,
    ttl: Annotated[
        int,
        typer.Option("--ttl", min=1, max=3600, help="Lifetime of each SSH session, seconds."),
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


@app.command("ssh", context_settings={"allow_interspersed_args": False})
@_guard
def ssh_cmd(
    ctx: typer.Context,
    sandbox: SandboxArg,
    command: Annotated[
        list[str] | None,
        typer.Argument(
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


@app.command("exec", context_settings={"allow_interspersed_args": False})
@_guard
def exec_cmd(
    ctx: typer.Context,
    sandbox: SandboxArg,
    command: Annotated[
        list[str],
        typer.Argument(
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
            help="Stop the command after this many seconds (exit status 124).",
            show_default=False,
        ),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env", "-e", help="NAME=VALUE for the command; repeatable.", show_default=False
        ),
    ] = None,
    cwd: Annotated[
        str | None,
        typer.Option("--cwd", "-w", help="Working directory in the sandbox.", show_default=False),
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
    # Bad input costs no session (and no holder).
    build_command(_command_argv(words), cwd=cwd, env=variables or None)
    check_timeout(timeout)
    g = _globals(ctx)
    if g.persist is not None:
        config = load_config(api_key=g.api_key, base_url=g.base_url)
        job = {
            "command": words,
            "env": variables,
            "cwd": cwd,
            "timeout": timeout,
            "pty": tty,
            "stdin": not no_stdin,
            "persist": g.persist,
        }
        held = _exec_in_holder(config, sandbox, job, g)
        if held is not None:
            return held
    try:
        outcome = _exec_direct(ctx, sandbox, words, cwd, variables, timeout, tty, no_stdin)
    except (SSHError, APIConnectionError) as exc:
        raise CLIError(str(exc), 255) from None  # as ssh: 255 when the connection fails
    if outcome.message:
        raise CLIError(outcome.message, outcome.status)
    return outcome.status


def _exec_direct(
    ctx: typer.Context,
    sandbox: str,
    words: list[str],
    cwd: str | None,
    variables: dict[str, str],
    timeout: float | None,
    tty: bool,
    no_stdin: bool,
) -> StreamOutcome:
    with _connect(ctx, sandbox) as shell:
        return stream_command(
            shell._manager.source(),
            _command_argv(words),
            cwd=cwd,
            env=variables or None,
            timeout=timeout,
            pty=tty,
            stdin_fd=None if no_stdin else sys.stdin.fileno(),
            stdout_fd=sys.stdout.fileno(),
            stderr_fd=sys.stderr.fileno(),
        )


def _exec_in_holder(config: Any, sandbox: str, job: dict[str, Any], g: Globals) -> int | None:
    """Run ``job`` in this sandbox's session holder (started if need be); its status.
    None if holders cannot be used here."""
    assert g.persist is not None
    for _attempt in range(3):
        try:
            path = ensure_holder(config, sandbox, ttl=g.ttl, persist=g.persist, verbose=g.verbose)
        except HolderStartError as exc:
            raise CLIError(str(exc), exc.code) from None
        if path is None:
            return None
        old: Any = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, _protocol.on_sigterm)
        try:
            sys.stdout.flush()
            status, error = _protocol.attach_exec(
                path, job, (sys.stdin.fileno(), sys.stdout.fileno(), sys.stderr.fileno())
            )
        except _protocol.HolderUnavailable:
            continue  # it was exiting (idle) as we came: start another
        except _protocol.Interrupted as exc:
            raise CLIError(str(exc), exc.code) from None
        except _protocol.ProtocolError as exc:
            raise CLIError(str(exc), 255) from None
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        if error:
            raise CLIError(error, status)
        return status
    raise CLIError("could not reach a session holder (try --no-persist)", 255)


# -- sessions, close -------------------------------------------------------------------------


@app.command("sessions")
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


@app.command("close")
@_guard
def close_cmd(
    sandbox: Annotated[
        str | None,
        typer.Argument(
            metavar="[SANDBOX]", help="Close this sandbox's holders.", show_default=False
        ),
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
    """One rich progress bar over all bytes of a copy; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._base = 0
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

    def file(self, name: str) -> Callable[[int, int], None] | None:
        if self._bar is None:
            return None
        base = self._base
        short = name if len(name) <= 40 else "..." + name[-37:]
        self._bar.update(self._task, description=short, completed=base)

        def callback(done: int, total: int) -> None:
            self._bar.update(self._task, completed=base + done)

        return callback

    def tree(self, name: str) -> Callable[[int, int], None] | None:
        """A callback for a whole tree whose size is learned as it goes."""
        if self._bar is None:
            return None
        short = name if len(name) <= 40 else "..." + name[-37:]
        self._bar.update(self._task, description=short)

        def callback(done: int, total: int) -> None:
            self._bar.update(self._task, completed=done, total=total)

        return callback

    def done(self, size: int) -> None:
        self._base += size
        if self._bar is not None:
            self._bar.update(self._task, completed=self._base)


def _tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root``, links not followed (as put_dir)."""
    total = 0
    for here, _dirs, names in os.walk(root):
        for n in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(here, n))
                if stat_mod.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def _remote_is_dir(shell: SandboxSSH, path: str) -> bool:
    try:
        return stat_mod.S_ISDIR(shell.stat(path).st_mode or 0)
    except RemotePathError as exc:
        if exc.is_not_found:
            return False
        raise


def _upload(shell: SandboxSSH, src: Path, dst: str, recursive: bool, progress: bool) -> None:
    if src.is_dir():
        if not recursive:
            raise InvalidArgument(f"{str(src)!r} is a directory; use -r to copy a tree")
        name = Path(os.path.abspath(src)).name
        target = posixpath.join(dst, name) if _remote_is_dir(shell, dst) and name else dst
        # The library's tree copy: modes, mtimes, empty directories, symlinks kept as
        # links (never followed), each file atomic.
        with _Progress(progress, _tree_bytes(src)) as bar:
            shell.put_dir(src, target, callback=bar.file(str(src)))
        return
    if not src.exists():
        raise CLIError(f"{str(src)!r}: no such file or directory")
    if not src.is_file():
        raise CLIError(f"{str(src)!r} is not a regular file")
    with _Progress(progress, src.stat().st_size) as bar:
        shell.put(src, dst, callback=bar.file(src.name))
        bar.done(src.stat().st_size)


def _download(shell: SandboxSSH, src: str, dst: Path, recursive: bool, progress: bool) -> None:
    attrs = shell.stat(src)
    if stat_mod.S_ISDIR(attrs.st_mode or 0):
        if not recursive:
            raise InvalidArgument(f"remote {src!r} is a directory; use -r to copy a tree")
        name = posixpath.basename(src.rstrip("/"))
        target = dst / name if dst.is_dir() and name not in ("", ".", "..") else dst
        if not target.parent.is_dir():
            raise CLIError(f"local directory {str(target.parent)!r} does not exist")
        # get_dir never writes through a local symlink and keeps modes and mtimes.
        with _Progress(progress, 0) as bar:
            shell.get_dir(src, target, callback=bar.tree(src))
        return
    if not stat_mod.S_ISREG(attrs.st_mode or stat_mod.S_IFREG):
        raise CLIError(f"remote {src!r} is not a regular file")
    size = attrs.st_size or 0
    with _Progress(progress, size) as bar:
        shell.get(src, dst, callback=bar.file(src))
        bar.done(size)


@app.command("cp")
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
        local = Path(src)
        if not local.exists():
            raise CLIError(f"{src!r}: no such file or directory")
        with _connect(ctx, sandbox) as shell:
            _upload(shell, local, rpath, recursive, show)
    else:
        assert rsrc is not None
        sandbox, rpath = rsrc
        with _connect(ctx, sandbox) as shell:
            _download(shell, rpath, Path(dst), recursive, show)
    return 0


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


@app.command("forward")
@_guard
def forward_cmd(
    ctx: typer.Context,
    sandbox: SandboxArg,
    specs: Annotated[
        list[str],
        typer.Argument(
            metavar="LOCAL_PORT[:REMOTE_HOST]:REMOTE_PORT...",
            help="What to forward; REMOTE_HOST defaults to 127.0.0.1 (inside the sandbox), "
            "LOCAL_PORT 0 picks a free port. With -R: REMOTE_PORT[:LOCAL_HOST]:LOCAL_PORT.",
            show_default=False,
        ),
    ],
    bind: Annotated[
        str,
        typer.Option("--bind", help="Local address to listen on (not with -R)."),
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


@app.command("emulator")
@_guard
def emulator_cmd(
    ctx: typer.Context,
    sandboxes: Annotated[
        int, typer.Option("--sandboxes", "-n", min=0, max=1000, help="Sandboxes to create.")
    ] = 1,
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
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
    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)
        self.failures = 0

    def section(self, title: str) -> None:
        self.console.print(f"[bold]{title}[/bold]")

    def ok(self, text: str) -> None:
        self.console.print(f"  [green]ok[/green]    {text}", markup=True)

    def info(self, text: str) -> None:
        self.console.print(f"  [dim]info[/dim]  {text}")

    def fail(self, text: str, fix: str) -> None:
        self.failures += 1
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


@app.command("doctor")
@_guard
def doctor_cmd(
    ctx: typer.Context,
    sandbox: Annotated[
        str | None,
        typer.Argument(
            metavar="[SANDBOX]", help="Also check this sandbox and SSH to it.", show_default=False
        ),
    ] = None,
) -> int:
    """Check configuration, API reachability and (with SANDBOX) an SSH round trip."""
    g = _globals(ctx)
    if sandbox is not None:
        validate_sandbox_id(sandbox)
    r = _Report()
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

    r.section(f"Sandbox {sandbox}")
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


def _fail(message: str, code: int) -> int:
    _err(f"error: {_one_line(message)}")
    return code


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    command = typer.main.get_command(app)
    old_term: Any = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rv = command.main(
            args=list(argv) if argv is not None else sys.argv[1:],
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
        # stdout went away (`| head`): stop quietly, and keep Python from complaining.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
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


def main() -> NoReturn:
    """Console-script entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
