"""Rekeying in the middle of transfers, on real OpenSSH sshds over loopback.

paramiko rekeys every 512 MiB, and a rekey holds every channel for two round trips;
sshbridge rekeys after 4 GiB (the top of OpenSSH's own default). Checked here: a
connection moves more than 512 MiB without a rekey of its own; a server that rekeys
every 1 MiB (``RekeyLimit 1M``) and a client limit of 1 MiB both leave parallel uploads
and downloads byte-exact. Rekeys are counted by wrapping paramiko's KEXINIT sender.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from sshd_server import SSHDServer, find_sshd, start_sshd
from tree_helpers import link_to

from sshbridge import _sftp, _transfer
from sshbridge import _transport as transport_mod

if find_sshd() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the rekey tests, but sshd is not installed")
    pytest.skip("OpenSSH sshd is not installed (apt-get install openssh-server)",
                allow_module_level=True)  # fmt: skip

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024


def _kex_inits(monkeypatch: pytest.MonkeyPatch) -> list[paramiko.Transport]:
    """Every KEXINIT a transport sends from now on (a rekey either side starts)."""
    sent: list[paramiko.Transport] = []
    real = paramiko.Transport._send_kex_init

    def wrapper(self: paramiko.Transport) -> Any:
        sent.append(self)
        return real(self)

    monkeypatch.setattr(paramiko.Transport, "_send_kex_init", wrapper)
    return sent


def _round_trip(link: Any, tmp_path: Path, remote: Path, size: int) -> None:
    src = tmp_path / "src.bin"
    with src.open("wb") as fh:
        for _ in range(size // MIB):
            fh.write(os.urandom(MIB))
    _sftp.put(link, src, str(remote))
    assert _transfer.local_sha256(remote) == _transfer.local_sha256(src)
    back = tmp_path / "back.bin"
    _sftp.get(link, str(remote), back)
    assert _transfer.local_sha256(back) == _transfer.local_sha256(src)


class _Counter:
    """A write-only file object that counts and hashes what it is given."""

    def __init__(self) -> None:
        self.n = 0
        self.h = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.n += len(data)
        self.h.update(data)
        return len(data)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHDServer]:
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rekeying_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHDServer]:
    server = start_sshd(tmp_path_factory.mktemp("sshd-rekey"), extra_config="RekeyLimit 1M\n")
    yield server
    server.stop()


def test_more_than_512_mib_moves_without_a_rekey(
    sshd: SSHDServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sparse remote file: the bytes cost the disk nothing, the link all of them.
    size = 600 * MIB
    remote = sshd.home / "sparse.bin"
    with remote.open("wb") as fh:
        fh.truncate(size)
    link = link_to(sshd)
    try:
        kex = _kex_inits(monkeypatch)
        sink = _Counter()
        assert _sftp.getfo(link, str(remote), sink) == size  # type: ignore[arg-type]
        assert sink.n == size
        assert sink.h.hexdigest() == hashlib.sha256(bytes(size)).hexdigest()
        assert kex == [], f"{len(kex)} rekeys while moving {size // MIB} MiB"
    finally:
        link.close()
        remote.unlink()


def test_transfers_survive_a_server_that_rekeys_every_mebibyte(
    rekeying_sshd: SSHDServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = link_to(rekeying_sshd)
    try:
        kex = _kex_inits(monkeypatch)
        # 12 MiB: several channels each way, a rekey every MiB among them.
        _round_trip(link, tmp_path, rekeying_sshd.home / "r.bin", 12 * MIB)
        assert len(kex) >= 10, len(kex)
    finally:
        link.close()


def test_transfers_survive_rekeys_the_client_asks_for(
    sshd: SSHDServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport_mod, "REKEY_BYTES", MIB)
    link = link_to(sshd)
    try:
        kex = _kex_inits(monkeypatch)
        _round_trip(link, tmp_path, sshd.home / "c.bin", 12 * MIB)
        assert len(kex) >= 10, len(kex)
    finally:
        link.close()
