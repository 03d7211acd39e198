"""Running one command on an SSH channel.

Both output streams are drained in one loop, woken by the channel's event pipe, so neither
stream can fill its window while the other is being read (the classic paramiko deadlock:
reading stdout to the end, or waiting for the exit status, before draining stderr).
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import re
import secrets
import selectors
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import paramiko
from paramiko.common import cMSG_CHANNEL_REQUEST
from paramiko.message import Message

from ._exceptions import CommandError, CommandTimeout, ConnectionLost, InvalidArgument
from ._result import CommandResult

log = logging.getLogger("sshbridge.run")

OutputCallback = Callable[[str], None]
RUN_MARKER = "SSHBRIDGE_RUN_ID"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_READ = 1 << 20


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
        exports.append(f"{RUN_MARKER}={marker}")
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
        lines.append(f"cd -- {shlex.quote(cwd)} || exit 125")
    lines.append(display)
    return display, "\n".join(lines)


def kill_script(marker: str, grace: float = 0.3) -> str:
    """Shell that signals every process carrying the run marker in its environment."""
    needle = shlex.quote(f"{RUN_MARKER}={marker}")
    return (
        f"m={needle}; for s in TERM KILL; do "
        'for f in $(grep -lF "$m" /proc/[0-9]*/environ 2>/dev/null); do '
        'p=${f#/proc/}; kill -s $s "${p%/environ}" 2>/dev/null; done; '
        f'[ "$s" = TERM ] && sleep {grace}; done; true'
    )


def send_eof(chan: paramiko.Channel) -> None:
    """EOF only while the channel is open, under its lock.

    An EOF for a channel sshd has already freed makes it drop the whole connection
    ("ieof packet referred to nonexistent channel"), killing every other command on it.
    """
    transport = chan.get_transport()
    with chan.lock:
        if chan.closed or chan.eof_sent or transport is None:
            return
        m = chan._send_eof()  # type: ignore[attr-defined]
        if m is not None:
            transport._send_user_message(m)  # type: ignore[attr-defined]


def send_signal(chan: paramiko.Channel, name: str) -> None:
    """RFC 4254 "signal" request (paramiko has no API for it). Best effort, no reply."""
    transport = chan.get_transport()
    with chan.lock:
        if chan.closed or transport is None:
            return
        m = Message()
        m.add_byte(cMSG_CHANNEL_REQUEST)
        m.add_int(chan.remote_chanid)
        m.add_string("signal")
        m.add_boolean(False)
        m.add_string(name)
        transport._send_user_message(m)  # type: ignore[attr-defined]


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
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
    if input is not None and not isinstance(input, (str, bytes, bytearray)):
        raise InvalidArgument("input must be str or bytes")
    for name, cb in (("on_stdout", on_stdout), ("on_stderr", on_stderr)):
        if cb is not None and not callable(cb):
            raise InvalidArgument(f"{name} must be callable")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise InvalidArgument(f"unknown encoding {encoding!r}") from None
    marker = secrets.token_hex(8)
    display, wire = build_command(command, cwd=cwd, env=env, marker=marker)
    data = input.encode(encoding) if isinstance(input, str) else bytes(input or b"")

    start = time.monotonic()
    deadline = None if timeout is None else start + float(timeout)
    chan = source.open_channel()
    out = _Stream(on_stdout, line_buffered, encoding)
    err = _Stream(on_stderr, line_buffered, encoding)
    feeder: threading.Thread | None = None
    sel: selectors.BaseSelector | None = None
    finished = False
    try:
        try:
            if pty:
                chan.get_pty(term=term, width=size[0], height=size[1])
            chan.exec_command(wire)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise source.lost_error(f"starting {display!r} failed: {exc}") from None
        if data:
            feeder = threading.Thread(
                target=_feed_input, args=(chan, data), name="sshbridge-stdin", daemon=True
            )
            feeder.start()
        elif not pty:
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
            if (chan.eof_received or chan.closed) and not (
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
        if not timed_out:
            while not chan.status_event.is_set():
                wait = 1.0 if deadline is None else deadline - time.monotonic()
                if wait <= 0:
                    timed_out = True
                    break
                chan.status_event.wait(min(wait, 1.0))
                transport = chan.get_transport()
                if transport is None or not transport.is_active():
                    break
        duration = time.monotonic() - start
        if timed_out:
            _stop_remote(source, chan, marker)
            result = CommandResult(
                display, -1, out.finish(), err.finish(), duration, encoding=encoding
            )
            raise CommandTimeout(
                f"command {_short(display)} did not finish within {timeout:g} s; it was "
                "stopped on the sandbox (use spawn() for long-running work, or raise timeout)",
                result=result,
                timeout=float(timeout or 0),
            )
        status_known = chan.status_event.is_set() and chan.exit_status != -1
        if not status_known and _connection_going_down(chan):
            raise source.lost_error(f"while running {_short(display)}")
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
                _stop_remote(source, chan, marker)
        raise
    finally:
        if sel is not None:
            sel.close()
        chan.close()
        if feeder is not None:
            feeder.join(timeout=1.0)
    if check and not result.ok:
        raise CommandError(
            f"command {_short(display)} exited with status {result.exit_code}"
            + (f": {_tail(result.stderr)}" if result.stderr_bytes else ""),
            result=result,
        )
    return result


def _connection_going_down(chan: paramiko.Channel, grace: float = 0.3) -> bool:
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


def _stop_remote(source: ChannelSource, chan: paramiko.Channel, marker: str) -> None:
    """Stop a command for real: a signal request, then a kill by marker, then close."""
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        send_signal(chan, "TERM")
    try:
        killer = source.open_channel()
    except Exception:
        log.debug("could not open a channel to stop a command", exc_info=True)
        chan.close()
        return
    try:
        killer.settimeout(5.0)
        killer.exec_command(kill_script(marker))
        killer.status_event.wait(5.0)
    except (OSError, EOFError, paramiko.SSHException):
        log.debug("stopping a command by marker failed", exc_info=True)
    finally:
        killer.close()
        chan.close()


def _short(text: str, limit: int = 80) -> str:
    text = text.replace("\n", " ")
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _tail(text: str, limit: int = 300) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]
