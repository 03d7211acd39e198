"""SFTP against servers that are not OpenSSH, and downloads that must not harm this machine.

Two kinds of server: the emulator's AsyncSSH sidecar (the ``emu`` fixture), and
tests/minimal_server.py behind the emulator's OpenSSH mode: a paramiko-based server
with no SFTP extensions, no SETSTAT, short reads, the SFTP draft's SYMLINK argument
order and three exec channels per connection. Both serve real directories on this
machine, so the tests look at the "remote" side with plain file operations.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from conftest import SECRET_KEY, running_emulator
from emu_helpers import alive, ed25519_pair, wait_until
from minimal_server import VERSION, MinimalServer

from sshbridge import (
    ConnectionLost,
    InvalidArgument,
    RemotePathError,
    SandboxSSH,
)
from sshbridge._sftp import STALE_AGE, FileAttributesWarning
from sshbridge.emulator import Emulator, OpenSSHTarget

pytestmark = pytest.mark.timeout(30)

# Transfers behave alike in both session contracts: one is enough (conftest drops the
# sidecar run of tests not marked ``contracts``); the cut, which reconnects, runs in both.
ONE_CONTRACT = pytest.mark.parametrize("contract", ["vm"])


def _payload(size: int) -> bytes:
    return os.urandom(size)


def _leftovers(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".sshbridge" in n)


def _umask() -> int:
    # Read, not set: os.umask() would change it for every thread for a moment.
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def minimal(tmp_path: Path) -> Iterator[MinimalServer]:
    root = tmp_path / "sandbox"
    root.mkdir()
    with MinimalServer(root, tmp_path / "authorized_keys") as server:
        yield server


@pytest.fixture
def on_minimal(minimal: MinimalServer) -> Iterator[SandboxSSH]:
    """A SandboxSSH whose sessions are served by the minimal server (contract A)."""
    target = OpenSSHTarget(minimal.host, minimal.port, minimal.username,
                           minimal.authorized_keys_file)
    with running_emulator(
        api_key=SECRET_KEY, openssh=target, contract="sidecar", check_closed=True
    ) as emu:
        sandbox = emu.create_sandbox()
        with SandboxSSH(sandbox, api_key=emu.api_key, base_url=emu.base_url) as shell:
            yield shell


@pytest.fixture
def sandbox(emu: Emulator) -> Iterator[tuple[SandboxSSH, Path]]:
    """A SandboxSSH on the emulator's own sidecar, and the sandbox's directory."""
    sandbox_id = emu.create_sandbox()
    with SandboxSSH(sandbox_id, api_key=emu.api_key, base_url=emu.base_url) as shell:
        yield shell, emu.sandbox_dir(sandbox_id)


# -- the minimal server itself, with raw paramiko ---------------------------------------------


def _raw_client(server: MinimalServer, pkey: paramiko.PKey,
                username: str | None = None) -> paramiko.Transport:
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else ~40 ms per command
    transport = paramiko.Transport(sock)
    transport.start_client(timeout=5)
    transport.auth_publickey(username or server.username, pkey)
    return transport


def test_minimal_server_auth_exec_and_sftp(minimal: MinimalServer) -> None:
    good, good_line = ed25519_pair()
    old, old_line = ed25519_pair()
    stranger, _ = ed25519_pair()
    minimal.authorized_keys_file.write_text(
        f'expiry-time="20991231235959",no-pty {good_line} sshbridge-emulator:sess_1\n'
        f'expiry-time="20000101" {old_line} expired\n'
    )
    for key, user in ((old, None), (stranger, None), (good, "someone-else")):
        with pytest.raises(paramiko.AuthenticationException):
            _raw_client(minimal, key, user).close()
    transport = _raw_client(minimal, good)
    try:
        assert transport.remote_version == VERSION and "OpenSSH" not in VERSION
        chan = transport.open_session()
        chan.exec_command('echo "$HOME"; pwd; echo oops >&2; cat; exit 7')
        chan.sendall(b"from stdin")
        chan.shutdown_write()
        out = chan.makefile("rb").read()
        err = chan.makefile_stderr("rb").read()
        root = str(minimal.root)
        assert (out, err, chan.recv_exit_status()) == (
            f"{root}\n{root}\nfrom stdin".encode(), b"oops\n", 7)

        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        data = _payload(100_000)
        with sftp.open("f.bin", "wb") as fh:  # relative: in the root
            fh.write(data)
        assert (minimal.root / "f.bin").read_bytes() == data
        with sftp.open(str(minimal.root / "f.bin"), "rb") as fh:
            assert len(fh._read(65536) or b"") == minimal.read_cap  # type: ignore[attr-defined]
            fh.seek(0)
            assert fh.read() == data
        # No extensions, no SETSTAT: refused, and without a message.
        with pytest.raises(OSError) as info:
            sftp.posix_rename("f.bin", "g.bin")
        assert str(info.value) == ""
        with pytest.raises(OSError):
            sftp.chmod("f.bin", 0o600)
        # The draft's SYMLINK order: paramiko's (target, link) makes the link at "target".
        sftp.symlink("made-here", "reads-this")
        assert os.readlink(minimal.root / "made-here") == "reads-this"
        sftp.close()
    finally:
        transport.close()


def test_minimal_server_caps_exec_channels_and_kills_process_groups(
    minimal: MinimalServer,
) -> None:
    pkey, line = ed25519_pair()
    minimal.authorized_keys_file.write_text(line + "\n")
    transport = _raw_client(minimal, pkey)
    try:
        chans: list[paramiko.Channel] = []
        helpers: list[int] = []
        for _ in range(minimal.max_exec_channels):
            chan = transport.open_session()
            # A helper in the background: the whole group goes when the channel does.
            chan.exec_command("sleep 30 & echo $!; wait")
            chans.append(chan)
            helpers.append(int(chan.makefile("rb").readline()))
        refused = transport.open_session()
        with pytest.raises(paramiko.SSHException):
            refused.exec_command("true")
        assert transport.is_active()  # a refusal, not a dropped connection
        chans[0].close()
        assert wait_until(lambda: not alive(helpers[0]), 5, "the helper to exit", 0.01)
        assert all(alive(pid) for pid in helpers[1:])
        for i in range(20):  # fast commands: the reply always comes before the close
            again = transport.open_session()
            again.exec_command(f"echo {i}")
            assert again.makefile("rb").read() == f"{i}\n".encode()
            assert again.recv_exit_status() == 0
    finally:
        transport.close()
    minimal.close()
    # Killed with their groups: gone once the kernel has delivered the signal and the
    # orphans were reaped, which is not the same instant as close() returning.
    gone = wait_until(lambda: not any(alive(pid) for pid in helpers), 5, "helpers to exit", 0.01)
    assert gone
    assert [t.name for t in threading.enumerate() if t.name.startswith("minimal-server")] == []


# -- Bug 16: symbolic links on a server with the draft's SYMLINK order ------------------------


def test_put_dir_makes_links_in_the_servers_order(
    on_minimal: SandboxSSH, minimal: MinimalServer, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "top.txt").write_bytes(b"top")
    os.symlink("../top.txt", src / "a" / "up")
    os.symlink("a", src / "to-a")
    remote = minimal.root / "tree"
    before = sorted(os.listdir(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FileAttributesWarning)  # no SETSTAT here
        # Links only: no modes or times asked for, which this server could not set.
        on_minimal.put_dir(src, str(remote), preserve_mode=False, preserve_times=False)
        assert os.readlink(remote / "a" / "up") == "../top.txt"
        assert os.readlink(remote / "to-a") == "a"
        assert (remote / "a" / "up").read_bytes() == b"top"
        # Nothing outside the tree: OpenSSH's order would have put a link at
        # ../top.txt (from the server's root, this test's directory) and one at "a".
        assert sorted(os.listdir(minimal.root)) == ["tree"]
        assert sorted(os.listdir(tmp_path)) == before
        # A link out of the tree is recreated as a link (its text), never followed.
        os.symlink("/etc/passwd", src / "outside")
        on_minimal.put_dir(src, str(remote))
    assert os.readlink(remote / "outside") == "/etc/passwd"
    assert sorted(os.listdir(remote)) == ["a", "outside", "to-a", "top.txt"]  # no probes


@ONE_CONTRACT
def test_put_dir_links_on_the_sidecar(sandbox: tuple[SandboxSSH, Path], tmp_path: Path) -> None:
    shell, root = sandbox
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("../x", src / "up")
    shell.put_dir(src, str(root / "t"))
    shell.put_dir(src, str(root / "t"))  # again: over the existing link
    assert os.readlink(root / "t" / "up") == "../x"
    assert sorted(os.listdir(root / "t")) == ["up"] and not (root / "x").exists()


# -- Bug 17: no SETSTAT, no posix-rename ------------------------------------------------------


def test_put_lands_without_setstat_or_posix_rename(
    on_minimal: SandboxSSH, minimal: MinimalServer, tmp_path: Path
) -> None:
    remote = minimal.root / "f.bin"
    src = tmp_path / "f.bin"
    first, second = _payload(700_001), _payload(300_003)
    src.write_bytes(first)
    os.chmod(src, 0o640)
    created = 0o640 & ~_umask()  # the temporary file's create mode, after the umask
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert on_minimal.put(src, str(remote)) == str(remote)
    assert remote.read_bytes() == first
    assert stat.S_IMODE(remote.stat().st_mode) == created
    assert [w.category for w in rec] == ([] if created == 0o640 else [FileAttributesWarning])

    # Over an existing target, with a mode the create mode cannot give (umask): it lands,
    # and the mode that could not be set is reported.
    src.write_bytes(second)
    os.chmod(src, 0o777)
    with pytest.warns(FileAttributesWarning, match=r"mode 0777 not set.*SFTP status 8") as got:
        on_minimal.put(src, str(remote), verify="sha256")
    assert len(got) == 1 and str(remote) in str(got[0].message)
    assert remote.read_bytes() == second
    assert stat.S_IMODE(remote.stat().st_mode) == 0o777 & ~_umask()
    assert _leftovers(minimal.root) == []

    with pytest.warns(FileAttributesWarning):
        on_minimal.putfo(open(src, "rb"), str(remote), mode=0o777)  # noqa: SIM115
    assert remote.read_bytes() == second and _leftovers(minimal.root) == []


def test_a_failed_replace_puts_the_old_file_back(
    on_minimal: SandboxSSH, minimal: MinimalServer, tmp_path: Path
) -> None:
    target = minimal.root / "f.bin"
    target.write_bytes(b"old")
    src = tmp_path / "f.bin"
    src.write_bytes(b"new")
    # The server refuses to rename the new file into place (the old one has been
    # moved aside by then): the old one must come back, and no temporary file stay.
    minimal.refuse_rename = lambda old, new: old.endswith(".part")
    with pytest.raises(RemotePathError, match="upload to") as info:
        on_minimal.put(src, str(target), preserve_mode=False)
    assert isinstance(info.value.__cause__, OSError)
    assert target.read_bytes() == b"old" and _leftovers(minimal.root) == []
    minimal.refuse_rename = None
    on_minimal.put(src, str(target), preserve_mode=False)
    assert target.read_bytes() == b"new" and _leftovers(minimal.root) == []


def test_readers_never_see_a_partial_file_without_posix_rename(
    on_minimal: SandboxSSH, minimal: MinimalServer, tmp_path: Path
) -> None:
    target = minimal.root / "shared.bin"
    versions = [bytes([65 + i]) * (200_000 + 50_000 * i) for i in range(3)]
    target.write_bytes(versions[0])
    bad: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):  # briefly absent is documented
                content = target.read_bytes()
                if content not in versions:
                    bad.append(len(content))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in (1, 2, 0, 1):
            src = tmp_path / f"v{i}"
            src.write_bytes(versions[i])
            on_minimal.put(src, str(target), preserve_mode=False)
    finally:
        stop.set()
        thread.join()
    assert bad == [] and target.read_bytes() == versions[1]
    assert _leftovers(minimal.root) == []


def test_errors_keep_their_cause(on_minimal: SandboxSSH, minimal: MinimalServer,
                                 tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.write_bytes(b"a")
    missing = str(minimal.root / "no-dir" / "a")
    with pytest.raises(RemotePathError) as info:
        on_minimal.put(src, missing)
    # The server's own answer stays attached (it used to be dropped with "from None").
    assert missing in str(info.value) and isinstance(info.value.__cause__, OSError)


# -- Bug 2: a local FIFO or device is written into, never replaced ----------------------------


@ONE_CONTRACT
def test_get_streams_into_a_fifo(sandbox: tuple[SandboxSSH, Path], tmp_path: Path) -> None:
    shell, root = sandbox
    data = _payload(3_000_001)
    (root / "s.bin").write_bytes(data)
    where = tmp_path / "d"
    where.mkdir()
    fifo = where / "pipe"
    os.mkfifo(fifo)
    # The reader is another process, so that a wrong get() cannot hang this one.
    with open(tmp_path / "out.bin", "wb") as out:
        reader = subprocess.Popen(["cat", str(fifo)], stdout=out)
        try:
            assert shell.get(str(root / "s.bin"), fifo, verify="sha256") == fifo
            reader.wait(timeout=10)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
    assert (tmp_path / "out.bin").read_bytes() == data
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.listdir(where) == ["pipe"]
    with pytest.raises(InvalidArgument, match="FIFO"):
        shell.get(str(root / "s.bin"), fifo, resume=True)


def _same_null(path: Path, rdev: int, mode: int) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev and st.st_mode == mode


@ONE_CONTRACT
def test_get_into_dev_null_keeps_the_device(
    sandbox: tuple[SandboxSSH, Path], tmp_path: Path
) -> None:
    shell, root = sandbox
    (root / "s.bin").write_bytes(_payload(500_000))
    os.chmod(root / "s.bin", 0o600)
    null = os.lstat("/dev/null")
    # As root a regression would replace /dev/null itself: prove it on a private node
    # with the same device number first, and stop there if that one is harmed.
    clone = tmp_path / "null"
    with contextlib.suppress(PermissionError):
        os.mknod(clone, stat.S_IFCHR | 0o666, null.st_rdev)
        made = os.lstat(clone).st_mode
        shell.get(str(root / "s.bin"), clone)
        assert _same_null(clone, null.st_rdev, made)
        assert os.listdir(tmp_path) == ["null"]
    shell.get(str(root / "s.bin"), "/dev/null")
    assert _same_null(Path("/dev/null"), null.st_rdev, null.st_mode)
    assert [n for n in os.listdir("/dev") if ".sshbridge" in n] == []


@ONE_CONTRACT
def test_get_refuses_other_special_files(
    sandbox: tuple[SandboxSSH, Path], tmp_path: Path
) -> None:
    shell, root = sandbox
    (root / "s.bin").write_bytes(b"data")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        with pytest.raises(InvalidArgument, match="socket"):
            shell.get(str(root / "s.bin"), tmp_path / "sock")
        assert stat.S_ISSOCK(os.lstat(tmp_path / "sock").st_mode)
    # get_dir writes a tree of regular files: a FIFO in the way is refused.
    (root / "t").mkdir()
    (root / "t" / "f").write_bytes(b"f")
    (tmp_path / "t").mkdir()
    os.mkfifo(tmp_path / "t" / "f")
    with pytest.raises(InvalidArgument, match="FIFO"):
        shell.get_dir(str(root / "t"), tmp_path / "t")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "t" / "f").st_mode)


# -- Bug 3: no setuid, setgid or sticky bits from the sandbox ---------------------------------


@ONE_CONTRACT
def test_downloads_drop_setuid_setgid_and_sticky(
    sandbox: tuple[SandboxSSH, Path], tmp_path: Path
) -> None:
    shell, root = sandbox
    for name, mode in (("suid", 0o4755), ("sgid", 0o2750)):
        (root / name).write_bytes(b"#!/bin/sh\n")
        os.chmod(root / name, mode)
    tree = root / "tree"
    (tree / "shared").mkdir(parents=True)
    (tree / "shared" / "tool").write_bytes(b"x")
    os.chmod(tree / "shared" / "tool", 0o6711)
    os.chmod(tree / "shared", 0o1777)
    for name in ("suid", "sgid"):
        assert stat.S_IMODE(shell.get(str(root / name), tmp_path / name).stat().st_mode) == (
            stat.S_IMODE(os.stat(root / name).st_mode) & 0o777
        )
    shell.get_dir(str(tree), tmp_path / "tree")
    assert stat.S_IMODE(os.stat(tmp_path / "tree" / "shared").st_mode) == 0o777
    assert stat.S_IMODE(os.stat(tmp_path / "tree" / "shared" / "tool").st_mode) == 0o711


# -- Bug 13: temporary upload files never stay behind -----------------------------------------


@pytest.mark.contracts
def test_connection_cut_mid_put_leaves_no_temp(
    emu: Emulator, sandbox: tuple[SandboxSSH, Path], tmp_path: Path
) -> None:
    shell, root = sandbox
    (root / "t.bin").write_bytes(b"old")
    src = tmp_path / "big.bin"
    src.write_bytes(_payload(12_000_000))
    session = shell.session
    assert session is not None
    cut = threading.Event()

    def cut_midway(done: int, total: int) -> None:
        if done >= total // 3 and not cut.is_set():
            cut.set()
            assert _leftovers(root) != []  # mid-way: the temporary file exists
            emu.cut_connections(session.session_id)

    with pytest.raises(ConnectionLost) as info:
        shell.put(src, str(root / "t.bin"), callback=cut_midway)
    assert cut.is_set() and info.value.__cause__ is not None
    assert (root / "t.bin").read_bytes() == b"old"
    assert _leftovers(root) == []
    shell.put(src, str(root / "t.bin"))  # and the next call works
    assert (root / "t.bin").read_bytes() == src.read_bytes()


@ONE_CONTRACT
def test_ctrl_c_mid_put_leaves_no_temp(sandbox: tuple[SandboxSSH, Path], tmp_path: Path) -> None:
    shell, root = sandbox
    src = tmp_path / "big.bin"
    src.write_bytes(_payload(8_000_000))

    def interrupt(done: int, total: int) -> None:
        if done >= 2_000_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shell.put(src, str(root / "t.bin"), callback=interrupt)
    assert _leftovers(root) == [] and not (root / "t.bin").exists()
    with pytest.raises(KeyboardInterrupt):
        shell.putfo(open(src, "rb"), str(root / "t.bin"), callback=interrupt)  # noqa: SIM115
    assert _leftovers(root) == []
    assert shell.run("echo still here").stdout == "still here\n"


@ONE_CONTRACT
def test_stale_temporaries_are_swept_at_the_next_put(
    sandbox: tuple[SandboxSSH, Path], tmp_path: Path
) -> None:
    shell, root = sandbox
    old = time.time() - STALE_AGE - 600
    planted = {
        ".a.bin.sshbridge-0badf00d.part": True,  # ours, stale: removed
        ".b.bin.sshbridge-0000beef.part": False,  # ours, fresh (a live upload): kept
        ".c.bin.sshbridge.part": False,  # a resumable partial: never touched
        "d.bin.sshbridge-0badf00d.part": False,  # not hidden: not our name
        ".e.bin.sshbridge-0BADF00D.part": False,  # not our name either
    }
    for name in planted:
        (root / name).write_bytes(b"x")
        if name != ".b.bin.sshbridge-0000beef.part":
            os.utime(root / name, (old, old))
    os.symlink("/etc/passwd", root / ".f.bin.sshbridge-00000000.part")
    os.utime(root / ".f.bin.sshbridge-00000000.part", (old, old), follow_symlinks=False)
    (root / "sub").mkdir()
    (root / "sub" / ".g.sshbridge-0badf00d.part").write_bytes(b"x")
    os.utime(root / "sub" / ".g.sshbridge-0badf00d.part", (old, old))
    src = tmp_path / "new.bin"
    src.write_bytes(b"new")
    shell.put(src, str(root / "new.bin"))
    left = sorted(os.listdir(root))
    assert ".a.bin.sshbridge-0badf00d.part" not in left
    kept = [n for n, stale in planted.items() if not stale]
    assert set(kept) | {".f.bin.sshbridge-00000000.part", "sub", "new.bin"} == set(left)
    assert os.listdir(root / "sub") == [".g.sshbridge-0badf00d.part"]  # another directory
