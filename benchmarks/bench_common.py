"""Shared pieces of the side-by-side benchmarks: servers, keys, the flow's HTTP calls,
statistics and table formatting.

The emulator runs in a child process (``python benchmarks/bench_common.py emulator
CONFIG``) so its AsyncSSH sidecar and HTTP server never compete with the client being
measured for this process's GIL.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from latency_proxy import ChildServer

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

SSH_BASE_OPTS = [
    "-F",
    "/dev/null",  # ignore the user's ~/.ssh/config
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "LogLevel=ERROR",
]


# -- the contract-B front, out of process -------------------------------------------------

_FRONT = """
import sys
sys.path.insert(0, sys.argv[3])
from sshd_server import PreambleFront
front = PreambleFront((sys.argv[1], int(sys.argv[2])), lambda _: True)
print("port", front.port, flush=True)
sys.stdin.buffer.read()  # until the parent closes it (or dies)
front.close()
"""


class FrontProcess(ChildServer):
    """tests/sshd_server.py's PreambleFront (contract B's preamble in front of a plain
    sshd) in a process of its own: it relays every byte in Python, which in the
    benchmark's process would take CPU and the GIL from the client being measured (the
    alternatives, talking to sshd directly, have no such relay)."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__([sys.executable, "-c", _FRONT, target[0], str(target[1]),
                          str(ROOT / "tests")], "the preamble front")


# -- statistics --------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    if not s:
        return math.nan
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


@dataclass
class Sample:
    """Timings (seconds) of one client in one scenario, grouped by repetition."""

    reps: list[list[float]] = field(default_factory=list)
    error: str | None = None

    @property
    def all(self) -> list[float]:
        return [v for rep in self.reps for v in rep]

    @property
    def median(self) -> float:
        vals = self.all
        return statistics.median(vals) if vals else math.nan

    def rep_medians(self) -> list[float]:
        return [statistics.median(r) for r in self.reps if r]


def ms(seconds: float, digits: int = 2) -> str:
    if math.isnan(seconds):
        return "n/a"
    return f"{seconds * 1000:.{digits}f}"


def ratio(a: float, b: float) -> str:
    """``a / b`` as text, with the inverse spelled out when ``a`` is the faster one."""
    if math.isnan(a) or math.isnan(b) or b <= 0:
        return "n/a"
    r = a / b
    if r < 0.95:
        return f"{r:.2f}x ({1 / r:.1f}x faster)"
    return f"{r:.2f}x"


@dataclass
class Goal:
    name: str
    target: str
    measured: str
    met: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        if self.met is None:
            return "not measured"
        return "met" if self.met else "**MISSED**"


@dataclass
class Section:
    title: str
    table: list[str]
    notes: list[str] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [f"### {self.title}", "", *self.table]
        if self.notes:
            parts += ["", *self.notes]
        return "\n".join(parts)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- keys --------------------------------------------------------------------------------


def write_keyfile(path: Path) -> str:
    """An unencrypted Ed25519 private key file for the external clients; returns the
    public line."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    key = Ed25519PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()))
    return key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


# -- the flow's HTTP calls, done by hand (raw and provider rows) -------------------------


def open_session_by_hand(
    http: requests.Session,
    base_url: str,
    api_key: str,
    sandbox_id: str,
    public_line: str,
    ttl: int = 900,
) -> dict[str, Any]:
    """GET sandbox, POST ssh-session, POST authorize: what every client must do first."""
    auth = {"Authorization": f"Bearer {api_key}"}
    api = f"{base_url}/api/v1/sandbox/{sandbox_id}"
    r = http.get(api, headers=auth, timeout=30)
    r.raise_for_status()
    if r.json()["status"] != "RUNNING":
        raise RuntimeError("sandbox not running")
    r = http.post(f"{api}/ssh-session", json={"ttl_seconds": ttl}, headers=auth, timeout=30)
    r.raise_for_status()
    s: dict[str, Any] = r.json()
    url = f"{s['gateway_url'].rstrip('/')}/{s['user_ns']}/{s['job_id']}/authorize"
    body = {"session_id": s["session_id"], "public_key": public_line, "ttl_seconds": ttl}
    r = http.post(url, json=body, headers={"Authorization": f"Bearer {s['token']}"}, timeout=30)
    r.raise_for_status()
    return s


def delete_session_by_hand(
    http: requests.Session, base_url: str, api_key: str, sandbox_id: str, session_id: str
) -> None:
    r = http.delete(
        f"{base_url}/api/v1/sandbox/{sandbox_id}/ssh-session/{session_id}",
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=30,
    )
    if r.status_code not in (200, 204, 404):
        r.raise_for_status()


# -- the emulator, in a child process ----------------------------------------------------


class EmulatorProcess:
    """The sshbridge emulator in its own process; sandboxes made over its admin API."""

    def __init__(self, *, cut_at_expiry: bool = False, openssh: Any = None) -> None:
        config: dict[str, Any] = {"cut_at_expiry": cut_at_expiry}
        if openssh is not None:
            config["openssh"] = [
                openssh.host,
                openssh.port,
                openssh.username,
                str(openssh.authorized_keys_file),
            ]
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "emulator", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the emulator child process did not start")
        info = json.loads(line)
        self.base_url: str = info["base_url"]
        self.api_key: str = info["api_key"]
        self._http = requests.Session()

    def create_sandbox(self) -> str:
        r = self._http.post(
            f"{self.base_url}/_emulator/sandboxes",
            json={},
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=30,
        )
        r.raise_for_status()
        sid: str = r.json()["id"]
        return sid

    def open_sessions(self) -> int:
        r = self._http.get(
            f"{self.base_url}/_emulator/sessions",
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=30,
        )
        r.raise_for_status()
        return sum(1 for s in r.json() if s["deleted_at"] is None)

    def stop(self) -> None:
        self._http.close()
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the child stops at EOF
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _emulator_child(config_json: str) -> None:
    from sshbridge.emulator import Emulator, OpenSSHTarget

    config = json.loads(config_json)
    target = None
    if config.get("openssh"):
        host, port, user, path = config["openssh"]
        target = OpenSSHTarget(host, int(port), user, Path(path))
    # Contract A: the hand-written baseline flows above speak the token/gateway flow, and a
    # bare sshd takes no session preamble.
    with Emulator(openssh=target, contract="sidecar") as emu:
        emu.cut_at_expiry = bool(config.get("cut_at_expiry"))
        print(json.dumps({"base_url": emu.base_url, "api_key": emu.api_key}), flush=True)
        sys.stdin.read()  # run until the parent closes our stdin


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "emulator":
        _emulator_child(sys.argv[2])
    else:
        raise SystemExit("usage: bench_common.py emulator CONFIG_JSON")
