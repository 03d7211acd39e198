"""The ``sshbridge`` app: global options, plumbing every command shares, and the entry
point that turns every failure into one line and an exit status."""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from typer.core import TyperArgument, TyperOption

from sshbridge_fast import persist_seconds
from sshbridge_fast._protocol import PERSIST_ENV

from .._exceptions import (
    InvalidArgument,
    SSHBridgeError,
)
from .._sandbox import SandboxSSH
from .._version import __version__

log = logging.getLogger("sshbridge.cli")

F = TypeVar("F", bound=Callable[..., Any])

_verbosity = 0
# A remote path in cp: "SANDBOX:PATH" where SANDBOX is a plain id (as the API accepts).
# Anything else, like "./a:b" or "/tmp/x:y", is a local path, as with scp.
REMOTE_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]{0,127}):(.*)$", re.DOTALL)
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


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def err(message: str) -> None:
    sys.stderr.write(f"sshbridge: {message}\n")
    sys.stderr.flush()


class _PlainFormatter(logging.Formatter):
    """``sshbridge: warning: ...``, one line like every other message."""

    def format(self, record: logging.LogRecord) -> str:
        return f"sshbridge: {record.levelname.lower()}: {one_line(record.getMessage())}"


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


def globals_of(ctx: typer.Context) -> Globals:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Globals) else Globals()


@contextlib.contextmanager
def connect(ctx: typer.Context, sandbox: str) -> Iterator[SandboxSSH]:
    g = globals_of(ctx)
    with SandboxSSH(sandbox, api_key=g.api_key, base_url=g.base_url, ttl_seconds=g.ttl) as shell:
        yield shell


def interrupts_as_keyboard() -> contextlib.AbstractContextManager[None]:
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


def command_words(command: Sequence[str] | None) -> list[str]:
    # Without interspersed options click keeps the "--" separator as an argument.
    words = list(command or [])
    if words and words[0] == "--":
        words = words[1:]
    return words


def command_argv(command: Sequence[str]) -> str | list[str]:
    """One argument is a shell command line; several are an argv, quoted safely."""
    if len(command) == 1:
        return command[0]
    return list(command)


def usage(message: str) -> Exception:
    return typer.BadParameter(message)


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not _ENV_RE.fullmatch(name):
            raise typer.BadParameter(
                f"{pair!r} is not NAME=VALUE with a valid variable name", param_hint="'--env'"
            )
        env[name] = value
    return env


def guard(func: F) -> F:
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


def cli_message(message: str) -> str:
    """A library message in the CLI's terms (flags and variables, not keywords)."""
    text = one_line(message)
    for pattern, replacement in _CLI_WORDING:
        text = pattern.sub(replacement, text)
    return text


def _fail(message: str, code: int) -> int:
    err(f"error: {cli_message(message)}")
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
        err("error: terminated")
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
