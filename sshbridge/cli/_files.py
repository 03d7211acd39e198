"""cp: files and trees, through a holder when one is live."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .._api import validate_sandbox_id
from .._holder import (
    Report,
    download,
    upload,
)
from ._app import (
    REMOTE_RE,
    CLIError,
    app,
    connect,
    globals_of,
    guard,
)
from ._shell import in_holder

log = logging.getLogger("sshbridge.cli")


# -- cp ------------------------------------------------------------------------------------


def _split_remote(spec: str) -> tuple[str, str] | None:
    m = REMOTE_RE.match(spec)
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
@guard
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
    g = globals_of(ctx)
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
            held = in_holder(g, sandbox, job, on_message=bar.message)
            if held is not None:
                status, error = held
                if error or status:
                    raise CLIError(error or f"the copy failed (status {status})", status or 1)
                return 0
        with connect(ctx, sandbox) as shell:
            if rdst is not None:
                upload(shell, local, shown, rpath, recursive, bar.report())
            else:
                download(shell, rpath, local, shown, recursive, bar.report())
    return 0


def _current_umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
