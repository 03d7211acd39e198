"""Directory trees (sshbridge/_trees.py): pipelined SFTP, tar streams, sync.

Against real servers on loopback only: throwaway OpenSSH sshds with a Link built
directly (one stock, one whose PATH has no tar or find, one whose ``tar`` is a script
that sends a crafted archive), the minimal paramiko server (no SETSTAT, no
posix-rename, short reads), and the emulator's AsyncSSH sidecar through SandboxSSH.
The servers are local, so "remote" paths are local paths, checked with plain file
operations. SFTP requests are counted from the pooled client's request counter.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SECRET_KEY
from minimal_server import MinimalServer
from sshd_server import SSHDServer, find_sshd, start_sshd
from tree_helpers import link_to, serve_link, serve_sshd

from sshbridge import (
    ConnectionLost,
    FileAttributesWarning,
    InvalidArgument,
    RemotePathError,
    SandboxSSH,
    _trees,
)
from sshbridge._link import Link
from sshbridge.emulator import Emulator, OpenSSHTarget

if find_sshd() is None:
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        raise RuntimeError("CI is set but OpenSSH sshd was not found: install openssh-server")
    pytest.skip("OpenSSH sshd not found (apt-get install openssh-server)",
                allow_module_level=True)

pytestmark = pytest.mark.timeout(60)

Snapshot = dict[str, tuple[str, int, int, bytes | str]]


def _snapshot(root: Path) -> Snapshot:
    """kind, mode, mtime and content (or link text) of everything under ``root``."""
    out: Snapshot = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(here) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", 0, 0, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, int(st.st_mtime), b"")
            else:
                out[rel] = ("file", st.st_mode & 0o7777, int(st.st_mtime), p.read_bytes())
    return out


def _leftovers(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs for p in d.rglob("*") if ".sshbridge" in p.name)


def _make_tree(src: Path, files: int = 60) -> None:
    """Nested directories, an empty one, odd modes, links in and out, one big file,
    awkward names; times set children first so directories keep theirs."""
    rng = random.Random(files)
    (src / "a" / "b" / "c").mkdir(parents=True)
    (src / "empty dir").mkdir()
    (src / "with 'quote' and space").mkdir()
    for i in range(files):
        d = ("a", "a/b", "a/b/c", "with 'quote' and space", "")[i % 5]
        (src / d / f"f{i:03}.txt").write_bytes(rng.randbytes(rng.randrange(0, 9000)))
    (src / "a" / "mid.bin").write_bytes(rng.randbytes(1_500_007))  # many WRITEs in the pipeline
    (src / "a" / "big.bin").write_bytes(rng.randbytes(_trees.SMALL + 1))  # the bulk engine
    (src / "a" / "b" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    for hidden in (".hidden", "..double", ".-dash", "*star?", "new\nline"):
        (src / "a" / "b" / hidden).write_bytes(hidden.encode())
    os.chmod(src / "a" / "b" / "run.sh", 0o750)
    os.chmod(src / "a" / "f000.txt", 0o600)
    os.chmod(src / "empty dir", 0o751)
    os.chmod(src / "a" / "b", 0o700)
    os.symlink("../f004.txt", src / "a" / "up")
    os.symlink("/etc/passwd", src / "outside")
    os.symlink("missing-target", src / "a" / "dangling")
    paths = sorted(src.rglob("*"), key=lambda p: -len(p.parts))
    for i, p in enumerate(paths):
        if not p.is_symlink():
            os.utime(p, (1_600_000_000 + i * 61, 1_600_000_000 + i * 61))


def _count(snapshot: Snapshot, *kinds: str) -> int:
    return sum(1 for kind, *_ in snapshot.values() if kind in kinds)


def _requests(link: Link) -> int:
    """The SFTP request counter of the link's pooled client (one, used in turn)."""
    with link.sftp() as client:
        return int(client.request_number)


# -- servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHDServer]:
    yield from serve_sshd(tmp_path_factory)


@pytest.fixture(scope="module")
def link(sshd: SSHDServer) -> Iterator[Link]:
    yield from serve_link(sshd, "sbx-trees")


def _bin_dir(path: Path, tools: tuple[str, ...]) -> Path:
    path.mkdir()
    for tool in tools:
        for where in ("/bin", "/usr/bin"):
            if os.path.exists(f"{where}/{tool}"):
                os.symlink(f"{where}/{tool}", path / tool)
                break
    return path


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SSHDServer, Link]]:
    """An sshd whose commands see a PATH without tar, find or sha256sum."""
    tmp = tmp_path_factory.mktemp("bare")
    bindir = _bin_dir(tmp / "bin", ("sh", "cat", "mkdir", "rm", "mv", "echo"))
    server = start_sshd(tmp / "sshd", extra_config=f"SetEnv PATH={bindir}")
    lk = link_to(server, "sbx-trees")
    yield server, lk
    lk.close()
    server.stop()


@pytest.fixture(scope="module")
def faketar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SSHDServer, Link, Path]]:
    """An sshd whose ``tar`` sends whatever archive the test put in ``archive.tar``, then
    exits with the status in ``status``."""
    tmp = tmp_path_factory.mktemp("faketar")
    fake = tmp / "fakebin"
    fake.mkdir()
    (fake / "status").write_text("0")
    (fake / "tar").write_text(f"#!/bin/sh\ncat {fake}/archive.tar\nexit $(cat {fake}/status)\n")
    os.chmod(fake / "tar", 0o755)
    server = start_sshd(tmp / "sshd", extra_config=f"SetEnv PATH={fake}:/usr/bin:/bin")
    lk = link_to(server, "sbx-trees")
    yield server, lk, fake
    lk.close()
    server.stop()


@pytest.fixture
def rdir(sshd: SSHDServer, request: pytest.FixtureRequest) -> Path:
    d = sshd.home / f"t-{request.node.name[:40]}-{os.urandom(3).hex()}"
    d.mkdir()
    return d


# -- pipelined SFTP ---------------------------------------------------------------------------


def test_sftp_tree_round_trip(link: Link, rdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    expected = _snapshot(src)
    seen: list[tuple[int, int]] = []
    before = _requests(link)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # OpenSSH sets every attribute: no warning
        sent = _trees.put_dir(link, src, str(rdir / "tree"), method="sftp",
                              callback=lambda d, t: seen.append((d, t)))
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    assert len(sent) == _count(expected, "file") and seen[-1] == (total, total)
    assert _snapshot(rdir / "tree") == expected
    # Pipelined: a handful of requests per file, not a round trip each (counted, not timed).
    assert _requests(link) - before < 8 * len(sent)

    back = tmp_path / "back"
    got = _trees.get_dir(link, str(rdir / "tree"), back, method="sftp")
    assert sorted(got) == sorted(back / r for r, v in expected.items() if v[0] == "file")
    assert _snapshot(back) == expected
    # Again, over the existing copies, both ways: every file replaced atomically.
    _trees.put_dir(link, src, str(rdir / "tree"), method="sftp")
    _trees.get_dir(link, str(rdir / "tree"), back, method="sftp", verify="sha256")
    assert _snapshot(rdir / "tree") == expected and _snapshot(back) == expected
    assert _leftovers(rdir, back) == []


def test_walk_of_directories_larger_than_one_readdir(
    link: Link, rdir: Path, tmp_path: Path
) -> None:
    # OpenSSH answers a READDIR with at most 100 names: this needs several pairs.
    for d, n in (("big", 333), ("big/inner", 101), ("small", 1)):
        (rdir / "t" / d).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (rdir / "t" / d / f"n{i}").write_bytes(b"%d" % i)
    with link.sftp() as client:
        listing = _trees.walk_sftp(client, str(rdir / "t"))
        assert _trees.walk_sftp(client, str(rdir / "missing")) is None
        with pytest.raises(InvalidArgument, match="not a directory"):
            _trees.walk_sftp(client, str(rdir / "t" / "small" / "n0"))
    assert listing is not None and len(listing) == 333 + 101 + 1 + 3
    back = tmp_path / "back"
    assert len(_trees.get_dir(link, str(rdir / "t"), back, method="sftp")) == 435
    assert _snapshot(back) == _snapshot(rdir / "t")
    assert _trees.list_remote(link, str(rdir / "t")) == listing  # find agrees with SFTP


def test_sftp_put_dir_sha256_and_errors(link: Link, rdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src, files=10)
    _trees.put_dir(link, src, str(rdir / "t"), verify="sha256")
    assert _snapshot(rdir / "t") == _snapshot(src)
    # A file where a directory of the tree goes: refused with the path, nothing half-done.
    (rdir / "u").mkdir()
    (rdir / "u" / "a").write_bytes(b"not a directory")
    with pytest.raises(RemotePathError, match="not a directory"):
        _trees.put_dir(link, src, str(rdir / "u"))
    assert (rdir / "u" / "a").read_bytes() == b"not a directory"
    assert _leftovers(rdir) == []
    (rdir / "plain").write_bytes(b"file")
    with pytest.raises(RemotePathError, match="not a directory"):
        _trees.put_dir(link, src, str(rdir / "plain"))
    assert (rdir / "plain").read_bytes() == b"file"
    with pytest.raises(InvalidArgument, match="method"):
        _trees.put_dir(link, src, str(rdir / "t"), method="rsync")  # type: ignore[arg-type]


def test_pipelined_upload_failure_leaves_no_temporaries(
    link: Link, rdir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(40):
        (src / "d" / f"f{i}").write_bytes(b"x" * 100)
    (rdir / "t" / "d" / "f7").mkdir(parents=True)  # a directory where a file goes
    (rdir / "t" / "d" / "f7" / "keep").write_bytes(b"keep")
    with pytest.raises(RemotePathError, match="f7"):
        _trees.put_dir(link, src, str(rdir / "t"), method="sftp")
    assert (rdir / "t" / "d" / "f7" / "keep").read_bytes() == b"keep"
    assert _leftovers(rdir) == []


def _many(src: Path, tag: bytes, n: int = 120) -> dict[str, bytes]:
    out = {}
    for i in range(n):
        rel = f"d{i % 4}/f{i}"
        data = tag * (9000 + i)
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
        out[rel] = data
    return out


def _whole(remote: Path, old: dict[str, bytes], new: dict[str, bytes]) -> None:
    """Every target is absent, the old file or the new one: never anything between."""
    for rel in new:
        p = remote / rel
        if p.exists():
            assert p.read_bytes() in (old.get(rel), new[rel]), rel


@pytest.mark.parametrize("stop", ["interrupt", "cut"])
def test_stopped_tree_upload_leaves_no_temporaries(
    link: Link, rdir: Path, tmp_path: Path, stop: str
) -> None:
    old = _many(tmp_path / "old", b"o")
    _trees.put_dir(link, tmp_path / "old", str(rdir / "t"))
    new = _many(tmp_path / "new", b"n")
    with link.sftp() as client:
        chan = client.get_channel()
    assert chan is not None

    def halt(done: int, total: int) -> None:
        if done >= 400_000:
            if stop == "cut":
                chan.get_transport().close()
                return
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt if stop == "interrupt" else ConnectionLost):
        _trees.put_dir(link, tmp_path / "new", str(rdir / "t"), callback=halt)
    _whole(rdir / "t", old, new)
    if stop == "interrupt":
        assert _leftovers(rdir) == []  # removed over the same, still working channel
    else:
        link.connect()  # what SandboxSSH's session manager does after a cut
    # The next upload into those directories finishes the job and the cleanup.
    _trees.put_dir(link, tmp_path / "new", str(rdir / "t"))
    assert _leftovers(rdir) == []
    _whole(rdir / "t", new, new)


# -- tar --------------------------------------------------------------------------------------


def test_tar_tree_round_trip(link: Link, rdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    expected = _snapshot(src)
    dirs = sum(1 for v in expected.values() if v[0] == "dir")
    seen: list[tuple[int, int]] = []
    before = _requests(link)
    sent = _trees.put_dir(link, src, str(rdir / "tree"), method="tar",
                          callback=lambda d, t: seen.append((d, t)))
    # One archive; SFTP only sets the directories' attributes (one SETSTAT each).
    assert _requests(link) - before == dirs
    assert len(sent) == _count(expected, "file") and seen[-1][0] == seen[-1][1] > 1_500_000
    assert _snapshot(rdir / "tree") == expected
    assert sorted(os.listdir(rdir / "tree")) == sorted(os.listdir(src))  # no stage left

    back = tmp_path / "back"
    before = _requests(link)
    got = _trees.get_dir(link, str(rdir / "tree"), back)  # auto: tar, no SFTP at all
    assert _requests(link) == before
    assert len(got) == _count(expected, "file") and _snapshot(back) == expected
    # Over an existing copy with a planted link where a file goes: the link itself is
    # replaced, never written through.
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (back / "a" / "f000.txt").unlink()
    os.symlink(victim, back / "a" / "f000.txt")
    _trees.get_dir(link, str(rdir / "tree"), back)
    assert victim.read_bytes() == b"untouched" and _snapshot(back) == expected
    # And the upload over the existing remote tree, a link planted where a file goes.
    (rdir / "tree" / "a" / "f000.txt").unlink()
    os.symlink(victim, rdir / "tree" / "a" / "f000.txt")
    _trees.put_dir(link, src, str(rdir / "tree"), method="tar")
    assert victim.read_bytes() == b"untouched" and _snapshot(rdir / "tree") == expected
    assert _leftovers(rdir, back) == []


@pytest.mark.parametrize("method", ["sftp", "tar"])
def test_awkward_and_relative_remote_roots(
    link: Link, sshd: SSHDServer, tmp_path: Path, method: _trees.Method
) -> None:
    src = tmp_path / "src"
    _make_tree(src, files=8)
    expected = _snapshot(src)
    # Quotes, spaces, a leading dash, $ and a backslash: quoted for the shell, never run.
    name = f"-it's a \"dir\" $(touch pwned) \\ {method}-{os.urandom(2).hex()}"
    sent = _trees.put_dir(link, src, str(sshd.home / name), method=method)
    assert len(sent) == _count(expected, "file")
    assert _snapshot(sshd.home / name) == expected
    back = tmp_path / "back"
    _trees.get_dir(link, str(sshd.home / name), back, method=method)
    assert _snapshot(back) == expected
    # Relative remote paths start in the session's working directory, on both paths.
    rel = f"rel-{method}-{os.urandom(2).hex()}/tree"
    _trees.put_dir(link, src, rel, method=method)
    with link.sftp() as client:
        home = client.normalize(".")
    assert _snapshot(Path(home) / rel) == expected
    back2 = tmp_path / "back2"
    _trees.get_dir(link, rel, back2, method=method)
    assert _snapshot(back2) == expected
    assert not (sshd.home / "pwned").exists() and not (Path(home) / "pwned").exists()


def test_tar_refuses_local_links_and_fifos(link: Link, rdir: Path, tmp_path: Path) -> None:
    (rdir / "t" / "sub").mkdir(parents=True)
    (rdir / "t" / "sub" / "f").write_bytes(b"payload")
    (rdir / "t" / "g").write_bytes(b"g")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(elsewhere, dest / "sub")
    with pytest.raises(InvalidArgument, match="symbolic link"):
        _trees.get_dir(link, str(rdir / "t"), dest, method="tar")
    assert os.listdir(elsewhere) == [] and _leftovers(dest) == []
    os.unlink(dest / "sub")
    # A real local directory where the sandbox has a link: refused before anything of
    # the tree is replaced.
    os.symlink("g", rdir / "t" / "ln")
    (dest / "g").write_bytes(b"old")
    (dest / "ln").mkdir()
    for method in ("tar", "sftp"):
        with pytest.raises(InvalidArgument, match="not a link"):
            _trees.get_dir(link, str(rdir / "t"), dest, method=method)
        assert (dest / "g").read_bytes() == b"old" and _leftovers(dest) == []
    (dest / "ln").rmdir()
    (dest / "g").unlink()
    os.mkfifo(dest / "g")
    with pytest.raises(InvalidArgument, match="FIFO"):
        _trees.get_dir(link, str(rdir / "t"), dest, method="tar")
    assert _leftovers(dest) == []


def test_without_tar_both_directions_fall_back_to_sftp(
    bare: tuple[SSHDServer, Link], tmp_path: Path
) -> None:
    server, lk = bare
    src = tmp_path / "src"
    _make_tree(src, files=20)
    expected = _snapshot(src)
    remote = server.home / f"t-{os.urandom(3).hex()}"
    sent = _trees.put_dir(lk, src, str(remote), method="tar")
    assert len(sent) == _count(expected, "file") and _snapshot(remote) == expected
    back = tmp_path / "back"
    assert len(_trees.get_dir(lk, str(remote), back)) == _count(expected, "file")
    assert _snapshot(back) == expected
    # The missing tar is remembered for this link: the next tree asks no more.
    assert lk in _trees._no_tar
    assert _leftovers(remote, back) == []
    # sync without find or sha256sum: a pipelined SFTP walk, SFTP reads for checksums.
    result = _trees.sync_up(lk, src, str(remote), checksum=True)
    assert result.sent == [] and result.bytes_sent == 0
    assert len(result.unchanged) == _count(expected, "file", "link")


def _tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
            linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_600_000_000
    info.linkname = linkname
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


@pytest.mark.parametrize("case", ["dotdot", "absolute", "through-link", "hardlink-out"])
def test_hostile_archive_is_refused(
    faketar: tuple[SSHDServer, Link, Path], tmp_path: Path, case: str
) -> None:
    server, lk, fake = faketar
    outside = tmp_path / "outside"
    outside.mkdir()
    members = {
        "dotdot": [_member("./ok", data=b"ok"), _member("./../outside/evil", data=b"evil")],
        "absolute": [_member(str(outside / "evil"), data=b"evil")],
        "through-link": [_member("./a", tarfile.SYMTYPE, linkname=str(outside)),
                         _member("./a/evil", data=b"evil")],
        "hardlink-out": [_member("./h", tarfile.LNKTYPE, linkname="../../etc/passwd")],
    }[case]
    (fake / "archive.tar").write_bytes(_tar_bytes(*members))
    remote = server.home / f"r-{os.urandom(3).hex()}"
    remote.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "ok").write_bytes(b"old")
    with pytest.raises(_trees.HostileArchive, match="refusing the archive"):
        _trees.get_dir(lk, str(remote), dest)
    assert os.listdir(outside) == []
    assert (dest / "ok").read_bytes() == b"old"  # nothing replaced
    assert _leftovers(dest) == []


def test_tar_that_fails_midway_replaces_nothing(
    faketar: tuple[SSHDServer, Link, Path], tmp_path: Path
) -> None:
    server, lk, fake = faketar
    (fake / "archive.tar").write_bytes(_tar_bytes(_member("./a", data=b"new")))
    (fake / "status").write_text("2")
    try:
        remote = server.home / f"r-{os.urandom(3).hex()}"
        remote.mkdir()
        dest = tmp_path / "dest"
        dest.mkdir()
        (dest / "a").write_bytes(b"old")
        with pytest.raises(RemotePathError, match="tar on the sandbox failed"):
            _trees.get_dir(lk, str(remote), dest)
        assert (dest / "a").read_bytes() == b"old" and _leftovers(dest) == []
    finally:
        (fake / "status").write_text("0")


# -- sync -----------------------------------------------------------------------------------


def test_sync_up(link: Link, rdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    remote = rdir / "mirror"
    entries = _count(_snapshot(src), "file", "link")
    first = _trees.sync_up(link, src, str(remote))
    assert len(first.sent) == entries and first.unchanged == [] and first.deleted == []
    assert _snapshot(remote) == _snapshot(src)

    before = _requests(link)
    seen: list[tuple[int, int]] = []
    again = _trees.sync_up(link, src, str(remote), progress=lambda d, t: seen.append((d, t)))
    assert again.sent == [] and again.bytes_sent == 0 and seen == []
    assert len(again.unchanged) == entries
    assert _requests(link) == before  # one remote listing (find), no SFTP request

    # One file changed (new size): only it goes, and its directory's time is kept.
    (src / "a" / "b" / "f001.txt").write_bytes(b"changed")
    os.utime(src / "a" / "b" / "f001.txt", (1_700_000_000, 1_700_000_000))
    os.utime(src / "a" / "b", (1_600_000_000, 1_600_000_000))
    r = _trees.sync_up(link, src, str(remote))
    assert r.sent == ["a/b/f001.txt"] and r.bytes_sent == 7
    assert _snapshot(remote) == _snapshot(src)

    # Same size and mtime, different bytes: found only by content.
    target = src / "a" / "f005.txt"
    st = target.stat()
    data = bytearray(target.read_bytes() or b"\0")
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, (st.st_atime, st.st_mtime))
    os.utime(src / "a", (1_600_000_000, 1_600_000_000))
    assert _trees.sync_up(link, src, str(remote)).sent == []
    assert (remote / "a" / "f005.txt").read_bytes() != bytes(data)
    r = _trees.sync_up(link, src, str(remote), checksum=True)
    assert r.sent == ["a/f005.txt"]
    assert (remote / "a" / "f005.txt").read_bytes() == bytes(data)

    # Extras stay unless delete=True; then files, links and whole directories go.
    (remote / "extra.txt").write_bytes(b"x")
    (remote / "old" / "deep").mkdir(parents=True)
    (remote / "old" / "deep" / "f").write_bytes(b"f")
    os.symlink("x", remote / "a" / "extra-link")
    assert _trees.sync_up(link, src, str(remote)).deleted == []
    assert (remote / "extra.txt").exists()
    r = _trees.sync_up(link, src, str(remote), delete=True)
    assert r.deleted == ["a/extra-link", "extra.txt", "old", "old/deep", "old/deep/f"]
    assert r.sent == []
    assert _snapshot(remote) == _snapshot(src)
    assert _leftovers(remote) == []


def test_sync_replaces_entries_of_another_kind(link: Link, rdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "was-file").mkdir(parents=True)
    (src / "was-file" / "inner").write_bytes(b"inner")
    (src / "was-dir").write_bytes(b"now a file")
    (src / "was-link").write_bytes(b"now a file too")
    remote = rdir / "m"
    (remote / "was-dir" / "deep").mkdir(parents=True)
    (remote / "was-dir" / "deep" / "x").write_bytes(b"x")
    (remote / "was-file").write_bytes(b"a file")
    elsewhere = rdir / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, remote / "was-link")
    # A directory in the way of a file goes only with delete=True; nothing moved before.
    with pytest.raises(RemotePathError, match="delete=True"):
        _trees.sync_up(link, src, str(remote))
    assert (remote / "was-file").read_bytes() == b"a file"
    r = _trees.sync_up(link, src, str(remote), delete=True)
    assert r.deleted == ["was-dir", "was-dir/deep", "was-dir/deep/x", "was-file"]
    assert sorted(r.sent) == ["was-dir", "was-file/inner", "was-link"]
    assert _snapshot(remote) == _snapshot(src)
    assert os.listdir(elsewhere) == []  # the link was replaced, not written through
    # And down: local entries of the other kind give way the same.
    local = tmp_path / "local"
    (local / "was-dir").mkdir(parents=True)
    (local / "was-dir" / "y").write_bytes(b"y")
    (local / "was-file").write_bytes(b"a file")
    with pytest.raises(InvalidArgument, match="delete=True"):
        _trees.sync_down(link, str(remote), local)
    r = _trees.sync_down(link, str(remote), local, delete=True)
    assert r.deleted == ["was-dir", "was-dir/y", "was-file"]
    assert _snapshot(local) == _snapshot(src)


def test_sync_down(link: Link, rdir: Path, tmp_path: Path) -> None:
    _make_tree(rdir / "src")
    remote = rdir / "src"
    local = tmp_path / "local"
    first = _trees.sync_down(link, str(remote), local)
    assert len(first.sent) == _count(_snapshot(remote), "file", "link")
    assert _snapshot(local) == _snapshot(remote)
    before = _requests(link)
    again = _trees.sync_down(link, str(remote), local)
    assert again.sent == [] and again.bytes_sent == 0 and _requests(link) == before

    (remote / "a" / "f000.txt").write_bytes(b"remote change")
    os.utime(remote / "a", (1_600_000_000, 1_600_000_000))
    r = _trees.sync_down(link, str(remote), local)
    assert r.sent == ["a/f000.txt"] and _snapshot(local) == _snapshot(remote)

    target = remote / "a" / "b" / "f001.txt"
    st = target.stat()
    data = bytearray(target.read_bytes() or b"\0")
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, (st.st_atime, st.st_mtime))
    os.utime(remote / "a" / "b", (1_600_000_000, 1_600_000_000))
    assert _trees.sync_down(link, str(remote), local).sent == []
    assert _trees.sync_down(link, str(remote), local, checksum=True).sent == ["a/b/f001.txt"]
    assert _snapshot(local) == _snapshot(remote)

    (local / "junk").mkdir()
    (local / "junk" / "j").write_bytes(b"j")
    (local / "stray.txt").write_bytes(b"s")
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "precious").write_bytes(b"p")
    os.symlink(kept, local / "a" / "link-out")  # an extra link: removed as a link
    r = _trees.sync_down(link, str(remote), local, delete=True)
    assert r.deleted == ["a/link-out", "junk", "junk/j", "stray.txt"]
    assert (kept / "precious").read_bytes() == b"p"
    assert _snapshot(local) == _snapshot(remote)
    with pytest.raises(RemotePathError, match="no such directory"):
        _trees.sync_down(link, str(rdir / "missing"), local)


# -- other servers, through SandboxSSH ------------------------------------------------------


@pytest.mark.parametrize("contract", ["vm"])
def test_trees_and_sync_on_the_sidecar(emu: Emulator, tmp_path: Path) -> None:
    sandbox_id = emu.create_sandbox()
    root = emu.sandbox_dir(sandbox_id)
    src = tmp_path / "src"
    _make_tree(src, files=30)
    expected = _snapshot(src)
    files, entries = _count(expected, "file"), _count(expected, "file", "link")
    with SandboxSSH(sandbox_id, api_key=emu.api_key, base_url=emu.base_url) as shell:
        assert len(shell.put_dir(src, str(root / "up"))) == files
        assert _snapshot(root / "up") == expected
        assert len(shell.put_dir(src, str(root / "tar up"), method="tar")) == files
        assert _snapshot(root / "tar up") == expected
        back = tmp_path / "back"
        assert len(shell.get_dir(str(root / "up"), back)) == files
        assert _snapshot(back) == expected
        assert len(shell.get_dir(str(root / "up"), tmp_path / "b2", method="sftp")) == files
        assert _snapshot(tmp_path / "b2") == expected
        r = shell.sync(src, str(root / "mirror"), delete=True)
        assert len(r.sent) == entries and _snapshot(root / "mirror") == expected
        assert shell.sync(src, str(root / "mirror")).sent == []
        down = shell.sync_down(str(root / "mirror"), tmp_path / "down")
        assert len(down.sent) == entries and _snapshot(tmp_path / "down") == expected
        assert shell.sync_down(str(root / "mirror"), tmp_path / "down").sent == []
    assert _leftovers(root, back, tmp_path / "down") == []


@pytest.fixture
def minimal(tmp_path: Path) -> Iterator[MinimalServer]:
    root = tmp_path / "sandbox"
    root.mkdir()
    with MinimalServer(root, tmp_path / "authorized_keys") as server:
        yield server


def test_pipelined_trees_on_the_minimal_server(minimal: MinimalServer, tmp_path: Path) -> None:
    """No SETSTAT or FSETSTAT, no posix-rename (a RENAME that will not replace), short
    reads: the pipeline still lands every file, reports the times once, and replaces
    existing files the careful way."""
    target = OpenSSHTarget(minimal.host, minimal.port, minimal.username,
                           minimal.authorized_keys_file)
    src = tmp_path / "src"
    _make_tree(src, files=40)
    expected = {k: (kind, mode, 0, data) for k, (kind, mode, _, data) in _snapshot(src).items()}
    remote = minimal.root / "tree"

    def untimed(root: Path) -> Snapshot:
        return {k: (kind, mode, 0, data) for k, (kind, mode, _, data) in _snapshot(root).items()}

    with Emulator(api_key=SECRET_KEY, openssh=target, contract="sidecar") as emu:
        sandbox = emu.create_sandbox()
        with SandboxSSH(sandbox, api_key=emu.api_key, base_url=emu.base_url) as shell:
            for _ in range(2):  # the second time over existing files
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    shell.put_dir(src, str(remote))
                told = [w for w in caught if issubclass(w.category, FileAttributesWarning)]
                assert len(told) == 1 and "times" in str(told[0].message)
                assert untimed(remote) == expected
            back = tmp_path / "back"
            shell.get_dir(str(remote), back, method="sftp")
            assert _snapshot(back) == _snapshot(remote)
        assert emu.open_sessions() == []
    assert _leftovers(remote, back) == []
