"""The provider's official SDK (``prime-sandboxes``) against the emulator's vm contract.

If the SDK can read and drive the emulator, the emulator speaks the provider's current
contract as the provider's own client understands it. The SSH leg is what
``prime_cli.ssh_proxy`` does: the preamble line, then plain SSH (raw paramiko here).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import running_emulator
from emu_helpers import ed25519_pair, paramiko_exec

from sshbridge.emulator import Emulator

try:
    import prime_sandboxes
except ImportError:
    if os.environ.get("CI"):
        raise RuntimeError(
            "CI must run the official-SDK tests, but prime_sandboxes is not importable: "
            "install the dev extra (pip install -e '.[dev]')"
        ) from None
    pytest.skip(
        "prime_sandboxes is not installed (pip install prime-sandboxes==0.5.1)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def emu() -> Iterator[Emulator]:
    """Contract B only (the SDK's), not parametrized; the emulator's own random key."""
    with running_emulator(contract="vm") as emulator:
        yield emulator


@pytest.fixture
def sdk(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``SandboxClient(APIClient())`` configured by the environment, as a user would."""
    for name in ("PRIME_CONTEXT", "PRIME_BASE_URL", "PRIME_TEAM_ID", "PRIME_USER_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PRIME_API_KEY", emu.api_key)
    monkeypatch.setenv("PRIME_API_BASE_URL", emu.base_url + "/api/v1")  # suffix is stripped
    assert "PRIME_CONTEXT" not in os.environ
    api_client = prime_sandboxes.APIClient()
    # HOME is a per-test directory (conftest): the SDK reads and writes nothing real.
    assert api_client.config.config_dir == Path(os.environ["HOME"]) / ".prime"
    assert api_client.base_url == emu.base_url and api_client.api_key == emu.api_key
    client = prime_sandboxes.SandboxClient(api_client)
    try:
        yield client
    finally:
        api_client.client.close()


def test_sdk_get_and_list(emu: Emulator, sdk: Any) -> None:
    ids = [emu.create_sandbox(name=f"box-{i}") for i in range(3)]
    emu.set_status(ids[2], "TERMINATED")
    box = sdk.get(ids[0])
    assert isinstance(box, prime_sandboxes.Sandbox)
    assert (box.id, box.name, box.status, box.vm) == (ids[0], "box-0", "RUNNING", True)
    assert isinstance(box.created_at, datetime) and box.created_at.tzinfo is not None
    assert box.start_command is None and box.labels == []
    gone = sdk.get(ids[2])
    assert gone.status == "TERMINATED" and gone.terminated_at is not None
    # Every field the SDK models, required or not, comes from the emulator itself.
    body = emu_get(emu, ids[0])
    aliases = {f.alias or name for name, f in prime_sandboxes.Sandbox.model_fields.items()}
    assert aliases <= set(body), aliases - set(body)

    listed = sdk.list()
    assert isinstance(listed, prime_sandboxes.SandboxListResponse)
    assert [s.id for s in listed.sandboxes] == ids
    assert (listed.total, listed.page, listed.per_page, listed.has_next) == (3, 1, 50, False)
    page2 = sdk.list(page=2, per_page=2)
    assert [s.id for s in page2.sandboxes] == ids[2:] and page2.has_next is False
    assert sdk.list(per_page=2).has_next is True
    assert [s.id for s in sdk.list(status="RUNNING").sandboxes] == ids[:2]
    with pytest.raises(prime_sandboxes.APIError):
        sdk.get("sbx_doesnotexist000000")
    assert {c.endpoint for c in emu.api_calls} == {"get_sandbox", "list_sandboxes"}


def emu_get(emu: Emulator, sandbox_id: str) -> dict[str, Any]:
    import requests

    r = requests.get(
        f"{emu.base_url}/api/v1/sandbox/{sandbox_id}",
        headers={"Authorization": f"Bearer {emu.api_key}"},
        timeout=5,
    )
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def test_sdk_ssh_session_round_trip(emu: Emulator, sdk: Any) -> None:
    sid = emu.create_sandbox()
    pkey, public_key = ed25519_pair()
    session = sdk.create_ssh_session(sid, public_key)
    assert isinstance(session, prime_sandboxes.SSHSession)
    assert emu.open_sessions(sid) == [session.session_id]
    assert (session.sandbox_id, session.host, session.port) == (sid, "127.0.0.1", emu.ssh_port)
    assert session.ttl_seconds == 900 and session.expires_at.tzinfo is not None
    assert emu.sessions[0].authorized_keys == [pkey.fingerprint]

    status, out, err = paramiko_exec(
        session.host, session.port, session.session_id, pkey, "echo via-sdk; echo oops >&2"
    )
    assert (status, out, err) == (0, b"via-sdk\n", b"oops\n")

    sdk.close_ssh_session(sid, session.session_id)
    assert emu.open_sessions() == []
    short = sdk.create_ssh_session(sid, public_key, ttl_seconds=30)
    assert short.ttl_seconds == 30
    sdk.close_ssh_session(sid, short.session_id)
    calls = [(c.method, c.endpoint, c.status) for c in emu.api_calls]
    assert calls == [
        ("POST", "create_session", 200),
        ("DELETE", "close_session", 200),
        ("POST", "create_session", 200),
        ("DELETE", "close_session", 200),
    ]


def test_sdk_sees_the_emulators_errors(emu: Emulator, sdk: Any) -> None:
    sid = emu.create_sandbox()
    with pytest.raises(prime_sandboxes.APIError):
        sdk.create_ssh_session(sid, "not a key")
    with pytest.raises(prime_sandboxes.APIError):
        sdk.create_ssh_session(sid, ed25519_pair()[1], ttl_seconds=7200)
    emu.set_status(sid, "PAUSED")
    with pytest.raises(prime_sandboxes.APIError, match="not running"):
        sdk.create_ssh_session(sid, ed25519_pair()[1])
    assert emu.sessions == []
    assert [c.status for c in emu.api_calls] == [422, 422, 409]
