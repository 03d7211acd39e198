"""Both session contracts, told apart by the answer, against the emulator on loopback.

Contract B (``contract="vm"``): the key goes in the POST, the answer has six fields, and
every TCP connection starts with ``PRIME-SSH-SESSION <id>``. Contract A (``"sidecar"``):
a token authorizes the key at a gateway and SSH starts at once.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from conftest import SECRET_KEY

from sshbridge import (
    Fleet,
    SandboxNotRunning,
    SandboxNotSupported,
    SandboxSSH,
    SidecarSSHSession,
    SSHSession,
    UnexpectedResponse,
)
from sshbridge.emulator import Emulator

pytestmark = [pytest.mark.timeout(90), pytest.mark.contracts]


# ``contract`` and ``emu`` are conftest's: both contracts, every session ends closed.


def connect(emu: Emulator, sandbox_id: str, **kw: Any) -> SandboxSSH:
    return SandboxSSH(sandbox_id, api_key=emu.api_key, base_url=emu.base_url, **kw)


def endpoints(emu: Emulator) -> list[tuple[str, int]]:
    return [(c.endpoint, c.status) for c in emu.api_calls]


def test_detected_from_the_answer_with_no_preflight_get(emu: Emulator, contract: str) -> None:
    sid = emu.create_sandbox()
    with connect(emu, sid) as shell:
        assert shell.run("echo hi", check=True).stdout == "hi\n"
        session = shell.session
        assert session is not None and session.contract == contract
        assert isinstance(session, SidecarSSHSession) == (contract == "sidecar")
        assert (session.preamble is None) == (contract == "sidecar")
    expected = [("create_session", 200)]
    if contract == "sidecar":
        expected.append(("authorize", 200))
    expected.append(("close_session", 200))
    # No GET of the sandbox on the way in: that round trip is for explaining failures.
    assert endpoints(emu) == expected
    if contract == "vm":
        assert emu.preamble_rejections == 0


def test_every_connection_carries_the_preamble(emu: Emulator, contract: str) -> None:
    # One channel per connection: eight concurrent commands need eight connections, each
    # of which (and the reconnect after a cut) must start with the session line.
    emu.max_channels_per_connection = 1
    sid = emu.create_sandbox()
    with connect(emu, sid, max_connections=8) as shell:
        results: list[int] = []
        lock = threading.Lock()

        def work() -> None:
            r = shell.run("sleep 0.3; echo ok")
            with lock:
                results.append(r.exit_code)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [0] * 8
        session = shell.session
        assert session is not None
        assert emu.ssh_connections(session.session_id) >= 2
        emu.cut_connections(session.session_id)
        assert shell.run("echo again", check=True).stdout == "again\n"
        assert shell.reconnects >= 1
    if contract == "vm":
        assert emu.preamble_rejections == 0


def test_renewal_in_both_contracts(emu: Emulator, contract: str) -> None:
    sid = emu.create_sandbox()
    seen: list[tuple[SSHSession, SSHSession]] = []
    with connect(emu, sid, ttl_seconds=30, on_renew=lambda a, b: seen.append((a, b))) as shell:
        first = shell.session
        assert first is not None
        shell.renew()
        second = shell.session
        assert second is not None and second.session_id != first.session_id
        assert second.contract == contract
        assert shell.run("echo renewed", check=True).stdout == "renewed\n"
    assert [(a.session_id, b.session_id) for a, b in seen] == [
        (first.session_id, second.session_id)
    ]
    posts = [c for c in emu.api_calls if c.endpoint == "create_session"]
    assert [c.status for c in posts] == [200, 200]


def test_vm_sandboxes_are_served_in_contract_b(contract: str) -> None:
    with Emulator(api_key=SECRET_KEY, contract=contract) as emu:
        sid = emu.create_sandbox(vm=True)
        if contract == "vm":
            with connect(emu, sid) as shell:
                assert shell.run("true").exit_code == 0
        else:
            # A sidecar service that itself says VMs are unsupported: its own answer,
            # explained after the fact (the GET comes only after the refused POST).
            with pytest.raises(SandboxNotSupported) as info:
                connect(emu, sid).connect()
            assert info.value.sandbox_id == sid
            assert [e for e, _ in endpoints(emu)] == ["create_session", "get_sandbox"]
        assert emu.open_sessions() == []


def test_stopped_sandbox_is_explained_after_the_refused_post(emu: Emulator) -> None:
    sid = emu.create_sandbox(status="PAUSED")
    with pytest.raises(SandboxNotRunning, match="PAUSED") as info:
        connect(emu, sid).connect()
    assert info.value.status == "PAUSED"
    assert [e for e, _ in endpoints(emu)] == ["create_session", "get_sandbox"]


def test_sidecar_that_forbids_public_key_is_asked_again_without_it() -> None:
    with Emulator(api_key=SECRET_KEY, contract="sidecar") as emu:
        emu.reject_unknown_fields = True
        sid = emu.create_sandbox()
        with connect(emu, sid, ttl_seconds=30) as shell:
            assert shell.run("echo a", check=True).stdout == "a\n"
            shell.renew()  # remembered: the renewal does not pay the 422 again
            assert shell.run("echo b", check=True).stdout == "b\n"
        posts = [c.status for c in emu.api_calls if c.endpoint == "create_session"]
        assert posts == [422, 200, 200]
        assert emu.open_sessions() == []


def test_a_422_about_something_else_is_not_retried(emu: Emulator) -> None:
    sid = emu.create_sandbox()
    body = {"errors": [{"param": "ttl_seconds", "details": "too long"}]}
    emu.fail_next(1, 422, body=body, endpoint="create_session")
    with pytest.raises(Exception, match="ttl_seconds: too long"):
        connect(emu, sid).connect()
    assert [e for e, _ in endpoints(emu)] == ["create_session"]


def _drop(field: str) -> Any:
    def hook(body: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k != field}

    return hook


@pytest.mark.parametrize(
    "hook",
    [
        _drop("host"),
        _drop("expires_at"),
        lambda b: {**b, "port": "not a port"},
        lambda b: {**b, "port": 0},
        lambda b: {**b, "expires_at": "yesterday"},
        lambda b: {**b, "session_id": b["session_id"] + " two"},
    ],
    ids=["no-host", "no-expiry", "port-text", "port-0", "bad-time", "space-in-id"],
)
def test_malformed_answer_is_deleted_before_the_error(emu: Emulator, hook: Any) -> None:
    sid = emu.create_sandbox()
    emu.session_answer_hook = hook
    with pytest.raises(UnexpectedResponse, match="cannot read") as info:
        connect(emu, sid).connect()
    assert SECRET_KEY not in str(info.value)
    deletes = [c for c in emu.api_calls if c.endpoint == "close_session"]
    assert len(deletes) == 1
    if deletes[0].status == 404:
        # The hook changed the id itself: the client closed what it was told of.
        for leaked in emu.open_sessions():
            emu.close_session(leaked)


def test_sidecar_answer_missing_gateway_fields_is_deleted() -> None:
    with Emulator(api_key=SECRET_KEY, contract="sidecar") as emu:
        sid = emu.create_sandbox()
        emu.session_answer_hook = _drop("user_ns")
        with pytest.raises(UnexpectedResponse, match="user_ns"):
            connect(emu, sid).connect()
        assert [e for e, _ in endpoints(emu)] == ["create_session", "close_session"]
        assert emu.open_sessions() == []


@pytest.mark.parametrize(
    "session_id", ["", 12345, None, ["x"]], ids=["empty", "int", "null", "list"]
)
def test_answer_without_a_usable_session_id_is_a_clear_error(
    emu: Emulator, session_id: object
) -> None:
    sid = emu.create_sandbox()
    emu.session_answer_hook = lambda b: {**b, "session_id": session_id}
    with pytest.raises(UnexpectedResponse, match="no usable session_id"):
        connect(emu, sid).connect()
    # Nothing to DELETE by: the emulator's real session is cleaned up here.
    assert [e for e, _ in endpoints(emu)] == ["create_session"]
    for leaked in emu.open_sessions():
        emu.close_session(leaked)


def test_fleet_in_both_contracts(emu: Emulator, contract: str) -> None:
    sids = [emu.create_sandbox() for _ in range(3)]
    with Fleet(sids, api_key=emu.api_key, base_url=emu.base_url) as fleet:
        results = fleet.run(lambda sid: ["echo", sid])
        assert results.ok
        assert {sid: r.result.stdout.strip() for sid, r in results.items() if r.result} == {
            s: s for s in sids
        }
    if contract == "vm":
        assert emu.preamble_rejections == 0


@pytest.mark.one_contract
def test_a_url_remembered_as_refusing_the_key_that_now_requires_it(emu: Emulator) -> None:
    """A base URL once answered 422 to public_key (contract A), then a contract-B server
    came up there (one that requires the key): the memory is dropped, not obeyed."""
    from sshbridge import _api

    sandbox = emu.create_sandbox()
    _api._REFUSES_PUBLIC_KEY.add(emu.base_url)
    try:
        with SandboxSSH(sandbox, api_key=emu.api_key, base_url=emu.base_url) as shell:
            assert shell.run("echo ok").stdout == "ok\n"
        assert emu.base_url not in _api._REFUSES_PUBLIC_KEY
    finally:
        _api._REFUSES_PUBLIC_KEY.discard(emu.base_url)
    assert emu.open_sessions() == []
