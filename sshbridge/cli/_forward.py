"""forward: local ports carried into the sandbox, through a holder when one is live."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import time
from typing import Annotated, Any

import typer

from sshbridge_fast import _protocol

from .._api import validate_sandbox_id
from .._config import load_config
from .._holder import HolderStartError, ensure_holder
from ._app import (
    CLIError,
    Globals,
    SandboxArg,
    app,
    connect,
    err,
    globals_of,
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
    g = globals_of(ctx)
    if g.persist is not None:
        validate_sandbox_id(sandbox)
        forwards = [
            {
                "listen": listen,
                "target": target,
                "host": host,
                "bind": (spec_bind or "127.0.0.1") if reverse else (spec_bind or bind),
                "reverse": reverse,
            }
            for spec_bind, listen, host, target in parsed
        ]
        with interrupts_as_keyboard():
            held = _in_holder(g, sandbox, forwards)
        if held is not None:
            return held
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
    return 130  # stopped by Ctrl-C or SIGTERM, the only ways it ends well: as every command


def _describe(sandbox: str, forward: dict[str, Any], port: int) -> str:
    """The line the direct path prints for one started forward."""
    bind, host, target = forward["bind"], forward["host"], forward["target"]
    if forward["reverse"]:
        return f"forwarding sandbox {bind}:{port} -> {host}:{target}"
    return f"forwarding {bind}:{port} -> sandbox {sandbox} {host}:{target}"


def _in_holder(g: Globals, sandbox: str, forwards: list[dict[str, Any]]) -> int | None:
    """Run the forwards in this sandbox's session holder (started if need be) until
    Ctrl-C or SIGTERM (as KeyboardInterrupt); the exit status. None if holders cannot be
    used here."""
    assert g.persist is not None
    config = load_config(api_key=g.api_key, base_url=g.base_url)
    job = {"op": "forward", "forwards": forwards, "persist": g.persist}
    for _attempt in range(3):
        try:
            path = ensure_holder(config, sandbox, ttl=g.ttl, persist=g.persist, verbose=g.verbose)
        except HolderStartError as exc:
            raise CLIError(str(exc), exc.code) from None
        if path is None:
            return None
        try:
            sock = _protocol.connect(path)
        except _protocol.HolderUnavailable:
            continue
        with sock:
            reader = _protocol.LineReader(sock)
            try:
                # Until "accepted" nothing ran: a holder exiting (idle) as we came is
                # someone to start again.
                _protocol.send_message(sock, job)
                first = reader.read()
            except OSError:
                continue
            if first is None or not first.get("accepted"):
                if first is not None and "status" in first:
                    raise CLIError(str(first.get("error")), int(first["status"]) or 1)
                continue
            return _attached(sandbox, forwards, sock, reader)
    raise CLIError("could not reach a session holder (try --no-persist)", 255)


def _attached(
    sandbox: str,
    forwards: list[dict[str, Any]],
    sock: socket.socket,
    reader: _protocol.LineReader,
) -> int:
    """Print the forwards the holder started and hold them open until interrupted; the
    holder closes them when our connection ends."""
    try:
        answer = reader.read()
    except (OSError, _protocol.ProtocolError) as exc:
        raise CLIError(f"the session holder went away: {exc}", 1) from None
    if answer is None:
        raise CLIError("the session holder went away before forwarding", 1)
    ports = answer.get("forwarding")
    if not isinstance(ports, list) or len(ports) != len(forwards):
        raise CLIError(
            str(answer.get("error") or "forwarding failed"), int(answer.get("status") or 1)
        )
    for forward, port in zip(forwards, ports, strict=True):
        err(_describe(sandbox, forward, int(port)))
    err("press Ctrl-C to stop")
    try:
        final = reader.read()  # nothing comes until the holder itself stops
    except KeyboardInterrupt:
        err("stopping")
        _release(sock, reader)
        return 130
    except (OSError, _protocol.ProtocolError):
        final = None
    if final is None:
        raise CLIError("the session holder went away; forwarding stopped", 1)
    raise CLIError(str(final.get("error") or "forwarding stopped"), int(final.get("status") or 1))


def _release(sock: socket.socket, reader: _protocol.LineReader) -> None:
    """End our forwards (our EOF) and wait, bounded, until the holder says they are
    closed, so their ports are free once we exit."""
    with contextlib.suppress(OSError, _protocol.ProtocolError, KeyboardInterrupt):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(15.0)
        while True:
            answer = reader.read()
            if answer is None or "status" in answer:
                return
