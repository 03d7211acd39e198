"""Processes of the emulated sandbox: commands on pipes or a pty, their signals, and
finding leftovers by the emulator's tag. The SSH side (``_sidecar``) owns the channels;
a process reports to its owner through ``ProcessOwner``."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import termios
from pathlib import Path
from typing import Protocol

# How long a hung-up process group may outlive its channel before SIGKILL.
HANGUP_GRACE = 1.0
# A pty whose shell exited while something still holds the slave open is closed after
# this much output silence instead of waiting for an EIO that may never come.
PTY_DRAIN_IDLE = 0.1
PTY_INPUT_HIGH = 256 * 1024
TAG_VAR = "SSHBRIDGE_EMULATOR"


class ProcessOwner(Protocol):
    """What a process reports to (the channel session that started it)."""

    def on_output(self, data: bytes, stderr: bool) -> None: ...

    def on_input_pressure(self, paused: bool) -> None: ...

    def on_done(self, returncode: int) -> None: ...


def kill_tagged(tag: str) -> int:
    """SIGKILL every process whose environment carries this emulator's tag (Linux /proc)."""
    needle = f"{TAG_VAR}={tag}:".encode()
    killed = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for name in entries:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if any(item.startswith(needle) for item in environ.split(b"\0")):
            with contextlib.suppress(OSError):
                os.kill(int(name), signal.SIGKILL)
                killed += 1
    return killed


def default_signals() -> None:
    # Runs in the child: an emulator started in the background by a shell inherits
    # SIGINT/SIGQUIT ignored, and ignored signals survive exec, so Ctrl-C would do nothing.
    for signum in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGQUIT})


def acquire_ctty() -> None:
    # Runs in the child after setsid(): make the pty slave (fd 0) its controlling terminal.
    default_signals()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def set_winsize(fd: int, size: tuple[int, int, int, int]) -> None:
    width, height, pixw, pixh = size
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height or 24, width or 80, pixw, pixh))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name.removeprefix("SIG")
    except ValueError:
        return f"SIG{signum}@sshbridge"


class Process(asyncio.SubprocessProtocol):
    """A child in its own session/process group, wired to one channel."""

    def __init__(self, owner: ProcessOwner) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.SubprocessTransport | None = None
        self.pid = 0
        self.returncode: int | None = None
        self.done = False
        self._out_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.transport = transport
        self.pid = transport.get_pid()

    def process_exited(self) -> None:
        assert self.transport is not None
        self.returncode = self.transport.get_returncode()
        self._check_done()

    def _outputs_closed(self) -> bool:
        raise NotImplementedError

    def _check_done(self) -> None:
        if self.done or self.returncode is None or not self._outputs_closed():
            return
        self.done = True
        self._close_io()
        if self.transport is not None:
            self.transport.close()
        self.owner.on_done(self.returncode)

    def signal(self, signum: int) -> None:
        if self.pid and self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)

    def hangup(self) -> None:
        """The channel went away: SIGHUP the group, SIGKILL it if its leader ignores that."""
        self._close_io()
        if self.returncode is None:
            self.signal(signal.SIGHUP)
            self.signal(signal.SIGCONT)
            self.loop.call_later(HANGUP_GRACE, self.signal, signal.SIGKILL)
        self._check_done()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self._close_io()
        self._check_done()

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def write_eof(self) -> None:
        raise NotImplementedError

    def pause_output(self) -> None:
        raise NotImplementedError

    def resume_output(self) -> None:
        raise NotImplementedError

    def _close_io(self) -> None:
        raise NotImplementedError


class PipeProcess(Process):
    """Plain exec: stdin/stdout/stderr as pipes, flow control through asyncio transports."""

    def __init__(self, owner: ProcessOwner) -> None:
        super().__init__(owner)
        self._open_outputs = {1, 2}

    async def spawn(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        await self.loop.subprocess_exec(
            lambda: self,
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=default_signals,
        )
        if self._out_paused:
            self.pause_output()

    def _pipe(self, fd: int) -> asyncio.BaseTransport | None:
        if self.transport is None:
            return None
        pipe = self.transport.get_pipe_transport(fd)
        if pipe is None or pipe.is_closing():
            return None
        return pipe

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if isinstance(data, bytes):
            self.owner.on_output(data, fd == 2)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open_outputs.discard(fd)
        self._check_done()

    def _outputs_closed(self) -> bool:
        return not self._open_outputs

    def pause_writing(self) -> None:
        self.owner.on_input_pressure(True)

    def resume_writing(self) -> None:
        self.owner.on_input_pressure(False)

    def write(self, data: bytes) -> None:
        pipe = self._pipe(0)
        if isinstance(pipe, asyncio.WriteTransport):
            pipe.write(data)

    def write_eof(self) -> None:
        pipe = self._pipe(0)
        if isinstance(pipe, asyncio.WriteTransport):
            pipe.write_eof()

    def pause_output(self) -> None:
        self._out_paused = True
        for fd in (1, 2):
            pipe = self._pipe(fd)
            if isinstance(pipe, asyncio.ReadTransport):
                pipe.pause_reading()

    def resume_output(self) -> None:
        self._out_paused = False
        for fd in (1, 2):
            pipe = self._pipe(fd)
            if isinstance(pipe, asyncio.ReadTransport):
                pipe.resume_reading()

    def _close_io(self) -> None:
        # Close the pipes only: transport.close() would SIGKILL the leader at once.
        for fd in (0, 1, 2):
            pipe = self._pipe(fd)
            if pipe is not None:
                pipe.close()


class PtyProcess(Process):
    """Shell or exec on a real pty that is the child's controlling terminal."""

    def __init__(self, owner: ProcessOwner) -> None:
        super().__init__(owner)
        self.master: int | None = None
        self._io_closed = False
        self._eof = False
        self._reading = False
        self._inbuf = bytearray()
        self._writing = False
        self._pressure = False
        self._last_output = 0.0
        self._drain_task: asyncio.Task[None] | None = None

    async def spawn(
        self, argv: list[str], cwd: Path, env: dict[str, str], size: tuple[int, int, int, int]
    ) -> None:
        master, slave = os.openpty()
        try:
            set_winsize(master, size)
            await self.loop.subprocess_exec(
                lambda: self,
                *argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=acquire_ctty,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        self._last_output = self.loop.time()
        if not self._out_paused:
            self._start_reading()
        if self.returncode is not None:
            self._start_drain()

    def _start_reading(self) -> None:
        if self.master is not None and not self._reading and not self._eof:
            self.loop.add_reader(self.master, self._readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self.master is not None and self._reading:
            self.loop.remove_reader(self.master)
        self._reading = False

    def _readable(self) -> None:
        if self.master is None:
            return
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: every slave descriptor is closed
        if not data:
            self._stop_reading()
            self._eof = True
            self._check_done()
            return
        self._last_output = self.loop.time()
        self.owner.on_output(data, False)

    def process_exited(self) -> None:
        super().process_exited()
        if not self.done and self.master is not None:
            self._start_drain()

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        # The shell is gone; a background job may still hold the slave open, so stop
        # waiting for EIO once output has been quiet for a moment.
        while not self.done:
            await asyncio.sleep(0.02)
            idle = self.loop.time() - self._last_output
            if not self._out_paused and idle >= PTY_DRAIN_IDLE:
                self._readable()
                self._eof = True
                self._check_done()

    def _outputs_closed(self) -> bool:
        return self._eof or self._io_closed

    def resize(self, size: tuple[int, int, int, int]) -> None:
        if self.master is not None:
            with contextlib.suppress(OSError):
                set_winsize(self.master, size)

    def write(self, data: bytes) -> None:
        if self.master is None:
            return
        self._inbuf += data
        self._flush_input()

    def _flush_input(self) -> None:
        master = self.master
        while self._inbuf and master is not None:
            try:
                n = os.write(master, self._inbuf)
            except BlockingIOError:
                break
            except OSError:
                self._inbuf.clear()
                break
            del self._inbuf[:n]
        if self._inbuf and master is not None:
            if not self._writing:
                self.loop.add_writer(master, self._flush_input)
                self._writing = True
            if not self._pressure and len(self._inbuf) > PTY_INPUT_HIGH:
                self._pressure = True
                self.owner.on_input_pressure(True)
        else:
            if self._writing and master is not None:
                self.loop.remove_writer(master)
            self._writing = False
            if self._pressure:
                self._pressure = False
                self.owner.on_input_pressure(False)

    def write_eof(self) -> None:
        pass  # as with sshd, EOF on a pty channel does not reach the terminal

    def pause_output(self) -> None:
        self._out_paused = True
        self._stop_reading()

    def resume_output(self) -> None:
        self._out_paused = False
        self._start_reading()

    def _close_io(self) -> None:
        self._io_closed = True
        master = self.master
        if master is None:
            return
        self._stop_reading()
        if self._writing:
            self.loop.remove_writer(master)
            self._writing = False
        self._inbuf.clear()
        self.master = None
        os.close(master)  # hangs up the terminal: the kernel SIGHUPs its session
        if self._drain_task is not None and self._drain_task is not asyncio.current_task():
            self._drain_task.cancel()
