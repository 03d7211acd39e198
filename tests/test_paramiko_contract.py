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
from emu_helpers import wait_until
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


# -- what sshbridge._compat relies on ------------------------------------------------------
# Every private or undocumented paramiko name the shim touches is listed here, then each
# shim function is run against sshd, so a change in paramiko fails by name.

COMPAT_CLASS_PRIVATES = [
    (paramiko.Channel, "_send_eof"),
    (paramiko.Channel, "__del__"),
    (paramiko.Transport, "_send_user_message"),
    (paramiko.Transport, "_channel_handler_table"),
]
COMPAT_CHANNEL_ATTRS = [
    "lock", "out_buffer_cv", "eof_received", "eof_sent", "status_event", "exit_status",
    "remote_chanid", "closed",
]  # fmt: skip
COMPAT_TRANSPORT_ATTRS = [
    "sock", "initial_kex_done", "banner_timeout", "auth_timeout", "handshake_timeout",
    "session_id", "auth_handler", "lock",
]  # fmt: skip
COMPAT_COMMON = [
    "MSG_CHANNEL_FAILURE", "cMSG_CHANNEL_REQUEST", "OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED",
    "OPEN_FAILED_CONNECT_FAILED", "OPEN_FAILED_UNKNOWN_CHANNEL_TYPE",
    "MSG_UNIMPLEMENTED", "cMSG_SERVICE_REQUEST", "cMSG_USERAUTH_REQUEST",
]  # fmt: skip
# The pipelined publickey authentication: paramiko's client AuthHandler, subclassed.
COMPAT_AUTH_METHODS = [
    "_parse_service_accept", "_parse_userauth_success", "_parse_userauth_failure",
    "wait_for_response",
]  # fmt: skip
COMPAT_AUTH_PROPERTIES = ["_client_handler_table", "_handler_table"]


def _connect(server: SSHDServer, key: paramiko.PKey) -> paramiko.Transport:
    transport = paramiko.Transport((server.host, server.port))
    transport.start_client(timeout=10)
    transport.auth_publickey(server.username, key)
    return transport


def test_compat_class_level_internals() -> None:
    import inspect

    import paramiko.common
    import paramiko.hostkeys
    import paramiko.transport

    from sshbridge import _compat

    missing = [
        f"{cls.__name__}.{name}" for cls, name in COMPAT_CLASS_PRIVATES if not hasattr(cls, name)
    ]
    missing += [f"paramiko.common.{n}" for n in COMPAT_COMMON if not hasattr(paramiko.common, n)]
    for name in ("HostKeyEntry", "InvalidHostKey"):
        if not hasattr(paramiko.hostkeys, name):
            missing.append(f"paramiko.hostkeys.{name}")
    assert not missing, f"paramiko {paramiko.__version__} lacks {missing}"
    # The handler the shim wraps is the one paramiko dispatches failure replies to.
    table = paramiko.Transport._channel_handler_table  # type: ignore[attr-defined]
    assert _compat._CHANNEL_FAILURE is table[paramiko.common.MSG_CHANNEL_FAILURE]
    assert issubclass(paramiko.hostkeys.InvalidHostKey, Exception)
    # Re-classing a channel needs a plain class: no __slots__ anywhere in its MRO.
    slotted = [c.__name__ for c in paramiko.Channel.__mro__ if "__slots__" in vars(c)]
    assert not slotted, f"paramiko.Channel's bases now use __slots__: {slotted}"
    # The refused-channel log line the transport logger filter demotes.
    assert _compat.OPEN_FAILED_LOG_TEXT in inspect.getsource(paramiko.transport)


def test_link_channel_names_do_not_shadow_paramiko() -> None:
    from sshbridge._link import LinkChannel

    own = [n for n in vars(LinkChannel) if not n.startswith("__") and n != "close"]
    assert own, "LinkChannel lost its members?"
    clash = [n for n in own if hasattr(paramiko.Channel, n) or hasattr(paramiko.Channel(0), n)]
    assert not clash, f"paramiko {paramiko.__version__} now defines {clash} on Channel"


def test_compat_transport_functions(sshd: tuple[SSHDServer, paramiko.PKey]) -> None:
    import socket

    from sshbridge import _compat

    server, key = sshd
    transport = _connect(server, key)
    try:
        missing = [f"Transport.{a}" for a in COMPAT_TRANSPORT_ATTRS if not hasattr(transport, a)]
        assert not missing, f"paramiko {paramiko.__version__} lacks {missing}"
        assert isinstance(_compat.transport_socket(transport), socket.socket)
        assert _compat.handshake_done(transport)
        _compat.set_handshake_timeouts(transport, 7.5)
        assert transport.banner_timeout == transport.auth_timeout == 7.5
        assert transport.handshake_timeout == 7.5
    finally:
        transport.close()


def test_compat_channel_functions(sshd: tuple[SSHDServer, paramiko.PKey]) -> None:
    import threading

    from sshbridge import _compat

    server, key = sshd
    transport = _connect(server, key)
    try:
        chan = transport.open_session()
        missing = [f"Channel.{a}" for a in COMPAT_CHANNEL_ATTRS if not hasattr(chan, a)]
        assert not missing, f"paramiko {paramiko.__version__} lacks {missing}"
        assert isinstance(_compat.status_event(chan), threading.Event)
        assert _compat.exit_status(chan) == -1 and not _compat.eof_received(chan)
        # send_eof: cat sees EOF and exits 0; a second EOF is never sent.
        chan.exec_command("cat")
        _compat.send_eof(chan)
        assert chan.eof_sent
        _compat.send_eof(chan)
        assert _compat.status_event(chan).wait(10)
        assert _compat.exit_status(chan) == 0
        assert wait_until(lambda: _compat.eof_received(chan), what="the server's EOF")
        # wait_channel returns when paramiko closes the channel (it notifies the send
        # condition on close) ...
        assert wait_until(lambda: chan.closed, what="the channel to close")
        _compat.wait_channel(chan, lambda: False, step=5.0)
        chan.close()
        _compat.send_eof(chan)  # nothing is sent on a closed channel

        # ... and when woken with its condition true.
        chan = transport.open_session()
        chan.exec_command("sleep 30")
        flag = threading.Event()
        asked = threading.Event()

        def done() -> bool:
            asked.set()
            return flag.is_set()

        waiter = threading.Thread(target=_compat.wait_channel, args=(chan, done, 5.0))
        waiter.start()
        # Asked once: it holds chan.lock until it waits, so the wake below comes after.
        wait_until(asked.is_set, what="wait_channel to check its condition")
        flag.set()
        _compat.wake_channel_waiters(chan)
        waiter.join(2.0)
        assert not waiter.is_alive(), "wake_channel_waiters did not wake wait_channel"
        # A "signal" request goes out without breaking the connection (sshd honours it
        # only with privilege separation, which a test sshd has not).
        _compat.send_channel_request(chan, "signal", "KILL")
        chan.close()
        _compat.send_channel_request(chan, "signal", "KILL")  # closed: nothing sent
        assert transport.is_active()

        # send_channel_request's framing, checked by an effect: a "window-change" that
        # the command sees.
        chan = transport.open_session()
        chan.get_pty(width=80, height=24)
        chan.exec_command(
            "trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 0.05; done"
        )
        out = b""
        while b"ready" not in out:
            data = chan.recv(100)
            assert data, "the command ended early"
            out += data
        _compat.send_channel_request(chan, "window-change", 123, 45, 0, 0)
        assert _compat.status_event(chan).wait(10), "window-change had no effect"
        rest = b""
        while data := chan.recv(100):
            rest += data
        assert b"45 123" in rest, rest
        assert _compat.exit_status(chan) == 0
        chan.close()
    finally:
        transport.close()


def test_compat_watch_channel_failures(sshd: tuple[SSHDServer, paramiko.PKey]) -> None:
    from sshbridge import _compat

    server, key = sshd
    transport = _connect(server, key)
    try:
        failed: list[paramiko.Channel] = []
        assert _compat.watch_channel_failures(transport, failed.append)
        assert _compat.watch_channel_failures(transport, failed.append)  # once per transport
        chan = transport.open_session()
        with pytest.raises(paramiko.SSHException):
            chan.invoke_subsystem("sshbridge-no-such-subsystem")
        assert failed == [chan]
        assert chan.closed and transport.is_active()
        ok = transport.open_session()  # the other handlers still work
        ok.exec_command("true")
        assert ok.recv_exit_status() == 0
        assert failed == [chan]
    finally:
        transport.close()


def test_compat_subsystem_request_pipelined_with_its_data(
    sshd: tuple[SSHDServer, paramiko.PKey],
) -> None:
    # Link.sftp sends the SFTP INIT right behind a "subsystem" request it does not wait
    # for: the server starts the subsystem and feeds it that data; a refused one closes
    # the channel, so the INIT's answer is an EOF rather than a hang.
    from sshbridge import _compat

    server, key = sshd
    transport = _connect(server, key)
    try:
        chan = transport.open_session()
        _compat.send_channel_request(chan, "subsystem", "sftp", want_reply=True)
        client = paramiko.SFTPClient(chan)
        assert client.normalize(".").startswith("/")
        assert client.stat(str(server.home)).st_mode is not None
        client.close()
        bad = transport.open_session()
        bad.settimeout(10)
        _compat.send_channel_request(bad, "subsystem", "sshbridge-no-such", want_reply=True)
        # The failure reply closes the channel: before the INIT is sent (OSError
        # "Socket is closed") or after it (the INIT's answer is an EOF, SSHException);
        # Link.sftp handles both.
        with pytest.raises((paramiko.SSHException, OSError)):
            paramiko.SFTPClient(bad)
        assert bad.closed and transport.is_active()
    finally:
        transport.close()


def test_compat_adopt_channel(sshd: tuple[SSHDServer, paramiko.PKey]) -> None:
    import gc

    from sshbridge import _compat

    closed: list[str] = []

    class Recorded(paramiko.Channel):
        tag = ""

        def close(self) -> None:
            try:
                super().close()
            finally:
                closed.append(self.tag)

    server, key = sshd
    transport = _connect(server, key)
    try:
        chan = _compat.adopt_channel(transport.open_session(), Recorded)
        assert isinstance(chan, Recorded) and isinstance(chan, paramiko.Channel)
        chan.tag = "explicit"
        chan.exec_command("echo hi")
        assert chan.recv(10) == b"hi\n"
        chan.close()
        assert closed == ["explicit"]
        # A channel dropped without close() is closed by paramiko's __del__, through
        # the subclass: a Link slot is given back either way.
        dropped = _compat.adopt_channel(transport.open_session(), Recorded)
        dropped.tag = "dropped"
        del dropped
        gc.collect()
        assert wait_until(lambda: "dropped" in closed, 5.0, lambda: f"'dropped' in {closed}")
    finally:
        transport.close()


def test_compat_known_hosts_line() -> None:
    from sshbridge import _compat

    pem = Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()
    )
    key = paramiko.Ed25519Key(file_obj=io.StringIO(pem.decode()))
    entry = _compat.parse_known_hosts_line(f"sbx_1,[h]:2222 {key.get_name()} {key.get_base64()}")
    assert entry is not None and entry.key == key and entry.hostnames == ["sbx_1", "[h]:2222"]
    assert _compat.parse_known_hosts_line("sbx_1 ssh-ed25519 AAAAnot-base64!!") is None
    assert _compat.parse_known_hosts_line("just-one-field") is None


# -- pipelined publickey authentication ------------------------------------------------------


def test_compat_auth_handler_internals() -> None:
    import inspect
    import socket

    import paramiko.auth_handler
    from paramiko.common import (
        MSG_SERVICE_ACCEPT,
        MSG_UNIMPLEMENTED,
        MSG_USERAUTH_FAILURE,
        MSG_USERAUTH_SUCCESS,
    )

    from sshbridge import _compat

    handler_cls = paramiko.auth_handler.AuthHandler
    missing = [f"AuthHandler.{n}" for n in COMPAT_AUTH_METHODS if not callable(
        getattr(handler_cls, n, None))]  # fmt: skip
    missing += [
        f"AuthHandler.{n} (a property)"
        for n in COMPAT_AUTH_PROPERTIES
        if not isinstance(inspect.getattr_static(handler_cls, n, None), property)
    ]
    missing += [] if callable(getattr(paramiko.Transport, "_send_message", None)) else [
        "Transport._send_message"]  # fmt: skip
    assert not missing, f"paramiko {paramiko.__version__} lacks {missing}"

    sock = socket.socket()
    try:
        transport = paramiko.Transport(sock)  # client mode, never started
        # A client handler dispatches the server's answers through methods looked up by
        # name, so the subclass's overrides are the ones paramiko calls ...
        plain = handler_cls(transport)._handler_table
        for ptype, name in (
            (MSG_SERVICE_ACCEPT, "_parse_service_accept"),
            (MSG_USERAUTH_SUCCESS, "_parse_userauth_success"),
            (MSG_USERAUTH_FAILURE, "_parse_userauth_failure"),
        ):
            assert plain[ptype].__name__ == name, (ptype, plain[ptype])
        ours = _compat.PipelinedAuth(transport)._handler_table
        for ptype in (MSG_SERVICE_ACCEPT, MSG_USERAUTH_SUCCESS, MSG_USERAUTH_FAILURE):
            assert ours[ptype].__func__ is vars(_compat.PipelinedAuth)[plain[ptype].__name__]
        assert ours[MSG_UNIMPLEMENTED].__self__.__class__ is _compat.PipelinedAuth
        # ... and the transport handles none of these itself: they reach the auth handler.
        own = set(transport._handler_table) | set(  # type: ignore[attr-defined]
            paramiko.Transport._channel_handler_table  # type: ignore[attr-defined]
        )
        taken = {MSG_SERVICE_ACCEPT, MSG_USERAUTH_SUCCESS, MSG_USERAUTH_FAILURE, MSG_UNIMPLEMENTED}
        assert not own & taken, own & taken
    finally:
        sock.close()
    run = inspect.getsource(paramiko.Transport.run)
    assert "self.auth_handler._handler_table" in run, "the run loop no longer asks auth_handler"
    # paramiko's own accept handler is the one that sends the request (so the subclass
    # must not call it), and auth_publickey installs its handler as an attribute.
    assert "cMSG_USERAUTH_REQUEST" in inspect.getsource(handler_cls._parse_service_accept)
    assert "self.auth_handler = AuthHandler(self)" in inspect.getsource(
        paramiko.Transport.auth_publickey
    )


def test_compat_pipelined_publickey(sshd: tuple[SSHDServer, paramiko.PKey]) -> None:
    import paramiko.auth_handler

    from sshbridge import _compat

    server, key = sshd
    transport = paramiko.Transport((server.host, server.port))
    try:
        transport.start_client(timeout=10)
        missing = [f"Transport.{a}" for a in COMPAT_TRANSPORT_ATTRS if not hasattr(transport, a)]
        assert not missing, f"paramiko {paramiko.__version__} lacks {missing}"
        assert _compat.pipelining_possible(transport, key)
        # The signed data is byte for byte what paramiko's own client signs.
        session_id = transport.session_id
        assert isinstance(session_id, bytes)
        reference = paramiko.auth_handler.AuthHandler(transport)._get_session_blob(  # type: ignore[attr-defined]
            key, "ssh-connection", server.username, key.get_name()
        )
        assert _compat.pipelined_publickey_blob(session_id, server.username, key) == reference

        auth = _compat.start_pipelined_publickey(transport, server.username, key)
        assert transport.auth_handler is auth
        auth.wait()
        assert transport.is_authenticated() and transport.get_username() == server.username
        assert auth.service_accepted and auth.answered and not auth.refused_early
        chan = transport.open_session()
        chan.exec_command("true")
        assert chan.recv_exit_status() == 0
        # The accept sent no second request: sshd answers one after success with
        # MSG_UNIMPLEMENTED, which the handler would have recorded by now.
        assert auth.refusal == "", auth.refusal
    finally:
        transport.close()


def test_compat_pipelined_publickey_refused_key(sshd: tuple[SSHDServer, paramiko.PKey]) -> None:
    from sshbridge import _compat

    server, _ = sshd
    pem = Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()
    )
    stranger = paramiko.Ed25519Key(file_obj=io.StringIO(pem.decode()))
    transport = paramiko.Transport((server.host, server.port))
    try:
        transport.start_client(timeout=10)
        auth = _compat.start_pipelined_publickey(transport, server.username, stranger)
        # The same exception paramiko's auth_publickey raises, answered in order.
        with pytest.raises(paramiko.AuthenticationException) as info:
            auth.wait()
        assert type(info.value) is paramiko.AuthenticationException
        assert auth.service_accepted and auth.answered and not auth.refused_early
        assert transport.is_active() and not transport.is_authenticated()
        # RSA keys (algorithm chosen from the server's EXT_INFO) keep paramiko's path.
        assert not _compat.pipelining_possible(transport, paramiko.RSAKey.generate(1024))
    finally:
        transport.close()
