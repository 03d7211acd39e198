"""One file over several SFTP channels at once, as byte ranges of one shared plan.

A channel moves at most its window per round trip: OpenSSH gives an upload 2 MiB per
channel, about 40 MB/s at 50 ms. A large file therefore goes over a few channels in
parallel: every channel opens the same file (the upload's temporary file, or the remote
file read) and takes blocks from one plan in offset order, so they all work near the
same place and the file is reassembled by offset, byte-exact. The caller's channel
starts at once; the others join as they open, and a channel that cannot be opened (the
server refuses it) is simply not used. Only the caller's thread runs the progress
callback, so it stays the transfer's cancellation point.

No block is handed out more than ``skew_for(size)`` bytes (24 MiB, or half a smaller
file) past the lowest one not yet written. After an interruption a partial file may
have gaps, but only in its last that many bytes: a resumed transfer starts that far back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

import paramiko

from . import _transfer

log = logging.getLogger("sshbridge.sftp")

# Files below this stay on one channel: one 2 MiB window carries them in a few round
# trips, and extra channels (pooled, their opens beside the caller's) would not win
# that back. From here one channel's window is what limits: 16 MiB went from 29 to
# 57 MB/s at 50 ms on four.
PARALLEL_MIN = 8 * 1024 * 1024
# One more channel per this many bytes, up to MAX_CHANNELS (4 x 2 MiB of window: a
# 1 Gbit/s link at 50 ms, with room to spare; well inside OpenSSH's 10 sessions).
PER_CHANNEL = 4 * 1024 * 1024
MAX_CHANNELS = 4
# How far past the lowest unwritten byte blocks may be handed out (and so how far back
# a resume starts): several channels' worth of requests in flight, and then some; for
# a smaller file half its size (at least MIN_SKEW), so a resume keeps half of it.
SKEW = 24 * 1024 * 1024
MIN_SKEW = 4 * 1024 * 1024
# Requests in flight per channel: a little over OpenSSH's 2 MiB window for writes; the
# read budget shared out for reads.
WRITE_DEPTH = 10
# One channel with a 16 MiB window already fills 1 Gbit/s at 50 ms here (measured: a
# second to fourth channel added nothing), so downloads stay on one by default.
DOWNLOAD_CHANNELS = 1


class Source(Protocol):
    def sftp(
        self, opened: Callable[[], None] | None = None
    ) -> contextlib.AbstractContextManager[paramiko.SFTPClient]: ...


def channels_for(size: int) -> int:
    """How many channels a transfer of ``size`` bytes uses (1: the plain path)."""
    if size < PARALLEL_MIN:
        return 1
    return max(1, min(MAX_CHANNELS, size // PER_CHANNEL))


def download_channels(size: int) -> int:
    """Channels for a download: one channel's window (16 MiB) covers the links this is
    for, so more only when DOWNLOAD_CHANNELS asks for them."""
    return 1 if DOWNLOAD_CHANNELS <= 1 else min(DOWNLOAD_CHANNELS, channels_for(size))


def skew_for(size: int) -> int:
    """The Plan skew of a parallel transfer of ``size`` bytes (see SKEW)."""
    return max(MIN_SKEW, min(SKEW, size // 2))


def resume_from(kept: int, size: int, *, download: bool = False) -> int:
    """Where a resumed transfer of a ``size``-byte file with ``kept`` bytes of partial
    starts: past a parallel transfer's gaps, if it may have been one."""
    if size < PARALLEL_MIN or (download and DOWNLOAD_CHANNELS <= 1):
        return kept  # one channel writes in order: the partial is a prefix
    return max(0, kept - skew_for(size))


class Plan:
    """The blocks of ``[start, end)``: handed out in offset order, tracked until written.

    Thread-safe; implements ``_transfer.BlockPlan`` for every channel of the transfer,
    and counts the channels working on it so the caller can wait for them.
    """

    def __init__(self, start: int, end: int, *, skew: int = SKEW) -> None:
        self.start = start
        self.end = end
        self.skew = skew
        self.next = start
        self.moved = 0  # bytes written so far, over every channel
        self.error: BaseException | None = None
        self.closed = False  # no channel joins any more
        self.workers = 0
        self._open: dict[int, int] = {}  # start -> end of blocks handed out, not done
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def _low(self) -> int:
        return min(self._open) if self._open else self.next

    def written(self) -> int:
        """The end of the run of written bytes from ``start``."""
        with self._lock:
            return min(self._low(), self.end)

    def take(self, most: int) -> tuple[int, int] | None:
        with self._lock:
            if self.error is not None or self.next >= self.end:
                return None
            n = min(most, self.end - self.next)
            if self.next + n > self._low() + self.skew:
                return None
            off = self.next
            self.next += n
            self._open[off] = off + n
            return off, n

    def wait(self) -> bool:
        with self._lock:
            if self.error is not None or self.next >= self.end:
                return False
            # Bounded: a change that came between take() and here is seen at the next.
            self._changed.wait(0.5)
            return True

    def done(self, offset: int, n: int) -> None:
        with self._lock:
            stop = self._open.pop(offset, None)
            if stop is None:
                return
            if offset + n < stop:
                self._open[offset + n] = stop  # the rest is asked again
            self.moved += n
            self._changed.notify_all()

    def cut(self, at: int) -> None:
        with self._lock:
            if at >= self.end:
                return
            self.end = at
            self.next = min(self.next, at)
            for off, stop in list(self._open.items()):
                if off >= at:
                    del self._open[off]
                elif stop > at:
                    self._open[off] = at
            self._changed.notify_all()

    def exhausted(self) -> bool:
        with self._lock:
            return self.error is not None or self.next >= self.end

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
            self._changed.notify_all()

    def enlist(self) -> bool:
        """A channel joins; False once the transfer no longer takes helpers."""
        with self._lock:
            if self.closed or self.error is not None or self.next >= self.end:
                return False
            self.workers += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.workers -= 1
            self._changed.notify_all()

    def finish(self, tick: Callable[[], None] | None) -> None:
        """No more helpers; wait until those working have stopped (``tick`` on every
        change and once at the end, so the last progress report counts every channel's
        bytes: a tick that raises fails the plan, and the wait goes on)."""
        with self._lock:
            self.closed = True
        while True:
            with self._lock:
                done = not self.workers
                if not done:
                    self._changed.wait()
            if tick is not None and self.error is None:
                try:
                    tick()
                except BaseException as exc:  # noqa: BLE001 - raised by the caller
                    self.fail(exc)
            if done:
                return


class Crew:
    """The extra channels of one transfer, launched as soon as the caller has its channel.

    Each borrows an SFTP client at once, so that channel setup overlaps the caller's
    own round trips; opens the file once ``aim`` names how (or, for a new upload, at
    once beside the caller's own OPEN when ``guess`` names it); and moves no byte before
    ``start`` hands it the plan (for an upload, the caller's own open has then been
    answered, so its truncate cannot land after a write). ``cancel`` (always called, a
    no-op once started) lets them go.
    """

    def __init__(self, source: Source, count: int) -> None:
        self.plan: Plan | None = None
        self._open: Callable[[paramiko.SFTPClient], paramiko.SFTPFile] | None = None
        self._path: str | None = None
        self._guess: tuple[str, int | None] | None = None
        self._work: Callable[[paramiko.SFTPClient, bytes], object] | None = None
        self._aimed = threading.Event()
        self._hinted = threading.Event()  # guess() or aim() (or cancel()) was called
        self._go = threading.Event()
        self._early = threading.Condition()
        self._early_open = 0  # early opens sent and not answered yet
        self._early_made = False  # one of them was answered with a handle
        self._settled = False  # no early open starts any more
        self._source = source
        self.count = count
        self._launched = False

    def launch(self) -> None:
        """Start the helpers (once): only once the caller holds its own channel, so that
        on a server with room for few channels the helpers never take the caller's; but
        as soon as it is open, so that their channels' setup (three round trips on
        OpenSSH) overlaps the rest of the caller's own SFTP start."""
        if self._launched:
            return
        self._launched = True
        for i in range(self.count):
            threading.Thread(target=self._helper, args=(self._source,),
                             name=f"sshbridge-range-{i}", daemon=True).start()

    def aim(
        self, open_file: Callable[[paramiko.SFTPClient], paramiko.SFTPFile], path: str | None = None
    ) -> None:
        self._open, self._path = open_file, path
        self._aimed.set()
        self._hinted.set()

    def guess(self, path: str, mode: int | None) -> None:
        """A new upload's temporary file is probably ``path``: helpers with their client
        ready open it now, as open_beside does (created with ``mode``, never
        truncated), beside the caller's own OPEN instead of one round trip after it.

        If aim() then names another file (``path`` was a directory), the caller calls
        settle() before it removes ``path``; a helper let go before any aim() removes
        the file it may have created, so a failed OPEN leaves nothing behind either."""
        self._guess = (path, mode)
        self._hinted.set()

    def settle(self, timeout: float = 30.0) -> bool:
        """Start no more early opens and wait until those sent have been answered, so a
        REMOVE sent now lands after them. True if one of them created or opened the file."""
        with self._early:
            self._settled = True
            self._early.wait_for(lambda: self._early_open == 0, timeout)
            return self._early_made

    def start(self, plan: Plan, work: Callable[[paramiko.SFTPClient, bytes], object]) -> None:
        self.plan, self._work = plan, work
        self._go.set()

    def cancel(self) -> None:
        self._aimed.set()
        self._hinted.set()
        self._go.set()

    def _open_early(self, client: paramiko.SFTPClient) -> tuple[str, paramiko.SFTPFile] | None:
        with self._early:
            guess = self._guess
            if guess is None or self._settled or self._aimed.is_set():
                return None
            self._early_open += 1
        path, mode = guess
        fh: paramiko.SFTPFile | None = None
        try:
            fh = _transfer.open_beside(client, path, create=True, mode=mode)
        except OSError:
            pass  # opened again the ordinary way once aimed, or not used
        finally:
            with self._early:
                self._early_open -= 1
                self._early_made = self._early_made or fh is not None
                self._early.notify_all()
        return None if fh is None else (path, fh)

    def _helper(self, source: Source) -> None:
        try:
            with source.sftp() as client:
                self._hinted.wait()
                early = self._open_early(client)
                self._aimed.wait()
                open_file = self._open
                if early is not None and (open_file is None or early[0] != self._path):
                    with contextlib.suppress(Exception):
                        early[1].close()
                    if open_file is None:
                        # Let go before the caller had its file: what this created must
                        # not stay (the caller's own OPEN failed, or never went out).
                        with contextlib.suppress(Exception):
                            client.remove(early[0])
                    early = None
                if open_file is None or (self._go.is_set() and self.plan is None):
                    if early is not None:
                        with contextlib.suppress(Exception):
                            early[1].close()
                    return
                fh = early[1] if early is not None else open_file(client)
                try:
                    self._go.wait()
                    plan, work = self.plan, self._work
                    if plan is None or work is None or not plan.enlist():
                        return
                    try:
                        work(client, _transfer.handle_of(fh))
                    except BaseException as exc:  # noqa: BLE001 - the caller's thread raises it
                        plan.fail(exc)
                    finally:
                        plan.leave()
                finally:
                    with contextlib.suppress(Exception):
                        fh.close()
        except Exception as exc:  # noqa: BLE001 - a channel not had: the others carry on
            log.debug("an extra SFTP channel was not used: %s", exc)

    def aim_upload(self, path: str, *, create: bool, mode: int | None) -> None:
        """Helpers open the upload's temporary file ``path`` (see open_beside)."""
        self.aim(lambda c: _transfer.open_beside(c, path, create=create, mode=mode), path)

    def aim_download(self, path: str) -> None:
        self.aim(lambda c: c.open(path, "rb"))


def _run(
    crew: Crew,
    plan: Plan,
    work: Callable[[paramiko.SFTPClient, bytes, Callable[[], None] | None], object],
    client: paramiko.SFTPClient,
    handle: bytes,
    tick: Callable[[], None],
) -> object:
    crew.start(plan, lambda c, h: work(c, h, None))
    try:
        result = work(client, handle, tick)
    except BaseException as exc:
        plan.fail(exc)
        plan.finish(None)
        raise
    plan.finish(tick)
    if plan.error is not None:
        raise plan.error
    return result


def upload(
    crew: Crew,
    client: paramiko.SFTPClient,
    handle: bytes,
    fd: int,
    *,
    start: int,
    size: int,
    progress: _transfer.Progress | None = None,
    tail: _transfer.Tail | None = None,
) -> _transfer.TransferStats:
    """Write the local file ``fd`` from ``start`` to ``size`` into the open remote file
    (``handle`` on ``client``), together with the channels of ``crew``. ``tail`` goes
    behind the caller's channel's last WRITE (see write_blocks)."""
    t0 = time.perf_counter()
    plan = Plan(start, size, skew=skew_for(size))
    # One server: the limits asked on the caller's channel hold on the others.
    block = _transfer.server_limits(client).write

    def read_at(buf: memoryview, offset: int) -> int:
        return os.preadv(fd, [buf], offset)

    def tick() -> None:
        if progress is not None:
            progress(start + plan.moved, size)

    def work(c: paramiko.SFTPClient, h: bytes, t: Callable[[], None] | None) -> None:
        _transfer.write_blocks(c, h, plan, read_at, block=block, depth=WRITE_DEPTH, tick=t,
                               tail=tail if c is client else None)

    _run(crew, plan, work, client, handle, tick)
    return _transfer.TransferStats(start, plan.written(), plan.moved, time.perf_counter() - t0)


def download(
    crew: Crew,
    client: paramiko.SFTPClient,
    handle: bytes,
    sink: _transfer.Sink,
    *,
    start: int,
    size: int,
    channels: int,
    progress: _transfer.Progress | None = None,
) -> _transfer.TransferStats:
    """Read the open remote file (``handle`` on ``client``) from ``start`` to ``size``
    into ``sink`` (positional writes), together with the channels of ``crew``; one read
    past ``size`` tells whether the file grew (``end`` is then past ``size``)."""
    t0 = time.perf_counter()
    plan = Plan(start, size, skew=skew_for(size))
    block = _transfer.server_limits(client).read
    depth = max(8, _transfer.READ_BUDGET // block // channels)

    def tick() -> None:
        if progress is not None:
            progress(start + plan.moved, size)

    def work(c: paramiko.SFTPClient, h: bytes, t: Callable[[], None] | None) -> bool:
        return _transfer.read_blocks(c, h, plan, sink, block=block, depth=depth, tick=t,
                                     probe=size if t is not None else None)

    grew = _run(crew, plan, work, client, handle, tick)
    end = plan.written()
    if grew and end == size:
        end = size + 1  # longer than expected: the caller reports the change
    return _transfer.TransferStats(start, end, plan.moved, time.perf_counter() - t0)
