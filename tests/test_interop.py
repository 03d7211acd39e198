"""Interop: the same library behaviours against three different SSH servers.

* ``openssh``: OpenSSH's sshd (tests/sshd_server.py: start_sshd; internal-sftp).
* ``dropbear``: Dropbear with OpenSSH's sftp-server (start_dropbear; Dropbear does not
  know ``expiry-time=``, so its helper copies the emulator's keys file without it).
* ``minimal``: tests/minimal_server.py, a small paramiko server with no SFTP extensions,
  no SETSTAT, short reads, the draft's SYMLINK order, at most 3 exec channels per
  connection, and process groups killed when their channel closes.

Each server runs once per module; every test gets its own emulator in OpenSSH mode, with
contract A ("sidecar": no preamble; contract B's preamble is covered in test_openssh.py),
handing out the server's host, port and user and appending each session's key to the
server's authorized_keys file. All three servers are local, so "remote" paths are local
paths: the tests check the server's side with plain file operations.

Nothing here is marked xfail: a failure on one server is a library bug (or a server the
library does not handle yet) to fix.
"""

from __future__ import annotations

import os
import random
import shlex
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from conftest import SECRET_KEY, running_emulator
from emu_helpers import pids_with, wait_until
from minimal_server import MinimalServer
from sshd_server import (
    DropbearStartError,
    dropbear_key_lines,
    find_dropbear,
    find_sshd,
    start_dropbear,
    start_sshd,
)

from sshbridge import CommandError, CommandTimeout, FileAttributesWarning, SandboxSSH
from sshbridge.emulator import Emulator, OpenSSHTarget

pytestmark = pytest.mark.timeout(30)

SERVERS = ("openssh", "dropbear", "minimal")
MIB = 1024 * 1024


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> NoReturn:
    """Skip on a developer machine; in CI every server must run."""
    if _in_ci():
        pytest.fail(f"CI must run the interop tests on every server: {reason}")
    pytest.skip(reason)


@dataclass(frozen=True)
class Server:
    name: str
    host: str
    port: int
    username: str
    authorized_keys_file: Path
    home: Path  # $HOME of the commands it runs


@pytest.fixture(scope="module", params=SERVERS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    name = str(request.param)
    tmp = tmp_path_factory.mktemp(name)
    if name == "openssh":
        if find_sshd() is None:
            _unavailable("OpenSSH sshd is not installed (apt-get install openssh-server)")
        sshd = start_sshd(tmp)
        try:
            yield Server(name, sshd.host, sshd.port, sshd.username,
                         sshd.authorized_keys_file, sshd.home)  # fmt: skip
        finally:
            sshd.stop()
    elif name == "dropbear":
        if find_dropbear() is None:
            _unavailable("Dropbear is not installed (apt-get install dropbear-bin)")
        try:
            dropbear = start_dropbear(tmp)
        except DropbearStartError as exc:
            _unavailable(f"Dropbear could not be started: {exc}")
        try:
            yield Server(name, dropbear.host, dropbear.port, dropbear.username,
                         dropbear.authorized_keys_file, dropbear.home)  # fmt: skip
        finally:
            dropbear.stop()
    else:
        root = tmp / "root"
        root.mkdir()
        keys = tmp / "authorized_keys"
        keys.touch(mode=0o600)
        with MinimalServer(root, keys) as minimal:
            yield Server(name, minimal.host, minimal.port, minimal.username, keys, minimal.root)


@pytest.fixture
def server_emu(server: Server) -> Iterator[Emulator]:
    """The emulator in OpenSSH mode in front of ``server``, contract A; every session must
    end closed."""
    target = OpenSSHTarget(server.host, server.port, server.username, server.authorized_keys_file)
    with running_emulator(
        api_key=SECRET_KEY, openssh=target, contract="sidecar", check_closed=True
    ) as emulator:
        yield emulator


@pytest.fixture
def shell(server_emu: Emulator) -> Iterator[SandboxSSH]:
    emu = server_emu
    sandbox = emu.create_sandbox()
    with SandboxSSH(sandbox, api_key=emu.api_key, base_url=emu.base_url, connect_timeout=10) as s:
        yield s


@pytest.fixture
def rdir(server: Server, request: pytest.FixtureRequest) -> Path:
    """A fresh directory on the server (a local path too)."""
    d = server.home / f"t-{request.node.originalname}-{os.urandom(3).hex()}"
    d.mkdir()
    return d


def _leftovers(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs for p in d.rglob("*") if ".sshbridge" in p.name)


def _snapshot(root: Path) -> dict[str, tuple[str, int, int, bytes | str]]:
    """kind, mode, mtime and content (or link text) of everything under ``root``."""
    out: dict[str, tuple[str, int, int, bytes | str]] = {}
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


def _tree_diff(
    got: dict[str, tuple[str, int, int, bytes | str]],
    want: dict[str, tuple[str, int, int, bytes | str]],
) -> list[str]:
    """One readable line per difference between two snapshots."""
    out = [f"{k}: missing" for k in sorted(want.keys() - got.keys())]
    out += [f"{k}: unexpected" for k in sorted(got.keys() - want.keys())]
    for k in sorted(want.keys() & got.keys()):
        (g_kind, g_mode, g_mtime, g_data), (w_kind, w_mode, w_mtime, w_data) = got[k], want[k]
        if g_kind != w_kind:
            out.append(f"{k}: a {g_kind}, want a {w_kind}")
            continue
        if g_mode != w_mode:
            out.append(f"{k}: mode {g_mode:o}, want {w_mode:o}")
        if g_mtime != w_mtime:
            out.append(f"{k}: mtime {g_mtime}, want {w_mtime}")
        if g_data != w_data:
            out.append(f"{k}: content {g_data[:40]!r}, want {w_data[:40]!r}")
    return out


# -- commands -------------------------------------------------------------------------------


def test_run_exit_codes_and_streams(shell: SandboxSSH, server: Server) -> None:
    r = shell.run("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, "out\n", "err\n", False)
    assert shell.run("true").exit_code == 0
    assert shell.run("exit 255").exit_code == 255
    assert shell.run('echo "$HOME"').stdout == f"{server.home}\n"
    r = shell.run(f"head -c {MIB} /dev/zero; head -c {MIB} /dev/zero >&2; echo end >&2")
    assert len(r.stdout_bytes) == MIB and r.stderr_bytes == b"\0" * MIB + b"end\n" and r.ok


def test_argv_is_quoted(shell: SandboxSSH) -> None:
    tricky = ["a b", "it's", '"q"', "$HOME", "`id`", "ünï", "x;y", "", "*", "\\n"]
    r = shell.run(["printf", "%s|", *tricky], check=True)
    assert r.stdout == "|".join(tricky) + "|"


def test_cwd_env_input(shell: SandboxSSH, rdir: Path) -> None:
    (rdir / "my dir" / "sub").mkdir(parents=True)
    r = shell.run(
        'pwd; echo "$A|$B"', cwd=str(rdir / "my dir" / "sub"), env={"A": "1", "B": "two 'q' $x"}
    )
    assert r.stdout == f"{rdir}/my dir/sub\n1|two 'q' $x\n"
    assert shell.run("cat", input="data\nmore").stdout == "data\nmore"
    assert shell.run("cat", input=b"\x00\xff" * 70000).stdout_bytes == b"\x00\xff" * 70000
    assert shell.run("cat").stdout == ""  # stdin at EOF at once: no hang
    r = shell.run("true", cwd=str(rdir / "missing"))
    assert r.exit_code == 125 and r.stderr != ""
    with pytest.raises(CommandError) as info:
        shell.run("echo nope >&2; exit 7", check=True)
    assert info.value.result.exit_code == 7


def test_timeout_stops_the_remote_process(shell: SandboxSSH) -> None:
    marker = f"sleep 27.{random.randrange(10**6):06d}"
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        shell.run(f"echo started; {marker}; echo never", timeout=0.5)
    assert time.monotonic() - start < 2.5
    assert info.value.result.stdout == "started\n"
    wait_until(lambda: pids_with(marker) == [], 2, "the timed-out command's process to end")
    assert pids_with(marker) == []
    assert shell.run("echo still usable").stdout == "still usable\n"


@pytest.mark.timeout(90)
def test_sixteen_concurrent_runs(shell: SandboxSSH, rdir: Path) -> None:
    # Each command waits (up to ~25 s: a loaded machine opens the minimal server's six
    # connections slowly, one of them seen at over 10 s) until all 16 have started:
    # they must run at once, past every server's per-connection channel limit (the
    # minimal server's is 3). Unloaded, it ends as soon as the last one starts.
    n = 16
    gate = shlex.quote(str(rdir / "gate"))
    os.mkdir(rdir / "gate")
    start = threading.Barrier(n)
    outs: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        script = (  # the glob counts the markers without a fork per test
            f"touch {gate}/{i}; k=0; "
            f'while set -- {gate}/*; [ "$#" -lt {n} ] && [ "$k" -lt 1250 ]; '
            'do sleep 0.02; k=$((k+1)); done; echo "' + str(i) + ' $#"'
        )
        try:
            start.wait(5)
            outs[i] = shell.run(script, timeout=50).stdout
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, f"{len(errors)} of {n} failed:\n" + "\n".join(
        f"{type(e).__name__}: {e}" for e in errors
    )
    assert outs == {i: f"{i} {n}\n" for i in range(n)}


# -- files ----------------------------------------------------------------------------------


def test_put_get_3mib_byte_exact(shell: SandboxSSH, rdir: Path, tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3 * MIB)
    local = tmp_path / "in.bin"
    local.write_bytes(data)
    target = shell.put(local, str(rdir / "blob.bin"))
    assert target == str(rdir / "blob.bin")
    assert (rdir / "blob.bin").read_bytes() == data
    back = shell.get(target, tmp_path / "out.bin")
    assert back.read_bytes() == data
    assert _leftovers(rdir, tmp_path) == []


def test_parallel_put_into_a_directory_and_back(
    shell: SandboxSSH, rdir: Path, tmp_path: Path
) -> None:
    # 12 MiB goes over several channels, which open the temporary file beside the first
    # channel's own OPEN; named by a directory (no trailing slash), that guess was wrong
    # and its file must be gone. Every server: the minimal one refuses the extra
    # channels past its three, and has no posix-rename.
    data = random.Random(5).randbytes(12 * MIB + 3)
    local = tmp_path / "par.bin"
    local.write_bytes(data)
    (rdir / "into").mkdir()
    target = shell.put(local, str(rdir / "into"))
    assert target == str(rdir / "into" / "par.bin")
    assert (rdir / "into" / "par.bin").read_bytes() == data
    again = shell.put(local, str(rdir / "par.bin"))  # a new name this time, then over it
    shell.put(local, again)
    assert (rdir / "par.bin").read_bytes() == data
    back = shell.get(again, tmp_path / "back.bin")
    assert back.read_bytes() == data
    assert _leftovers(rdir, tmp_path) == [] and _leftovers(rdir / "into") == []


def test_put_get_3mib_sha256(shell: SandboxSSH, rdir: Path, tmp_path: Path) -> None:
    if shell.run("command -v sha256sum").exit_code != 0:
        pytest.skip("no sha256sum on the server")
    data = random.Random(4).randbytes(3 * MIB + 1)
    local = tmp_path / "in.bin"
    local.write_bytes(data)
    target = shell.put(local, str(rdir) + "/", verify="sha256")  # into the directory
    assert target == str(rdir / "in.bin")
    assert (rdir / "in.bin").read_bytes() == data
    back = shell.get(target, tmp_path / "out.bin", verify="sha256")
    assert back.read_bytes() == data
    assert _leftovers(rdir, tmp_path) == []


def _make_tree(src: Path) -> None:
    (src / "a" / "b").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "top.txt").write_bytes(b"top\n")
    (src / "a" / "data.bin").write_bytes(random.Random(5).randbytes(200_003))
    (src / "a" / "b" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "a" / "b" / "nul").write_bytes(b"")
    os.symlink("../top.txt", src / "a" / "to-top")
    for path, mode in (
        ("top.txt", 0o644),
        ("a/data.bin", 0o600),
        ("a/b/run.sh", 0o750),
        ("a/b/nul", 0o640),
        ("a/b", 0o700),
        ("a", 0o755),
        ("empty", 0o751),
    ):
        os.chmod(src / path, mode)
    # Children first, so that setting a file's time does not move its directory's.
    paths = sorted(src.rglob("*"), key=lambda p: -len(p.parts))
    for i, p in enumerate(paths):
        if not p.is_symlink():
            os.utime(p, (1_600_000_000 + i * 61, 1_600_000_000 + i * 61))


def test_put_dir_tree(shell: SandboxSSH, rdir: Path, tmp_path: Path, server: Server) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    expected = _snapshot(src)
    assert {k for k, v in expected.items() if v[0] == "link"} == {"a/to-top"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sent = shell.put_dir(src, str(rdir / "tree"))
    assert sorted(sent) == sorted(
        str(rdir / "tree" / f) for f in ("top.txt", "a/data.bin", "a/b/run.sh", "a/b/nul")
    )
    got = _snapshot(rdir / "tree")
    told = [w for w in caught if issubclass(w.category, FileAttributesWarning)]
    if server.name == "minimal":
        # No SETSTAT there: times cannot be set, and the caller is told so, once.
        assert len(told) == 1 and "times" in str(told[0].message), [str(w.message) for w in told]
        expected = {k: (kind, mode, 0, data) for k, (kind, mode, _, data) in expected.items()}
        got = {k: (kind, mode, 0, data) for k, (kind, mode, _, data) in got.items()}
    else:
        assert told == []
    diff = _tree_diff(got, expected)
    assert not diff, "put_dir did not reproduce the tree:\n" + "\n".join(diff)
    assert _leftovers(rdir) == []


def test_get_dir_tree(shell: SandboxSSH, rdir: Path, tmp_path: Path) -> None:
    # The tree is made on the server directly, so this does not depend on put_dir.
    _make_tree(rdir / "tree")
    expected = _snapshot(rdir / "tree")
    back = tmp_path / "back"
    got = shell.get_dir(str(rdir / "tree"), back)
    assert sorted(got) == sorted(
        back / f for f in ("top.txt", "a/data.bin", "a/b/run.sh", "a/b/nul")
    )
    diff = _tree_diff(_snapshot(back), expected)
    assert not diff, "get_dir did not reproduce the tree:\n" + "\n".join(diff)
    assert _leftovers(back) == []


# -- durable jobs ---------------------------------------------------------------------------


def test_spawn_and_wait(shell: SandboxSSH) -> None:
    job = shell.spawn("echo one; echo two >&2; sleep 0.3; echo three; exit 5")
    result = job.wait(timeout=3)
    assert (result.exit_code, result.stdout, result.stderr) == (5, "one\nthree\n", "two\n")
    assert job.poll() == 5
    again = shell.job(job.id).wait(timeout=3)
    assert again.stdout == "one\nthree\n"


# -- the Dropbear helper's key copy ---------------------------------------------------------


def test_dropbear_key_copy_drops_expiry_time() -> None:
    # Dropbear refuses a line with expiry-time ("Bad public key options"): the helper's
    # copy drops the option, and the line itself once the time has passed.
    now = time.mktime((2030, 6, 1, 12, 0, 0, 0, 0, -1))
    text = (
        'expiry-time="20300601120001" ssh-ed25519 AAAAfuture c1\n'
        'expiry-time="20300601115959" ssh-ed25519 AAAApast c2\n'
        'no-pty,expiry-time="203006011300",command="echo a,b" ssh-ed25519 AAAAopts c3\n'
        'expiry-time="2030-06-01" ssh-ed25519 AAAAunreadable c4\n'
        "# comment\n\n"
        "ssh-ed25519 AAAAplain c5\n"
        'expiry-time="20991231" ssh-ed25519 AAAAhalf-written'
    )
    lines, next_expiry = dropbear_key_lines(text, now)
    assert lines == [
        "ssh-ed25519 AAAAfuture c1",
        'no-pty,command="echo a,b" ssh-ed25519 AAAAopts c3',
        "ssh-ed25519 AAAAplain c5",
    ]
    assert next_expiry == now + 1
