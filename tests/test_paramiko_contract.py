"""What sshbridge relies on in paramiko beyond its documented API, checked on a real
connection. A paramiko release that renames or drops any of these fails here, loudly and
by name, instead of somewhere deep in a transfer; the version bound in pyproject.toml is
the range this test has passed on."""

from __future__ import annotations

import io
from collections.abc import Iterator

import paramiko
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sshd_server import SSHDServer, find_sshd, start_sshd

if find_sshd() is None:
    pytest.skip("OpenSSH sshd is not installed (apt-get install openssh-server)",
                allow_module_level=True)  # fmt: skip

# (where, name): class-level attributes and methods.
CLASS_PRIVATES = [
    (paramiko.Channel, "_send_eof"),
    (paramiko.Channel, "_event_pending"),
    (paramiko.Transport, "_send_user_message"),
    (paramiko.Transport, "_channel_handler_table"),
]
# Attributes of live objects: a channel, its transport, an SFTP client.
CHANNEL_ATTRS = [
    "lock", "status_event", "in_buffer", "out_buffer_cv", "remote_chanid",
    "out_max_packet_size", "in_window_size", "eof_received", "eof_sent", "closed",
]  # fmt: skip
TRANSPORT_ATTRS = ["sock", "initial_kex_done", "active"]
SFTP_ATTRS = ["_lock", "request_number", "sock"]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SSHDServer, paramiko.PKey]]:
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    pem = Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()
    )
    key = paramiko.Ed25519Key(file_obj=io.StringIO(pem.decode()))
    server.add_authorized_key(f"{key.get_name()} {key.get_base64()}")
    yield server, key
    server.stop()


def test_class_level_internals_exist() -> None:
    missing = [f"{cls.__name__}.{name}" for cls, name in CLASS_PRIVATES if not hasattr(cls, name)]
    assert not missing, f"paramiko {paramiko.__version__} lacks {missing}"
    from paramiko.common import MSG_CHANNEL_FAILURE, MSG_CHANNEL_SUCCESS

    table = paramiko.Transport._channel_handler_table  # type: ignore[attr-defined]
    assert MSG_CHANNEL_FAILURE in table and MSG_CHANNEL_SUCCESS in table


def test_live_object_internals_exist(sshd: tuple[SSHDServer, paramiko.PKey]) -> None:
    server, key = sshd
    transport = paramiko.Transport((server.host, server.port))
    try:
        transport.start_client(timeout=10)
        transport.auth_publickey(server.username, key)
        missing = [f"Transport.{a}" for a in TRANSPORT_ATTRS if not hasattr(transport, a)]
        chan = transport.open_session()
        missing += [f"Channel.{a}" for a in CHANNEL_ATTRS if not hasattr(chan, a)]
        assert isinstance(chan.in_buffer, paramiko.buffered_pipe.BufferedPipe)
        chan.close()
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        missing += [f"SFTPClient.{a}" for a in SFTP_ATTRS if not hasattr(sftp, a)]
        sftp.close()
        assert not missing, f"paramiko {paramiko.__version__} lacks {missing}"
    finally:
        transport.close()
