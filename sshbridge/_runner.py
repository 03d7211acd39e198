"""Running one command on an SSH channel.

Both output streams are drained in one loop, woken by the channel's event pipe, so neither
stream can fill its window while the other is being read (the classic paramiko deadlock:
reading stdout to the end, or waiting for the exit status, before draining stderr).
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import math
import re
import selectors
import shlex
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import paramiko

from . import _compat
from ._cancel import CANCEL_VAR, kill_script, split_token
from ._exceptions import (
    ChannelRequestRefused,
    CommandError,
    CommandTimeout,
    ConnectionLost,
    InvalidArgument,
)
from ._link import LinkChannel
from ._result import CommandResult
from ._retry import Backoff

log = logging.getLogger("sshbridge.run")

OutputCallback = Callable[[str], None]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_READ = 1 << 20
# The terminal's EOF character (VEOF, Ctrl-D): on a pty, the channel's EOF never reaches
# the command, since sshd cannot half-close a terminal.
_VEOF = b"\x04"
# A refused exec/pty request is retried this long at most (like a refused channel open).
REQUEST_RETRY_TIMEOUT = 30.0
# How long stop_remote waits for its kill script (TERM, grace, KILL: well under a second).
STOP_TIMEOUT = 10.0


def check_timeout(value: object, name: str = "timeout") -> float | None:
    """None, or a finite positive number of seconds; anything else is refused up front."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidArgument(
            f"{name} must be a finite positive number of seconds (or None), got {value!r}"
        )
    return float(value)


class ChannelSource(Protocol):
    def open_channel(self) -> paramiko.Channel: ...

    def lost_error(self, what: str) -> ConnectionLost: ...


def build_command(
    command: str | Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    marker: str | None = None,
) -> tuple[str, str]:
    """Return (display form, wire form). Argv lists are quoted with ``shlex``.

    ``env`` is exported in the command itself: sshd ignores "env" requests unless
    ``AcceptEnv`` allows them, so that route is unreliable.
    """
    if isinstance(command, (list, tuple)):
        if not command:
            raise InvalidArgument("command list is empty; pass at least the program name")
        for part in command:
            if not isinstance(part, str):
                raise InvalidArgument(
                    f"command list items must be strings, got {type(part).__name__}"
                )
            if "\x00" in part:
                raise InvalidArgument("command arguments cannot contain NUL bytes")
        display = shlex.join(command)
    elif isinstance(command, str):
        if not command.strip():
            raise InvalidArgument("command is empty")
        if "\x00" in command:
            raise InvalidArgument("command cannot contain NUL bytes")
        display = command
    else:
        raise InvalidArgument(
            f"command must be a string or a list of strings, got {type(command).__name__}"
        )
    lines: list[str] = []
    exports: list[str] = []
    if marker:
        exports.append(f"{CANCEL_VAR}={marker}")
    if env is not None:
        if not isinstance(env, Mapping):
            raise InvalidArgument("env must be a mapping of names to string values")
        for name, value in env.items():
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise InvalidArgument(f"env name {name!r} is not a valid variable name")
            if not isinstance(value, str):
                raise InvalidArgument(f"env value for {name} must be a string")
            if "\x00" in value:
                raise InvalidArgument(f"env value for {name} cannot contain NUL bytes")
            exports.append(f"{name}={shlex.quote(value)}")
    if exports:
        lines.append("export " + " ".join(exports))
    if cwd is not None:
        if not isinstance(cwd, str) or not cwd or "\x00" in cwd:
            raise InvalidArgument("cwd must be a non-empty path string")
        # `cd -- -` still means $OLDPWD: a leading '-' is always a path here.
        path = "./" + cwd if cwd.startswith("-") else cwd
        lines.append(f"cd -- {shlex.quote(path)} || exit 125")
    lines.append(display)
    return display, "\n".join(lines)


def send_eof(chan: paramiko.Channel) -> None:
    """EOF only while the channel is open, under its lock.

    An EOF for a channel sshd has already freed makes it drop the whole connection
    ("ieof packet referred to nonexistent channel"), killing every other command on it.
    """
    _compat.send_eof(chan)


def send_signal(chan: paramiko.Channel, name: str) -> None:
    """RFC 4254 "signal" request (paramiko has no API for it). Best effort, no reply."""
    _compat.send_channel_request(chan, "signal", name)


class _Stream:
    """Collects one output stream; feeds the user's callback text chunks or whole lines."""

    def __init__(self, callback: OutputCallback | None, lines: bool, encoding: str) -> None:
        self.parts: list[bytes] = []
        self.callback = callback
        self.lines = lines
        self.decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        self.pending = ""

    def feed(self, data: bytes) -> None:
        self.parts.append(data)
        if self.callback is None:
            return
        text = self.decoder.decode(data)
        if not self.lines:
            if text:
                self.callback(text)
            return
        text = self.pending + text
        *complete, self.pending = text.split("\n")
        for line in complete:
            self.callback(line + "\n")

    def finish(self) -> bytes:
        if self.callback is not None:
            tail = self.decoder.decode(b"", final=True)
            if self.lines:
                tail = self.pending + tail
                self.pending = ""
            if tail:
                self.callback(tail)
        return b"".join(self.parts)


def _feed_input(chan: paramiko.Channel, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            if chan.closed:
                return
            sent = chan.send(view[:_READ])  # type: ignore[arg-type]  # accepts any buffer
            if sent <= 0:
                return
            view = view[sent:]
    except (OSError, EOFError, paramiko.SSHException):
        return
    finally:
        send_eof(chan)


def pty_input(data: bytes) -> bytes:
    """What a pty channel is sent for ``data``: the data, then the terminal's EOF.

    A Ctrl-D at the start of a line is EOF; after a partial line it hands that line over
    without a newline, and a second one is then EOF. So the command reads ``data``
    exactly, then EOF, as on the non-pty path (nothing added, and Ctrl-D is not echoed).
    """
    if not data or data.endswith((b"\n", b"\r")):
        return data + _VEOF
    return data + _VEOF + _VEOF


# -- refused requests ------------------------------------------------------------------


# Channels whose last request got the server's failure reply (weak: no channel is kept).
_refused: weakref.WeakSet[paramiko.Channel] = weakref.WeakSet()


def _watch_refusals(transport: paramiko.Transport | None) -> None:
    """Let this transport mark a channel whose request got a failure reply.

    paramiko reports that reply (MSG_CHANNEL_FAILURE) like a channel closed by the
    server, "Channel closed.", so without this a refused exec looks like a lost
    connection.
    """
    if transport is not None:
        _compat.watch_channel_failures(transport, _refused.add)


def start_command(
    source: ChannelSource,
    wire: str,
    display: str,
    *,
    pty: bool = False,
    term: str = "xterm",
    size: tuple[int, int] = (80, 24),
    deadline: float | None = None,
) -> paramiko.Channel:
    """A channel running ``wire``. A refused request is retried like a refused open.

    The server's failure reply to ``pty-req`` or ``exec`` proves the command never
    started, so it is safe to try again: the connection counts as full at its load (as
    after a refused open) and the next channel goes to another connection, or a new
    one. A refusal on a connection that carries nothing else of ours cannot be about
    load, so it is reported at once instead of being retried to the deadline.
    """
    first = time.monotonic()
    limit = first + REQUEST_RETRY_TIMEOUT
    if deadline is not None:
        limit = min(limit, deadline)
    backoff = Backoff(0.01, 0.25)
    resends = 0
    while True:
        chan = source.open_channel()
        transport = chan.get_transport()
        _watch_refusals(transport)
        what = "pty-req" if pty else "exec"
        try:
            if pty:
                chan.get_pty(term=term, width=size[0], height=size[1])
            what = "exec"
            chan.exec_command(wire)
            return chan
        except (paramiko.SSHException, EOFError, OSError) as exc:
            refused = chan in _refused
            alive = transport is not None and transport.is_active()
            linked = chan if isinstance(chan, LinkChannel) else None
            spare = linked is not None and linked.sshbridge_spare
            unsent = isinstance(exc, (EOFError, OSError))  # the request could not go out
            if not refused and resends < 2 and (unsent or (spare and alive)):
                # Never started: the request was not sent (the connection was already
                # gone), or a channel opened ahead of need was closed by the server just
                # before it. Try again on a fresh channel (the link reconnects if needed).
                resends += 1
                chan.close()
                continue
            # The link counts the connection as full; True when it carries other
            # channels, i.e. the refusal may be about load.
            busy = False
            if refused and alive and linked is not None:
                busy = linked.sshbridge_note_refusal()
            chan.close()
            if not (refused and alive):
                what_failed = f"starting {short_display(display)} failed: {exc}"
                raise source.lost_error(what_failed) from None
        except BaseException:
            chan.close()
            raise
        if not busy or time.monotonic() >= limit:
            raise ChannelRequestRefused(
                f"the server refused the {what!r} request for {short_display(display)} (the "
                "connection is fine; the command never started)"
                + (f"; still refused after {time.monotonic() - first:.1f} s" if busy else ""),
                request=what,
            )
        log.debug("%s refused on a busy connection; retrying elsewhere", what)
        time.sleep(min(backoff.next(), max(0.0, limit - time.monotonic())))


# -- running ---------------------------------------------------------------------------


def execute(
    source: ChannelSource,
    command: str | Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    input: str | bytes | None = None,
    timeout: float | None = None,
    check: bool = False,
    pty: bool = False,
    term: str = "xterm",
    size: tuple[int, int] = (80, 24),
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
    line_buffered: bool = False,
    encoding: str = "utf-8",
) -> CommandResult:
    timeout = check_timeout(timeout)
    if input is not None and not isinstance(input, (str, bytes, bytearray)):
        raise InvalidArgument("input must be str or bytes")
    for name, cb in (("on_stdout", on_stdout), ("on_stderr", on_stderr)):
        if cb is not None and not callable(cb):
            raise InvalidArgument(f"{name} must be callable")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise InvalidArgument(f"unknown encoding {encoding!r}") from None
    # The call's cancel token: a Fleet's or AsyncSandboxSSH's own when given, so that
    # their cancellation and this timeout stop the same processes.
    token, env = split_token(env)
    display, wire = build_command(command, cwd=cwd, env=env, marker=token)
    data = input.encode(encoding) if isinstance(input, str) else bytes(input or b"")
    if pty:
        data = pty_input(data)

    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    try:
        chan = start_command(
            source, wire, display, pty=pty, term=term, size=size, deadline=deadline
        )
    except BaseException as exc:
        # Refused (never started) or the connection is gone: nothing to stop. But Ctrl-C
        # during the exec round trip: the server may have started it already.
        if not isinstance(exc, Exception):
            with contextlib.suppress(BaseException):
                stop_remote(source, token)
        raise
    out = _Stream(on_stdout, line_buffered, encoding)
    err = _Stream(on_stderr, line_buffered, encoding)
    feeder: threading.Thread | None = None
    sel: selectors.BaseSelector | None = None
    finished = False
    try:
        if data:
            feeder = threading.Thread(
                target=_feed_input, args=(chan, data), name="sshbridge-stdin", daemon=True
            )
            feeder.start()
        else:
            # Like `ssh -n`: a command that reads stdin sees EOF instead of hanging.
            send_eof(chan)
        sel = selectors.DefaultSelector()
        sel.register(chan.fileno(), selectors.EVENT_READ)
        timed_out = False
        while True:
            while chan.recv_ready():
                out.feed(chan.recv(_READ))
            while chan.recv_stderr_ready():
                err.feed(chan.recv_stderr(_READ))
            if (_compat.eof_received(chan) or chan.closed) and not (
                chan.recv_ready() or chan.recv_stderr_ready()
            ):
                break
            wait = 1.0
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    timed_out = True
                    break
                wait = min(wait, 1.0)
            # paramiko clears the pipe itself when its buffers are read empty.
            sel.select(wait)
            transport = chan.get_transport()
            dead = transport is None or not transport.is_active()
            if dead and not (chan.recv_ready() or chan.recv_stderr_ready()):
                break
        status = _compat.status_event(chan)
        if not timed_out:
            while not status.is_set():
                wait = 1.0 if deadline is None else deadline - time.monotonic()
                if wait <= 0:
                    timed_out = True
                    break
                status.wait(min(wait, 1.0))
                transport = chan.get_transport()
                if transport is None or not transport.is_active():
                    break
        duration = time.monotonic() - start
        if timed_out:
            stopped = stop_remote(source, token, chan=chan)
            result = CommandResult(
                display, -1, out.finish(), err.finish(), duration, encoding=encoding
            )
            how = (
                "it was stopped on the sandbox"
                if stopped
                else "stopping it on the sandbox failed, so it may still run"
            )
            raise CommandTimeout(
                f"command {short_display(display)} did not finish within {timeout:g} s; {how} "
                "(use spawn() for long-running work, or raise timeout)",
                result=result,
                timeout=float(timeout or 0),
            )
        status_known = status.is_set() and _compat.exit_status(chan) != -1
        if not status_known and connection_going_down(chan):
            raise source.lost_error(f"while running {short_display(display)}")
        result = CommandResult(
            display,
            chan.recv_exit_status() if status_known else -1,
            out.finish(),
            err.finish(),
            duration,
            encoding=encoding,
        )
        finished = True
    except BaseException:
        if not finished and not chan.closed:
            # Interrupted (Ctrl-C, callback error, lost link): don't leave it running.
            with contextlib.suppress(BaseException):  # cleanup must not mask the cause
                stop_remote(source, token, chan=chan)
        raise
    finally:
        if sel is not None:
            sel.close()
        chan.close()
        if feeder is not None:
            feeder.join(timeout=1.0)
    if check and not result.ok:
        raise CommandError(
            f"command {short_display(display)} exited with status {result.exit_code}"
            + (f": {_tail(result.stderr)}" if result.stderr_bytes else ""),
            result=result,
        )
    return result


def connection_going_down(chan: paramiko.Channel, grace: float = 0.3) -> bool:
    """A channel closed with no exit status: a signal-killed command (OpenSSH sends only
    exit-signal), or the first sign of a dropped connection, whose channels close just
    before the transport does. Tell them apart by watching the transport briefly."""
    end = time.monotonic() + grace
    while True:
        transport = chan.get_transport()
        if transport is None or not transport.is_active():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)


def stop_remote(
    source: ChannelSource,
    token: str,
    *,
    chan: paramiko.Channel | None = None,
    timeout: float = STOP_TIMEOUT,
) -> bool:
    """THE way a command is stopped: run() timeouts, Ctrl-C in run(), asyncio and Fleet
    cancellation all come here.

    An RFC 4254 signal request on the command's own channel (if given; best effort, not
    every server honours it), then the kill script (``_cancel.kill_script``: TERM, grace,
    KILL, whole trees, by token) on a channel of its own. True if the script ran to its
    end. The command's channel is closed afterwards.
    """
    try:
        if chan is not None:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                send_signal(chan, "TERM")
        script = kill_script(token)
        try:
            killer = start_command(
                source, script, "the kill script", deadline=time.monotonic() + timeout
            )
        except Exception:  # reported to the caller as "did not run"
            log.debug("could not start the kill script", exc_info=True)
            return False
        try:
            send_eof(killer)
            done = _compat.status_event(killer).wait(timeout)
            return done and _compat.exit_status(killer) == 0
        finally:
            killer.close()
    finally:
        if chan is not None:
            chan.close()


def short_display(text: str, limit: int = 80) -> str:
    """A command for a message: one line, at most ``limit`` characters, quoted."""
    text = text.replace("\n", " ")
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _tail(text: str, limit: int = 300) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]
