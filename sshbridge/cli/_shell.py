"""ssh and exec: a remote shell or command, through a holder when one is live."""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

from sshbridge_fast import _jsonout, _protocol

from .._api import validate_sandbox_id
from .._config import load_config
from .._exceptions import (
    APIConnectionError,
    InvalidArgument,
    SandboxError,
    SSHBridgeError,
    SSHError,
)
from .._holder import (
    HolderStartError,
    ensure_holder,
)
from .._runner import build_command, check_timeout
from .._stream import StreamOutcome, stream_command
from ._app import (
    CLIError,
    Globals,
    SandboxArg,
    app,
    cli_message,
    command_argv,
    command_words,
    connect,
    err,
    globals_of,
    guard,
    parse_env,
    usage,
)

log = logging.getLogger("sshbridge.cli")


# -- ssh -----------------------------------------------------------------------------------


@app.command(
    "ssh",
    context_settings={"allow_interspersed_args": False},
    epilog="Example: `sshbridge ssh sbx_abc123` (a shell), `sshbridge ssh sbx_abc123 -- ls -la`",
)
@guard
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
    words = command_words(command)
    if words and words[0].startswith("-") and command and command[0] != "--":
        raise usage(
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
    g = globals_of(ctx)
    use_pty = sys.stdin.isatty() if tty is None else tty
    if g.persist is not None and not use_pty:
        # No terminal (rsync -e, GIT_SSH_COMMAND, a pipe): through the session holder.
        job = {"env": {}, "pty": False, "stdin": True, "ssh": True, "persist": g.persist}
        job.update({"command": [argv]} if argv else {"login": True})
        fds = (sys.stdin.fileno(), sys.stdout.fileno(), sys.stderr.fileno())
        held = in_holder(g, sandbox, job, fds, ssh=True)
        if held is not None:
            status, error = held
            if error:
                raise CLIError(error, status)
            return status
    try:
        with connect(ctx, sandbox) as shell:
            status = shell.interactive(argv, pty=tty)
    except (SSHError, APIConnectionError, SandboxError) as exc:
        raise CLIError(str(exc), 255) from None  # as ssh: 255 when the connection fails
    if status < 0:
        err("the remote side ended without an exit status (killed by a signal?)")
        return 255
    return status


# -- exec ----------------------------------------------------------------------------------


@app.command(
    "exec",
    context_settings={"allow_interspersed_args": False},
    epilog="Example: `sshbridge exec --timeout 60 -e DEBUG=1 sbx_abc123 -- python train.py`",
)
@guard
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
    words = command_words(command)
    if not words:
        raise usage("missing the command to run (sshbridge exec SANDBOX -- COMMAND...)")
    variables = parse_env(env or [])
    validate_sandbox_id(sandbox)
    if timeout is not None and not math.isfinite(timeout):
        raise typer.BadParameter("must be a finite number of seconds", param_hint="'--timeout'")
    if cwd is not None and not cwd.strip():
        raise typer.BadParameter("must be a non-empty path", param_hint="'--cwd'")
    # Bad input costs no session (and no holder).
    build_command(command_argv(words), cwd=cwd, env=variables or None)
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
            error = cli_message(str(exc))
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
        g = globals_of(self.ctx)
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
            held = in_holder(g, self.sandbox, job, fds, timing=self)
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
        with connect(self.ctx, self.sandbox) as shell:
            self.started = time.monotonic()
            return stream_command(
                shell.channel_source(),
                command_argv(self.words),
                cwd=self.cwd,
                env=self.variables or None,
                timeout=self.timeout,
                pty=self.tty,
                stdin_fd=None if self.no_stdin else sys.stdin.fileno(),
                stdout_fd=stdout_fd,
                stderr_fd=stderr_fd,
            )


def in_holder(
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
