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
from paramiko.common import (
    MSG_CHANNEL_FAILURE,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_FAILED_CONNECT_FAILED,
    OPEN_FAILED_UNKNOWN_CHANNEL_TYPE,
    cMSG_CHANNEL_REQUEST,
)

# paramiko exports the OPEN_FAILED_* codes at its top level, but its stubs only have them
# in paramiko.common.
__all__ = [
    "OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED",
    "OPEN_FAILED_CONNECT_FAILED",
    "OPEN_FAILED_UNKNOWN_CHANNEL_TYPE",
    "adopt_channel",
    "eof_received",
    "exit_status",
    "handshake_done",
    "parse_known_hosts_line",
    "quiet_channel_open_failures",
    "send_channel_request",
    "send_eof",
    "set_handshake_timeouts",
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


def send_channel_request(chan: paramiko.Channel, request: str, *args: str | int) -> None:
    """An RFC 4254 channel request, no reply wanted (paramiko has no API for arbitrary
    ones); ``args`` go out as strings and uint32s. Nothing is sent on a closed channel."""
    transport = chan.get_transport()
    with chan.lock:
        if chan.closed or transport is None:
            return
        m = paramiko.Message()
        m.add_byte(cMSG_CHANNEL_REQUEST)
        m.add_int(chan.remote_chanid)
        m.add_string(request)
        m.add_boolean(False)
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
