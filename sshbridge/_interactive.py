"""An interactive session attached to this process's terminal (``ssh`` with a PTY).

With a terminal on stdin the local terminal goes into raw mode, so every key (Ctrl-C,
Ctrl-Z, arrows) reaches the remote side as bytes, and window-size changes (SIGWINCH) are
sent as ``window-change`` requests. The terminal is restored on every way out: normal
exit, exceptions, SIGTERM and SIGHUP. Without a terminal, stdin is streamed as is and its
end becomes EOF on the remote side, so ``echo ls | sshbridge ssh SANDBOX`` works.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import selectors
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import paramiko

from . import _compat
from ._exceptions import InvalidArgument
from ._link import Link
from ._runner import build_command, send_eof

if TYPE_CHECKING:
    from typing import TypeAlias

    _Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

log = logging.getLogger("sshbridge.interactive")

_CHUNK = 32768
# Bytes read from stdin but not yet accepted by the channel window; above this, stdin is
# not read until the remote side catches up (back-pressure instead of unbounded memory).
_MAX_PENDING = 1 << 20


def _selector() -> selectors.BaseSelector:
    # epoll refuses regular files (stdin redirected from a file); poll accepts them.
    # macOS poll() does not support terminals, select() does.
    if sys.platform.startswith("linux") and hasattr(selectors, "PollSelector"):
        return selectors.PollSelector()
    return selectors.SelectSelector()


def terminal_size(*fds: int) -> tuple[int, int]:
    """(columns, rows) of the first fd that is a terminal; 80x24 otherwise."""
    for fd in fds:
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        if size.columns > 0 and size.lines > 0:
            return size.columns, size.lines
    return 80, 24


@contextlib.contextmanager
def raw_terminal(fd: int | None) -> Iterator[None]:
    """Raw mode on ``fd`` for the duration; restored however the block ends."""
    if fd is None:
        yield
        return
    import termios
    import tty

    old = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, old)


class _Signals:
    """SIGWINCH -> a wake-up pipe; SIGTERM/SIGHUP -> SystemExit so cleanup runs.

    Handlers can only be installed from the main thread; elsewhere window changes are
    simply not followed.
    """

    def __init__(self, follow_winch: bool) -> None:
        self.follow_winch = follow_winch
        self.read_fd: int | None = None
        self._write_fd: int | None = None
        self._old: dict[int, _Handler] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is not threading.main_thread():
            return self
        if self.follow_winch and hasattr(signal, "SIGWINCH"):
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self.read_fd, self._write_fd = r, w
            self._old[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, self._on_winch)
        for name in ("SIGTERM", "SIGHUP"):
            signum = getattr(signal, name, None)
            if signum is not None:
                self._old[signum] = signal.signal(signum, self._on_term)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, old in self._old.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, old if old is not None else signal.SIG_DFL)
        self._old.clear()
        for fd in (self.read_fd, self._write_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.read_fd = self._write_fd = None

    def _on_winch(self, signum: int, frame: FrameType | None) -> None:
        if self._write_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._write_fd, b"w")

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def drain(self) -> None:
        if self.read_fd is not None:
            with contextlib.suppress(OSError):
                while os.read(self.read_fd, 512):
                    pass


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            # A terminal left in non-blocking mode by someone else: wait until writable.
            select.select([], [fd], [], 1.0)
            continue
        except InterruptedError:
            continue
        view = view[n:]


def interactive(
    links: Callable[[], Link],
    command: str | Sequence[str] | None = None,
    *,
    pty: bool | None = None,
    term: str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: int = 0,
    stdout: int = 1,
    stderr: int = 2,
) -> int:
    """Run a login shell (or ``command``) attached to the given file descriptors.

    ``pty=None`` allocates a terminal when ``stdin`` is one (like ``ssh``). Returns the
    remote exit status, or -1 when the remote side ended without one (killed by a signal).
    """
    if pty is not None and not isinstance(pty, bool):
        raise InvalidArgument("pty must be True, False or None")
    wire: str | None = None
    if command is not None or env:
        if command is None:
            raise InvalidArgument("env needs a command (a login shell takes no environment)")
        _, wire = build_command(command, env=env)
    in_tty = os.isatty(stdin)
    use_pty = in_tty if pty is None else pty
    # Flush Python-level buffers first: from here on output goes straight to the fds.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    link = links()
    chan = link.open_channel()
    try:
        try:
            if use_pty:
                cols, rows = terminal_size(stdout, stdin, stderr)
                chan.get_pty(
                    term=term or os.environ.get("TERM") or "xterm-256color",
                    width=cols,
                    height=rows,
                )
            if wire is not None:
                chan.exec_command(wire)
            else:
                chan.invoke_shell()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise link.lost_error(f"starting an interactive session failed ({exc})") from None
        raw_fd = stdin if (in_tty and use_pty) else None
        with _Signals(follow_winch=use_pty) as sigs, raw_terminal(raw_fd):
            status = _pump(chan, stdin, stdout, stderr, sigs, use_pty)
        if status is None:
            raise link.lost_error("during the interactive session")
        return status
    finally:
        chan.close()


def _pump(
    chan: paramiko.Channel,
    stdin: int,
    stdout: int,
    stderr: int,
    sigs: _Signals,
    use_pty: bool,
) -> int | None:
    sel = _selector()
    pending = bytearray()
    stdin_open = True
    try:
        sel.register(chan.fileno(), selectors.EVENT_READ, "chan")
        try:
            sel.register(stdin, selectors.EVENT_READ, "stdin")
        except (OSError, ValueError):
            stdin_open = False  # closed stdin: nothing to send
            send_eof(chan)
        reading = stdin_open
        if sigs.read_fd is not None:
            sel.register(sigs.read_fd, selectors.EVENT_READ, "winch")
        while True:
            while chan.recv_ready():
                write_all(stdout, chan.recv(_CHUNK))
            while chan.recv_stderr_ready():
                write_all(stderr, chan.recv_stderr(_CHUNK))
            if _compat.eof_received(chan) or chan.closed:
                if not (chan.recv_ready() or chan.recv_stderr_ready()):
                    break
                continue
            if pending and chan.send_ready():
                try:
                    sent = chan.send(bytes(pending[:_CHUNK]))
                except (OSError, EOFError, paramiko.SSHException):
                    sent = 0
                    pending.clear()
                del pending[:sent]
                if not pending and not stdin_open:
                    send_eof(chan)
            want_stdin = stdin_open and len(pending) < _MAX_PENDING
            if want_stdin != reading:
                # Back-pressure: stop watching stdin while the channel window is full.
                if want_stdin:
                    sel.register(stdin, selectors.EVENT_READ, "stdin")
                else:
                    sel.unregister(stdin)
                reading = want_stdin
            timeout = 0.05 if pending else 1.0
            for key, _ in sel.select(timeout):
                if key.data == "stdin":
                    try:
                        data = os.read(stdin, _CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        if exc.errno != errno.EIO:  # EIO: the terminal went away
                            raise
                        data = b""
                    if data:
                        pending += data
                    else:
                        stdin_open = reading = False
                        sel.unregister(stdin)
                        if not pending:
                            send_eof(chan)
                elif key.data == "winch":
                    sigs.drain()
                    cols, rows = terminal_size(stdout, stdin, stderr)
                    with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
                        chan.resize_pty(width=cols, height=rows)
            transport = chan.get_transport()
            if (transport is None or not transport.is_active()) and not (
                chan.recv_ready() or chan.recv_stderr_ready()
            ):
                break
    finally:
        sel.close()
    # Output is done; the exit status may trail the EOF by a moment.
    status = _compat.status_event(chan)
    while not status.wait(0.2):
        transport = chan.get_transport()
        if transport is None or not transport.is_active():
            break
    if chan.exit_status_ready() and _compat.exit_status(chan) != -1:
        return int(chan.recv_exit_status())
    transport = chan.get_transport()
    if transport is None or not transport.is_active():
        return None
    return -1
