"""The ``sshbridge`` command line: ssh, exec, ls, sessions, close, cp, forward, emulator,
doctor.

Every failure ends as one line on stderr and an exit status: 2 for usage errors, 1 for
other errors, 130 on Ctrl-C; ``exec`` and ``ssh`` pass the remote exit status through.
Needs the ``cli`` extra (typer, rich). One module per command group; ``_app`` holds the
global options, the shared plumbing and the entry point. Nothing is imported until it is
used, so ``python -m sshbridge.cli`` without the extra can still say what to install.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import typer

# Help and completion list commands in this order, not in import order.
_ORDER = ("ssh", "exec", "ls", "sessions", "close", "cp", "forward", "emulator", "doctor")


def _app() -> typer.Typer:
    # Each module registers its commands on the app when imported.
    from . import _doctor, _emulator_cmd, _files, _forward, _listing, _shell  # noqa: F401
    from ._app import app

    app.registered_commands.sort(
        key=lambda c: _ORDER.index(c.name) if c.name in _ORDER else len(_ORDER)
    )
    return app


_CLI_EXTRA = ("typer", "click", "rich", "shellingham")


def _loaded() -> bool:
    """Load the app; without the extra, say once what to install (no traceback)."""
    try:
        _app()
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in _CLI_EXTRA:
            raise
        sys.stderr.write(
            f"sshbridge: error: the command line needs the 'cli' extra ({missing} is "
            "missing): pip install 'sshbridge[cli]'\n"
        )
        return False
    return True


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv``; returns the exit status."""
    if not _loaded():
        return 1
    from ._app import run as run_app

    return run_app(argv)


def main() -> NoReturn:
    """The console entry point."""
    if not _loaded():
        sys.exit(1)
    from ._app import main as main_app

    main_app()


def __getattr__(name: str) -> Any:
    if name == "app":
        return _app()
    if name == "CLIError":
        from ._app import CLIError

        return CLIError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CLIError", "app", "main", "run"]
