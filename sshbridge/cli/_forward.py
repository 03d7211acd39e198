"""forward: local ports carried into the sandbox."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from typing import Annotated

import typer

from ._app import (
    SandboxArg,
    app,
    connect,
    err,
    guard,
    interrupts_as_keyboard,
)

log = logging.getLogger("sshbridge.cli")


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
@guard
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
    with interrupts_as_keyboard(), connect(ctx, sandbox) as shell, contextlib.ExitStack() as st:
        for spec_bind, listen, host, target in parsed:
            if reverse:
                port = st.enter_context(
                    shell.forward_remote(
                        listen, target, local_host=host, remote_host=spec_bind or "127.0.0.1"
                    )
                )
                err(f"forwarding sandbox {spec_bind or '127.0.0.1'}:{port} -> {host}:{target}")
            else:
                local_host = spec_bind or bind
                port = st.enter_context(shell.forward(target, listen, host, local_host))
                err(f"forwarding {local_host}:{port} -> sandbox {sandbox} {host}:{target}")
        err("press Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            err("stopping")
    return 0
