"""The ``sshbridge`` console script's entry point: a fast path for ``exec`` and ``ssh``.

``sshbridge exec SANDBOX -- CMD``, and ``sshbridge ssh SANDBOX CMD`` without a terminal
(``rsync -e``, ``GIT_SSH_COMMAND``), against a live session holder are handled here without
importing typer, rich, paramiko, pydantic or requests (the ``sshbridge`` package's
``__init__`` imports all of them, which is why this lives in a package of its own).
Everything else, and a call with no live holder, goes to ``sshbridge.cli:main``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import signal
import sys
import time
import types
from collections.abc import Sequence
from typing import Any, NoReturn

from . import _protocol

_SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VALUED_GLOBALS = {"--api-key": "api_key", "--base-url": "base_url", "--ttl": "ttl"}
_VALUED_EXEC = {
    "--timeout": "timeout",
    "-e": "env",
    "--env": "env",
    "-w": "cwd",
    "--cwd": "cwd",
}
_FLAG_EXEC = {
    "-i": "stdin",
    "--stdin": "stdin",
    "-n": "no_stdin",
    "-t": "tty",
    "--tty": "tty",
    "--json": "json",
}
# Set by the shell completion scripts typer generates: the full CLI answers those.
_COMPLETE_ENV = "_SSHBRIDGE_COMPLETE"


class _Defer(Exception):
    """Not for the fast path: the full CLI handles (and reports) it."""


def _split_option(arg: str) -> tuple[str, str | None]:
    if arg.startswith("--") and "=" in arg:
        name, _, value = arg.partition("=")
        return name, value
    return arg, None


def _parse_globals(args: Sequence[str], command: str) -> tuple[dict[str, Any], int]:
    """Global options before ``command``: (options, index of the first word after it)."""
    opts: dict[str, Any] = {"env": [], "persist": None, "no_persist": False}
    i = 0
    while i < len(args) and args[i] != command:
        name, inline = _split_option(args[i])
        if name in _VALUED_GLOBALS or name == "--persist":
            if inline is None:
                if i + 1 >= len(args):
                    raise _Defer
                i += 1
                inline = args[i]
            opts[_VALUED_GLOBALS.get(name, "persist")] = inline
        elif name == "--no-persist" and inline is None:
            opts["no_persist"] = True
        else:
            raise _Defer  # -v, --help, --version, other commands
        i += 1
    if i >= len(args):
        raise _Defer
    return opts, i + 1


def parse_exec(argv: Sequence[str]) -> dict[str, Any]:
    """The fast path's reading of ``[GLOBALS] exec [OPTIONS] SANDBOX [--] CMD...``.

    Raises _Defer for anything it does not fully understand."""
    args = list(argv)
    opts, i = _parse_globals(args, "exec")

    def value() -> str:
        nonlocal i
        if i + 1 >= len(args):
            raise _Defer
        i += 1
        return args[i]

    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        name, inline = _split_option(args[i])
        if name in _VALUED_EXEC:
            key = _VALUED_EXEC[name]
            text = inline if inline is not None else value()
            if key == "env":
                opts["env"].append(text)
            else:
                opts[key] = text
        elif name in _FLAG_EXEC and inline is None:
            opts[_FLAG_EXEC[name]] = True
        else:
            raise _Defer
        i += 1
    if i >= len(args):
        raise _Defer
    opts["sandbox"] = args[i]
    words = args[i + 1 :]
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise _Defer
    opts["command"] = words
    return opts


def parse_ssh(argv: Sequence[str]) -> dict[str, Any]:
    """The fast path's reading of ``[GLOBALS] ssh [-T|-t] SANDBOX [COMMAND...]``, for a
    call without a remote terminal (how rsync and git call it). Raises _Defer otherwise."""
    args = list(argv)
    opts, i = _parse_globals(args, "ssh")
    tty: bool | None = None
    while i < len(args) and args[i].startswith("-"):
        if args[i] in ("-T", "--no-tty"):
            tty = False
        elif args[i] in ("-t", "--tty"):
            tty = True
        else:
            raise _Defer  # --help, -G (git probing for OpenSSH), ...: the full CLI answers
        i += 1
    if i >= len(args):
        raise _Defer
    opts["sandbox"] = args[i]
    words = args[i + 1 :]
    if words and words[0] == "--":
        words = words[1:]
    elif words and words[0].startswith("-"):
        raise _Defer  # an option after SANDBOX: the full CLI says why that is an error
    if os.isatty(0) if tty is None else tty:
        raise _Defer  # a remote terminal: the full CLI's interactive session
    # Like ssh: the words joined with spaces, for the remote shell to split.
    line = " ".join(words)
    if words and not line.strip():
        raise _Defer
    opts["line"] = line
    return opts


def ssh_job(line: str) -> dict[str, Any]:
    """The holder request for ``ssh`` without a terminal: a command line, or (empty) a
    login shell reading stdin."""
    job: dict[str, Any] = {"env": {}, "pty": False, "stdin": True, "ssh": True}
    if line:
        job["command"] = [line]
    else:
        job["login"] = True
    return job


def _job(opts: dict[str, Any]) -> dict[str, Any]:
    """The holder request, validated as the full CLI would (else _Defer)."""
    if not _SANDBOX_ID.fullmatch(opts["sandbox"]):
        raise _Defer
    env: dict[str, str] = {}
    for pair in opts["env"]:
        name, sep, val = pair.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise _Defer
        env[name] = val
    timeout: float | None = None
    if opts.get("timeout") is not None:
        try:
            timeout = float(opts["timeout"])
        except ValueError:
            raise _Defer from None
        if not math.isfinite(timeout) or timeout < 0.001:
            raise _Defer
    if any("\x00" in w for w in opts["command"]):
        raise _Defer
    return {
        "command": opts["command"],
        "env": env,
        "cwd": opts.get("cwd"),
        "timeout": timeout,
        "pty": bool(opts.get("tty")),
        "stdin": not opts.get("no_stdin"),
    }


def persist_seconds(option: str | None, disabled: bool) -> float | None:
    """The idle timeout in effect: --no-persist, --persist SECONDS, $SSHBRIDGE_PERSIST."""
    if disabled:
        return None
    if option is not None:
        return _protocol.parse_persist(option)
    return _protocol.parse_persist(os.environ.get(_protocol.PERSIST_ENV))


def _load_config_module() -> types.ModuleType:
    """``sshbridge._config`` without running ``sshbridge/__init__`` (which imports
    paramiko): the same resolution code the library uses, loaded under a bare package."""
    if "sshbridge" in sys.modules:
        return importlib.import_module("sshbridge._config")
    spec = importlib.util.find_spec("sshbridge")
    if spec is None or not spec.submodule_search_locations:
        raise _Defer
    bare = types.ModuleType("sshbridge")
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__package__ = "sshbridge"
    sys.modules["sshbridge"] = bare
    try:
        return importlib.import_module("sshbridge._config")
    finally:
        _forget_bare_package()


def _forget_bare_package() -> None:
    # The real package (and fresh copies of these submodules) load normally later.
    for name in [n for n in sys.modules if n == "sshbridge" or n.startswith("sshbridge.")]:
        del sys.modules[name]


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand the fast path may handle, from the first non-global word."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name, inline = _split_option(arg)
        if (name in _VALUED_GLOBALS or name == "--persist") and inline is None:
            skip = True
        elif not arg.startswith("-"):
            return arg if arg in ("exec", "ssh") else None
    return None


def _try_fast(argv: Sequence[str]) -> int:
    if os.environ.get(_COMPLETE_ENV):
        raise _Defer
    try:
        if _command_of(argv) == "ssh":
            opts = parse_ssh(argv)
            if not _SANDBOX_ID.fullmatch(opts["sandbox"]):
                raise _Defer
            job = ssh_job(opts["line"])
        else:
            opts = parse_exec(argv)
            job = _job(opts)
        persist = persist_seconds(opts["persist"], opts["no_persist"])
        if opts.get("ttl") is not None and not 1 <= int(opts["ttl"]) <= 3600:
            raise _Defer
    except ValueError:
        raise _Defer from None
    if persist is None:
        raise _Defer
    config_mod = _load_config_module()
    try:
        config = config_mod.load_config(api_key=opts.get("api_key"), base_url=opts.get("base_url"))
    except Exception:  # noqa: BLE001 - the full CLI reports it properly
        raise _Defer from None
    try:
        directory = _protocol.runtime_dir(create=False)
    except OSError:
        raise _Defer from None
    path = _protocol.socket_path(
        directory,
        _protocol.holder_name(config.base_url, config.team_id, config.api_key, opts["sandbox"]),
    )
    if path is None:
        raise _Defer
    job["persist"] = persist
    if opts.get("json"):
        return _fast_json(path, job, opts)
    old = signal.signal(signal.SIGTERM, _protocol.on_sigterm)
    try:
        status, error = _protocol.attach_exec(path, job)
    except (_protocol.HolderUnavailable, PermissionError):
        raise _Defer from None
    except _protocol.Interrupted as exc:
        _error(str(exc))
        return exc.code
    except (_protocol.ProtocolError, OSError) as exc:
        _error(str(exc))
        return 255
    finally:
        signal.signal(signal.SIGTERM, old)
    if error:
        _error(error)
    return status


def _fast_json(path: Any, job: dict[str, Any], opts: dict[str, Any]) -> int:
    """``exec --json`` through a live holder: output captured, one JSON object printed."""
    from . import _jsonout  # only here: plain exec stays as light as it was

    out, err = _jsonout.capture_files()
    with out, err:
        old = signal.signal(signal.SIGTERM, _protocol.on_sigterm)
        start = time.monotonic()
        try:
            status, error = _protocol.attach_exec(path, job, (0, out.fileno(), err.fileno()))
        except (_protocol.HolderUnavailable, PermissionError):
            raise _Defer from None
        except _protocol.Interrupted as exc:
            status, error = exc.code, str(exc)
        except (_protocol.ProtocolError, OSError) as exc:
            status, error = 255, str(exc)
        finally:
            signal.signal(signal.SIGTERM, old)
        duration = time.monotonic() - start
        result = _jsonout.exec_result(
            opts["sandbox"], opts["command"], status, error, out, err, duration
        )
    _jsonout.write_json(result)
    if error:
        _error(error)
    return status


def _error(message: str) -> None:
    sys.stderr.write(f"sshbridge: error: {' '.join(message.split())}\n")
    sys.stderr.flush()


def main() -> NoReturn:
    """Console-script entry point."""
    argv = sys.argv[1:]
    try:
        code = _try_fast(argv)
    except KeyboardInterrupt:
        _error("interrupted")
        code = 130
    except BrokenPipeError:
        _quiet_stdout()
        code = 141
    except _Defer:
        full_main = _load_full_cli()
        full_main()
    sys.exit(code)


def _quiet_stdout() -> None:
    # stdout went away (`| head`): nothing more to say, and no complaint at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
    except OSError:
        pass


_CLI_EXTRA = ("typer", "rich", "click", "shellingham")


def _load_full_cli() -> Any:
    try:
        from sshbridge.cli import main as full_main
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing in _CLI_EXTRA:
            _error(
                f"the command line needs the 'cli' extra ({missing} is missing): "
                "pip install 'sshbridge[cli]'"
            )
        else:
            _error(
                f"cannot load sshbridge: module {exc.name or exc} is missing; "
                "reinstall it: pip install --force-reinstall 'sshbridge[cli]'"
            )
        sys.exit(1)
    except ImportError as exc:
        # A broken or half-upgraded installation, not something the user typed.
        _error(f"cannot load sshbridge ({exc}); reinstall it: pip install 'sshbridge[cli]'")
        sys.exit(1)
    return full_main
