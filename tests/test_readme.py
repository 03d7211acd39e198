"""Every ```python block of README.md, run as written against the local emulator.

Conventions a sample may rely on (nothing else is added to it):

* ``PRIME_API_KEY`` and ``PRIME_API_BASE_URL`` point at a fresh emulator, as
  ``sshbridge emulator`` prints them and ``examples/quickstart.py`` sets them;
* the placeholder sandbox ids ``"sbx_123"``, ``"sbx_456"`` and ``"sbx_789"`` stand for
  three running emulated sandboxes;
* it runs as a script (``python -c``) in an empty temporary directory, without a terminal.

Blocks that cannot run as written are listed in KNOWN_BROKEN with the reason; they are
strict xfails, so a README fix shows up here as a pass to remove from the list.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sshbridge.emulator import Emulator

README = Path(__file__).resolve().parent.parent / "README.md"
PLACEHOLDER_IDS = ("sbx_123", "sbx_456", "sbx_789")
_BLOCK_RE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)

# First line of the block -> why it cannot run as written.
KNOWN_BROKEN: dict[str, str] = {}


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    found = []
    for m in _BLOCK_RE.finditer(text):
        line = text.count("\n", 0, m.start()) + 2  # the first line of code
        found.append((line, m.group(1)))
    return found


def _why_broken(code: str) -> str | None:
    for start, reason in KNOWN_BROKEN.items():
        if code.startswith(start):
            return reason
    return None


def _params() -> list[object]:
    params: list[object] = []
    for line, code in _blocks():
        reason = _why_broken(code)
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        params.append(pytest.param(code, id=f"README.md:{line}", marks=marks))
    return params


def test_readme_has_python_samples() -> None:
    assert len(_blocks()) >= 5
    # Every known-broken entry still names a block: a stale entry is a mistake here.
    starts = [code for _, code in _blocks()]
    for start in KNOWN_BROKEN:
        assert any(code.startswith(start) for code in starts), start


@pytest.mark.timeout(120)
@pytest.mark.parametrize("code", _params())
def test_readme_python_block(code: str, tmp_path: Path) -> None:
    with Emulator() as emu:
        script = code
        for placeholder in PLACEHOLDER_IDS:
            script = script.replace(f'"{placeholder}"', repr(emu.create_sandbox()))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
        env.update(emu.env())
        env["HOME"] = str(tmp_path)
        env["SSHBRIDGE_PERSIST"] = "0"
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        r = subprocess.run(
            [sys.executable, "-c", script],
            cwd=run_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=90,
            check=False,
        )
        assert r.returncode == 0, r.stderr.decode()[-3000:]
        # A sample leaves no session open behind it.
        assert emu.open_sessions() == []
