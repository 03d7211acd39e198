"""doctor: configuration, API, sandbox and SSH checked in order."""

from __future__ import annotations

import logging
import sys
import time
from typing import Annotated, Any

import typer

from sshbridge_fast import _jsonout

from .._api import APIClient, validate_sandbox_id
from .._config import config_file_path, describe_config, load_config
from .._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    AuthenticationError,
    ConfigurationError,
    InvalidArgument,
    NotFound,
    SandboxNotRunning,
    SandboxNotSupported,
    SSHBridgeError,
)
from .._sandbox import SandboxSSH
from ._app import (
    app,
    cli_message,
    globals_of,
    guard,
    one_line,
)

log = logging.getLogger("sshbridge.cli")


# -- doctor --------------------------------------------------------------------------------


class _Report:
    """The doctor's findings: printed as they come, or kept for one JSON object."""

    def __init__(self, as_json: bool = False) -> None:
        self.console: Any = None
        if not as_json:
            from rich.console import Console

            self.console = Console(highlight=False, soft_wrap=True)
        self.failures = 0
        self.checks: list[dict[str, str | None]] = []
        self._section = ""

    def section(self, title: str, key: str | None = None) -> None:
        self._section = key or title.lower()
        if self.console is not None:
            self.console.print(f"[bold]{title}[/bold]")

    def _record(self, status: str, text: str, fix: str | None = None) -> None:
        self.checks.append(
            {"section": self._section, "status": status, "message": text, "fix": fix}
        )

    def ok(self, text: str) -> None:
        self._record("ok", text)
        if self.console is not None:
            self.console.print(f"  [green]ok[/green]    {text}", markup=True)

    def info(self, text: str) -> None:
        self._record("info", text)
        if self.console is not None:
            self.console.print(f"  [dim]info[/dim]  {text}")

    def fail(self, text: str, fix: str) -> None:
        self.failures += 1
        text = cli_message(text)
        self._record("fail", text, fix)
        if self.console is not None:
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


@app.command(
    "doctor",
    epilog="Example: `sshbridge doctor sbx_abc123` (or `sshbridge doctor --json` for scripts)",
)
@guard
def doctor_cmd(
    ctx: typer.Context,
    sandbox: Annotated[
        str | None,
        typer.Argument(
            metavar="SANDBOX", help="Also check this sandbox and SSH to it.", show_default=False
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON object instead: ok (true when nothing failed), sandbox, "
            "and checks, a list of {section: configuration|api|sandbox|ssh, status: "
            "ok|info|fail, message, fix}.",
        ),
    ] = False,
) -> int:
    """Check configuration, API reachability and (with SANDBOX) an SSH round trip.

    Exits 0 when every check passed, 1 otherwise.
    """
    if sandbox is not None:
        validate_sandbox_id(sandbox)
    r = _Report(as_json)
    _doctor(ctx, sandbox, r)
    code = 0 if r.failures == 0 else 1
    if as_json:
        sys.stdout.flush()
        _jsonout.write_json({"ok": code == 0, "sandbox": sandbox, "checks": r.checks})
    return code


def _doctor(ctx: typer.Context, sandbox: str | None, r: _Report) -> int:
    g = globals_of(ctx)
    r.section("Configuration")
    try:
        # Where each setting comes from is the config module's answer, not re-derived here.
        sources = describe_config(api_key=g.api_key, base_url=g.base_url)
    except (ConfigurationError, InvalidArgument) as exc:
        r.fail(one_line(str(exc)), "correct the value named above")
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
        r.fail(one_line(str(exc)), "correct the value named above")
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
                f"cannot reach {config.base_url}: {one_line(str(exc))}",
                "check the network, a proxy (HTTPS_PROXY) or --base-url",
            )
            return 1
        except APIStatusError as exc:
            if sandbox is not None:
                r.fail(one_line(str(exc)), "see the message; retry later for 429/5xx")
                return 1
            found = None
            r.ok(f"reachable (answered {exc.status_code}, {_ms(start)})")
        except APIError as exc:
            r.fail(one_line(str(exc)), "retry later")
            return 1
        if found is None or sandbox is None:
            if sandbox is None:
                r.info("pass a SANDBOX id to check a sandbox and an SSH round trip")
            return 0 if r.failures == 0 else 1
        r.ok(f"reachable, key accepted ({_ms(start)})")
    finally:
        api.close()

    r.section(f"Sandbox {sandbox}", "sandbox")
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
        r.fail(one_line(str(exc)), "start the sandbox and retry")
    except SSHBridgeError as exc:
        r.fail(
            one_line(str(exc)),
            "retry; if it persists run `sshbridge -v doctor SANDBOX` and check the network "
            "to the sandbox's SSH endpoint",
        )
    return 0 if r.failures == 0 else 1


def _ms(start: float) -> str:
    ms = (time.monotonic() - start) * 1000
    return f"{ms:.0f} ms" if ms < 10000 else f"{ms / 1000:.1f} s"
