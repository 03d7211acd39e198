"""Proves that tests/sshd_server.py starts a usable OpenSSH sshd (uses paramiko directly)."""

from __future__ import annotations

import base64
import io
import os
import pathlib
import socket
import threading
from collections.abc import Iterator

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from emu_helpers import wait_until

try:  # tests/ without __init__.py: pytest puts tests/ itself on sys.path
    from sshd_server import SSHDServer, find_sshd, start_sshd
except ImportError:  # tests/ as a package
    from tests.sshd_server import SSHDServer, find_sshd, start_sshd


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


if find_sshd() is None:
    if _in_ci():
        raise RuntimeError(
            "CI is set but OpenSSH sshd was not found: .ci/run must install openssh-server"
        )
    pytest.skip(
        "OpenSSH sshd not found (apt-get install openssh-server); set CI=1 to make this an error",
        allow_module_level=True,
    )


def _new_key() -> tuple[paramiko.Ed25519Key, str]:
    """An in-memory Ed25519 key for paramiko and its authorized_keys line."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return paramiko.Ed25519Key(file_obj=io.StringIO(pem)), public + " sshbridge-test"


def _connect(server: SSHDServer, pkey: paramiko.PKey) -> paramiko.SSHClient:
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client = paramiko.SSHClient()
    # Pin the server's host key; RejectPolicy makes any other key fail.
    key_type, key_b64 = server.host_key_public.split()[:2]
    host_entry = f"[{server.host}]:{server.port}"
    host_key = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64))
    client.get_host_keys().add(host_entry, key_type, host_key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            server.host,
            port=server.port,
            username=server.username,
            pkey=pkey,
            sock=sock,
            timeout=5,
            banner_timeout=5,
            auth_timeout=5,
            look_for_keys=False,
            allow_agent=False,
        )
    except BaseException:
        client.close()
        sock.close()
        raise
    return client


def _run(client: paramiko.SSHClient, command: str) -> tuple[int, str, str]:
    _stdin, stdout, stderr = client.exec_command(command, timeout=10)
    out = stdout.read().decode()
    err = stderr.read().decode()
    return stdout.channel.recv_exit_status(), out, err


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHDServer]:
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client_key(sshd: SSHDServer) -> paramiko.Ed25519Key:
    pkey, public_line = _new_key()
    sshd.add_authorized_key(public_line)
    return pkey


def test_server_fields(sshd: SSHDServer) -> None:
    assert sshd.host == "127.0.0.1"
    assert 0 < sshd.port < 65536
    assert sshd.host_key_public.startswith("ssh-ed25519 AAAA")
    assert sshd.authorized_keys_file.is_absolute()
    assert sshd.authorized_keys_file.stat().st_mode & 0o777 == 0o600
    assert sshd.home.is_dir()
    assert (sshd.home / ".bashrc").read_text() == ""
    assert (sshd.home / ".profile").read_text() == ""


def test_exec_uses_pinned_home(sshd: SSHDServer, client_key: paramiko.Ed25519Key) -> None:
    client = _connect(sshd, client_key)
    try:
        status, out, err = _run(client, "echo $HOME; true")
        assert status == 0, err
        assert out.strip() == str(sshd.home)
        status, _out, _err = _run(client, "exit 3")
        assert status == 3
    finally:
        client.close()


def test_host_key_matches(sshd: SSHDServer, client_key: paramiko.Ed25519Key) -> None:
    client = _connect(sshd, client_key)
    try:
        transport = client.get_transport()
        assert transport is not None
        key = transport.get_remote_server_key()
        assert f"{key.get_name()} {key.get_base64()}" == sshd.host_key_public
    finally:
        client.close()


def test_sftp_roundtrip(sshd: SSHDServer, client_key: paramiko.Ed25519Key) -> None:
    client = _connect(sshd, client_key)
    try:
        sftp = client.open_sftp()
        try:
            remote = str(sshd.home / "sftp-roundtrip.bin")
            payload = os.urandom(70_000)
            with sftp.open(remote, "wb") as fh:
                fh.write(payload)
            with sftp.open(remote, "rb") as fh:
                assert fh.read() == payload
            assert sftp.stat(remote).st_size == len(payload)
            assert pathlib.Path(remote).read_bytes() == payload
            sftp.remove(remote)
        finally:
            sftp.close()
    finally:
        client.close()


def test_unknown_key_refused(sshd: SSHDServer, client_key: paramiko.Ed25519Key) -> None:
    stranger, _line = _new_key()
    with pytest.raises(paramiko.AuthenticationException):
        _connect(sshd, stranger).close()


def test_shell_reads_rc_from_pinned_home_and_stop(tmp_path: pathlib.Path) -> None:
    """The shell sources <pinned home>/.bashrc, so the real user's rc files do not run."""
    server = start_sshd(tmp_path, max_sessions=2)
    try:
        (server.home / ".bashrc").write_text("export SSHBRIDGE_PINNED_RC=yes\n")
        pkey, line = _new_key()
        server.add_authorized_key(line)
        client = _connect(server, pkey)
        try:
            status, out, err = _run(client, "echo $HOME:${SSHBRIDGE_PINNED_RC:-no}")
            assert status == 0, err
            assert out.strip() == f"{server.home}:yes"
        finally:
            client.close()
        assert "MaxSessions 2" in (server.config_file.read_text() if server.config_file else "")
    finally:
        server.stop()

    # After stop() the port no longer accepts connections.
    def refused() -> bool:
        try:
            socket.create_connection((server.host, server.port), timeout=0.5).close()
        except OSError:
            return True
        return False

    wait_until(refused, 2, "sshd to stop accepting after stop()", 0.05)
    server.stop()  # idempotent


def test_preamble_front_checks_the_session_line(
    sshd: SSHDServer, client_key: paramiko.Ed25519Key
) -> None:
    """PreambleFront: sshd behind the provider's ``PRIME-SSH-SESSION <id>`` line."""
    try:
        from sshd_server import PreambleFront
    except ImportError:
        from tests.sshd_server import PreambleFront

    def raw(front: PreambleFront, line: bytes) -> bytes:
        """What the front sends back to a connection that wrote ``line`` first."""
        with socket.create_connection((front.host, front.port), timeout=5) as sock:
            sock.sendall(line)
            sock.settimeout(5)
            try:
                return sock.recv(64)
            except ConnectionResetError:
                return b""

    allowed = {"sess_ok"}
    with PreambleFront((sshd.host, sshd.port), allowed.__contains__) as front:
        assert front.host == "127.0.0.1" and front.port not in (0, sshd.port)
        sock = socket.create_connection((front.host, front.port), timeout=5)
        sock.sendall(b"PRIME-SSH-SESSION sess_ok\n")
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=5)
            transport.auth_publickey(sshd.username, client_key)
            chan = transport.open_session(timeout=5)
            chan.exec_command("echo through-the-front")
            assert chan.makefile("rb").read() == b"through-the-front\n"
            assert chan.recv_exit_status() == 0
        finally:
            transport.close()
            sock.close()
        assert (front.accepted, front.rejected) == (1, 0)

        rejected_lines = [
            b"PRIME-SSH-SESSION sess_other\n",  # accept() says no
            b"SSH-2.0-paramiko\r\n",  # no preamble at all
            b"PRIME-SSH-SESSION " + b"x" * 300,  # too long, no newline
        ]
        for n, line in enumerate(rejected_lines, 1):
            assert raw(front, line) == b""  # closed before any sshd byte
            wait_until(lambda: front.rejected >= n, 5, "the front to count it", 0.01)  # noqa: B023
            assert front.rejected == n
        sock = socket.create_connection((front.host, front.port), timeout=5)
        sock.sendall(b"PRIME-SSH-SESSION sess_other\n")
        with pytest.raises((paramiko.SSHException, EOFError, OSError)):
            paramiko.Transport(sock).start_client(timeout=5)
        sock.close()
        assert raw(front, b"PRIME-SSH-SESSION sess_ok\n").startswith(b"SSH-2.0-")
        assert front.accepted == 2
    # close() joined everything and stopped listening.
    assert not [t for t in threading.enumerate() if t.name.startswith("preamble-front")]
    with pytest.raises(OSError):
        socket.create_connection((front.host, front.port), timeout=1).close()
