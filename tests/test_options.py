"""SSHOptions: validated once, frozen, picklable, taken by every front end."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import pickle

import pytest
from emu_helpers import opts

from sshbridge import (
    AsyncSandboxSSH,
    Fleet,
    InvalidArgument,
    PinFirstHostKey,
    SandboxSSH,
    SSHOptions,
)
from sshbridge.emulator import Emulator


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": True}, "ttl_seconds"),
        ({"connect_timeout": math.nan}, "connect_timeout"),
        ({"keepalive": -1}, "keepalive"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_connections": 2.5}, "max_connections"),
        ({"api_timeout": (1.0, math.inf)}, "timeout"),
        ({"rate_limit_wait": "soon"}, "rate_limit_wait"),
        ({"renew_before": 900, "ttl_seconds": 600}, "renew_before"),
        ({"auto_renew": 1}, "auto_renew"),
        ({"on_renew": "print"}, "on_renew"),
        ({"known_hosts": 3}, "known_hosts"),
        ({"api_key": b"k"}, "api_key"),
        ({"ttl": 60}, "unknown option"),
    ],
)
def test_bad_options_are_named(changes: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        SSHOptions.of(**changes)


def test_options_are_frozen_picklable_and_keep_secrets_out_of_repr() -> None:
    options = SSHOptions(ttl_seconds=120, api_key="sk-secret-value", keepalive=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.ttl_seconds = 60  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(options)) == options
    assert "sk-secret-value" not in repr(options)
    assert SSHOptions.of(options, ttl_seconds=60).ttl_seconds == 60
    assert SSHOptions.of(options) is options
    with pytest.raises(InvalidArgument, match="SSHOptions"):
        SSHOptions.of({"ttl_seconds": 60})  # type: ignore[arg-type]


def test_every_front_end_takes_options(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    options = SSHOptions(ttl_seconds=120, **opts(emu))
    with SandboxSSH.from_options(sandbox, options) as shell:
        assert shell.options is options
        assert shell.run("echo one").stdout == "one\n"
        session = shell.session
        assert session is not None and session.ttl_seconds == 120
    with Fleet([sandbox], options=options, ttl_seconds=60) as fleet:
        assert fleet.options.ttl_seconds == 60  # a keyword overrides the object
        assert isinstance(fleet.options.host_key_policy, PinFirstHostKey)
        assert fleet.run("echo two")[sandbox].unwrap().stdout == "two\n"

    async def main() -> str:
        async with AsyncSandboxSSH(sandbox, options=options) as shell:
            return (await shell.run("echo three")).stdout

    assert asyncio.run(main()) == "three\n"
    assert not emu.open_sessions()


def test_fleet_rejects_bad_options_before_any_session(emu: Emulator) -> None:
    sandbox = emu.create_sandbox()
    with pytest.raises(InvalidArgument, match="keepalive"):
        Fleet([sandbox], keepalive=-1, **opts(emu))
    with pytest.raises(InvalidArgument, match="unknown option"):
        Fleet([sandbox], ttl=60, **opts(emu))
    assert not [c for c in emu.api_calls if c.method == "POST"]
