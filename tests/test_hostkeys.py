"""known_hosts files as OpenSSH writes them: markers, hashed names, lines we cannot read."""

from __future__ import annotations

import logging
from pathlib import Path

import paramiko
import pytest
from emu_helpers import opts

from sshbridge import HostKeyMismatch, KnownHostsFile, PinFirstHostKey, SandboxSSH
from sshbridge.emulator import Emulator


def sandbox_key(emu: Emulator, sandbox: str) -> paramiko.PKey:
    """The host key the sandbox really presents, learned over a real connection."""
    policy = PinFirstHostKey()
    with SandboxSSH(sandbox, host_key_policy=policy, **opts(emu)) as shell:
        shell.run("true")
    key = policy.pinned(sandbox)
    assert key is not None
    return key


def line(name: str, key: paramiko.PKey) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}"


@pytest.mark.parametrize("contract", ["vm"])
def test_revoked_key_is_never_accepted(emu: Emulator, tmp_path: Path) -> None:
    sandbox = emu.create_sandbox()
    key = sandbox_key(emu, sandbox)
    path = tmp_path / "known_hosts"
    # Listed as good too: @revoked wins over any other line.
    path.write_text(f"{line(sandbox, key)}\n@revoked {line(sandbox, key)}\n")
    with pytest.raises(HostKeyMismatch, match="revoked"):
        SandboxSSH(sandbox, known_hosts=path, **opts(emu)).connect()
    policy = KnownHostsFile(path, accept_new=True)
    with pytest.raises(HostKeyMismatch, match="revoked"):
        SandboxSSH(sandbox, host_key_policy=policy, **opts(emu)).connect()
    assert path.read_text().count(key.get_base64()) == 2  # accept_new recorded nothing


@pytest.mark.parametrize("contract", ["vm"])
def test_cert_authority_hashed_and_corrupt_lines(
    emu: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox = emu.create_sandbox()
    key = sandbox_key(emu, sandbox)
    hashed = paramiko.HostKeys.hash_host(sandbox)
    ca = line("*.example.com", key)
    path = tmp_path / "known_hosts"
    text = (
        "# a comment\n\n"
        f"@cert-authority {ca}\n"
        "this line is not a host key\n"
        "host ssh-ed25519 not-base64!!\n"
        f"{line(hashed, key)}\n"
    )
    path.write_text(text)
    caplog.set_level(logging.WARNING, logger="sshbridge.hostkeys")
    policy = KnownHostsFile(path, accept_new=True)
    assert policy.skipped == [3, 4, 5]
    assert "3, 4, 5" in caplog.text
    with SandboxSSH(sandbox, host_key_policy=policy, **opts(emu)) as shell:
        assert shell.run("echo ok").stdout == "ok\n"  # matched by the hashed name
    assert path.read_text() == text  # nothing rewritten, nothing appended


@pytest.mark.parametrize("contract", ["vm"])
def test_accept_new_appends_and_keeps_other_lines(emu: Emulator, tmp_path: Path) -> None:
    sandbox = emu.create_sandbox()
    path = tmp_path / "known_hosts"
    keep = "@cert-authority *.corp ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA\n# mine\n"
    path.write_text(keep)
    with SandboxSSH(sandbox, host_key_policy=KnownHostsFile(path, accept_new=True), **opts(emu)):
        pass
    text = path.read_text()
    assert text.startswith(keep) and sandbox in text
    with SandboxSSH(sandbox, known_hosts=path, **opts(emu)) as shell:
        shell.run("true")
