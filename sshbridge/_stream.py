"""Running a command on file descriptors: stdin, stdout and stderr streamed, not buffered.

Built on ``_runner.start_command``. Memory stays bounded: stdin is read in chunks only as
fast as the channel's window takes them, and output is written out as it arrives (a slow
reader stops us reading, which fills the SSH window and stops the remote writer).
Used by ``sshbridge exec`` directly and by the session holder on descriptors a client
passed to it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import selectors
import shlex
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import paramiko

from . import _compat
from ._cancel import new_token
from ._interactive import write_all
from ._runner import (
    ChannelSource,
    build_command,
    check_timeout,
    connection_going_down,
    send_eof,
    short_display,
    start_command,
    stop_remote,
)

_CHUNK = 1 << 15
_VEOF = b"\x04"


@dataclass
class StreamOutcome:
    """The exit status to report (0..255, 124 on timeout, 141 when our stdout closed,
    255 without a status), and a one-line message for the user, if any."""

    status: int
    message: str | None = None


class _Feeder(threading.Thread):
    """Copies ``fd`` to the channel in bounded chunks until EOF, or until stopped."""

    def __init__(self, chan: paramiko.Channel, fd: int | None, pty: bool) -> None:
        super().__init__(name="sshbridge-stdin", daemon=True)
        self.chan = chan
        self.fd = fd
        self.pty = pty
        self._stop_r, self._stop_w = os.pipe()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def close(self) -> None:
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def run(self) -> None:
        last = b"\n"
        try:
            while self.fd is not None:
                ready, _, _ = select.select([self.fd, self._stop_r], [], [])
                if self._stop_r in ready:
                    return
                try:
                    data = os.read(self.fd, _CHUNK)
                except BlockingIOError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                self.chan.sendall(data)
                last = data[-1:]
            if self.pty:
                # sshd cannot half-close a terminal: the terminal's EOF character instead.
                self.chan.sendall(_VEOF if last in (b"\n", b"\r") else _VEOF + _VEOF)
        except (OSError, EOFError, paramiko.SSHException):
            return
        finally:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                send_eof(self.chan)


def stream_command(
    source: ChannelSource,
    command: str | Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    pty: bool = False,
    term: str = "xterm",
    stdin_fd: int | None = 0,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
    cancel_fd: int | None = None,
) -> StreamOutcome:
    """Run ``command`` with its streams on these descriptors.

    ``stdin_fd=None`` gives it an empty stdin (``ssh -n``). Readability (EOF) on
    ``cancel_fd`` stops the command, as Ctrl-C does. Raises ``ConnectionLost`` and the
    other library errors; an interrupt (KeyboardInterrupt) stops the remote command
    first, then propagates.
    """
    timeout = check_timeout(timeout)
    token = new_token()
    display, wire = build_command(command, cwd=cwd, env=env, marker=token)
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    try:
        chan = start_command(source, wire, display, pty=pty, term=term, deadline=deadline)
    except BaseException as exc:
        if not isinstance(exc, Exception):
            with contextlib.suppress(BaseException):
                stop_remote(source, token)
        raise
    feeder = _Feeder(chan, stdin_fd, pty)
    sel = selectors.DefaultSelector()
    finished = False
    try:
        feeder.start()
        sel.register(chan.fileno(), selectors.EVENT_READ, "chan")
        if cancel_fd is not None:
            sel.register(cancel_fd, selectors.EVENT_READ, "cancel")
        outcome: StreamOutcome | None = None
        while True:
            try:
                while chan.recv_ready():
                    write_all(stdout_fd, chan.recv(_CHUNK))
                while chan.recv_stderr_ready():
                    write_all(stderr_fd, chan.recv_stderr(_CHUNK))
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    raise
                # Our stdout went away (`| head`): stop the command, exit like SIGPIPE.
                stop_remote(source, token, chan=chan)
                outcome = StreamOutcome(141)
                break
            if (_compat.eof_received(chan) or chan.closed) and not (
                chan.recv_ready() or chan.recv_stderr_ready()
            ):
                break
            wait = 1.0
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                wait = min(wait, 1.0)
            for key, _ in sel.select(wait):
                if key.data == "cancel":
                    raise KeyboardInterrupt
            transport = chan.get_transport()
            if (transport is None or not transport.is_active()) and not (
                chan.recv_ready() or chan.recv_stderr_ready()
            ):
                break
        if outcome is None:
            status = _compat.status_event(chan)
            while not status.is_set():
                wait = 1.0 if deadline is None else deadline - time.monotonic()
                if wait <= 0:
                    break
                status.wait(min(wait, 1.0))
                transport = chan.get_transport()
                if transport is None or not transport.is_active():
                    break
            if (
                deadline is not None
                and time.monotonic() >= deadline
                and not status.is_set()
            ):
                stopped = stop_remote(source, token, chan=chan)
                how = (
                    "it was stopped on the sandbox"
                    if stopped
                    else "stopping it on the sandbox failed, so it may still run"
                )
                outcome = StreamOutcome(
                    124,
                    f"command {short_display(display)} did not finish within {timeout:g} s; {how}",
                )
            else:
                known = status.is_set() and _compat.exit_status(chan) != -1
                if not known and connection_going_down(chan):
                    raise source.lost_error(f"while running {short_display(display)}")
                if known:
                    code = chan.recv_exit_status()
                    outcome = StreamOutcome(code if 0 <= code <= 255 else 255)
                else:
                    outcome = StreamOutcome(
                        255, "the remote side ended without an exit status (killed by a signal?)"
                    )
        finished = True
        return outcome
    except BaseException:
        if not finished and not chan.closed:
            with contextlib.suppress(BaseException):
                stop_remote(source, token, chan=chan)
        raise
    finally:
        feeder.stop()
        sel.close()
        chan.close()
        feeder.join(timeout=2.0)
        if not feeder.is_alive():
            feeder.close()


def command_of(words: Sequence[str]) -> str | list[str]:
    """The CLI's rule: one word is a shell command line; several are an argv."""
    return words[0] if len(words) == 1 else list(words)


def display_of(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else shlex.join(words)
