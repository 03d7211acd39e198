"""emulator: the local stand-in for the provider, in the foreground."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Annotated

import typer

from .._exceptions import (
    ConfigurationError,
)
from ._app import (
    app,
    err,
    globals_of,
    guard,
    interrupts_as_keyboard,
)

log = logging.getLogger("sshbridge.cli")


# -- emulator ------------------------------------------------------------------------------


@app.command("emulator", epilog="Example: `sshbridge emulator --sandboxes 2 --env-file emu.env`")
@guard
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
        from ..emulator import Emulator
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

    g = globals_of(ctx)
    written: os.stat_result | None = None
    with (
        interrupts_as_keyboard(),
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
            err(
                f"emulator ready ({contract} contract); in another shell run the export "
                f"lines, then `sshbridge ssh {example}`. Ctrl-C stops it."
            )
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                err("stopping the emulator")
        finally:
            if env_file is not None and written is not None:
                with contextlib.suppress(OSError):
                    now = env_file.stat()
                    # Only our own file: someone may have put another one there since.
                    if (now.st_dev, now.st_ino) == (written.st_dev, written.st_ino):
                        env_file.unlink()
    return 0
