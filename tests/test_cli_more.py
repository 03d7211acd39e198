"""The command line for agents and people: --json, ls, completion, help, errors, extras.

Every test runs the real CLI as a subprocess against the real emulator.
"""

# ruff: noqa: F811 - pytest fixtures imported from cli_helpers are parameters here
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import (  # noqa: F401 - fixtures are used by name
    CLI,
    FAST_CLI,
    cli_env,
    contract,
    emu,
    fast,
    holder_pids,
    one_error_line,
    run_cli,
    sandbox,
)

from sshbridge.emulator import Emulator

pytestmark = pytest.mark.timeout(120)

JSON_KEYS = {
    "sandbox",
    "command",
    "exit_code",
    "stdout",
    "stdout_encoding",
    "stderr",
    "stderr_encoding",
    "duration_seconds",
    "timed_out",
    "error",
}


def one_object(stdout: bytes) -> dict:  # type: ignore[type-arg]
    lines = stdout.decode().splitlines()
    assert len(lines) == 1, lines
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


# -- exec --json -----------------------------------------------------------------------------


@pytest.mark.contracts
@pytest.mark.parametrize("how", ["holder-fast", "holder-full", "direct"])
def test_exec_json(emu: Emulator, sandbox: str, cli_env: dict[str, str], how: str) -> None:
    def run(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        if how == "holder-fast":
            return fast("exec", "--json", *args, env=cli_env, input=input)
        if how == "holder-full":  # the full CLI's own route to the holder
            return run_cli("exec", "--json", *args, env=cli_env, input=input)
        return run_cli("--no-persist", "exec", "--json", *args, env=cli_env, input=input)

    r = run(sandbox, "--", "echo out; echo err >&2; exit 3")
    assert r.returncode == 3 and r.stderr == b""
    obj = one_object(r.stdout)
    assert set(obj) == JSON_KEYS
    assert obj["sandbox"] == sandbox and obj["command"] == ["echo out; echo err >&2; exit 3"]
    assert (obj["exit_code"], obj["stdout"], obj["stderr"]) == (3, "out\n", "err\n")
    assert obj["stdout_encoding"] == obj["stderr_encoding"] == "utf-8"
    assert obj["timed_out"] is False and obj["error"] is None
    assert 0 < obj["duration_seconds"] < 30

    # Not UTF-8: base64 of the exact bytes.
    blob = bytes(range(256)) * 8
    (emu.sandbox_dir(sandbox) / "blob").write_bytes(blob)
    obj = one_object(run(sandbox, "--", "cat blob; printf 'é' >&2").stdout)
    assert obj["stdout_encoding"] == "base64"
    assert base64.b64decode(obj["stdout"]) == blob
    assert (obj["stderr"], obj["stderr_encoding"]) == ("é", "utf-8")

    # stdin still reaches the command; an argv stays an argv.
    obj = one_object(run(sandbox, "--", "tr", "a-z", "A-Z", input=b"hi\n").stdout)
    assert (obj["exit_code"], obj["stdout"], obj["command"]) == (0, "HI\n", ["tr", "a-z", "A-Z"])

    r = run("--timeout", "0.5", sandbox, "--", "echo started; sleep 30")
    assert r.returncode == 124
    obj = one_object(r.stdout)
    assert obj["timed_out"] is True and obj["stdout"] == "started\n"
    assert "did not finish within 0.5 s" in obj["error"]
    assert obj["error"] in one_error_line(r.stderr)
    if how != "direct":
        assert len(holder_pids(Path(cli_env["XDG_RUNTIME_DIR"]))) == 1


def test_exec_json_failures_still_give_an_object(
    emu: Emulator, sandbox: str, cli_env: dict[str, str]
) -> None:
    for args in (("exec", "--json"), ("--no-persist", "exec", "--json")):
        r = run_cli(*args, "sbx_doesnotexist", "--", "true", env=cli_env)
        assert r.returncode == 1
        obj = one_object(r.stdout)
        assert obj["exit_code"] == 1 and "not found" in obj["error"].lower()
        assert (obj["stdout"], obj["duration_seconds"]) == ("", 0.0)
        one_error_line(r.stderr)
    env = {k: v for k, v in cli_env.items() if k != "PRIME_API_KEY"}
    r = run_cli("exec", "--json", sandbox, "--", "true", env=env)
    assert r.returncode == 1 and "PRIME_API_KEY" in one_object(r.stdout)["error"]
    # Usage errors come before: one line, no object.
    r = run_cli("exec", "--json", "--timeout", "soon", sandbox, "--", "true", env=cli_env)
    assert r.returncode == 2 and r.stdout == b""
    one_error_line(r.stderr)


# -- doctor --json ---------------------------------------------------------------------------


def test_doctor_json(emu: Emulator, sandbox: str, cli_env: dict[str, str]) -> None:
    r = run_cli("doctor", "--json", sandbox, env=cli_env)
    assert r.returncode == 0, r.stderr
    report = one_object(r.stdout)
    assert set(report) == {"ok", "sandbox", "checks"}
    assert report["ok"] is True and report["sandbox"] == sandbox
    sections = [c["section"] for c in report["checks"]]
    assert {"configuration", "api", "sandbox", "ssh"} <= set(sections)
    for check in report["checks"]:
        assert set(check) == {"section", "status", "message", "fix"}
        assert check["status"] in ("ok", "info") and check["fix"] is None
    assert emu.api_key not in r.stdout.decode()

    emu.set_status(paused := emu.create_sandbox(), "PAUSED")
    r = run_cli("doctor", "--json", paused, env=cli_env)
    report = one_object(r.stdout)
    assert r.returncode == 1 and report["ok"] is False
    [failed] = [c for c in report["checks"] if c["status"] == "fail"]
    assert failed["section"] == "sandbox" and "PAUSED" in failed["message"] and failed["fix"]

    env = {k: v for k, v in cli_env.items() if k != "PRIME_API_KEY"}
    r = run_cli("doctor", "--json", env=env)
    report = one_object(r.stdout)
    assert r.returncode == 1 and report["ok"] is False and report["sandbox"] is None
    assert "--api-key" in report["checks"][-1]["fix"]


# -- ls --------------------------------------------------------------------------------------


def test_ls_follows_every_page_filters_and_limits(tmp_path: Path) -> None:
    with Emulator() as e:
        ids = [e.create_sandbox() for _ in range(205)]
        for sid in ids[10:13]:
            e.set_status(sid, "PAUSED")
        home = tmp_path / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
        env.update(e.env(), HOME=str(home))

        def list_pages() -> list[str]:
            return [c.path for c in e.api_calls if c.endpoint == "list_sandboxes"]

        r = run_cli("ls", "--json", env=env)
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert [row["id"] for row in rows] == ids
        assert set(rows[0]) == {"id", "name", "status", "created_at", "docker_image", "vm"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rows[0]["created_at"])
        assert len(list_pages()) == 3  # 100 + 100 + 5

        r = run_cli("ls", env=env)
        lines = r.stdout.decode().splitlines()
        assert lines[0].split() == ["ID", "NAME", "STATUS", "CREATED"]
        assert len(lines) == 206 and lines[11].split()[0] == ids[10]
        assert lines[11].split()[2] == "PAUSED"

        before = len(list_pages())
        r = run_cli("ls", "--json", "--limit", "7", env=env)
        assert [row["id"] for row in json.loads(r.stdout)] == ids[:7]
        assert len(list_pages()) == before + 1  # one small page, nothing more

        r = run_cli("ls", "--json", "--status", "paused", env=env)
        assert [row["id"] for row in json.loads(r.stdout)] == ids[10:13]
        r = run_cli("ls", "-s", "PAUSED", "-s", "RUNNING", "--limit", "12", "--json", env=env)
        assert [row["id"] for row in json.loads(r.stdout)] == ids[:12]
        r = run_cli("ls", "--status", "TERMINATED", env=env)
        assert r.returncode == 0 and r.stdout == b""
        assert r.stderr.decode().strip() == "sshbridge: no sandboxes with status TERMINATED"

        for bad in (("--limit", "0"), ("--status", "not one"), ("--limit", "x")):
            r = run_cli("ls", *bad, env=env)
            assert r.returncode == 2, bad
            one_error_line(r.stderr)
        r = run_cli("ls", env=dict(env, PRIME_API_KEY="wrong-key-123456"))
        assert r.returncode == 1 and "wrong-key" not in one_error_line(r.stderr)
        # `| head`: stop quietly.
        proc = subprocess.run(
            f"{' '.join(CLI)} ls | head -1",
            shell=True,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert proc.stdout.decode().split() == ["ID", "NAME", "STATUS", "CREATED"]
        assert proc.stderr == b""


# -- completion ------------------------------------------------------------------------------


def test_completion_from_the_console_script(cli_env: dict[str, str], tmp_path: Path) -> None:
    for shell, marker in (("bash", "complete -o"), ("zsh", "#compdef sshbridge")):
        for args in (("--show-completion", shell), (f"--show-completion={shell}",)):
            r = fast(*args, env=cli_env)
            assert r.returncode == 0, r.stderr
            assert marker in r.stdout.decode() and "_SSHBRIDGE_COMPLETE" in r.stdout.decode()
    # What the bash script asks for: our commands, then a command's options.
    env = dict(
        cli_env, _SSHBRIDGE_COMPLETE="complete_bash", COMP_WORDS="sshbridge e", COMP_CWORD="1"
    )
    r = fast(env=env)
    assert r.returncode == 0 and r.stdout.decode().split() == ["exec", "emulator"]
    env.update(COMP_WORDS="sshbridge exec --ti", COMP_CWORD="2")
    assert fast(env=env).stdout.decode().split() == ["--timeout"]
    env.update(COMP_WORDS="sshbridge ls --", COMP_CWORD="2")
    assert {"--status", "--limit", "--json"} <= set(fast(env=env).stdout.decode().split())

    home = tmp_path / "home"
    home.mkdir()
    r = fast("--install-completion", "bash", env=dict(cli_env, HOME=str(home)))
    assert r.returncode == 0, r.stderr
    script = home / ".bash_completions" / "sshbridge.sh"
    assert "_SSHBRIDGE_COMPLETE" in script.read_text()
    assert str(script) in (home / ".bashrc").read_text()


# -- help ------------------------------------------------------------------------------------

COMMANDS = ["ssh", "exec", "ls", "sessions", "close", "cp", "forward", "emulator", "doctor"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_plain_with_an_example(cli_env: dict[str, str], command: str | None) -> None:
    env = dict(cli_env, COLUMNS="200", TERM="dumb")
    args = ["--help"] if command is None else [command, "--help"]
    r = fast(*args, env=env)
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    # No type labels or braces that read as syntax to type.
    assert not re.search(r"<(bool|str|int|float|list|path|int range|float range)", text), text
    assert "{" not in text.split("Options")[0], text
    assert "list[" not in text
    if command is not None:
        assert re.search(rf"Example: .*sshbridge {command}\b", text), text
    if command == "exec":
        assert "Usage: sshbridge exec [OPTIONS] SANDBOX COMMAND..." in text
        assert "--timeout" in text and "SECONDS" in text and "--json" in text
    if command is None:
        assert "--install-completion" in text and "--show-completion" in text
        assert " ls " in text


# -- errors in CLI terms; no tracebacks -------------------------------------------------------


def test_errors_name_flags_not_keywords(sandbox: str, cli_env: dict[str, str]) -> None:
    env = {k: v for k, v in cli_env.items() if k != "PRIME_API_KEY"}
    for args in (("exec", sandbox, "--", "true"), ("ls",), ("--no-persist", "exec", sandbox, "x")):
        r = run_cli(*args, env=env)
        line = one_error_line(r.stderr)
        assert "--api-key" in line and "PRIME_API_KEY" in line and "api_key=" not in line
    cases = [
        (("exec", "--timeout", "inf", sandbox, "--", "true"), "--timeout"),
        (("exec", "--timeout", "nan", sandbox, "--", "true"), "--timeout"),
        (("exec", "--cwd", "", sandbox, "--", "true"), "--cwd"),
        (("forward", "--bind", "", sandbox, "0:22"), "--bind"),
        (("--base-url", "ftp://x", "ls"), "base URL"),
        (("--ttl", "0", "ls"), "--ttl"),
        (("exec", "bad id!", "--", "true"), "sandbox id"),
    ]
    for args, name in cases:
        r = run_cli(*args, env=cli_env)
        line = one_error_line(r.stderr)
        assert r.returncode == 2, (args, line)
        assert name in line, (args, line)
        assert not re.search(r"\b[a-z_]+=(\.\.\.|\s|$)|\bor None\b", line), line
    r = run_cli("ls", env=dict(cli_env, PRIME_API_BASE_URL="nope"))
    line = one_error_line(r.stderr)
    assert "base URL" in line and "PRIME_API_BASE_URL" in line and "base_url" not in line


def test_no_traceback_on_user_errors(sandbox: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    no_key = {k: v for k, v in cli_env.items() if k != "PRIME_API_KEY"}
    runs = [
        (("ls", "--limit", "-3"), cli_env),
        (("doctor", "bad id!"), cli_env),
        (("doctor", "--json", "bad id!"), cli_env),
        (("close",), cli_env),
        (("close", "--all", sandbox), cli_env),
        (("cp", str(tmp_path / "missing"), f"{sandbox}:x"), cli_env),
        (("cp", f"{sandbox}:missing", str(tmp_path / "x")), cli_env),
        (("forward", sandbox), cli_env),
        (("emulator", "--contract", "nope"), cli_env),
        (("emulator", "--env-file", str(tmp_path / "no" / "such" / "dir" / "f")), cli_env),
        (("ssh", sandbox, "-x"), cli_env),
        (("ls",), no_key),
        (("--persist", "soon", "ls"), cli_env),
        (("exec", sandbox, "--", "true"), dict(cli_env, SSHBRIDGE_PERSIST="soon")),
        (("ls",), dict(cli_env, PRIME_API_BASE_URL="http://127.0.0.1:9")),
        (("--show-completion", "bash", "extra"), cli_env),
    ]
    for args, env in runs:
        for entry in (CLI, FAST_CLI):
            r = subprocess.run(
                [*entry, *args],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
                check=False,
            )
            err = r.stderr.decode()
            assert "Traceback" not in err and 'File "' not in err, (args, err)
            if r.returncode != 0:
                assert err.startswith("sshbridge: error: "), (args, err)
                assert len(err.splitlines()) == 1, (args, err)


# -- a missing optional extra: one line naming the pip install ------------------------------

BLOCK = (
    "import sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None  # as if not installed: importing it fails\n"
    "sys.argv = ['sshbridge', *sys.argv[2:]]\n"
    "from sshbridge_fast import main\n"
    "main()\n"
)


@pytest.mark.parametrize(
    ("missing", "args", "extra"),
    [
        ("typer", ("ls",), "cli"),
        ("typer", ("--help",), "cli"),
        ("rich", ("doctor",), "cli"),
        ("asyncssh", ("emulator",), "emulator"),
    ],
)
def test_missing_extra_is_one_line(
    cli_env: dict[str, str], missing: str, args: tuple[str, ...], extra: str
) -> None:
    r = subprocess.run(
        [sys.executable, "-c", BLOCK, missing, *args],
        env=cli_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert f"pip install 'sshbridge[{extra}]'" in line, line


def test_missing_typer_from_python_m_sshbridge_cli(cli_env: dict[str, str]) -> None:
    code = (
        "import sys, runpy; sys.modules['typer'] = None; "
        "runpy.run_module('sshbridge.cli', run_name='__main__')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "ls"],
        env=cli_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1
    assert "pip install 'sshbridge[cli]'" in one_error_line(r.stderr)
