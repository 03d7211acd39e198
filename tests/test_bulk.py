"""Large files as byte ranges over several SFTP channels (sshbridge/_ranges.py).

Against a throwaway OpenSSH sshd on loopback (a Link built directly, as in
test_transfer.py: remote paths are local paths here), and against the emulator for a
server that refuses extra channels. The engine functions are wrapped, never replaced,
to see which channels moved bytes. Also: rekeys in the middle of transfers, asked for by
a server (``RekeyLimit 1M``) or by the client.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from sshd_server import SSHDServer, find_sshd, start_sshd
from tree_helpers import Boom, link_to, raise_after, serve_link, serve_sshd

from sshbridge import ConnectionLost, RemotePathError, SandboxSSH, _ranges, _sftp, _transfer
from sshbridge import _transport as transport_mod
from sshbridge._link import Link
from sshbridge.emulator import Emulator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from latency_proxy import LatencyProxy

if find_sshd() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the bulk transfer tests, but sshd is not installed")
    pytest.skip("OpenSSH sshd is not installed (apt-get install openssh-server)",
                allow_module_level=True)  # fmt: skip

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHDServer]:
    yield from serve_sshd(tmp_path_factory)


@pytest.fixture
def link(sshd: SSHDServer) -> Iterator[Link]:
    yield from serve_link(sshd)


@pytest.fixture
def rdir(sshd: SSHDServer, request: pytest.FixtureRequest) -> Path:
    d = sshd.home / f"b-{request.node.name[:40]}-{os.urandom(3).hex()}"
    d.mkdir()
    return d


def _random_file(path: Path, size: int) -> str:
    """Random bytes (every 1 MiB different), written in pieces; returns the sha256."""
    h = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left:
            piece = os.urandom(min(MIB, left))
            h.update(piece)
            fh.write(piece)
            left -= len(piece)
    return h.hexdigest()


def _sha(path: Path) -> str:
    return _transfer.local_sha256(path)


def _leftovers(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".sshbridge" in n)


def _channels_used(monkeypatch: pytest.MonkeyPatch, name: str) -> dict[int, int]:
    """Wrap the engine's block loop ``name``: which clients ran it, how often."""
    used: dict[int, int] = {}
    real = getattr(_transfer, name)

    def wrapper(client: Any, *args: Any, **kwargs: Any) -> Any:
        used[id(client)] = used.get(id(client), 0) + 1
        return real(client, *args, **kwargs)

    monkeypatch.setattr(_transfer, name, wrapper)
    return used


def _record(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[Any]:
    calls: list[Any] = []
    real = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stats = real(*args, **kwargs)
        calls.append(stats)
        return stats

    monkeypatch.setattr(module, name, wrapper)
    return calls


# -- choosing the channels ------------------------------------------------------------------


def test_channel_count_follows_the_size() -> None:
    assert _ranges.channels_for(0) == 1
    assert _ranges.channels_for(_ranges.PARALLEL_MIN - 1) == 1
    assert _ranges.channels_for(_ranges.PARALLEL_MIN) == 2
    assert _ranges.channels_for(1 << 40) == _ranges.MAX_CHANNELS
    # Resumes start the skew back only where a parallel transfer may have left gaps:
    # 24 MiB, or half a smaller file.
    assert _ranges.resume_from(3 * MIB, 6 * MIB) == 3 * MIB
    assert _ranges.resume_from(60 * MIB, 100 * MIB) == 60 * MIB - _ranges.SKEW
    assert _ranges.resume_from(12 * MIB, 16 * MIB) == 4 * MIB
    assert _ranges.resume_from(7 * MIB, 8 * MIB) == 3 * MIB  # at least MIN_SKEW back
    assert _ranges.resume_from(10 * MIB, 100 * MIB) == 0
    assert _ranges.resume_from(60 * MIB, 100 * MIB, download=True) == 60 * MIB


def test_plan_hands_out_in_order_within_the_skew() -> None:
    plan = _ranges.Plan(0, 100, skew=30)
    assert plan.take(10) == (0, 10)
    assert plan.take(10) == (10, 10)
    assert plan.take(10) == (20, 10)
    assert plan.take(10) is None  # 30..40 would pass 0 + 30
    plan.done(10, 10)
    assert plan.take(10) is None  # 0..10 still open
    plan.done(0, 4)  # a short answer: 4..10 asked again
    assert plan.written() == 4 and plan.take(4) == (30, 4)
    plan.done(4, 6)
    assert plan.written() == 20
    plan.cut(32)  # the file ended there
    assert plan.take(10) is None and not plan.wait()
    plan.done(20, 10)
    plan.done(30, 2)
    assert plan.written() == 32 and plan.moved == 32


# -- byte-exact both ways ---------------------------------------------------------------------


def test_parallel_ranges_round_trip_byte_exact(
    link: Link, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "big.bin"
    digest = _random_file(src, 40 * MIB + 12345)
    used = _channels_used(monkeypatch, "write_blocks")
    seen: list[tuple[int, int]] = []
    _sftp.put(link, src, str(rdir / "big.bin"), callback=lambda d, t: seen.append((d, t)))
    assert _sha(rdir / "big.bin") == digest
    assert len(used) >= 2, "the upload stayed on one channel"
    assert seen[-1] == (src.stat().st_size, src.stat().st_size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert _leftovers(rdir) == []

    # Downloads stay on one channel by default; with several they reassemble exactly.
    for channels in (1, 3):
        monkeypatch.setattr(_ranges, "DOWNLOAD_CHANNELS", channels)
        readers = _channels_used(monkeypatch, "read_blocks")
        back = tmp_path / f"back-{channels}.bin"
        _sftp.get(link, str(rdir / "big.bin"), back)
        assert _sha(back) == digest
        if channels == 1:
            assert readers == {}  # the plain path
        else:
            assert len(readers) >= 2, "the download stayed on one channel"
        monkeypatch.undo()
    assert _leftovers(tmp_path) == []


def test_small_files_stay_on_one_channel(
    link: Link, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "small.bin"
    digest = _random_file(src, 3 * MIB)
    used = _channels_used(monkeypatch, "write_blocks")
    calls = _record(monkeypatch, _transfer, "upload")
    _sftp.put(link, src, str(rdir / "small.bin"))
    assert _sha(rdir / "small.bin") == digest
    assert used == {} and len(calls) == 1


def test_sha256_verify_on_parallel_transfers(
    link: Link, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "v.bin"
    digest = _random_file(src, 36 * MIB)
    monkeypatch.setattr(_ranges, "DOWNLOAD_CHANNELS", 2)
    _sftp.put(link, src, str(rdir / "v.bin"), verify="sha256")
    _sftp.get(link, str(rdir / "v.bin"), tmp_path / "v-back.bin", verify="sha256")
    assert _sha(rdir / "v.bin") == digest == _sha(tmp_path / "v-back.bin")


# -- resume ---------------------------------------------------------------------------------


def test_resume_after_a_cut_parallel_upload(
    link: Link, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "r.bin"
    size = 72 * MIB + 999
    digest = _random_file(src, size)
    target = rdir / "r.bin"
    part = rdir / ".r.bin.sshbridge.part"
    with link.sftp() as client:
        chan = client.get_channel()
        assert chan is not None
        transport = chan.get_transport()

    def cut(done: int, total: int) -> None:
        if done >= 50 * MIB:
            transport.close()  # every channel of this connection at once

    with pytest.raises(ConnectionLost):
        _sftp.put(link, src, str(target), callback=cut, resume=True)
    assert not target.exists() and part.exists()
    kept = part.stat().st_size
    assert 50 * MIB <= kept <= size

    link.connect()
    calls = _record(monkeypatch, _ranges, "upload")
    _sftp.put(link, src, str(target), resume=True, verify="sha256")
    assert _sha(target) == digest and not part.exists()
    (stats,) = calls
    # Gaps are possible only in the last SKEW bytes of the partial: it starts there
    # (or later: writes already sent on the cut connection may still have landed).
    assert stats.start >= kept - _ranges.SKEW > 0
    assert stats.sent == size - stats.start
    assert _leftovers(rdir) == []


def test_resume_after_an_interrupted_parallel_upload_with_the_connection_up(
    link: Link, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "i.bin"
    size = 64 * MIB
    digest = _random_file(src, size)
    with pytest.raises(Boom):
        _sftp.put(link, src, str(rdir / "i.bin"), callback=raise_after(45 * MIB), resume=True)
    part = rdir / ".i.bin.sshbridge.part"
    assert part.stat().st_size >= 45 * MIB
    kept = part.stat().st_size
    # What is left may be small enough for one channel: either path counts.
    parallel = _record(monkeypatch, _ranges, "upload")
    single = _record(monkeypatch, _transfer, "upload")
    _sftp.put(link, src, str(rdir / "i.bin"), resume=True)
    assert _sha(rdir / "i.bin") == digest
    (stats,) = parallel + single
    assert stats.start == kept - _ranges.SKEW > 0 and stats.sent == size - stats.start
    assert _leftovers(rdir) == []


def test_resume_after_an_interrupted_parallel_download(
    link: Link, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = rdir / "d.bin"
    size = 64 * MIB + 5
    digest = _random_file(remote, size)
    monkeypatch.setattr(_ranges, "DOWNLOAD_CHANNELS", 4)
    dest = tmp_path / "d.bin"
    with pytest.raises(Boom):
        _sftp.get(link, str(remote), dest, callback=raise_after(45 * MIB), resume=True)
    part = tmp_path / ".d.bin.sshbridge.part"
    kept = part.stat().st_size
    assert not dest.exists() and kept >= 45 * MIB
    parallel = _record(monkeypatch, _ranges, "download")
    single = _record(monkeypatch, _transfer, "download")
    _sftp.get(link, str(remote), dest, resume=True, verify="sha256")
    assert _sha(dest) == digest and not part.exists()
    (stats,) = parallel + single
    assert stats.start == kept - _ranges.SKEW and stats.sent == size - stats.start


def test_a_file_that_shrinks_under_a_parallel_upload_is_refused(
    link: Link, rdir: Path, tmp_path: Path
) -> None:
    """A local file that shrinks under the upload: the size check refuses it, and the
    temporary file goes; the old target stays."""
    src = tmp_path / "s.bin"
    _random_file(src, 48 * MIB)
    (rdir / "s.bin").write_bytes(b"old")

    def shrink(done: int, total: int) -> None:
        if done >= 8 * MIB:
            os.truncate(src, 20 * MIB)

    with pytest.raises(RemotePathError, match="bytes") as info:
        _sftp.put(link, src, str(rdir / "s.bin"), callback=shrink)
    assert "nothing was put in place" in str(info.value)
    assert (rdir / "s.bin").read_bytes() == b"old"
    assert _leftovers(rdir) == []


# -- memory ---------------------------------------------------------------------------------


_MEMORY_SCRIPT = r"""
import json, os, sys, time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from pydantic import SecretStr
from sshbridge import _sftp
from sshbridge._hostkeys import PinFirstHostKey
from sshbridge._link import Link
from sshbridge._models import SidecarSSHSession
from sshbridge._transport import generate_key

host, port, user, keys, work, remote, size = sys.argv[1:8]
size = int(size)
key = generate_key()
with open(keys, "a", encoding="utf-8") as fh:
    fh.write(key.public_line + "\n")
session = SidecarSSHSession(
    session_id=user, exposure_id="e", sandbox_id="sbx", host=host, port=int(port),
    external_endpoint="x", expires_at=datetime.now(timezone.utc) + timedelta(hours=1),
    ttl_seconds=3600, gateway_url="http://x/", user_ns="u", job_id="j", token=SecretStr("t"),
)
link = Link(session, key, sandbox_id="sbx", policy=PinFirstHostKey(),
            expires_monotonic=time.monotonic() + 3600, keepalive=15, connect_timeout=10,
            max_connections=4)
link.connect()

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")

src = Path(work) / "src.bin"
block = os.urandom(1 << 20)
with open(src, "wb") as fh:
    for _ in range(size >> 20):
        fh.write(block)
warm = Path(work) / "warm.bin"
warm.write_bytes(block * 40)  # threads, channels and buffers exist before the baseline
_sftp.put(link, warm, remote + ".warm")
_sftp.get(link, remote + ".warm", Path(work) / "warm-back.bin")
before = hwm()
_sftp.put(link, src, remote)
after_put = hwm()
_sftp.get(link, remote, Path(work) / "back.bin")
after_get = hwm()
link.close()
print(json.dumps({"before": before, "put": after_put - before, "get": after_get - after_put,
                  "total": after_get - before}))
"""


def test_memory_stays_flat_for_a_large_transfer(
    sshd: SSHDServer, rdir: Path, tmp_path: Path
) -> None:
    # 256 MiB keeps the suite quick; SSHBRIDGE_BULK_MIB=1024 checks a full GiB.
    size = int(os.environ.get("SSHBRIDGE_BULK_MIB", "256")) * MIB
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, sshd.host, str(sshd.port), sshd.username,
         str(sshd.authorized_keys_file), str(tmp_path), str(rdir / "big.bin"), str(size)],
        capture_output=True, text=True, timeout=170, env=env, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    assert growth["total"] < 64 * MIB, growth
    assert (rdir / "big.bin").stat().st_size == size
    assert _sha(rdir / "big.bin") == _sha(tmp_path / "back.bin")


# -- a server that refuses extra channels -------------------------------------------------------


@pytest.mark.parametrize("contract", ["vm"])
def test_upload_falls_back_to_one_channel_when_extra_ones_are_refused(
    emu: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.max_channels_per_connection = 1
    src = tmp_path / "f.bin"
    digest = _random_file(src, 40 * MIB)
    used = _channels_used(monkeypatch, "write_blocks")
    sandbox = emu.create_sandbox()
    with SandboxSSH(sandbox, api_key=emu.api_key, base_url=emu.base_url,
                    max_connections=1) as shell:
        # One channel in all: the others are refused, and the upload does not wait.
        shell.put(src, "f.bin")
        assert len(used) == 1  # only the caller's channel moved bytes
        emu.max_channels_per_connection = None
        shell.get("f.bin", tmp_path / "back.bin")
    assert _sha(tmp_path / "back.bin") == digest


# -- round trips of one put ----------------------------------------------------------------
# The SSH stream is encrypted, so a relay in front of sshd sees no SFTP packets. The
# client's SSH channels carry them in the clear: every byte paramiko's Channel sends and
# receives is decoded back into SFTP packets here (wrapped, never replaced), and each
# request's place in the chain of answers it had to wait for is counted. WRITEs and their
# acknowledgements are the data and are left out: what remains is the fixed round trips.


class _SFTPTap:
    def __init__(self) -> None:
        self.out: dict[int, bytearray] = {}
        self.inn: dict[int, bytearray] = {}
        self.asked: dict[tuple[int, int], tuple[int, int]] = {}  # (chan, id) -> (type, depth)
        self.level: dict[int, int] = {}  # per channel: deepest control answer seen
        self.chains: dict[int, list[tuple[int, int]]] = {}  # per channel: (type, depth)

    @staticmethod
    def _packets(buf: bytearray) -> Iterator[tuple[int, int]]:
        while len(buf) >= 5:
            length = int.from_bytes(buf[:4], "big")
            if len(buf) < 4 + length:
                return
            kind = buf[4]
            rid = int.from_bytes(buf[5:9], "big") if kind not in (1, 2) else -1
            del buf[: 4 + length]
            yield kind, rid

    def sent(self, chan: int, data: bytes) -> None:
        buf = self.out.setdefault(chan, bytearray())
        buf += data
        for kind, rid in self._packets(buf):
            if kind == 6:  # WRITE: data, not a fixed round trip
                self.asked[(chan, rid)] = (kind, -1)
                continue
            depth = self.level.get(chan, 0) + 1
            self.asked[(chan, rid)] = (kind, depth)
            self.chains.setdefault(chan, []).append((kind, depth))

    def received(self, chan: int, data: bytes) -> None:
        buf = self.inn.setdefault(chan, bytearray())
        buf += data
        for _kind, rid in self._packets(buf):
            _asked, depth = self.asked.pop((chan, rid), (0, -1))
            if depth > 0:
                self.level[chan] = max(self.level.get(chan, 0), depth)

    def deepest(self) -> int:
        return max((d for chain in self.chains.values() for _k, d in chain), default=0)


def _tap(monkeypatch: pytest.MonkeyPatch) -> _SFTPTap:
    import paramiko

    tap = _SFTPTap()
    real_send, real_recv = paramiko.Channel.send, paramiko.Channel.recv

    def send(self: paramiko.Channel, s: bytes) -> int:
        n = real_send(self, s)
        if n > 0:
            tap.sent(self.chanid, bytes(s[:n]))
        return n

    def recv(self: paramiko.Channel, nbytes: int) -> bytes:
        data = real_recv(self, nbytes)
        tap.received(self.chanid, data)
        return data

    monkeypatch.setattr(paramiko.Channel, "send", send)
    monkeypatch.setattr(paramiko.Channel, "recv", recv)
    return tap


@pytest.mark.parametrize("size", [3 * MIB, 40 * MIB])
def test_a_put_pays_few_sequential_round_trips(
    link: Link, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    src = tmp_path / "f.bin"
    digest = _random_file(src, size)
    src.chmod(0o640)
    _sftp.put(link, src, str(rdir / "warm.bin"))  # channels open, directory swept
    tap = _tap(monkeypatch)
    _sftp.put(link, src, str(rdir / "f.bin"))
    monkeypatch.undo()
    assert _sha(rdir / "f.bin") == digest
    assert (rdir / "f.bin").stat().st_mode & 0o777 == 0o640
    assert _leftovers(rdir) == []
    # Open (together with the target's stat), the data, the size check with the mode
    # and the close, the rename.
    assert tap.deepest() <= (3 if size < 32 * MIB else 4), tap.chains  # a second channel's last ack

    # The first put into a directory also looks for stale temporaries there, at no
    # extra step: the OPENDIR goes behind the last WRITE, the READDIRs (and the CLOSE)
    # behind the rename.
    (rdir / "sub").mkdir()
    tap = _tap(monkeypatch)
    _sftp.put(link, src, str(rdir / "sub") + "/")
    monkeypatch.undo()
    assert _sha(rdir / "sub" / "f.bin") == digest
    assert tap.deepest() <= (3 if size < 32 * MIB else 4), tap.chains


def test_a_get_pays_two_sequential_round_trips(
    link: Link, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = rdir / "g.bin"
    digest = _random_file(src, 3 * MIB)
    _sftp.get(link, str(src), tmp_path / "warm.bin")  # the channel is open
    tap = _tap(monkeypatch)
    _sftp.get(link, str(src), tmp_path / "g.bin")
    monkeypatch.undo()
    assert _sha(tmp_path / "g.bin") == digest
    # The STAT with the OPEN, then every READ with the end-of-file probe among them.
    waited = [(k, d) for chain in tap.chains.values() for k, d in chain if k != 4]
    assert max(d for _k, d in waited) <= 2, tap.chains
    # The CLOSE goes out last and nobody waits for its answer.
    closes = [key for key, (kind, _d) in tap.asked.items() if kind == 4]
    assert len(closes) == 1, tap.chains
    # The next transfer on that client skips the stray answer.
    _sftp.get(link, str(src), tmp_path / "again.bin")
    assert _sha(tmp_path / "again.bin") == digest


@pytest.mark.parametrize("size", [3 * MIB, 12 * MIB])
def test_a_file_already_holding_the_temporary_name_never_lands(
    link: Link, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    # The temporary file is opened without truncation (its name is random: nothing to
    # cut). If a longer file did hold that name, its bytes past the upload's end must
    # not go in place under the target: the size check stops it.
    src = tmp_path / "f.bin"
    digest = _random_file(src, size)
    target = rdir / "f.bin"
    target.write_bytes(b"old")
    real = _transfer.temp_name

    def taken(name: str, *, resume: bool) -> str:
        return real(name, resume=resume).rsplit("-", 1)[0] + "-00c0ffee.part"

    monkeypatch.setattr(_transfer, "temp_name", taken)
    squatter = rdir / ".f.bin.sshbridge-00c0ffee.part"
    squatter.write_bytes(b"x" * (size + MIB))
    with pytest.raises(RemotePathError, match="a file of that name was there before"):
        _sftp.put(link, src, str(target))
    assert target.read_bytes() == b"old"
    monkeypatch.undo()
    assert _sftp.put(link, src, str(target)) == str(target)
    assert _sha(target) == digest
    assert _leftovers(rdir) == []


def test_a_first_parallel_put_asks_for_its_range_channels_as_its_own_opens(
    sshd: SSHDServer, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Through a 100 ms link, on a fresh connection: the byte-range channels are asked
    # for once the call's own channel is open, not after its SFTP session has started
    # (two more round trips on OpenSSH), and never before that channel is had.
    src = tmp_path / "f.bin"
    digest = _random_file(src, 12 * MIB)
    events: list[tuple[str, str, float]] = []
    real_open, real_init = Link.open_channel, paramiko.SFTPClient.__init__

    def open_channel(self: Link, *args: Any, **kwargs: Any) -> Any:
        events.append(("open", threading.current_thread().name, time.monotonic()))
        chan = real_open(self, *args, **kwargs)
        events.append(("opened", threading.current_thread().name, time.monotonic()))
        return chan

    def init(self: paramiko.SFTPClient, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        events.append(("sftp", threading.current_thread().name, time.monotonic()))

    with LatencyProxy((sshd.host, sshd.port), rtt=0.1, bandwidth=None) as proxy:
        link = link_to(dataclasses.replace(sshd, host=proxy.host, port=proxy.port, process=None))
        try:
            monkeypatch.setattr(Link, "open_channel", open_channel)
            monkeypatch.setattr(paramiko.SFTPClient, "__init__", init)
            _sftp.put(link, src, str(rdir / "f.bin"))
            monkeypatch.undo()
        finally:
            link.close()
    assert _sha(rdir / "f.bin") == digest
    me = threading.current_thread().name
    mine = {kind: t for kind, who, t in events if who == me}
    helpers = [t for kind, who, t in events if kind == "open" and who.startswith("sshbridge-range")]
    assert len(helpers) == _ranges.channels_for(12 * MIB) - 1 == 2, events
    assert mine["opened"] <= min(helpers) and max(helpers) < mine["sftp"], events


def test_the_servers_request_sizes_are_asked_once_a_connection(
    sshd: SSHDServer, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A parallel upload leaves four SFTP channels in the pool, three of which only ever
    # carried byte ranges; downloads on all four at once ask limits@openssh.com no more
    # (it had cost a download on such a channel a round trip before its first READ).
    src = tmp_path / "f.bin"
    digest = _random_file(src, 12 * MIB)
    link = link_to(sshd)
    try:
        asked = _record(monkeypatch, _transfer, "remember_limits")
        _sftp.put(link, src, str(rdir / "f.bin"))
        errors: list[BaseException] = []

        def fetch(i: int) -> None:
            try:
                _sftp.get(link, str(rdir / "f.bin"), tmp_path / f"back{i}.bin")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert [_sha(tmp_path / f"back{i}.bin") for i in range(4)] == [digest] * 4
        assert len(asked) == 1, asked
    finally:
        link.close()


def test_a_connections_first_get_asks_the_request_sizes_with_its_open(
    sshd: SSHDServer, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = rdir / "first.bin"
    digest = _random_file(src, 3 * MIB)
    link = link_to(sshd)
    try:
        tap = _tap(monkeypatch)
        _sftp.get(link, str(src), tmp_path / "first.bin")
        monkeypatch.undo()
    finally:
        link.close()
    assert _sha(tmp_path / "first.bin") == digest
    (chain,) = [c for c in tap.chains.values() if any(k == 5 for k, _d in c)]
    depth = {k: d for k, d in chain if k in (17, 3, 200)}
    # limits@openssh.com (an EXTENDED) goes out with the STAT and the OPEN; the READs
    # follow their answers.
    assert depth[200] == depth[17] == depth[3], chain
    assert max(d for k, d in chain if k == 5) == depth[17] + 1, chain


@pytest.mark.parametrize("size", [1 * MIB, 40 * MIB])
def test_put_to_an_existing_directory_lands_inside_and_leaves_no_temp(
    link: Link, rdir: Path, tmp_path: Path, size: int
) -> None:
    # The temporary file opened beside the name (with the stat that tells it is a
    # directory) is closed and removed; the file goes inside.
    src = tmp_path / "in.bin"
    digest = _random_file(src, size)
    (rdir / "d").mkdir()
    assert _sftp.put(link, src, str(rdir / "d")) == str(rdir / "d" / "in.bin")
    assert _sha(rdir / "d" / "in.bin") == digest
    assert _leftovers(rdir) == [] and _leftovers(rdir / "d") == []


# -- rekeys -----------------------------------------------------------------------------
# paramiko rekeys every 512 MiB, and a rekey holds every channel for two round trips;
# sshbridge rekeys after 4 GiB (the top of OpenSSH's own default). Rekeys are counted by
# wrapping paramiko's KEXINIT sender.


class _Counter:
    """A write-only file object that counts and hashes what it is given."""

    def __init__(self) -> None:
        self.n = 0
        self.h = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.n += len(data)
        self.h.update(data)
        return len(data)


def _kex_inits(monkeypatch: pytest.MonkeyPatch) -> list[paramiko.Transport]:
    """Every KEXINIT a transport sends from now on (a rekey either side starts)."""
    sent: list[paramiko.Transport] = []
    real = paramiko.Transport._send_kex_init

    def wrapper(self: paramiko.Transport) -> Any:
        sent.append(self)
        return real(self)

    monkeypatch.setattr(paramiko.Transport, "_send_kex_init", wrapper)
    return sent


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


@pytest.mark.parametrize("who", ["server", "client"])
def test_transfers_survive_rekeys_every_mebibyte(
    sshd: SSHDServer, rekeying_sshd: SSHDServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, who: str,
) -> None:
    # The server's RekeyLimit 1M, or a client limit of 1 MiB: a rekey every MiB or so
    # among a parallel upload's and a download's channels, and both byte-exact.
    server = rekeying_sshd if who == "server" else sshd
    if who == "client":
        monkeypatch.setattr(transport_mod, "REKEY_BYTES", MIB)
    src = tmp_path / "src.bin"
    digest = _random_file(src, 12 * MIB)
    remote = server.home / f"rekeyed-{who}.bin"
    link = link_to(server)
    try:
        kex = _kex_inits(monkeypatch)
        _sftp.put(link, src, str(remote))
        assert _sha(remote) == digest
        _sftp.get(link, str(remote), tmp_path / "back.bin")
        assert _sha(tmp_path / "back.bin") == digest
        # Rekeys in the middle of both (how many depends on the machine's pace: one
        # is not asked for while another is on).
        assert len(kex) >= 3, len(kex)
    finally:
        link.close()


@pytest.mark.parametrize("pooled", [False, True])
def test_a_failing_opened_callback_leaves_no_sftp_channel_behind(
    sshd: SSHDServer, pooled: bool
) -> None:
    link = link_to(sshd)
    try:
        if pooled:
            with link.sftp() as client:
                client.listdir(".")
        before = link.active_channels - (1 if pooled else 0)

        def boom() -> None:
            raise Boom("callback")

        with pytest.raises(Boom), link.sftp(boom):
            pytest.fail("the body must not run")
        deadline = time.monotonic() + 5
        while link.active_channels > before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert link.active_channels == before
        with link.sftp() as client:  # the link still serves
            assert isinstance(client.listdir("."), list)
    finally:
        link.close()
