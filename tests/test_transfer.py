"""The pipelined SFTP engine (sshbridge/_transfer.py) behind put/get/putfo/getfo.

Most tests run against a throwaway OpenSSH sshd on loopback, with a Link built directly
(no API). Remote paths are local paths here, so the tests look at the "remote" side with
plain file operations. The engine's handling of out-of-order answers and short reads,
which OpenSSH never produces, is checked against an in-memory SFTP channel.
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import os
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from emu_helpers import wait_until
from sshd_server import SSHDServer, find_sshd, start_sshd
from tree_helpers import Boom, link_to, raise_after, serve_link, serve_sshd

from sshbridge import _sftp, _transfer, _trees
from sshbridge._exceptions import ConnectionLost, InvalidArgument, RemotePathError
from sshbridge._link import Link


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


if find_sshd() is None:
    if _in_ci():
        raise RuntimeError("CI is set but OpenSSH sshd was not found: install openssh-server")
    pytest.skip(
        "OpenSSH sshd not found (apt-get install openssh-server); set CI=1 to make this an error",
        allow_module_level=True,
    )

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHDServer]:
    yield from serve_sshd(tmp_path_factory)


@pytest.fixture(scope="module")
def link(sshd: SSHDServer) -> Iterator[Link]:
    yield from serve_link(sshd)


@pytest.fixture
def rdir(sshd: SSHDServer, request: pytest.FixtureRequest) -> Path:
    """A fresh "remote" directory (the sshd is local, so it is a local path too)."""
    d = sshd.home / f"t-{request.node.name[:40]}-{os.urandom(3).hex()}"
    d.mkdir()
    return d


def _leftovers(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".sshbridge" in n)


def _payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def _transport_of(link: Link) -> paramiko.Transport:
    with link.sftp() as client:
        chan = client.get_channel()
        assert chan is not None
        return chan.get_transport()


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1_000_003, 20 * 1024 * 1024 + 7])
def test_round_trip_is_byte_exact(link: Link, rdir: Path, tmp_path: Path, size: int) -> None:
    data = _payload(size)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    os.chmod(src, 0o640)
    seen: list[tuple[int, int]] = []
    target = _sftp.put(link, src, str(rdir / "copy.bin"), callback=lambda d, t: seen.append((d, t)))
    assert target == str(rdir / "copy.bin")
    assert (rdir / "copy.bin").read_bytes() == data
    assert (rdir / "copy.bin").stat().st_mode & 0o777 == 0o640
    if size:
        assert seen[-1] == (size, size)
        assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    back = _sftp.get(link, target, tmp_path / "back.bin")
    assert back.read_bytes() == data
    assert back.stat().st_mode & 0o777 == 0o640
    assert _leftovers(rdir) == [] and _leftovers(tmp_path) == []


def test_file_objects_round_trip(link: Link, rdir: Path) -> None:
    data = _payload(3_000_001)
    assert _sftp.putfo(link, io.BytesIO(data), str(rdir / "fo.bin"), mode=0o600) == str(
        rdir / "fo.bin"
    )
    assert (rdir / "fo.bin").read_bytes() == data
    assert (rdir / "fo.bin").stat().st_mode & 0o777 == 0o600

    class ReadOnly:  # no readinto: the engine copies from read()
        def __init__(self, raw: bytes) -> None:
            self.stream = io.BytesIO(raw)

        def read(self, n: int = -1) -> bytes:
            return self.stream.read(min(n, 1000))

    _sftp.putfo(link, ReadOnly(data), str(rdir / "ro.bin"), verify="sha256")  # type: ignore[arg-type]
    assert (rdir / "ro.bin").read_bytes() == data
    out = io.BytesIO()
    assert _sftp.getfo(link, str(rdir / "fo.bin"), out, verify="sha256") == len(data)
    assert out.getvalue() == data
    with pytest.raises(InvalidArgument, match="binary"):
        _sftp.putfo(link, io.StringIO("text"), str(rdir / "t.txt"))  # type: ignore[arg-type]
    assert _leftovers(rdir) == []


@pytest.mark.parametrize(
    "name", ["with space.bin", "it's \"quoted\".bin", "ünïcødé ☃.bin", "-dash", "$(touch x)"]
)
def test_awkward_names(link: Link, rdir: Path, tmp_path: Path, name: str) -> None:
    data = _payload(70_001)
    src = tmp_path / name
    src.write_bytes(data)
    target = _sftp.put(link, src, str(rdir) + "/", verify="sha256")  # into the directory
    assert target == f"{rdir}/{name}"
    assert (rdir / name).read_bytes() == data
    back = _sftp.get(link, target, tmp_path / "out", verify="sha256")
    assert back.read_bytes() == data
    assert not (rdir / "x").exists() and not Path("x").exists()


def test_limits_come_from_the_server(link: Link) -> None:
    with link.sftp() as client:
        limits = _transfer.server_limits(client)
    assert limits == _transfer.Limits(read=261120, write=261120)


# -- atomicity -----------------------------------------------------------------------------


def test_failed_upload_keeps_old_target_and_leaves_no_temp(
    link: Link, rdir: Path, tmp_path: Path
) -> None:
    (rdir / "t.bin").write_bytes(b"old")
    src = tmp_path / "new.bin"
    src.write_bytes(_payload(8_000_000))
    with pytest.raises(Boom):
        _sftp.put(link, src, str(rdir / "t.bin"), callback=raise_after(2_000_000))
    assert (rdir / "t.bin").read_bytes() == b"old"
    assert _leftovers(rdir) == []
    # The pooled client was settled, not left mid-stream: it still works.
    assert _sftp.listdir(link, str(rdir)) == ["t.bin"]
    _sftp.put(link, src, str(rdir / "t.bin"))
    assert (rdir / "t.bin").read_bytes() == src.read_bytes()


def test_failed_download_leaves_no_local_file(link: Link, rdir: Path, tmp_path: Path) -> None:
    (rdir / "s.bin").write_bytes(_payload(8_000_000))
    (tmp_path / "old.bin").write_bytes(b"old")
    for dest in ("new.bin", "old.bin"):
        with pytest.raises(Boom):
            _sftp.get(link, str(rdir / "s.bin"), tmp_path / dest, callback=raise_after(1))
    assert sorted(os.listdir(tmp_path)) == ["old.bin"]
    assert (tmp_path / "old.bin").read_bytes() == b"old"
    assert _sftp.stat(link, str(rdir / "s.bin")).st_size == 8_000_000


def test_cut_connection_mid_upload(link: Link, rdir: Path, tmp_path: Path) -> None:
    (rdir / "t.bin").write_bytes(b"old")
    src = tmp_path / "new.bin"
    src.write_bytes(_payload(8_000_000))
    transport = _transport_of(link)

    def cut(done: int, total: int) -> None:
        if done >= 1_000_000:
            transport.close()

    with pytest.raises(ConnectionLost):
        _sftp.put(link, src, str(rdir / "t.bin"), callback=cut)
    assert (rdir / "t.bin").read_bytes() == b"old"
    # Reconnect (what SandboxSSH's session manager does); a plain put replaces the target.
    link.connect()
    _sftp.put(link, src, str(rdir / "t.bin"))
    assert (rdir / "t.bin").read_bytes() == src.read_bytes()
    # The cut left the temporary file where no channel could reach it; its writer is
    # known to be gone, so the next put into that directory removed it.
    assert _leftovers(rdir) == []


def test_interrupt_that_broke_the_channel_leaves_no_temp(
    link: Link, rdir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(_payload(8_000_000))
    with link.sftp() as client:  # the pooled client the put borrows next
        chan = client.get_channel()
    assert chan is not None

    def interrupt(done: int, total: int) -> None:
        if done >= 2_000_000:
            # A Ctrl-C that lands inside a send leaves the channel's stream out of step,
            # so the engine closes the channel (see _Wire.settle); then the interrupt.
            chan.close()
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _sftp.put(link, src, str(rdir / "t.bin"), callback=interrupt)
    assert chan.closed
    assert _leftovers(rdir) == [] and not (rdir / "t.bin").exists()
    assert _sftp.listdir(link, str(rdir)) == []  # the connection is still fine


def test_readers_never_see_a_partial_file(link: Link, rdir: Path, tmp_path: Path) -> None:
    versions = [bytes([65 + i]) * (3_000_000 + 500_000 * i) for i in range(3)]
    target = rdir / "shared.bin"
    target.write_bytes(versions[0])
    bad: list[int] = []
    reads = [0]
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            content = target.read_bytes()
            reads[0] += 1
            if content not in versions:
                bad.append(len(content))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in (1, 2, 0, 1):
            src = tmp_path / f"v{i}"
            src.write_bytes(versions[i])
            _sftp.put(link, src, str(target))
    finally:
        stop.set()
        thread.join()
    assert bad == [] and reads[0] > 0
    assert target.read_bytes() == versions[1]


# -- verification --------------------------------------------------------------------------


def test_sha256_catches_an_upload_corrupted_on_the_sandbox(
    link: Link, rdir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(_payload(2_000_000))

    flipped: list[int] = []

    def corrupt(done: int, total: int) -> None:
        # Every write acknowledged: flip the first byte in the temp file, once.
        if done == total and not flipped:
            flipped.append(done)
            (part,) = [rdir / n for n in _leftovers(rdir)]
            with part.open("r+b") as fh:
                first = fh.read(1)
                fh.seek(0)
                fh.write(bytes([first[0] ^ 0xFF]))

    with pytest.raises(RemotePathError, match="sha256") as info:
        _sftp.put(link, src, str(rdir / "v.bin"), callback=corrupt, verify="sha256")
    assert info.value.path == str(rdir / "v.bin")
    assert not (rdir / "v.bin").exists() and _leftovers(rdir) == []
    # Size checking alone does not see it; sha256 does.
    flipped.clear()
    _sftp.put(link, src, str(rdir / "v.bin"), callback=corrupt)
    assert flipped
    assert (rdir / "v.bin").stat().st_size == 2_000_000


def test_sha256_catches_a_download_that_changed_under_it(
    link: Link, rdir: Path, tmp_path: Path
) -> None:
    source = rdir / "s.bin"
    source.write_bytes(_payload(2_000_000))

    def corrupt(done: int, total: int) -> None:
        with source.open("r+b") as fh:  # byte 0 is already here; the sandbox's copy changes
            fh.write(b"\x00" if done % 2 else b"\x01")

    with pytest.raises(RemotePathError, match="sha256") as info:
        _sftp.get(link, str(source), tmp_path / "d.bin", callback=corrupt, verify="sha256")
    assert str(source) in str(info.value)
    assert os.listdir(tmp_path) == []


def test_verify_argument_is_checked(link: Link, rdir: Path, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    with pytest.raises(InvalidArgument, match="verify"):
        _sftp.put(link, tmp_path / "a", str(rdir / "a"), verify="md5")  # type: ignore[arg-type]


# -- resume --------------------------------------------------------------------------------


def _held_open(path: Path) -> bool:
    """True while a local process (the sshd's sftp server, here) has ``path`` open."""
    target = os.path.realpath(path)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") == target:
                    return True
            except OSError:
                continue
    return False


def _record(monkeypatch: pytest.MonkeyPatch, name: str) -> list[_transfer.TransferStats]:
    """Collect the stats of every engine call, to count what was really sent."""
    calls: list[_transfer.TransferStats] = []
    real = getattr(_transfer, name)

    def wrapper(*args: Any, **kwargs: Any) -> _transfer.TransferStats:
        stats: _transfer.TransferStats = real(*args, **kwargs)
        calls.append(stats)
        return stats

    monkeypatch.setattr(_transfer, name, wrapper)
    return calls


def test_resumed_upload_sends_only_the_rest(
    link: Link, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under _ranges.PARALLEL_MIN: one channel, so the partial is a prefix (the parallel
    # case is tests/test_bulk.py's).
    data = _payload(7_800_017)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    target = rdir / "big.bin"
    part = rdir / ".big.bin.sshbridge.part"
    transport = _transport_of(link)

    def cut(done: int, total: int) -> None:
        if done >= 3_000_000:
            transport.close()

    with pytest.raises(ConnectionLost):
        _sftp.put(link, src, str(target), callback=cut, resume=True)
    assert not target.exists()
    # sshd applies what it had already received, then lets go of the file.
    wait_until(lambda: not _held_open(part), 10, "sshd to close the partial file")
    kept = part.stat().st_size
    assert 3_000_000 <= kept < len(data)
    assert part.read_bytes() == data[:kept]

    link.connect()  # what SandboxSSH's session manager does after a cut
    calls = _record(monkeypatch, "upload")
    seen: list[int] = []
    _sftp.put(link, src, str(target), resume=True, verify="sha256",
              callback=lambda d, t: seen.append(d))
    assert target.read_bytes() == data
    assert not part.exists()
    (stats,) = calls
    assert stats.start == kept and stats.sent == len(data) - kept
    assert seen[0] > kept and seen[-1] == len(data)


def test_resumed_upload_after_a_failure_with_the_connection_up(
    link: Link, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _payload(6_000_000)
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    with pytest.raises(Boom):
        _sftp.put(link, src, str(rdir / "f.bin"), callback=raise_after(2_000_000), resume=True)
    part = rdir / ".f.bin.sshbridge.part"
    kept = part.stat().st_size  # the engine waited for every write in flight
    assert kept >= 2_000_000 and part.read_bytes() == data[:kept]
    calls = _record(monkeypatch, "upload")
    _sftp.put(link, src, str(rdir / "f.bin"), resume=True)
    assert (rdir / "f.bin").read_bytes() == data
    assert calls[0].sent == len(data) - kept
    assert _leftovers(rdir) == []


def test_resume_starts_over_when_the_partial_cannot_be_a_prefix(
    link: Link, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _payload(100_000)
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    (rdir / ".f.bin.sshbridge.part").write_bytes(b"x" * 200_000)  # longer than the file
    calls = _record(monkeypatch, "upload")
    _sftp.put(link, src, str(rdir / "f.bin"), resume=True)
    assert (rdir / "f.bin").read_bytes() == data and calls[0].start == 0
    (tmp_path / ".g.bin.sshbridge.part").write_bytes(b"y" * 200_000)
    _sftp.get(link, str(rdir / "f.bin"), tmp_path / "g.bin", resume=True)
    assert (tmp_path / "g.bin").read_bytes() == data
    assert _leftovers(rdir) == [] and _leftovers(tmp_path) == []


def test_resumed_download_fetches_only_the_rest(
    link: Link, rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _payload(12_000_017)
    (rdir / "big.bin").write_bytes(data)
    transport = _transport_of(link)
    dest = tmp_path / "big.bin"
    part = tmp_path / ".big.bin.sshbridge.part"

    def cut(done: int, total: int) -> None:
        if done >= 4_000_000:
            transport.close()

    with pytest.raises(ConnectionLost):
        _sftp.get(link, str(rdir / "big.bin"), dest, callback=cut, resume=True)
    assert not dest.exists()
    kept = part.stat().st_size
    assert 4_000_000 <= kept < len(data) and part.read_bytes() == data[:kept]

    link.connect()  # what SandboxSSH's session manager does after a cut
    calls = _record(monkeypatch, "download")
    _sftp.get(link, str(rdir / "big.bin"), dest, resume=True, verify="sha256")
    assert dest.read_bytes() == data and not part.exists()
    (stats,) = calls
    assert stats.start == kept and stats.sent == len(data) - kept


# -- errors --------------------------------------------------------------------------------


def test_missing_paths_name_the_path(link: Link, rdir: Path, tmp_path: Path) -> None:
    missing = f"{rdir}/nope/not here.bin"
    with pytest.raises(RemotePathError) as info:
        _sftp.get(link, missing, tmp_path / "x")
    assert missing in str(info.value) and info.value.errno == errno.ENOENT
    assert os.listdir(tmp_path) == []
    (tmp_path / "a").write_bytes(b"a")
    with pytest.raises(RemotePathError) as info:
        _sftp.put(link, tmp_path / "a", missing)
    assert missing in str(info.value) and info.value.path == missing
    with pytest.raises(RemotePathError) as info:
        _sftp.getfo(link, missing, io.BytesIO())
    assert missing in str(info.value)
    (rdir / "file").write_bytes(b"")
    with pytest.raises(RemotePathError, match="under-a-file"):
        _sftp.put(link, tmp_path / "a", f"{rdir}/file/under-a-file")
    with pytest.raises(InvalidArgument, match="directory"):
        _sftp.get(link, str(rdir), tmp_path / "y")
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_local_problems_stay_local(link: Link, rdir: Path, tmp_path: Path) -> None:
    (rdir / "s").write_bytes(b"s")
    with pytest.raises(InvalidArgument, match="does not exist"):
        _sftp.put(link, tmp_path / "missing", str(rdir / "x"))
    with pytest.raises(InvalidArgument, match="does not exist"):
        _sftp.get(link, str(rdir / "s"), tmp_path / "no-dir" / "x")


def test_local_write_errors_are_not_blamed_on_the_sandbox(link: Link, rdir: Path) -> None:
    (rdir / "s.bin").write_bytes(_payload(1_000_000))
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    with open("/dev/full", "wb", buffering=0) as full, pytest.raises(OSError) as info:
        _sftp.getfo(link, str(rdir / "s.bin"), full)
    assert info.value.errno == errno.ENOSPC
    assert not isinstance(info.value, RemotePathError)
    assert _sftp.stat(link, str(rdir / "s.bin")).st_size == 1_000_000  # client still fine


def test_resume_of_a_missing_file_leaves_nothing(link: Link, rdir: Path, tmp_path: Path) -> None:
    with pytest.raises(RemotePathError):
        _sftp.get(link, str(rdir / "nope"), tmp_path / "x", resume=True)
    assert os.listdir(tmp_path) == []
    (tmp_path / "a").write_bytes(b"a")
    with pytest.raises(RemotePathError):
        _sftp.put(link, tmp_path / "a", f"{rdir}/no-dir/a", resume=True)


def test_permission_denied_names_the_path(tmp_path: Path) -> None:
    # Tests may run as root, which ignores file modes: a read-only SFTP server refuses
    # writes whoever asks.
    server = start_sshd(tmp_path / "ro", extra_config="Subsystem sftp internal-sftp -R")
    lk = link_to(server)
    try:
        (server.home / "readable.bin").write_bytes(b"r" * 1000)
        src = tmp_path / "a"
        src.write_bytes(b"a")
        target = f"{server.home}/denied.bin"
        with pytest.raises(RemotePathError) as info:
            _sftp.put(lk, src, target)
        assert target in str(info.value) and info.value.errno == errno.EACCES
        with pytest.raises(RemotePathError) as info:
            _sftp.putfo(lk, io.BytesIO(b"x"), target)
        assert info.value.errno == errno.EACCES
        out = _sftp.get(lk, f"{server.home}/readable.bin", tmp_path / "r.bin", verify="sha256")
        assert out.read_bytes() == b"r" * 1000
    finally:
        lk.close()
        server.stop()


# -- the engine against a misbehaving server -----------------------------------------------


class _ScrambledChannel:
    """An in-memory SFTP server for READ and WRITE that answers out of order, reads
    short, and hands its output back in pieces that cut packets anywhere."""

    def __init__(self, content: bytearray, seed: int) -> None:
        self.content = content
        self.rng = random.Random(seed)
        self.closed = False
        self.inbox = bytearray()
        self.held: list[bytes] = []
        self.outbox = bytearray()
        self.timeout: float | None = None
        self.out_max_packet_size = 32768
        self.in_window_size = 2 * 1024 * 1024

    # Channel API used by the engine.
    def send(self, data: Any) -> int:
        n = min(len(data), self.rng.randint(1, 40_000))
        self.inbox += bytes(data[:n])
        self._serve()
        return n

    def recv_ready(self) -> bool:
        return bool(self.outbox) and self.rng.random() < 0.5

    def recv(self, n: int) -> bytes:
        if not self.outbox:
            self.rng.shuffle(self.held)
            for answer in self.held:
                self.outbox += answer
            self.held.clear()
        cut = self.rng.randint(1, max(1, len(self.outbox)))
        out = bytes(self.outbox[:cut])
        del self.outbox[:cut]
        return out

    def gettimeout(self) -> float | None:
        return self.timeout

    def settimeout(self, t: float | None) -> None:
        self.timeout = t

    def close(self) -> None:
        self.closed = True

    def _serve(self) -> None:
        while len(self.inbox) >= 4:
            (length,) = struct.unpack_from(">I", self.inbox, 0)
            if len(self.inbox) < 4 + length:
                return
            packet = bytes(self.inbox[4 : 4 + length])
            del self.inbox[: 4 + length]
            kind, rid, hlen = struct.unpack_from(">BII", packet, 0)
            offset, count = struct.unpack_from(">QI", packet, 9 + hlen)
            if kind == 5:  # READ: sometimes fewer bytes than asked
                if offset >= len(self.content):
                    body = struct.pack(">BII", 101, rid, 1) + struct.pack(">I", 0) * 2
                else:
                    count = min(count, self.rng.choice([count, count, 1, count // 3 or 1]))
                    chunk = bytes(self.content[offset : offset + count])
                    body = struct.pack(">BII", 103, rid, len(chunk)) + chunk
            else:  # WRITE
                data = packet[9 + hlen + 12 :]
                end = offset + len(data)
                if len(self.content) < end:
                    self.content.extend(bytes(end - len(self.content)))
                self.content[offset:end] = data
                body = struct.pack(">BII", 101, rid, 0) + struct.pack(">I", 0) * 2
            self.held.append(struct.pack(">I", len(body)) + body)
            if len(self.held) > self.rng.randint(1, 6):
                self.rng.shuffle(self.held)
                self.outbox += self.held.pop()


class _FakeClient:
    def __init__(self, chan: _ScrambledChannel) -> None:
        self._chan = chan
        self._lock = threading.Lock()
        self.request_number = 1

    def get_channel(self) -> _ScrambledChannel:
        return self._chan


@pytest.mark.parametrize("seed", range(6))
def test_engine_survives_reordering_and_short_reads(seed: int) -> None:
    data = _payload(200_003 + seed)
    chan = _ScrambledChannel(bytearray(), seed)
    client: Any = _FakeClient(chan)
    up = _transfer.upload(client, b"h1", io.BytesIO(data).readinto, block=7_000, depth=9)
    assert bytes(chan.content) == data and up.sent == len(data)

    out = io.BytesIO()
    down = _transfer.download(client, b"h2", _transfer.StreamSink(out), size=len(data),
                              block=6_000, depth=11)
    assert out.getvalue() == data and down.end == len(data)

    # The size is only a hint: growth is followed to the end, shrinking is reported.
    for hint in (len(data) // 2, len(data) + 50_000):
        out = io.BytesIO()
        down = _transfer.download(client, b"h3", _transfer.StreamSink(out), size=hint,
                                  block=6_000, depth=5)
        assert out.getvalue() == data and down.end == len(data)

    # Resumed: only the tail is asked for.
    out = io.BytesIO()
    down = _transfer.download(client, b"h4", _transfer.StreamSink(out, 150_000),
                              size=len(data), start=150_000, block=6_000, depth=7)
    assert out.getvalue() == data[150_000:] and down.sent == len(data) - 150_000
    assert client.request_number > 100


def test_temp_names() -> None:
    assert _transfer.temp_name("/a/b c.txt", resume=True) == "/a/.b c.txt.sshbridge.part"
    one = _transfer.temp_name("/a/b", resume=False)
    assert one.startswith("/a/.b.sshbridge-") and one != _transfer.temp_name("/a/b", resume=False)
    long = _transfer.temp_name("d/" + "x" * 250, resume=True)
    assert len(long.split("/")[-1]) < 120 and long != _transfer.temp_name("d/" + "x" * 251,
                                                                           resume=True)
    assert hashlib.sha256(b"").hexdigest() == _transfer.local_sha256(os.devnull)


# -- trees ---------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple[str, int, int, bytes | str]]:
    """kind, mode, mtime and content (or link target) of everything under root."""
    out: dict[str, tuple[str, int, int, bytes | str]] = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(here) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", 0, 0, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o777, int(st.st_mtime), b"")
            else:
                out[rel] = ("file", st.st_mode & 0o777, int(st.st_mtime), p.read_bytes())
    return out


def test_tree_round_trip(link: Link, rdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "top.txt").write_bytes(b"top")
    (src / "a" / "big.bin").write_bytes(_payload(1_500_000))
    (src / "a" / "b" / "run.sh").write_bytes(b"#!/bin/sh\n")
    (src / "a" / "b" / "nul").write_bytes(b"")
    os.chmod(src / "a" / "b" / "run.sh", 0o750)
    os.chmod(src / "a" / "b", 0o700)
    os.symlink("../top.txt", src / "a" / "to-top")
    os.symlink("/etc/passwd", src / "outside")
    for i, p in enumerate(sorted(src.rglob("*"))):
        if not p.is_symlink():
            os.utime(p, (1_600_000_000 + i, 1_600_000_000 + i))
    os.utime(src / "a", (1_500_000_000, 1_500_000_000))
    seen: list[tuple[int, int]] = []
    sent = _trees.put_dir(link, src, str(rdir / "tree"),
                             callback=lambda d, t: seen.append((d, t)))
    assert len(sent) == 4 and seen[-1] == (1_500_013, 1_500_013)
    assert _snapshot(rdir / "tree") == _snapshot(src)
    assert os.readlink(rdir / "tree" / "outside") == "/etc/passwd"

    back = tmp_path / "back"
    got = _trees.get_dir(link, str(rdir / "tree"), back, verify="sha256")
    assert len(got) == 4
    assert _snapshot(back) == _snapshot(src)
    # Again over the existing copy: links are replaced, files overwritten atomically.
    _trees.get_dir(link, str(rdir / "tree"), back)
    assert _snapshot(back) == _snapshot(src)
    assert _leftovers(back / "a") == [] and _leftovers(rdir / "tree" / "a") == []


def test_get_dir_does_not_write_through_local_links(
    link: Link, rdir: Path, tmp_path: Path
) -> None:
    (rdir / "t" / "sub").mkdir(parents=True)
    (rdir / "t" / "sub" / "f").write_bytes(b"payload")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(elsewhere, dest / "sub")  # planted: sub -> a directory outside the tree
    with pytest.raises(InvalidArgument, match="symbolic link"):
        _trees.get_dir(link, str(rdir / "t"), dest)
    assert os.listdir(elsewhere) == []
