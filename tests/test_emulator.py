"""Contract tests for sshbridge.emulator: HTTP API with requests, SSH with asyncssh/paramiko.

``emu`` is the default contract ("vm": key in the POST, shared port, preamble); ``side`` is
the sidecar contract (token, gateway, a port per session); ``both`` runs a test on each.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import pytest
import requests
from conftest import CONTRACTS, running_emulator
from emu_helpers import (
    PREAMBLE,
    closed_without_banner,
    ed25519_pair,
    paramiko_exec,
    preamble_socket,
    ssh_banner,
    wait_until,
)
from sshd_server import PreambleFront, find_sshd, start_sshd

from sshbridge.emulator import APICall, Emulator, OpenSSHTarget

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")

SESSION_FIELDS = {
    "session_id",
    "exposure_id",
    "sandbox_id",
    "host",
    "port",
    "external_endpoint",
    "expires_at",
    "ttl_seconds",
    "gateway_url",
    "user_ns",
    "job_id",
    "token",
}
VM_SESSION_FIELDS = {"session_id", "sandbox_id", "host", "port", "expires_at", "ttl_seconds"}
# Every field of the official SDK's Sandbox model (prime-sandboxes 0.5.1), by alias.
SANDBOX_FIELDS = {
    "id",
    "name",
    "dockerImage",
    "startCommand",
    "cpuCores",
    "memoryGB",
    "diskSizeGB",
    "diskMountPath",
    "gpuCount",
    "gpuType",
    "vm",
    "networkAllowlist",
    "networkDenylist",
    "status",
    "timeoutMinutes",
    "idleTimeoutMinutes",
    "terminationReason",
    "environmentVars",
    "secrets",
    "advancedConfigs",
    "labels",
    "createdAt",
    "updatedAt",
    "startedAt",
    "terminatedAt",
    "exitCode",
    "errorType",
    "errorMessage",
    "userId",
    "teamId",
    "region",
    "pendingImageBuildId",
}
needs_sshd = pytest.mark.skipif(find_sshd() is None, reason="needs OpenSSH sshd")


# -- helpers ---------------------------------------------------------------------------


# Unlike conftest's ``emu``, these leave sessions open at the end where a test does so
# on purpose, and use the emulator's own random key.


@pytest.fixture
def emu() -> Iterator[Emulator]:
    """Contract B only, not parametrized."""
    with running_emulator() as e:
        yield e


@pytest.fixture
def side() -> Iterator[Emulator]:
    with running_emulator(contract="sidecar") as e:
        yield e


@pytest.fixture(params=CONTRACTS)
def both(request: pytest.FixtureRequest) -> Iterator[Emulator]:
    with running_emulator(contract=request.param) as e:
        yield e


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def auth(emu: Emulator) -> dict[str, str]:
    return {"Authorization": f"Bearer {emu.api_key}"}


def api(emu: Emulator, method: str, path: str, **kw: Any) -> requests.Response:
    kw.setdefault("headers", auth(emu))
    return requests.request(method, f"{emu.base_url}/api/v1{path}", timeout=10, **kw)


def public_line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


def session_body(emu: Emulator, key: asyncssh.SSHKey | None = None, **fields: Any) -> Any:
    """A valid POST body for the emulator's contract (vm: with a public key)."""
    if emu.contract == "vm":
        fields.setdefault("public_key", public_line(key or new_key()))
    return fields


def create_session(
    emu: Emulator, sid: str, ttl: int | None = 60, key: asyncssh.SSHKey | None = None
) -> dict[str, Any]:
    r = api(
        emu, "POST", f"/sandbox/{sid}/ssh-session", json=session_body(emu, key, ttl_seconds=ttl)
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def authorize(sess: dict[str, Any], key: asyncssh.SSHKey, **overrides: Any) -> requests.Response:
    payload = {
        "session_id": sess["session_id"],
        "public_key": key.export_public_key().decode().strip(),
        "ttl_seconds": sess["ttl_seconds"],
    }
    headers = {"Authorization": f"Bearer {overrides.pop('token', sess['token'])}"}
    payload.update(overrides)
    url = f"{sess['gateway_url'].rstrip('/')}/{sess['user_ns']}/{sess['job_id']}/authorize"
    return requests.post(url, json=payload, headers=headers, timeout=10)


def new_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def ready_session(emu: Emulator, sid: str, ttl: int = 60) -> tuple[dict[str, Any], asyncssh.SSHKey]:
    """A session whose key may log in: posted with it (vm) or authorized at the gateway."""
    key = new_key()
    sess = create_session(emu, sid, ttl, key)
    if "token" in sess:
        assert authorize(sess, key).status_code == 200
    return sess, key


def connect(sess: dict[str, Any], key: asyncssh.SSHKey | None, **kw: Any) -> Any:
    """asyncssh to a session: straight to its port (sidecar) or after the preamble (vm)."""
    kw.setdefault("username", sess["session_id"])
    kw.setdefault("client_keys", [key] if key is not None else None)
    opts: dict[str, Any] = {"known_hosts": None, "agent_path": None, "config": None}
    if "token" in sess:
        return asyncssh.connect(sess["host"], sess["port"], login_timeout=10, **opts, **kw)
    sock = preamble_socket(sess["host"], sess["port"], PREAMBLE.format(sess["session_id"]))
    return asyncssh.connect(sock=sock, login_timeout=10, **opts, **kw)


def preamble_closed(emu: Emulator, line: str | bytes, port: int | None = None) -> bool:
    """Send ``line`` to the shared port; True if it was closed without an SSH banner."""
    assert emu.ssh_port is not None
    return closed_without_banner(preamble_socket("127.0.0.1", port or emu.ssh_port, line))


def port_refuses(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # ENOENT, or ESRCH while the process is being reaped
        return False
    return state != "Z"


def pids_running(cmdline: bytes) -> list[int]:
    """Local processes whose /proc cmdline is exactly ``cmdline`` (NUL-separated)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/cmdline").read_bytes() == cmdline and pid_alive(int(entry)):
                    found.append(int(entry))
            except OSError:
                continue
    return found


def emulator_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sshbridge-emulator")]


# -- HTTP API --------------------------------------------------------------------------


def test_public_defaults_and_env() -> None:
    e = Emulator()
    assert e.contract == "vm"
    assert e.api_key.startswith("emu_")
    assert e.cut_at_expiry is False
    assert e.max_channels_per_connection is None
    assert e.exposure_delay == 0.0
    assert e.rotate_host_key is False
    assert e.rate_limit == (20, 60.0)
    assert e.rate_limit_retry_after is True
    assert e.time_format == "Z"
    assert e.reject_unknown_fields is False
    assert e.session_answer_hook is None
    assert e.preamble_timeout == 10.0
    assert e.preamble_rejections == 0 and e.ssh_port is None  # not started
    with e:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", e.base_url)
        assert e.env() == {"PRIME_API_KEY": e.api_key, "PRIME_API_BASE_URL": e.base_url}
        assert isinstance(e.ssh_port, int) and e.ssh_port > 0
        root = e.sandbox_dir(e.create_sandbox()).parent
        assert root.is_dir()
    assert not root.exists()  # temp root removed on stop
    e.stop()  # idempotent
    assert Emulator(contract="sidecar").contract == "sidecar"
    with pytest.raises(ValueError, match="'vm', 'sidecar'"):
        Emulator(contract="VM")


def test_auth_is_required(both: Emulator) -> None:
    emu = both
    sid = emu.create_sandbox()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": emu.api_key}):
        for method, path in (
            ("GET", f"/sandbox/{sid}"),
            ("GET", "/sandbox"),
            ("POST", f"/sandbox/{sid}/ssh-session"),
            ("DELETE", f"/sandbox/{sid}/ssh-session/whatever"),
        ):
            r = api(emu, method, path, headers=headers, json=session_body(emu))
            assert r.status_code == 401, (method, path, headers)
            assert isinstance(r.json()["detail"], str)
    assert emu.sessions == []


def test_get_sandbox(both: Emulator) -> None:
    emu = both
    sid = emu.create_sandbox(name="box")
    assert re.fullmatch(r"sbx_[a-z0-9]{20}", sid)
    r = api(emu, "GET", f"/sandbox/{sid}")
    assert r.status_code == 200
    body = r.json()
    assert set(body) >= SANDBOX_FIELDS, SANDBOX_FIELDS - set(body)
    assert set(body) - SANDBOX_FIELDS == {"emulatorWorkdir"}  # one field clients do not know
    assert body["id"] == sid and body["name"] == "box" and body["status"] == "RUNNING"
    assert body["vm"] is (emu.contract == "vm")  # what the contract serves by default
    assert body["startCommand"] is None and body["labels"] == []
    assert isinstance(body["diskMountPath"], str) and body["terminatedAt"] is None
    assert api(emu, "GET", f"/sandbox/{emu.create_sandbox(vm=False)}").json()["vm"] is False
    emu.set_status(sid, "TERMINATED")
    assert api(emu, "GET", f"/sandbox/{sid}").json()["terminatedAt"] is not None
    r = api(emu, "GET", "/sandbox/sbx_doesnotexist000000")
    assert r.status_code == 404 and r.json() == {"detail": "Sandbox not found"}


def test_list_sandboxes(emu: Emulator) -> None:
    ids = [emu.create_sandbox() for _ in range(5)]
    emu.set_status(ids[3], "PAUSED")
    r = api(emu, "GET", "/sandbox")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"sandboxes", "total", "page", "perPage", "hasNext"}
    assert [s["id"] for s in body["sandboxes"]] == ids  # creation order
    assert (body["total"], body["page"], body["perPage"], body["hasNext"]) == (5, 1, 50, False)
    assert set(body["sandboxes"][0]) >= SANDBOX_FIELDS

    pages = [api(emu, "GET", f"/sandbox?page={n}&per_page=2").json() for n in (1, 2, 3, 4)]
    assert [[s["id"] for s in p["sandboxes"]] for p in pages] == [ids[:2], ids[2:4], ids[4:], []]
    assert [p["hasNext"] for p in pages] == [True, True, False, False]
    assert {(p["total"], p["perPage"]) for p in pages} == {(5, 2)}
    r = api(emu, "GET", "/sandbox/", params={"status": "PAUSED", "team_id": "t1", "x": "y"})
    assert [s["id"] for s in r.json()["sandboxes"]] == [ids[3]] and r.json()["total"] == 1

    for query, param in (
        ("page=0", "page"),
        ("page=-1", "page"),
        ("page=x", "page"),
        ("per_page=0", "per_page"),
        ("per_page=101", "per_page"),
        ("per_page=1.5", "per_page"),
    ):
        r = api(emu, "GET", f"/sandbox?{query}")
        assert r.status_code == 422, query
        assert r.json()["errors"][0]["param"] == param
    assert api(emu, "GET", "/sandbox?per_page=100").status_code == 200

    emu.fail_next(1, 503, endpoint="list_sandboxes")
    assert api(emu, "GET", f"/sandbox/{ids[0]}").status_code == 200
    assert api(emu, "GET", "/sandbox").status_code == 503
    assert api(emu, "GET", "/sandbox").status_code == 200
    assert {c.endpoint for c in emu.api_calls} == {"list_sandboxes", "get_sandbox"}
    assert all(c.sandbox_id is None for c in emu.api_calls if c.endpoint == "list_sandboxes")


def test_create_session_shape_and_default_ttl(side: Emulator) -> None:
    emu = side
    sid = emu.create_sandbox()
    before = datetime.now(timezone.utc)
    sess = create_session(emu, sid, ttl=120)
    assert set(sess) == SESSION_FIELDS
    assert sess["sandbox_id"] == sid and sess["host"] == "127.0.0.1"
    assert isinstance(sess["port"], int) and sess["port"] > 0
    assert sess["external_endpoint"] == f"127.0.0.1:{sess['port']}"
    assert sess["ttl_seconds"] == 120
    assert sess["gateway_url"] == f"{emu.base_url}/gateway/"
    expires = datetime.fromisoformat(sess["expires_at"].replace("Z", "+00:00"))
    assert before + timedelta(seconds=119) < expires < before + timedelta(seconds=125)

    # no body, null, {} -> the default 900; an unknown public_key is ignored, as FastAPI does
    url = f"/sandbox/{sid}/ssh-session"
    variants: list[dict[str, Any]] = [
        {},
        {"json": {"ttl_seconds": None}},
        {"json": {}},
        {"json": {"public_key": public_line(new_key())}},
    ]
    for kw in variants:
        r = api(emu, "POST", url, **kw)
        assert r.status_code == 200 and r.json()["ttl_seconds"] == 900, r.text
        assert set(r.json()) == SESSION_FIELDS
    for ttl in (1, 3600):
        assert create_session(emu, sid, ttl)["ttl_seconds"] == ttl
    ids = emu.open_sessions(sid)
    assert len(set(ids)) == 7 and ids[0] == sess["session_id"]
    assert len({rec.port for rec in emu.sessions}) == 7  # one exposure per session
    assert all(rec.authorized_keys == [] for rec in emu.sessions)  # the POST's key is not used
    assert emu.ssh_port is None


def test_vm_session_shape(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    key = new_key()
    before = datetime.now(timezone.utc)
    sess = create_session(emu, sid, ttl=120, key=key)
    assert set(sess) == VM_SESSION_FIELDS
    assert sess["sandbox_id"] == sid and sess["host"] == "127.0.0.1"
    assert sess["port"] == emu.ssh_port and sess["ttl_seconds"] == 120
    assert re.fullmatch(r"sess_[a-z0-9]{20}", sess["session_id"])
    expires = datetime.fromisoformat(sess["expires_at"].replace("Z", "+00:00"))
    assert before + timedelta(seconds=119) < expires < before + timedelta(seconds=125)
    rec = emu.sessions[0]
    assert rec.authorized_keys == [key.get_fingerprint()]  # authorized by the POST itself
    assert rec.port == emu.ssh_port and rec.wire_session_id == sess["session_id"]

    url = f"/sandbox/{sid}/ssh-session"
    line = public_line(new_key())
    for payload in ({"public_key": line}, {"public_key": line, "ttl_seconds": None}):
        r = api(emu, "POST", url, json=payload)
        assert r.status_code == 200 and r.json()["ttl_seconds"] == 900, r.text
    r = api(emu, "POST", url, json={"public_key": line + " me@laptop", "ttl_seconds": 5})
    assert r.status_code == 200 and set(r.json()) == VM_SESSION_FIELDS
    # Every session is served on the one shared port; ids are distinct.
    assert {rec.port for rec in emu.sessions} == {emu.ssh_port}
    assert len({rec.session_id for rec in emu.sessions}) == 4
    # No gateway: the sidecar contract's authorize path does not exist here.
    emu.fail_next(1, 500, endpoint="authorize")
    r = requests.post(f"{emu.base_url}/gateway/ns/job/authorize", json={}, timeout=5)
    assert r.status_code == 404 and emu.api_calls[-1].endpoint == "unknown"
    emu.clear_failures()


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"ttl_seconds": 60},
        {"public_key": None},
        {"public_key": 42},
        {"public_key": ""},
        {"public_key": "hello"},
        {"public_key": "ssh-ed25519"},
        {"public_key": "ssh-ed25519 AAAAnotbase64"},
        {"public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"},
        {"public_key": "ssh-ed25519 AAAA\nssh-ed25519 AAAA"},
        {"public_key": ["ssh-ed25519", "AAAA"]},
    ],
)
def test_vm_public_key_is_required_and_valid(emu: Emulator, payload: dict[str, Any]) -> None:
    sid = emu.create_sandbox()
    r = api(emu, "POST", f"/sandbox/{sid}/ssh-session", json=payload)
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert errors[0]["param"] == "public_key" and isinstance(errors[0]["details"], str)
    assert emu.sessions == []


def test_vm_public_key_other_formats(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    url = f"/sandbox/{sid}/ssh-session"
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    r = api(emu, "POST", url, json={"public_key": public_line(rsa)})
    assert r.status_code == 200  # any OpenSSH key type parses
    pem = rsa.export_public_key("pkcs8-pem").decode()
    r = api(emu, "POST", url, json={"public_key": pem})
    assert r.status_code == 422 and r.json()["errors"][0]["param"] == "public_key"
    assert len(emu.sessions) == 1


@pytest.mark.parametrize("ttl", [0, -5, 3601, 1.5, 60.0, True, "60", [60]])
def test_invalid_ttl_is_422(both: Emulator, ttl: Any) -> None:
    emu = both
    sid = emu.create_sandbox()
    r = api(emu, "POST", f"/sandbox/{sid}/ssh-session", json=session_body(emu, ttl_seconds=ttl))
    assert r.status_code == 422
    errors = r.json()["errors"]
    assert errors[0]["param"] == "ttl_seconds" and isinstance(errors[0]["details"], str)
    assert emu.sessions == []


def test_sandbox_state_errors(both: Emulator) -> None:
    emu = both
    url = "/sandbox/sbx_nope0000000000000000/ssh-session"
    r = api(emu, "POST", url, json=session_body(emu))
    assert r.status_code == 404 and r.json() == {"detail": "Sandbox not found"}
    pending = emu.create_sandbox(status="PENDING")
    r = api(emu, "POST", f"/sandbox/{pending}/ssh-session", json=session_body(emu))
    assert r.status_code == 409
    assert r.json() == {"detail": "Sandbox is not running (status: PENDING)"}
    # Each contract serves its own runtime: sidecar containers, VMs in the vm contract.
    other = emu.create_sandbox(vm=emu.contract == "sidecar")
    r = api(emu, "POST", f"/sandbox/{other}/ssh-session", json=session_body(emu))
    assert r.status_code == 400
    if emu.contract == "sidecar":
        assert r.json() == {"detail": "SSH sessions are not supported for VM sandboxes"}
        assert api(emu, "GET", f"/sandbox/{other}").json()["vm"] is True
    else:
        assert r.json() == {"detail": "SSH sessions are only supported for VM sandboxes"}
        assert api(emu, "GET", f"/sandbox/{other}").json()["vm"] is False
    assert emu.sessions == []


def test_rate_limit(emu: Emulator) -> None:
    emu.rate_limit = (3, 60.0)
    a, b = emu.create_sandbox(), emu.create_sandbox()
    url = f"/sandbox/{a}/ssh-session"
    body = session_body(emu)
    api(emu, "POST", url, headers={}, json=body)  # 401s do not count
    for _ in range(3):
        assert api(emu, "POST", url, json=body).status_code == 200
    r = api(emu, "POST", url, json=body)
    assert r.status_code == 429
    assert "detail" in r.json()
    retry_after = int(r.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert api(emu, "POST", f"/sandbox/{b}/ssh-session", json=body).status_code == 200
    emu.rate_limit_retry_after = False
    r = api(emu, "POST", url, json=body)
    assert r.status_code == 429 and "Retry-After" not in r.headers
    assert len(emu.open_sessions(a)) == 3

    emu.rate_limit = (1, 0.3)
    c = emu.create_sandbox()
    url = f"/sandbox/{c}/ssh-session"
    assert api(emu, "POST", url, json=body).status_code == 200
    emu.rate_limit_retry_after = True
    r = api(emu, "POST", url, json=body)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"  # never below 1
    time.sleep(0.35)  # the window slides
    assert api(emu, "POST", url, json=body).status_code == 200


def test_fail_next(side: Emulator) -> None:
    emu = side
    sid = emu.create_sandbox()
    emu.fail_next(2, 503, retry_after=7, endpoint="create_session")
    url = f"/sandbox/{sid}/ssh-session"
    assert api(emu, "GET", f"/sandbox/{sid}").status_code == 200  # other endpoint unaffected
    for _ in range(2):
        r = api(emu, "POST", url, json={})
        assert r.status_code == 503 and r.headers["Retry-After"] == "7"
        assert isinstance(r.json()["detail"], str)
    assert emu.sessions == []  # injected answers create nothing
    sess = create_session(emu, sid)

    emu.fail_next(1, 429, body={"error": "slow down"})  # any endpoint
    r = api(emu, "GET", f"/sandbox/{sid}")
    assert r.status_code == 429 and r.json() == {"error": "slow down"}
    assert "Retry-After" not in r.headers

    emu.fail_next(1, 500, endpoint="authorize")
    key = new_key()
    assert authorize(sess, key).status_code == 500
    assert emu.sessions[0].authorized_keys == []
    assert authorize(sess, key).status_code == 200

    emu.fail_next(1, 502, endpoint="close_session")
    r = api(emu, "DELETE", f"/sandbox/{sid}/ssh-session/{sess['session_id']}")
    assert r.status_code == 502 and emu.open_sessions() == [sess["session_id"]]
    with pytest.raises(ValueError):
        emu.fail_next(1, 500, endpoint="nope")

    statuses = [(c.endpoint, c.status) for c in emu.api_calls]
    assert statuses == [
        ("get_sandbox", 200),
        ("create_session", 503),
        ("create_session", 503),
        ("create_session", 200),
        ("get_sandbox", 429),
        ("authorize", 500),
        ("authorize", 200),
        ("close_session", 502),
    ]


@pytest.mark.parametrize(
    ("fmt", "pattern"),
    [
        ("Z", r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"),
        ("offset", r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00"),
        ("naive", r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}"),
    ],
)
def test_time_format(emu: Emulator, fmt: str, pattern: str) -> None:
    emu.time_format = fmt
    sid = emu.create_sandbox()
    sess = create_session(emu, sid, 300)
    assert re.fullmatch(pattern, sess["expires_at"]), sess["expires_at"]
    parsed = datetime.fromisoformat(sess["expires_at"].replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    assert abs(parsed - emu.sessions[0].expires_at) < timedelta(microseconds=2)
    assert re.fullmatch(pattern, api(emu, "GET", f"/sandbox/{sid}").json()["createdAt"])


def test_delete_session(both: Emulator) -> None:
    emu = both
    sid = emu.create_sandbox()
    s1, s2 = create_session(emu, sid), create_session(emu, sid)
    assert emu.open_sessions() == [s1["session_id"], s2["session_id"]]
    r = api(emu, "DELETE", f"/sandbox/{sid}/ssh-session/{s1['session_id']}")
    assert r.status_code in (200, 204)
    assert emu.open_sessions(sid) == [s2["session_id"]]
    assert api(emu, "DELETE", f"/sandbox/{sid}/ssh-session/{s1['session_id']}").status_code == 404
    assert api(emu, "DELETE", f"/sandbox/{sid}/ssh-session/sess_unknown").status_code == 404
    other = emu.create_sandbox()
    assert api(emu, "DELETE", f"/sandbox/{other}/ssh-session/{s2['session_id']}").status_code == 404
    rec = {r.session_id: r for r in emu.sessions}
    assert rec[s1["session_id"]].deleted_at is not None
    assert rec[s2["session_id"]].deleted_at is None
    if emu.contract == "sidecar":
        assert authorize(s1, new_key()).status_code in (401, 410)
        assert port_refuses(s1["port"])  # the exposure is gone
    else:
        assert preamble_closed(emu, PREAMBLE.format(s1["session_id"]))
        assert emu.preamble_rejections == 1


def test_authorize_errors(side: Emulator) -> None:
    emu = side
    sid = emu.create_sandbox()
    sess = create_session(emu, sid)
    other = create_session(emu, sid)
    key = new_key()
    url = f"{sess['gateway_url']}{sess['user_ns']}/{sess['job_id']}/authorize"
    payload = {"session_id": sess["session_id"], "public_key": key.export_public_key().decode()}
    assert requests.post(url, json=payload, timeout=5).status_code == 401
    assert authorize(sess, key, token="wrong").status_code == 401
    assert authorize(sess, key, token=emu.api_key).status_code == 401
    assert authorize(sess, key, token=other["token"]).status_code in (403, 404)
    bad_path = {**sess, "job_id": "job-other"}
    assert authorize(bad_path, key).status_code in (403, 404)
    assert authorize(sess, key, session_id=other["session_id"]).status_code in (403, 404)
    for junk in ("ssh-ed25519 AAAAnotbase64", "hello", ""):
        assert authorize(sess, key, public_key=junk).status_code == 422
    assert emu.sessions[0].authorized_keys == []

    # with a comment, twice: idempotent
    line = key.export_public_key().decode().strip() + " me@laptop"
    for _ in range(2):
        r = authorize(sess, key, public_key=line)
        assert r.status_code == 200 and r.json() == {"ok": True}
    assert emu.sessions[0].authorized_keys == [key.get_fingerprint()]
    assert emu.sessions[1].authorized_keys == []


def test_reject_unknown_fields(side: Emulator) -> None:
    emu = side
    sid = emu.create_sandbox()
    url = f"/sandbox/{sid}/ssh-session"
    new_style = {"public_key": public_line(new_key()), "ttl_seconds": 60}
    r = api(emu, "POST", url, json=new_style)
    assert r.status_code == 200 and set(r.json()) == SESSION_FIELDS  # ignored by default
    emu.reject_unknown_fields = True
    r = api(emu, "POST", url, json=new_style)
    assert r.status_code == 422
    assert r.json() == {
        "errors": [{"param": "public_key", "details": "Extra inputs are not permitted"}]
    }
    r = api(emu, "POST", url, json={"ttl_seconds": 60, "foo": 1, "bar": 2})
    assert [e["param"] for e in r.json()["errors"]] == ["foo", "bar"]
    assert len(emu.sessions) == 1  # the 422s created nothing
    assert api(emu, "POST", url, json={"ttl_seconds": 60}).status_code == 200
    assert api(emu, "POST", url).status_code == 200


def test_reject_unknown_fields_in_vm_contract(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    emu.reject_unknown_fields = True
    url = f"/sandbox/{sid}/ssh-session"
    assert api(emu, "POST", url, json=session_body(emu, ttl_seconds=60)).status_code == 200
    r = api(emu, "POST", url, json=session_body(emu, token="x"))
    assert r.status_code == 422 and r.json()["errors"][0]["param"] == "token"
    assert len(emu.sessions) == 1


def test_session_answer_hook(both: Emulator) -> None:
    emu = both
    sid = emu.create_sandbox()
    url = f"/sandbox/{sid}/ssh-session"
    seen: list[dict[str, Any]] = []

    def drop_host(answer: dict[str, Any]) -> Any:
        seen.append(dict(answer))
        return {k: v for k, v in answer.items() if k != "host"}

    emu.session_answer_hook = drop_host
    r = api(emu, "POST", url, json=session_body(emu))
    assert r.status_code == 200 and "host" not in r.json()
    assert seen[0]["session_id"] == r.json()["session_id"] == emu.open_sessions()[0]

    corruptions: list[tuple[Any, Any]] = [
        (lambda a: {**a, "session_id": ""}, ""),
        (lambda a: {**a, "session_id": 12345}, 12345),
        (lambda a: [a], None),
    ]
    for hook, expected_id in corruptions:
        emu.session_answer_hook = hook
        r = api(emu, "POST", url, json=session_body(emu))
        assert r.status_code == 200
        if expected_id is not None:
            assert r.json()["session_id"] == expected_id
        else:
            assert isinstance(r.json(), list)
    emu.session_answer_hook = lambda a: b'{"session_id": "trunc'
    r = api(emu, "POST", url, json=session_body(emu))
    assert r.status_code == 200 and r.content == b'{"session_id": "trunc'
    assert len(emu.open_sessions(sid)) == 5  # every answer stood for a real session

    # The client cleans up with the real id; the emulator records it as usual.
    emu.session_answer_hook = None
    for session_id in emu.open_sessions(sid):
        r = api(emu, "DELETE", f"/sandbox/{sid}/ssh-session/{session_id}")
        assert r.status_code in (200, 204)
    assert emu.open_sessions() == []
    deletes = [c for c in emu.api_calls if c.endpoint == "close_session"]
    assert len(deletes) == 5 and all(c.status == 200 and c.sandbox_id == sid for c in deletes)


def test_records_and_keepalive(side: Emulator, caplog: pytest.LogCaptureFixture) -> None:
    emu = side
    caplog.set_level(logging.DEBUG, logger="sshbridge.emulator")
    sid = emu.create_sandbox()
    conn = http.client.HTTPConnection("127.0.0.1", int(emu.base_url.rsplit(":", 1)[1]), timeout=5)
    tokens = []
    for _ in range(3):  # one TCP connection, several requests
        conn.request(
            "POST",
            f"/api/v1/sandbox/{sid}/ssh-session",
            body=json.dumps({"ttl_seconds": 30}),
            headers={**auth(emu), "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        tokens.append(json.loads(resp.read())["token"])
    conn.close()
    calls = emu.api_calls
    assert all(isinstance(c, APICall) for c in calls)
    c = calls[0]
    assert (c.method, c.path, c.endpoint, c.sandbox_id, c.status) == (
        "POST",
        f"/api/v1/sandbox/{sid}/ssh-session",
        "create_session",
        sid,
        200,
    )
    assert abs(c.time - time.time()) < 30
    records = emu.sessions
    assert len(records) == 3
    rec = records[0]
    assert rec.sandbox_id == sid and rec.deleted_at is None and rec.host == "127.0.0.1"
    assert rec.expires_at - rec.created_at == timedelta(seconds=30)
    assert rec.created_at.tzinfo is not None
    dumped = repr(records)
    assert all(t not in dumped for t in tokens)
    logs = caplog.text
    assert emu.api_key not in logs and all(t not in logs for t in tokens)


def test_admin_endpoints(emu: Emulator) -> None:
    r = requests.post(f"{emu.base_url}/_emulator/sandboxes", json={}, timeout=5)
    assert r.status_code == 401
    r = requests.post(
        f"{emu.base_url}/_emulator/sandboxes", json={"name": "x"}, headers=auth(emu), timeout=5
    )
    assert r.status_code == 201 and r.json()["vm"] is True  # the contract's default
    sid = r.json()["id"]
    r = requests.post(
        f"{emu.base_url}/_emulator/sandboxes", json={"vm": False}, headers=auth(emu), timeout=5
    )
    assert r.status_code == 201 and r.json()["vm"] is False
    r = requests.post(
        f"{emu.base_url}/_emulator/sandboxes/{sid}/status",
        json={"status": "PAUSED"},
        headers=auth(emu),
        timeout=5,
    )
    assert r.status_code == 200 and api(emu, "GET", f"/sandbox/{sid}").json()["status"] == "PAUSED"
    assert emu.api_calls[-1].endpoint == "get_sandbox"  # admin calls are not recorded


# -- SSH ---------------------------------------------------------------------------------


def test_exec_auth_cwd_and_status(both: Emulator) -> None:
    emu = both
    sid = emu.create_sandbox()
    sess, key = ready_session(emu, sid)
    sandbox = str(emu.sandbox_dir(sid))

    async def go() -> None:
        async with connect(sess, key) as conn:
            assert emu.ssh_connections(sess["session_id"]) == 1
            assert emu.ssh_connections() == 1
            r = await conn.run("pwd; echo $HOME; echo oops >&2; exit 7")
            assert r.stdout == f"{sandbox}\n{sandbox}\n"
            assert r.stderr == "oops\n" and r.exit_status == 7
            r = await conn.run("cat; echo done", input="abc\n")  # stdin then EOF
            assert r.stdout == "abc\ndone\n" and r.exit_status == 0
            r = await conn.run("echo $FOO", env={"FOO": "bar"})
            assert r.stdout == "bar\n"
            r = await conn.run("test -t 0 || echo notty; echo ${PRIME_API_KEY:-unset}")
            assert r.stdout == "notty\nunset\n"

    os.environ["PRIME_API_KEY"] = "host-secret"
    try:
        run(go())
    finally:
        del os.environ["PRIME_API_KEY"]
    assert wait_until(lambda: emu.ssh_connections() == 0, timeout=5)


def test_auth_refusals(both: Emulator) -> None:
    emu = both
    sid = emu.create_sandbox()
    sess, key = ready_session(emu, sid)
    other_sess, other_key = ready_session(emu, sid)

    async def refused(**kw: Any) -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            async with connect(sess, kw.pop("key", key), **kw):
                pass

    async def password() -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            async with connect(sess, None, password="x"):
                pass

    async def all_refusals() -> None:
        await refused(key=new_key())  # never authorized
        await refused(key=other_key)  # authorized for another session
        await refused(username="root")
        await refused(username=other_sess["session_id"])
        await password()

    run(all_refusals())
    assert emu.ssh_connections() == 0


def test_expiry_cut_and_survival(both: Emulator) -> None:
    """Auth fails after expiry; open connections survive it unless cut_at_expiry is on."""
    emu = both
    sid = emu.create_sandbox()
    keep, keep_key = ready_session(emu, sid, ttl=1)
    late, late_key = ready_session(emu, sid, ttl=1)
    cut, cut_key = ready_session(emu, sid, ttl=2)
    t0 = time.monotonic()

    async def go() -> None:
        survivor = await connect(keep, keep_key)
        victim = await connect(cut, cut_key)
        running = await victim.create_process("echo started; sleep 20")
        assert (await running.stdout.readline()) == "started\n"
        await asyncio.sleep(1.2 - (time.monotonic() - t0))
        r = await survivor.run("echo still here")  # past expires_at, no cut
        assert r.stdout == "still here\n"
        if emu.contract == "sidecar":
            with pytest.raises(asyncssh.PermissionDenied):
                async with connect(late, late_key):
                    pass
            assert authorize(late, late_key).status_code in (401, 410)
        else:  # the shared port turns an expired session away at the preamble
            with pytest.raises((ConnectionError, asyncssh.Error, OSError)):
                async with connect(late, late_key):
                    pass
            assert emu.preamble_rejections == 1

        emu.cut_at_expiry = True  # also catches sessions that expired before
        await asyncio.wait_for(survivor.wait_closed(), 1)
        assert not victim.is_closed()  # not expired yet
        await asyncio.wait_for(victim.wait_closed(), 2)
        assert 1.9 < time.monotonic() - t0 < 2.8
        await asyncio.wait_for(running.wait_closed(), 1)

    run(go())
    assert wait_until(lambda: emu.ssh_connections() == 0, timeout=5)


def test_large_output_on_both_streams(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    sess, key = ready_session(emu, sid)
    size = 50 * 1024 * 1024

    async def go() -> None:
        async with connect(sess, key) as conn:
            r = await conn.run(
                f"head -c {size} /dev/zero & head -c {size} /dev/zero >&2; wait", encoding=None
            )
            assert r.exit_status == 0
            assert len(r.stdout) == size and len(r.stderr) == size
            data = os.urandom(4 * 1024 * 1024)
            r = await conn.run("cat; cat >&2 </dev/null", input=data, encoding=None)
            assert r.stdout == data

    run(go(), timeout=25)


def test_signals_and_exit_signal(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    sess, key = ready_session(emu, sid)

    async def go() -> None:
        async with connect(sess, key) as conn:
            proc = await conn.create_process("echo up; sleep 20")
            assert await proc.stdout.readline() == "up\n"
            proc.send_signal("TERM")
            await asyncio.wait_for(proc.wait_closed(), 5)
            assert proc.exit_signal is not None and proc.exit_signal[0] == "TERM"
            r = await conn.run("kill -KILL $$")
            assert r.exit_signal is not None and r.exit_signal[0] == "KILL"

    run(go())


def test_pty_shell_and_resize(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    sess, key = ready_session(emu, sid)

    async def read_until(proc: Any, marker: str) -> str:
        buf = ""
        while marker not in buf:
            chunk = await asyncio.wait_for(proc.stdout.read(4096), 5)
            assert chunk, f"EOF before {marker!r}; got {buf!r}"
            buf += chunk
        return buf

    async def go() -> None:
        async with connect(sess, key) as conn:
            r = await conn.run(
                "stty size; echo $TERM; exec </dev/tty && echo ctty",
                term_type="vt100",
                term_size=(100, 40),
            )
            assert r.stdout.split() == ["40", "100", "vt100", "ctty"]
            proc = await conn.create_process(term_type="xterm", term_size=(80, 24))
            # the terminal echoes input, so wait for markers only the shell can print
            proc.stdin.write("stty size; echo MARK$((40+1))\n")
            assert "24 80" in await read_until(proc, "MARK41\r\n")
            proc.change_terminal_size(132, 50)
            await asyncio.sleep(0.05)
            proc.stdin.write("stty size; echo MARK$((40+2))\n")
            assert "50 132" in await read_until(proc, "MARK42\r\n")
            proc.stdin.write("exit 3\n")
            await asyncio.wait_for(proc.wait_closed(), 5)
            assert proc.exit_status == 3

    run(go())


def test_sftp(emu: Emulator, tmp_path: Path) -> None:
    sid = emu.create_sandbox()
    sess, key = ready_session(emu, sid)
    sandbox = emu.sandbox_dir(sid)

    async def go() -> None:
        async with connect(sess, key) as conn, conn.start_sftp_client() as sftp:
            assert await sftp.realpath(".") == str(sandbox.resolve())
            async with sftp.open("up.txt", "wb") as f:
                await f.write(b"payload")
            assert (sandbox / "up.txt").read_bytes() == b"payload"
            await sftp.posix_rename("up.txt", "final.txt")
            async with sftp.open("final.txt", "rb") as f:
                assert await f.read() == b"payload"
            absolute = tmp_path / "outside.bin"
            async with sftp.open(str(absolute), "wb") as f:
                await f.write(b"abs")
            assert absolute.read_bytes() == b"abs"
            (sandbox / "old").write_text("x")
            (sandbox / "new").write_text("y")
            await sftp.posix_rename("old", "new")  # overwrites, unlike plain rename
            assert (sandbox / "new").read_text() == "x"
            assert sorted(await sftp.listdir(".")) == [".", "..", "final.txt", "new"]

    run(go())


def test_channel_cap(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    sess, key = ready_session(emu, sid)
    emu.max_channels_per_connection = 2

    async def go() -> None:
        async with connect(sess, key) as conn:
            a = await conn.create_process("sleep 20")
            b = await conn.create_process("sleep 20")
            with pytest.raises(asyncssh.ChannelOpenError) as info:
                await conn.create_process("true")
            assert info.value.code == asyncssh.OPEN_RESOURCE_SHORTAGE
            assert not conn.is_closed()
            a.close()
            await a.wait_closed()
            r = await conn.run("echo ok")  # the slot is free again at once
            assert r.stdout == "ok\n"
            emu.channel_cap_failure_code = asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            c = await conn.create_process("sleep 20")
            with pytest.raises(asyncssh.ChannelOpenError) as info:
                await conn.run("true")
            assert info.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            emu.max_channels_per_connection = None
            rs = await asyncio.gather(*(conn.run("echo hi") for _ in range(12)))
            assert all(r.stdout == "hi\n" for r in rs)
            b.close()
            c.close()

    run(go())


def test_exposure_delay(side: Emulator) -> None:
    emu = side
    sid = emu.create_sandbox()
    emu.exposure_delay = 0.6
    t0 = time.monotonic()
    sess, key = ready_session(emu, sid)
    assert port_refuses(sess["port"])  # refused, not hanging

    async def go() -> None:
        while True:
            try:
                async with connect(sess, key) as conn:
                    assert (await conn.run("echo ok")).stdout == "ok\n"
                    return
            except OSError:
                assert time.monotonic() - t0 < 3
                await asyncio.sleep(0.05)

    run(go())
    assert time.monotonic() - t0 >= 0.55


def test_host_keys_stable_or_rotating(both: Emulator) -> None:
    emu = both
    a, b = emu.create_sandbox(), emu.create_sandbox()

    async def host_key(sess: dict[str, Any], key: asyncssh.SSHKey) -> str:
        async with connect(sess, key) as conn:
            server_key = conn.get_server_host_key()
            assert server_key is not None
            fp: str = server_key.get_fingerprint()
            return fp

    def fingerprint(sid: str) -> str:
        sess, key = ready_session(emu, sid)
        fp = run(host_key(sess, key))
        assert emu.sessions[-1].host_key_fingerprint == fp
        return fp

    assert fingerprint(a) == fingerprint(a)
    assert fingerprint(a) != fingerprint(b)
    emu.rotate_host_key = True
    assert len({fingerprint(a), fingerprint(a), fingerprint(a)}) == 3


def test_delete_and_status_change_close_connections(both: Emulator) -> None:
    emu = both
    sid = emu.create_sandbox()
    s1, k1 = ready_session(emu, sid)
    s2, k2 = ready_session(emu, sid)

    async def go() -> None:
        c1 = await connect(s1, k1)
        c2 = await connect(s2, k2)
        assert emu.ssh_connections() == 2
        r = api(emu, "DELETE", f"/sandbox/{sid}/ssh-session/{s1['session_id']}")
        assert r.status_code in (200, 204)
        await asyncio.wait_for(c1.wait_closed(), 3)
        assert not c2.is_closed()
        emu.set_status(sid, "TERMINATED")
        await asyncio.wait_for(c2.wait_closed(), 3)
        if emu.contract == "sidecar":
            assert port_refuses(s2["port"])
        else:
            assert preamble_closed(emu, PREAMBLE.format(s2["session_id"]))

    run(go())
    assert wait_until(lambda: emu.ssh_connections() == 0, timeout=5)
    assert emu.open_sessions(sid) == [s2["session_id"]]  # listed, but unusable
    if emu.contract == "sidecar":
        assert authorize(s2, new_key()).status_code >= 400
    r = api(emu, "POST", f"/sandbox/{sid}/ssh-session", json=session_body(emu))
    assert r.status_code == 409 and "TERMINATED" in r.json()["detail"]
    assert api(emu, "GET", f"/sandbox/{sid}").json()["status"] == "TERMINATED"


def test_channel_close_hangs_up_but_detached_survive(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    sess, key = ready_session(emu, sid)
    script = (
        "echo $$; "
        "setsid sh -c 'echo $$ > detached.pid; exec sleep 30' </dev/null >/dev/null 2>&1 & "
        "sleep 30"
    )
    pidfile = emu.sandbox_dir(sid) / "detached.pid"

    async def go() -> tuple[int, int]:
        async with connect(sess, key) as conn:
            proc = await conn.create_process(script)
            stubborn = await conn.create_process("trap '' HUP; echo $$; sleep 30")
            leader = int(await proc.stdout.readline())
            stubborn_pid = int(await stubborn.stdout.readline())
            assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", 5)
            for p in (proc, stubborn):
                p.close()
                await p.wait_closed()
            assert pid_alive(stubborn_pid)  # ignores SIGHUP: SIGKILLed after a grace period
            return leader, stubborn_pid

    leader, stubborn = run(go())
    detached = int(pidfile.read_text())
    try:
        assert wait_until(lambda: not pid_alive(leader), timeout=3)
        assert wait_until(lambda: not pid_alive(stubborn), timeout=4)
        assert pid_alive(detached)
    finally:
        os.kill(detached, 9)


def test_direct_tcpip_to_loopback(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    sess, key = ready_session(emu, sid)

    async def go() -> None:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.readline())
            await w.drain()
            w.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, connect(sess, key) as conn:
            reader, writer = await conn.open_connection("127.0.0.1", port)
            writer.write(b"ping\n")
            assert await reader.readline() == b"ping\n"
            writer.close()
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("192.0.2.1", 80)

    run(go())


@pytest.mark.parametrize("contract", ["vm", "sidecar"])
def test_stop_leaves_no_threads_or_processes(contract: str) -> None:
    before = set(threading.enumerate())
    emu = Emulator(contract=contract).start()
    sid = emu.create_sandbox()
    sess, key = ready_session(emu, sid)
    keep_alive = requests.Session()
    keep_alive.get(f"{emu.base_url}/api/v1/sandbox/{sid}", headers=auth(emu), timeout=5)
    loop = asyncio.new_event_loop()
    try:
        conn = loop.run_until_complete(connect(sess, key))
        proc = loop.run_until_complete(
            conn.create_process("setsid sleep 30 </dev/null >/dev/null 2>&1 & echo $! $$; sleep 30")
        )
        line = loop.run_until_complete(proc.stdout.readline())
        detached, pid = (int(x) for x in line.split())
        assert emulator_threads()
        # vm: a connection still waiting to send its preamble must go too
        port = emu.ssh_port
        waiting = socket.create_connection(("127.0.0.1", port)) if port else None
        t0 = time.monotonic()
        emu.stop()
        assert time.monotonic() - t0 < 5
        emu.stop()
        loop.run_until_complete(asyncio.wait_for(conn.wait_closed(), 3))
        if waiting is not None:
            assert closed_without_banner(waiting)
            assert port_refuses(sess["port"])
    finally:
        loop.close()
        keep_alive.close()
    assert emulator_threads() == []
    assert wait_until(
        lambda: set(threading.enumerate()) <= before,
        timeout=3,
        what=lambda: [t.name for t in set(threading.enumerate()) - before],
    )
    assert not pid_alive(pid)
    assert wait_until(lambda: not pid_alive(detached), timeout=2)  # detached ones too


def test_many_sessions_do_not_leak_fds(both: Emulator) -> None:
    emu = both
    sid = emu.create_sandbox()
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.exists():
        pytest.skip("needs /proc")

    async def one(sess: dict[str, Any], key: asyncssh.SSHKey) -> None:
        async with connect(sess, key) as conn:
            assert (await conn.run("true")).exit_status == 0

    def cycle(n: int) -> None:
        made = [ready_session(emu, sid) for _ in range(n)]

        async def all_of() -> None:
            await asyncio.gather(*(one(s, k) for s, k in made))

        run(all_of())
        for sess, _ in made:
            r = api(emu, "DELETE", f"/sandbox/{sid}/ssh-session/{sess['session_id']}")
            assert r.status_code in (200, 204)

    emu.rate_limit = (10_000, 60.0)
    cycle(5)  # warm up lazily created descriptors
    baseline = len(os.listdir(fd_dir))
    cycle(60)
    assert wait_until(
        lambda: len(os.listdir(fd_dir)) <= baseline + 3,
        timeout=5,
        what=lambda: (len(os.listdir(fd_dir)), baseline),
    )
    assert emu.open_sessions() == [] and emu.ssh_connections() == 0


# -- the vm contract's shared port and preamble --------------------------------------------


def test_vm_raw_paramiko_with_preamble(emu: Emulator) -> None:
    """What the official client does: preamble on the TCP stream, then plain SSH."""
    sid = emu.create_sandbox()
    pkey, line = ed25519_pair()
    r = api(emu, "POST", f"/sandbox/{sid}/ssh-session", json={"public_key": line})
    assert r.status_code == 200, r.text
    sess = r.json()
    status, out, err = paramiko_exec(
        sess["host"], sess["port"], sess["session_id"], pkey, "whoami >/dev/null; pwd; exit 3"
    )
    assert (status, out, err) == (3, f"{emu.sandbox_dir(sid)}\n".encode(), b"")
    # The posted key is the only one; the username must be the session id.
    other, _ = ed25519_pair()
    import paramiko

    with pytest.raises(paramiko.AuthenticationException):
        paramiko_exec(sess["host"], sess["port"], sess["session_id"], other, "true")
    with pytest.raises(paramiko.AuthenticationException):
        paramiko_exec(sess["host"], sess["port"], sess["session_id"], pkey, "true", username="root")
    assert emu.preamble_rejections == 0
    assert wait_until(lambda: emu.ssh_connections() == 0, timeout=5)


def test_vm_preamble_rejections(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    sess, key = ready_session(emu, sid)
    good = PREAMBLE.format(sess["session_id"])
    # Accepted: the SSH banner follows the preamble, and only then.
    sock = preamble_socket("127.0.0.1", emu.ssh_port or 0, good)
    try:
        assert ssh_banner(sock).startswith(b"SSH-2.0-")
    finally:
        sock.close()

    bad: list[str | bytes] = [
        "SSH-2.0-OpenSSH_9.6\r\n",  # no preamble: an SSH client speaking first
        "PRIME-SSH-SESSION sess_doesnotexist0000000\n",
        f"PRIME-SSH-SESSION {sess['session_id']}\r\n",
        f"PRIME-SSH-SESSION  {sess['session_id']}\n",
        f"prime-ssh-session {sess['session_id']}\n",
        f"PRIME-SSH-SESSION {sess['session_id']} extra\n",
        "PRIME-SSH-SESSION \n",
        "\n",
        b"PRIME-SSH-SESSION \xff\xfe\n",
        "PRIME-SSH-SESSION " + "x" * 300,  # over-long, no newline
        "PRIME-SSH-SESSION " + "x" * 240 + "\n",  # 259 bytes with the newline
    ]
    for n, line in enumerate(bad, 1):
        assert preamble_closed(emu, line), line
        assert emu.preamble_rejections == n
    # A preamble and the SSH client's banner in one write is fine (read exactly one line).
    assert asyncssh_echo(sess, key) == "ok\n"

    emu.preamble_timeout = 0.3
    t0 = time.monotonic()
    assert preamble_closed(emu, b"PRIME-SSH-")  # never finished
    assert 0.25 < time.monotonic() - t0 < 4
    assert emu.preamble_rejections == len(bad) + 1
    assert emu.ssh_connections() == 0


def asyncssh_echo(sess: dict[str, Any], key: asyncssh.SSHKey) -> str:
    async def go() -> str:
        async with connect(sess, key) as conn:
            out = (await conn.run("echo ok")).stdout
            assert isinstance(out, str)
            return out

    return run(go())


def test_vm_preamble_refuses_deleted_expired_and_stopped(emu: Emulator) -> None:
    sid, other_sid = emu.create_sandbox(), emu.create_sandbox()
    deleted, _ = ready_session(emu, sid)
    expired, _ = ready_session(emu, sid, ttl=1)
    stopped, _ = ready_session(emu, other_sid)
    live, live_key = ready_session(emu, sid)
    assert api(emu, "DELETE", f"/sandbox/{sid}/ssh-session/{deleted['session_id']}").ok
    emu.set_status(other_sid, "PAUSED")
    assert preamble_closed(emu, PREAMBLE.format(deleted["session_id"]))
    assert preamble_closed(emu, PREAMBLE.format(stopped["session_id"]))
    assert emu.preamble_rejections == 2
    expires_at = emu.sessions[1].expires_at
    assert wait_until(lambda: datetime.now(timezone.utc) >= expires_at, timeout=3)
    assert preamble_closed(emu, PREAMBLE.format(expired["session_id"]))
    assert emu.preamble_rejections == 3
    assert asyncssh_echo(live, live_key) == "ok\n"  # the others did not disturb it
    assert emu.preamble_rejections == 3


def test_vm_sessions_share_one_port(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    made = [ready_session(emu, sid) for _ in range(3)]
    assert {s["port"] for s, _ in made} == {emu.ssh_port}

    async def go() -> list[str]:
        conns = [await connect(s, k) for s, k in made]
        try:
            outs = [(await c.run("echo $$ >/dev/null; echo hi")).stdout for c in conns]
            counts = [emu.ssh_connections(s["session_id"]) for s, _ in made]
            assert counts == [1, 1, 1] and emu.ssh_connections() == 3
            return [str(o) for o in outs]
        finally:
            for c in conns:
                c.close()

    assert run(go()) == ["hi\n"] * 3
    # A session's preamble with another session's key: the key check is per session.
    (s0, _), (_, k1) = made[0], made[1]

    async def crossed() -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            async with connect(s0, k1):
                pass

    run(crossed())


def test_vm_exposure_delay(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    emu.exposure_delay = 0.5
    t0 = time.monotonic()
    sess, key = ready_session(emu, sid)
    assert preamble_closed(emu, PREAMBLE.format(sess["session_id"]))  # too early: closed
    assert emu.preamble_rejections == 1
    attempts = 1

    def banner_after_preamble() -> bool:
        nonlocal attempts
        sock = preamble_socket("127.0.0.1", sess["port"], PREAMBLE.format(sess["session_id"]))
        sock.settimeout(5)
        try:
            first = sock.recv(8)
        except ConnectionResetError:
            first = b""
        finally:
            sock.close()
        if first:
            assert first.startswith(b"SSH-2.0-")
            return True
        attempts += 1
        assert time.monotonic() - t0 < 5
        return False

    wait_until(banner_after_preamble, timeout=5, what="the exposed session", interval=0.05)
    assert time.monotonic() - t0 >= 0.45
    assert emu.preamble_rejections == attempts
    assert asyncssh_echo(sess, key) == "ok\n"


def test_children_get_default_sigint_and_sigquit(emu: Emulator) -> None:
    """An emulator started in the background by a shell inherits SIGINT/SIGQUIT ignored."""
    sid = emu.create_sandbox()
    sess, key = ready_session(emu, sid)
    mask_cmd = "grep '^SigIgn:' /proc/self/status"
    int_quit = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGQUIT - 1))

    async def go() -> None:
        async with connect(sess, key) as conn:
            for term in (None, "xterm"):
                r = await conn.run(mask_cmd, term_type=term)
                ignored = int(str(r.stdout).split()[-1], 16)
                assert ignored & int_quit == 0, (term, r.stdout)
            # Ctrl-C in an interactive shell reaches the foreground command.
            proc = await conn.create_process(term_type="xterm", term_size=(80, 24))
            proc.stdin.write("sleep 31.4159\n")
            assert wait_until(lambda: pids_running(b"sleep\x0031.4159\x00") != [], timeout=5)
            (sleeper,) = pids_running(b"sleep\x0031.4159\x00")
            proc.stdin.write("\x03")
            assert wait_until(lambda: not pid_alive(sleeper), timeout=5)
            proc.stdin.write("echo MARK$((40+1))\n")  # the shell is back at its prompt
            buf = ""
            while "MARK41\r\n" not in buf:
                chunk = await asyncio.wait_for(proc.stdout.read(4096), 5)
                assert chunk, buf
                buf += chunk
            proc.stdin.write("exit\n")
            await asyncio.wait_for(proc.wait_closed(), 5)

    saved = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGQUIT)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    try:
        run(go())
    finally:
        for n, handler in saved.items():
            signal.signal(n, handler)


# -- OpenSSH mode ------------------------------------------------------------------------


def test_openssh_mode_bookkeeping(tmp_path: Path) -> None:
    keys_file = tmp_path / "ssh" / "authorized_keys"
    target = OpenSSHTarget("127.0.0.1", 2222, "sandboxuser", keys_file)
    with Emulator(openssh=target, contract="sidecar") as emu:
        assert not any(t.name == "sshbridge-emulator-sidecar" for t in emulator_threads())
        sid = emu.create_sandbox()
        s1, k1 = ready_session(emu, sid)
        s2, k2 = ready_session(emu, sid)
        for s in (s1, s2):
            assert s["session_id"] == "sandboxuser" and s["port"] == 2222
            assert s["host"] == "127.0.0.1" and s["external_endpoint"] == "127.0.0.1:2222"
        first, second = emu.open_sessions()
        assert first != second
        assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
        lines = keys_file.read_text().splitlines()
        assert len(lines) == 2
        assert k1.export_public_key().decode().split()[1] in lines[0]
        assert authorize(s1, k1).status_code == 200  # idempotent: no duplicate line
        assert len(keys_file.read_text().splitlines()) == 2

        r = api(emu, "DELETE", f"/sandbox/{sid}/ssh-session/sandboxuser")
        assert r.status_code in (200, 204)
        assert emu.open_sessions() == [first]  # the most recent one went
        remaining = keys_file.read_text()
        assert k1.export_public_key().decode().split()[1] in remaining
        assert k2.export_public_key().decode().split()[1] not in remaining
        assert emu.ssh_connections() == 0
    assert keys_file.read_text() == ""  # stop() removes what it added


@pytest.mark.skipif(
    not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")) or os.geteuid() != 0,
    reason="needs OpenSSH sshd and root",
)
def test_openssh_mode_against_real_sshd(tmp_path: Path) -> None:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    host_key = tmp_path / "host_ed25519"
    new_key().write_private_key(str(host_key))
    host_key.chmod(0o600)
    keys_file = tmp_path / "authorized_keys"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
        f"AuthorizedKeysFile {keys_file}\nStrictModes no\nUsePAM no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"PidFile {tmp_path / 'sshd.pid'}\nPermitRootLogin prohibit-password\n"
    )
    daemon = subprocess.Popen(
        [sshd, "-D", "-e", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with socket.socket() as probe:
            assert wait_until(lambda: probe.connect_ex(("127.0.0.1", port)) == 0, timeout=5)
        target = OpenSSHTarget("127.0.0.1", port, "root", keys_file)
        with Emulator(openssh=target, contract="sidecar") as emu:
            sid = emu.create_sandbox()
            sess, key = ready_session(emu, sid)

            async def go() -> None:
                async with connect(sess, key) as conn:
                    assert (await conn.run("echo real")).stdout == "real\n"
                r = api(emu, "DELETE", f"/sandbox/{sid}/ssh-session/root")
                assert r.status_code in (200, 204)
                with pytest.raises(asyncssh.PermissionDenied):
                    async with connect(sess, key):
                        pass

            run(go())
    finally:
        daemon.terminate()
        daemon.wait(5)


def test_openssh_mode_bookkeeping_vm(tmp_path: Path) -> None:
    keys_file = tmp_path / "authorized_keys"
    target = OpenSSHTarget("127.0.0.1", 2222, "sandboxuser", keys_file)
    with Emulator(openssh=target) as emu:
        assert emu.ssh_port is None and not emulator_threads()[1:]  # only the HTTP thread
        sid = emu.create_sandbox()
        s1, k1 = ready_session(emu, sid)
        s2, k2 = ready_session(emu, sid)
        for s in (s1, s2):
            assert set(s) == VM_SESSION_FIELDS
            assert (s["session_id"], s["host"], s["port"]) == ("sandboxuser", "127.0.0.1", 2222)
        lines = keys_file.read_text().splitlines()  # authorized by the POSTs themselves
        assert len(lines) == 2 and public_line(k1).split()[1] in lines[0]
        assert public_line(k2).split()[1] in lines[1]
        assert api(emu, "DELETE", f"/sandbox/{sid}/ssh-session/sandboxuser").ok
        assert public_line(k2).split()[1] not in keys_file.read_text()
    assert keys_file.read_text() == ""


@needs_sshd
def test_openssh_mode_vm_behind_preamble_front(tmp_path: Path) -> None:
    """vm contract on a real sshd: the answer points at a front that checks the preamble."""
    server = start_sshd(tmp_path)
    emu_box: list[Emulator] = []

    def accept(session_id: str) -> bool:
        return session_id == server.username and bool(emu_box[0].open_sessions())

    try:
        with PreambleFront((server.host, server.port), accept) as front:
            target = OpenSSHTarget(
                front.host, front.port, server.username, server.authorized_keys_file
            )
            with Emulator(openssh=target) as emu:
                emu_box.append(emu)
                sid = emu.create_sandbox()
                pkey, line = ed25519_pair()
                r = api(emu, "POST", f"/sandbox/{sid}/ssh-session", json={"public_key": line})
                assert r.status_code == 200, r.text
                sess = r.json()
                assert (sess["host"], sess["port"]) == (front.host, front.port)
                status, out, _ = paramiko_exec(
                    sess["host"], sess["port"], sess["session_id"], pkey, "echo real"
                )
                assert (status, out) == (0, b"real\n")
                assert front.accepted == 1
                assert api(emu, "DELETE", f"/sandbox/{sid}/ssh-session/{sess['session_id']}").ok
                sock = preamble_socket(front.host, front.port, PREAMBLE.format(server.username))
                assert closed_without_banner(sock)  # no open session left
                assert front.rejected == 1
    finally:
        server.stop()


# -- the command line ----------------------------------------------------------------------


def test_emulator_command_contract_and_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "run" / "emu.env"
    env_file.parent.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    cli = [sys.executable, "-m", "sshbridge.cli", "emulator"]
    bad = subprocess.run(
        [*cli, "--contract", "ssh"], env=env, capture_output=True, timeout=30, check=False
    )
    assert bad.returncode == 2 and b"--contract" in bad.stderr
    proc = subprocess.Popen(
        [*cli, "--contract", "sidecar", "--env-file", str(env_file), "-n", "1"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        assert wait_until(lambda: env_file.exists() or proc.poll() is not None, timeout=20)
        assert env_file.exists(), proc.stderr.read() if proc.stderr else ""
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        assert [p.name for p in env_file.parent.iterdir()] == ["emu.env"]  # no temp file left
        text = env_file.read_text()
        printed = [proc.stdout.readline().decode() for _ in text.splitlines()]
        assert "".join(printed) == text  # the file holds exactly what was printed
        assert text.endswith("\n") and len(printed) == 3  # two exports, one sandbox
        values = dict(re.findall(r"^export (\w+)=(\S+)$", text, re.M))
        assert set(values) == {"PRIME_API_KEY", "PRIME_API_BASE_URL"}
        # Sourcing the file gives the same values a shell would see.
        shown = subprocess.run(
            ["sh", "-c", f". {env_file} && echo $PRIME_API_BASE_URL"],
            capture_output=True,
            timeout=10,
            check=True,
        )
        base = shown.stdout.decode().strip()
        assert base == values["PRIME_API_BASE_URL"]
        headers = {"Authorization": f"Bearer {values['PRIME_API_KEY']}"}
        listed = requests.get(f"{base}/api/v1/sandbox", headers=headers, timeout=5).json()
        (box,) = listed["sandboxes"]
        assert box["vm"] is False  # the sidecar contract serves containers
        url = f"{base}/api/v1/sandbox/{box['id']}/ssh-session"
        r = requests.post(url, json={}, headers=headers, timeout=5)
        assert r.status_code == 200 and set(r.json()) == SESSION_FIELDS
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert not env_file.exists()  # removed when the emulator exits
    finally:
        proc.kill()
        proc.wait()
