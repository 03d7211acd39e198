"""Everything sshbridge takes from paramiko beyond its documented API, in one place.

Each function here wraps one undocumented attribute, private method or internal module
of paramiko. tests/test_paramiko_contract.py checks every one of them on a real
connection, so a paramiko release that changes them fails there, by name, rather than
deep inside a command or a forward. The rest of the package goes through these
functions and paramiko's public API only.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import paramiko
import paramiko.hostkeys
from paramiko.auth_handler import AuthHandler
from paramiko.common import (
    MSG_CHANNEL_FAILURE,
    MSG_UNIMPLEMENTED,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_FAILED_CONNECT_FAILED,
    OPEN_FAILED_UNKNOWN_CHANNEL_TYPE,
    cMSG_CHANNEL_REQUEST,
    cMSG_SERVICE_REQUEST,
    cMSG_USERAUTH_REQUEST,
)

# paramiko exports the OPEN_FAILED_* codes at its top level, but its stubs only have them
# in paramiko.common.
__all__ = [
    "OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED",
    "OPEN_FAILED_CONNECT_FAILED",
    "OPEN_FAILED_UNKNOWN_CHANNEL_TYPE",
    "PipelinedAuth",
    "adopt_channel",
    "eof_received",
    "exit_status",
    "handshake_done",
    "parse_known_hosts_line",
    "pipelined_publickey_blob",
    "pipelining_possible",
    "quiet_channel_open_failures",
    "send_channel_request",
    "send_eof",
    "set_handshake_timeouts",
    "start_pipelined_publickey",
    "status_event",
    "transport_socket",
    "wait_channel",
    "wake_channel_waiters",
    "watch_channel_failures",
]

_C = TypeVar("_C", bound=paramiko.Channel)

# The text paramiko logs (at ERROR) for every refused channel open.
OPEN_FAILED_LOG_TEXT = "open FAILED"

# paramiko's channel handler table is a private class attribute (typeshed omits it).
_HANDLER_TABLE = "_channel_handler_table"
_HANDLERS: dict[int, Any] = getattr(paramiko.Transport, _HANDLER_TABLE, {})
_CHANNEL_FAILURE: Any = _HANDLERS.get(MSG_CHANNEL_FAILURE)


# -- channels ----------------------------------------------------------------------------


def adopt_channel(chan: paramiko.Channel, cls: type[_C]) -> _C:
    """Make ``chan`` an instance of ``cls``, a subclass of paramiko.Channel that adds
    methods and no state of paramiko's.

    paramiko constructs its Channel objects itself and has no close hook. Re-classing
    keeps the object (paramiko's channel map, handlers, SFTPClient and selectors all see
    the same one) and lets the subclass override close(). It needs Channel to be a plain
    class without __slots__, which the contract test checks.
    """
    chan.__class__ = cls
    assert isinstance(chan, cls)
    return chan


def eof_received(chan: paramiko.Channel) -> bool:
    """The server sent EOF on this channel (paramiko has no public accessor)."""
    return bool(chan.eof_received)


def status_event(chan: paramiko.Channel) -> threading.Event:
    """Set when the exit status arrives or the channel closes.

    exit_status_ready() reads it but cannot wait with a timeout, and recv_exit_status()
    waits forever.
    """
    event: threading.Event = chan.status_event
    return event


def exit_status(chan: paramiko.Channel) -> int:
    """The exit status received so far, -1 if none (never blocks)."""
    return int(chan.exit_status)


def send_eof(chan: paramiko.Channel) -> None:
    """Send EOF under the channel's lock, only while the channel is open and not after
    an EOF already went out. Channel.shutdown_write() checks neither under the lock."""
    transport = chan.get_transport()
    with chan.lock:
        if chan.closed or chan.eof_sent or transport is None:
            return
        m = chan._send_eof()  # type: ignore[attr-defined]
        if m is not None:
            transport._send_user_message(m)  # type: ignore[attr-defined]


def send_channel_request(
    chan: paramiko.Channel, request: str, *args: str | int, want_reply: bool = False
) -> None:
    """An RFC 4254 channel request, not waited for (paramiko has no API for arbitrary
    ones, and waits for every reply it asks); ``args`` go out as strings and uint32s.
    With ``want_reply`` a failure reply closes the channel (paramiko's handling), so
    what is sent behind the request meets a closed channel instead of nothing. Nothing
    is sent on a closed channel."""
    transport = chan.get_transport()
    with chan.lock:
        if chan.closed or transport is None:
            return
        m = paramiko.Message()
        m.add_byte(cMSG_CHANNEL_REQUEST)
        m.add_int(chan.remote_chanid)
        m.add_string(request)
        m.add_boolean(want_reply)
        for arg in args:
            if isinstance(arg, int):
                m.add_int(arg)
            else:
                m.add_string(arg)
        transport._send_user_message(m)  # type: ignore[attr-defined]


def wake_channel_waiters(chan: paramiko.Channel) -> None:
    """Wake threads blocked in wait_channel() on this channel."""
    with chan.lock:
        chan.out_buffer_cv.notify_all()


def wait_channel(chan: paramiko.Channel, done: Callable[[], bool], step: float = 0.5) -> None:
    """Block until the channel closes or ``done()`` is true.

    Waits on the channel's send condition: paramiko notifies it when the channel closes,
    and wake_channel_waiters() does when ``done`` may have changed.
    """
    with chan.lock:
        while not chan.closed and not done():
            chan.out_buffer_cv.wait(step)


# -- transports --------------------------------------------------------------------------


def transport_socket(transport: paramiko.Transport) -> socket.socket | None:
    """The TCP socket under a transport, or None when it is not a real socket."""
    sock = getattr(transport, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def handshake_done(transport: paramiko.Transport) -> bool:
    """The first key exchange finished (start_client can return before it does)."""
    return bool(getattr(transport, "initial_kex_done", False))


def set_handshake_timeouts(transport: paramiko.Transport, timeout: float) -> None:
    """The banner, key exchange and authentication timeouts (plain attributes that
    SSHClient.connect sets; no method for them)."""
    transport.banner_timeout = timeout
    transport.auth_timeout = timeout
    transport.handshake_timeout = timeout


def set_rekey_bytes(transport: paramiko.Transport, limit: int) -> None:
    """Rekey after ``limit`` bytes each way instead of paramiko's 512 MiB: a class
    attribute of its Packetizer, read through the instance on every packet."""
    transport.packetizer.REKEY_BYTES = limit


def watch_channel_failures(
    transport: paramiko.Transport, callback: Callable[[paramiko.Channel], None]
) -> bool:
    """Call ``callback(chan)`` for every MSG_CHANNEL_FAILURE on this transport, before
    paramiko's own handling (which closes the channel as if the server had).

    paramiko looks its channel handlers up on the instance, so this installs a
    per-transport copy of the class table with that one handler wrapped. Installed once
    per transport: a later call keeps the first callback. False when this paramiko has
    no such table (callers then cannot tell a refused request from a closed channel).
    """
    if _CHANNEL_FAILURE is None:
        return False
    if _HANDLER_TABLE in vars(transport):
        return True
    original = _CHANNEL_FAILURE

    def failed(chan: paramiko.Channel, m: paramiko.Message) -> None:
        callback(chan)
        original(chan, m)

    table = dict(getattr(type(transport), _HANDLER_TABLE, _HANDLERS))
    table[MSG_CHANNEL_FAILURE] = failed
    setattr(transport, _HANDLER_TABLE, table)
    return True


# -- authentication ----------------------------------------------------------------------
# paramiko sends its USERAUTH_REQUEST only once SERVICE_ACCEPT arrives, one round trip
# after the SERVICE_REQUEST. Servers handle packets in order, so the request can go right
# behind the SERVICE_REQUEST instead; the functions below do that with paramiko's own
# client AuthHandler, told not to send a second request when the accept comes.

_USERAUTH_SERVICE = "ssh-userauth"
_CONNECTION_SERVICE = "ssh-connection"


def pipelining_possible(transport: paramiko.Transport, key: paramiko.PKey) -> bool:
    """The key's signature algorithm is its own name (not RSA, whose algorithm depends
    on the server's EXT_INFO; not a certificate), and the first key exchange is done."""
    return (
        transport.is_active()
        and handshake_done(transport)
        and isinstance(transport.session_id, bytes)
        and "rsa" not in key.get_name()
        and getattr(key, "public_blob", None) is None
    )


def pipelined_publickey_blob(session_id: bytes, username: str, key: paramiko.PKey) -> bytes:
    """The data a publickey USERAUTH_REQUEST signs (RFC 4252 section 7), as paramiko's
    AuthHandler._get_session_blob builds it for a plain (non-certificate) key."""
    m = paramiko.Message()
    m.add_string(session_id)
    m.add_byte(cMSG_USERAUTH_REQUEST)
    m.add_string(username)
    m.add_string(_CONNECTION_SERVICE)
    m.add_string("publickey")
    m.add_boolean(True)
    m.add_string(key.get_name())
    m.add_string(key.asbytes())
    return m.asbytes()


def _publickey_request(session_id: bytes, username: str, key: paramiko.PKey) -> paramiko.Message:
    algorithm = key.get_name()
    m = paramiko.Message()
    m.add_byte(cMSG_USERAUTH_REQUEST)
    m.add_string(username)
    m.add_string(_CONNECTION_SERVICE)
    m.add_string("publickey")
    m.add_boolean(True)
    m.add_string(algorithm)
    m.add_string(key.asbytes())
    blob = pipelined_publickey_blob(session_id, username, key)
    m.add_string(key.sign_ssh_data(blob, algorithm).asbytes())
    return m


class PipelinedAuth(AuthHandler):
    """paramiko's client AuthHandler for a request already sent: SERVICE_ACCEPT sends
    nothing, and it records whether the server answered in order.

    ``answered`` is true once USERAUTH_SUCCESS, or USERAUTH_FAILURE after SERVICE_ACCEPT,
    arrived: the server took the early request, and its verdict is final. Anything else
    (a disconnect, MSG_UNIMPLEMENTED, a failure before the accept, no answer at all) may
    be a server that does not take a request before it accepted the service.
    """

    def __init__(self, transport: paramiko.Transport) -> None:
        super().__init__(transport)
        self._done = threading.Event()
        self.auth_event = self._done
        self.auth_method = "publickey"
        self.service_accepted = False
        self.answered = False
        self.refusal = ""

    @property
    def refused_early(self) -> bool:
        return not self.answered

    def _wake(self, why: str) -> None:
        self.refusal = self.refusal or why
        self._done.set()

    def _parse_service_accept(self, m: paramiko.Message) -> None:
        if m.get_text() == _USERAUTH_SERVICE:
            self.service_accepted = True
        else:
            self._wake("the server accepted another service")

    def _parse_userauth_success(self, m: paramiko.Message) -> None:
        self.answered = True
        super()._parse_userauth_success(m)  # type: ignore[misc]

    def _parse_userauth_failure(self, m: paramiko.Message) -> None:
        if not self.service_accepted:
            self._wake("USERAUTH_FAILURE before SERVICE_ACCEPT")
            return
        self.answered = True
        super()._parse_userauth_failure(m)  # type: ignore[misc]

    def _parse_unimplemented(self, m: paramiko.Message) -> None:
        self._wake("the server answered MSG_UNIMPLEMENTED")

    @property
    def _client_handler_table(self) -> dict[int, Callable[[paramiko.Message], None]]:
        # paramiko's transport thread dispatches every message it does not handle itself
        # through this table; MSG_UNIMPLEMENTED is added so a refusal wakes the waiter.
        table = dict(super()._client_handler_table)  # type: ignore[misc]
        table[MSG_UNIMPLEMENTED] = self._parse_unimplemented
        return table

    def wait(self) -> None:
        """Block for the result as Transport.auth_publickey does (same timeout, same
        exceptions: AuthenticationException and its subclasses, SSHException, EOFError)."""
        self.wait_for_response(self._done)


def start_pipelined_publickey(
    transport: paramiko.Transport, username: str, key: paramiko.PKey
) -> PipelinedAuth:
    """Send SERVICE_REQUEST("ssh-userauth") and the signed publickey USERAUTH_REQUEST
    back to back; then call ``wait()`` on the result. Needs pipelining_possible()."""
    session_id = transport.session_id
    if session_id is None:
        raise paramiko.SSHException("No existing session")
    handler = PipelinedAuth(transport)
    handler.username = username
    handler.private_key = key
    request = _publickey_request(session_id, username, key)
    service = paramiko.Message()
    service.add_byte(cMSG_SERVICE_REQUEST)
    service.add_string(_USERAUTH_SERVICE)
    # Under the transport lock, as paramiko's own auth_publickey sends its request.
    with transport.lock:
        transport.auth_handler = handler
        transport._send_message(service)  # type: ignore[attr-defined]
        transport._send_message(request)  # type: ignore[attr-defined]
    return handler


class _QuietChannelRefusals(logging.Filter):
    """paramiko logs a refused channel at ERROR; for sshbridge it is routine (another
    connection is tried), so it is demoted to DEBUG instead of reaching stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and OPEN_FAILED_LOG_TEXT in str(record.msg):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_quiet_filter = _QuietChannelRefusals()


def quiet_channel_open_failures() -> None:
    """Install the filter above on paramiko's transport logger (idempotent)."""
    logging.getLogger("paramiko.transport").addFilter(_quiet_filter)


# -- known_hosts -------------------------------------------------------------------------


def parse_known_hosts_line(
    line: str, lineno: int | None = None
) -> paramiko.hostkeys.HostKeyEntry | None:
    """One known_hosts line (no marker), or None if paramiko cannot read it.

    HostKeyEntry.from_line raises paramiko.hostkeys.InvalidHostKey, which the package
    does not export, for a key it cannot decode.
    """
    try:
        entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
    except (paramiko.hostkeys.InvalidHostKey, paramiko.SSHException, ValueError, TypeError):
        return None
    if entry is None or entry.key is None or not entry.hostnames:
        return None
    return entry
