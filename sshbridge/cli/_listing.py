"""ls, sessions and close: what exists, and what this user holds open."""

from __future__ import annotations

import logging
import re
import sys
from typing import Annotated, Any

import typer

from sshbridge_fast import _jsonout

from .._api import APIClient, validate_sandbox_id
from .._config import load_config
from .._holder import (
    close_holder,
    list_holders,
)
from ._app import (
    app,
    err,
    globals_of,
    guard,
    usage,
)

log = logging.getLogger("sshbridge.cli")


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
@guard
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
    g = globals_of(ctx)
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
        err("no sandboxes" + (f" with status {', '.join(sorted(wanted))}" if wanted else ""))
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
@guard
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
        err("no persistent sessions")
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
@guard
def close_cmd(
    sandbox: Annotated[
        str | None,
        typer.Argument(metavar="SANDBOX", help="Close this sandbox's holders.", show_default=False),
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Close every holder of this user.")] = False,
) -> int:
    """Close persistent sessions: their holders DELETE the sessions and exit."""
    if (sandbox is None) == (not all_):
        raise usage("give a SANDBOX or --all")
    if sandbox is not None:
        validate_sandbox_id(sandbox)
    closed = 0
    for h in list_holders():
        if all_ or h.sandbox == sandbox:
            closed += close_holder(h.path)
    if sandbox is not None and not closed:
        err(f"no persistent session for {sandbox}")
    return 0
