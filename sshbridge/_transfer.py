"""Pipelined SFTP transfers on a borrowed paramiko SFTPClient.

paramiko's own paths are slow: ``SFTPFile.write`` cuts requests to 32 KiB, and ``getfo``
reads responses 32 KiB at a time out of a pipe whose every read memmoves the whole
backlog. This engine speaks the data part of the protocol itself on the client's channel:
requests sized to the server's limits, many in flight, WRITEs built in place in one
reused buffer, READs batched into one send, and responses parsed straight out of
whole-buffer drains of the channel. While a download runs, the channel's pipe is a
list-based one that wakes the reader only once a whole answer can be there.

For a single file's upload the engine also sends the few requests around the data,
together where they need no answer of each other (``exchange``, ``Tail``); rename and
the rest stay with paramiko. Directory trees (``_trees``) send every request on the same
wire, many files in flight. Request ids come from the client's own counter, and every
request the engine sends is answered before the client is used again (or its channel is
closed, so the pool drops it): paramiko's framing is never left in the middle of a packet.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import secrets
import shlex
import stat as stat_mod
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal, Protocol

import paramiko
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSETSTAT,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_NAME,
    CMD_OPEN,
    CMD_OPENDIR,
    CMD_READ,
    CMD_READDIR,
    CMD_REMOVE,
    CMD_SETSTAT,
    CMD_STAT,
    CMD_STATUS,
    CMD_WRITE,
    SFTP_DESC,
    SFTP_EOF,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_READ,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
)

from ._exceptions import InvalidArgument, RemotePathError

__all__ = [
    "BlockPlan",
    "FdSink",
    "Limits",
    "LocalError",
    "Method",
    "SFTPStatusError",
    "StreamSink",
    "SyncResult",
    "TransferStats",
    "Verify",
    "download",
    "handle_of",
    "local_sha256",
    "read_blocks",
    "remote_sha256",
    "server_limits",
    "temp_name",
    "upload",
    "write_blocks",
]

Progress = Callable[[int, int], None]
Verify = Literal["size", "sha256"]
# How trees travel: "sftp" (pipelined), "tar" (one archive stream), "auto" (see _trees).
Method = Literal["auto", "sftp", "tar"]


@dataclass(frozen=True)
class SyncResult:
    """What ``sync`` / ``sync_down`` did; paths are relative to the synced directories.

    ``sent``: files and links copied to the destination; ``deleted``: entries removed
    from it (``delete=True``, or something of another kind in the way); ``unchanged``:
    files and links already the same; ``bytes_sent``: file bytes copied.
    """

    sent: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    bytes_sent: int = 0

# OpenSSH's sftp-server answers at most 261120 bytes per READ and takes packets up to
# 256 KiB; limits@openssh.com reports both. Measured: 64 KiB reads cost ~20 % more client
# CPU than these, 32 KiB ~30 %; 64 KiB writes 30-50 % more.
MAX_BLOCK = 261120
# Without limits@openssh.com the server's packet cap is unknown; the SFTP drafts ask
# every server to take packets of 34000 bytes, so a 32 KiB write is safe anywhere.
SAFE_WRITE = 32768
# Requests in flight. On loopback 4 to 64 measured the same; they matter across real
# latency, where in-flight bytes are capped anyway by the channel windows (the server's
# 2 MiB for writes, ours for reads): these keep a little more than that asked for.
WRITE_DEPTH = 16
READ_DEPTH = 32
# Downloads start at READ_DEPTH and add reads in flight while the rate still rises
# (a longer or faster link needs more than the depth that suits loopback), up to this
# many bytes asked for at once: it bounds what can pile up unread in the channel.
READ_BUDGET = 32 * 1024 * 1024
# Bytes between two rate measurements of that tuning (at least one depth's worth).
_TUNE_SPAN = 4 * 1024 * 1024
# One drain takes everything buffered (the window bounds it): asking paramiko for less
# makes it memmove the rest of its buffer on every read.
_RECV_ALL = 1 << 30
# Answers to requests already sent after a failure: how long to wait for them.
_SETTLE_TIMEOUT = 30.0

_HDR = struct.Struct(">IBI")
_U32 = struct.Struct(">I")
_OFFSET_LEN = struct.Struct(">QI")


class LocalError(Exception):
    """A local read or write failed mid-transfer; carries the OSError to re-raise.

    Wrapped so the caller's SFTP error mapping does not report a full local disk as a
    problem with the remote path.
    """

    def __init__(self, original: OSError) -> None:
        super().__init__(str(original))
        self.original = original


@dataclass(frozen=True)
class Limits:
    read: int
    write: int
    # Open handles the server allows (0: not said); not part of what a Limits "is".
    handles: int = field(default=0, compare=False)


@dataclass(frozen=True)
class TransferStats:
    """One transfer: ``end`` is the byte offset reached (the file's size when complete);
    ``sent`` counts payload moved by this call, so a resumed prefix is not in it."""

    start: int
    end: int
    sent: int
    seconds: float


class SFTPStatusError(OSError):
    """A STATUS answer that is not OK; ``code`` is the SFTP status number."""

    code: int = 0


def status_error(code: int, text: str) -> SFTPStatusError:
    # Same shapes as paramiko's _convert_status (errno for the two it maps), so callers
    # map both alike; never an empty message, whatever the server sent.
    name = SFTP_DESC[code] if 0 <= code < len(SFTP_DESC) else "unknown status"
    message = text or f"{name} (SFTP status {code}, no message from the server)"
    if code == SFTP_NO_SUCH_FILE:
        exc = SFTPStatusError(errno.ENOENT, message)
    elif code == SFTP_PERMISSION_DENIED:
        exc = SFTPStatusError(errno.EACCES, message)
    else:
        exc = SFTPStatusError(message)
    exc.code = code
    return exc


def parse_status(body: memoryview) -> tuple[int, str]:
    code: int = _U32.unpack_from(body, 0)[0]
    text = ""
    if len(body) >= 8:
        n = _U32.unpack_from(body, 4)[0]
        text = bytes(body[8 : 8 + n]).decode("utf-8", "replace")
    return code, text


Span = tuple[int, int]  # (offset, length) of one request


class Wire:
    """SFTP packets straight on the channel of an SFTPClient the caller holds alone.

    ``waiting`` maps the id of every request sent and not yet answered to its span.
    Answers to ids it does not know are skipped, as paramiko skips them (a file closed
    with reads still in flight leaves those behind).
    """

    def __init__(self, client: paramiko.SFTPClient) -> None:
        chan = client.get_channel()
        if chan is None or chan.closed:
            raise EOFError("the SFTP channel is closed")
        self.client = client
        self.chan = chan
        self._data = b""
        self._view = memoryview(self._data)
        self._pos = 0
        self.waiting: dict[int, Span] = {}
        self.broken = False

    def next_id(self) -> int:
        client = self.client
        with client._lock:  # type: ignore[attr-defined]
            rid: int = client.request_number
            client.request_number = rid + 1
        return rid

    def send(self, data: bytes | bytearray | memoryview, *requests: tuple[int, Span]) -> None:
        """Send whole packets, then count ``requests`` (id, span) as waiting."""
        chan = self.chan
        view = memoryview(data)
        # paramiko cuts what it sends to the peer's packet size and coerces each piece
        # with a try/except that raises twice for anything but bytes: handing it bytes
        # of exactly that size measured ~5 % less CPU than views.
        step = max(1024, chan.out_max_packet_size - 64)
        pos, end = 0, len(view)
        self.broken = True  # until the last byte is out
        try:
            while pos < end:
                sent = chan.send(view[pos : pos + step].tobytes())
                if sent <= 0:
                    raise EOFError("the SFTP channel closed")
                pos += sent
        except OSError as exc:  # paramiko raises OSError("Socket is closed")
            raise EOFError(str(exc) or "the SFTP channel closed") from None
        self.broken = False
        self.waiting.update(requests)

    def reply(self, block: bool = True) -> tuple[int, Span, memoryview] | None:
        """The next answer as (type, span asked, body after the id); None if not ready."""
        waiting = self.waiting
        while True:
            data, pos = self._data, self._pos
            avail = len(data) - pos
            end = 0
            if avail >= 9:
                length, kind, rid = _HDR.unpack_from(data, pos)
                end = pos + 4 + length
                if end <= len(data):
                    self._pos = end
                    span = waiting.pop(rid, None)
                    if span is None:
                        continue
                    return kind, span, self._view[pos + 9 : end]
            chan = self.chan
            if not block and not chan.recv_ready():
                return None
            pipe = getattr(chan, "in_buffer", None)
            if block and isinstance(pipe, _ChunkPipe):
                # Sleep until the packet can be whole, not once per SSH packet: a READ
                # answer is 8 of those, and each wake-up re-joined the partial packet.
                want = (end - len(data)) if end else 9 - avail
                # Past a third of the window the server could stall short of it.
                pipe.want = want if want * 3 < chan.in_window_size else 1
            try:
                chunk = chan.recv(_RECV_ALL)
            except TimeoutError:
                raise TimeoutError("no answer from the SFTP server") from None
            if not chunk:
                raise EOFError("the SFTP channel closed")
            if avail == 0:
                self._data, self._pos = chunk, 0
            elif end and end - len(data) <= len(chunk):
                # A packet cut by the end of the last drain: join just that packet and
                # carry on in the new drain without copying it.
                need = end - len(data)
                whole = b"".join((self._view[pos:], memoryview(chunk)[:need]))
                self._data, self._pos = chunk, need
                self._view = memoryview(chunk)
                span = waiting.pop(rid, None)
                if span is None:
                    continue
                return kind, span, memoryview(whole)[9:]
            else:
                self._data, self._pos = data[pos:] + chunk, 0
            self._view = memoryview(self._data)

    def backlog(self) -> int:
        """Bytes received and not yet handed out as answers."""
        pipe = getattr(self.chan, "in_buffer", None)
        queued = len(pipe) if isinstance(pipe, _ChunkPipe) else 0
        return len(self._data) - self._pos + queued

    def settle(self) -> None:
        """After a failure: take the answers still owed, or close the channel.

        A closed channel makes the pool discard the client, whose stream would
        otherwise be out of step.
        """
        if not self.waiting and not self.broken:
            return
        if self.broken or self.chan.closed:
            self.chan.close()
            return
        old = self.chan.gettimeout()
        try:
            self.chan.settimeout(_SETTLE_TIMEOUT)
            while self.waiting:
                self.reply()
        except BaseException:
            self.chan.close()
            raise
        finally:
            with contextlib.suppress(Exception):
                self.chan.settimeout(old)


if TYPE_CHECKING:

    _PipeBase = BufferedPipe[bytes]  # generic only in the stubs
else:
    _PipeBase = BufferedPipe


class _ChunkPipe(_PipeBase):
    """paramiko's channel pipe, keeping fed packets in a list instead of a byte array.

    BufferedPipe appends every SSH packet to an array and copies the array out twice
    per read (slice, then tobytes); measured, that was a third of the client's CPU on
    a download. Here a read joins the packets once. Same locking, timeout and close
    behaviour; every method is overridden, so nothing of the base class state is used.
    """

    def __init__(self) -> None:
        super().__init__()
        self._mutex = threading.Lock()
        self._ready = threading.Condition(self._mutex)
        self._waker: threading.Event | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._shut = False
        # Bytes the reader is waiting for; feeds below that do not wake it. Reset by
        # every read, so paramiko's own readers are never held back.
        self.want = 1

    def set_event(self, event: threading.Event) -> None:
        with self._mutex:
            self._waker = event
            if self._shut or self._size:
                event.set()
            else:
                event.clear()

    def feed(self, data: bytes | str) -> None:
        chunk = data.encode() if isinstance(data, str) else bytes(data)
        with self._mutex:
            if self._waker is not None:
                self._waker.set()
            self._chunks.append(chunk)
            self._size += len(chunk)
            if self._size >= self.want:
                self._ready.notify_all()

    def read_ready(self) -> bool:
        with self._mutex:
            return self._size > 0

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        with self._mutex:
            want = self.want = max(1, min(self.want, nbytes))
            try:
                return self._read(nbytes, want, timeout)
            finally:
                self.want = 1

    def _read(self, nbytes: int, want: int, timeout: float | None) -> bytes:
        # The caller holds the mutex.
        if self._size < want:
            if self._shut:
                if not self._size:
                    return b""
            elif timeout == 0.0 and not self._size:
                raise PipeTimeout()
            else:
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._size < want and not self._shut:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        if self._size:
                            break
                        raise PipeTimeout()
                    self._ready.wait(left)
                if not self._size:
                    return b""
        chunks = self._chunks
        if self._size <= nbytes:
            out = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._size = 0
            if self._waker is not None and not self._shut:
                self._waker.clear()
            return out
        taken: list[bytes] = []
        short = nbytes
        while short:
            head = chunks[0]
            if len(head) <= short:
                taken.append(chunks.pop(0))
                short -= len(head)
            else:
                taken.append(head[:short])
                chunks[0] = head[short:]
                short = 0
        self._size -= nbytes
        return b"".join(taken)

    def empty(self) -> bytes:
        with self._mutex:
            out = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            if self._waker is not None and not self._shut:
                self._waker.clear()
            return out

    def close(self) -> None:
        with self._mutex:
            self._shut = True
            self._ready.notify_all()
            if self._waker is not None:
                self._waker.set()

    @property
    def closed(self) -> bool:
        return self._shut

    def __len__(self) -> int:
        with self._mutex:
            return self._size


@contextlib.contextmanager
def _chunk_pipe(chan: paramiko.Channel) -> Iterator[None]:
    """Swap the channel's stdout pipe for a _ChunkPipe while the engine reads it.

    Done under the channel's lock, which paramiko holds to close the pipe on EOF or
    close, so a close cannot land on the pipe being swapped out. Nothing is in flight
    at either swap; whatever is buffered moves across anyway.
    """
    old = getattr(chan, "in_buffer", None)
    if type(old) is not BufferedPipe:
        yield  # not paramiko's plain pipe: leave it alone
        return
    new = _ChunkPipe()
    with chan.lock:
        event = getattr(old, "_event", None)
        if isinstance(event, threading.Event):
            new.set_event(event)
        rest = old.empty()
        if rest:
            new.feed(rest)
        if getattr(old, "_closed", False):
            new.close()
        chan.in_buffer = new
    try:
        yield
    finally:
        with chan.lock:
            rest = new.empty()
            if rest:
                old.feed(rest)
            if new.closed:
                old.close()
            chan.in_buffer = old


# Per connection: every SFTP channel of one connection is served by the same server
# (asked once, not once per channel: a download on a channel that had only carried an
# upload's byte ranges paid a round trip for it before its first READ).
_limits_cache: weakref.WeakKeyDictionary[paramiko.Transport | paramiko.SFTPClient, Limits] = (
    weakref.WeakKeyDictionary()
)


def _limits_key(client: paramiko.SFTPClient) -> paramiko.Transport | paramiko.SFTPClient:
    transport = transport_of(client)
    return client if transport is None else transport


def server_limits(client: paramiko.SFTPClient) -> Limits:
    """Request sizes for this server, from limits@openssh.com when it has it."""
    cached = cached_limits(client)
    if cached is not None:
        return cached
    wire = Wire(client)
    rid = wire.next_id()
    name = b"limits@openssh.com"
    body = _U32.pack(len(name)) + name
    wire.send(_HDR.pack(5 + len(body), CMD_EXTENDED, rid) + body, (rid, (0, 0)))
    try:
        reply = wire.reply()
    except BaseException:
        wire.settle()
        raise
    assert reply is not None
    kind, _span, payload = reply
    return remember_limits(client, kind, bytes(payload))


LIMITS_REQUEST = _U32.pack(18) + b"limits@openssh.com"


def remember_limits(client: paramiko.SFTPClient, kind: int, payload: bytes) -> Limits:
    """Read (and cache for ``client``) the answer to a limits@openssh.com request."""
    limits = Limits(read=MAX_BLOCK, write=SAFE_WRITE)
    if kind == CMD_EXTENDED_REPLY and len(payload) >= 32:
        packet, read, write, handles = struct.unpack_from(">QQQQ", payload, 0)
        # 0 means "no limit": stay at OpenSSH's sizes, the ones servers are tested with.
        # A WRITE also carries ~13 + handle bytes of header inside the packet cap.
        cap = packet - 1024 if packet > 2048 else MAX_BLOCK
        limits = Limits(
            read=max(1024, min(read or MAX_BLOCK, MAX_BLOCK)),
            write=max(1024, min(write or MAX_BLOCK, cap, MAX_BLOCK)),
            handles=handles,
        )
    _limits_cache[_limits_key(client)] = limits
    return limits


def cached_limits(client: paramiko.SFTPClient) -> Limits | None:
    return _limits_cache.get(_limits_key(client))


def handle_of(fh: paramiko.SFTPFile) -> bytes:
    """The raw SFTP handle of an open file (the stubs call it SFTPHandle; it is bytes)."""
    handle: object = fh.handle
    if not isinstance(handle, bytes):
        raise TypeError(f"unexpected SFTP handle type {type(handle).__name__}")
    return handle


# -- single requests --------------------------------------------------------------------
# A few requests go on the wire here rather than through paramiko, which turns a refusal
# into a bare OSError (with no text when the server sent none) and drops the status code:
# callers need the code to tell "not supported by this server" from a real refusal.

_ATTR_PERMISSIONS = 0x4
_ATTR_ACMODTIME = 0x8


def _string(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _U32.pack(len(data)) + data


def encode_attrs(mode: int | None = None, times: tuple[float, float] | None = None) -> bytes:
    flags, body = 0, b""
    if mode is not None:
        flags |= _ATTR_PERMISSIONS
        body += _U32.pack(mode & 0o7777)
    if times is not None:
        flags |= _ATTR_ACMODTIME
        body += struct.pack(">II", int(times[0]) & 0xFFFFFFFF, int(times[1]) & 0xFFFFFFFF)
    return _U32.pack(flags) + body


def request(client: paramiko.SFTPClient, kind: int, payload: bytes) -> tuple[int, bytes]:
    """Send one request and return its answer as (packet type, body after the id)."""
    wire = Wire(client)
    rid = wire.next_id()
    wire.send(_HDR.pack(5 + len(payload), kind, rid) + payload, (rid, (0, 0)))
    try:
        reply = wire.reply()
    except BaseException:
        wire.settle()
        raise
    assert reply is not None
    answer, _span, body = reply
    return answer, bytes(body)


def exchange(
    client: paramiko.SFTPClient, requests: Sequence[tuple[int, bytes]]
) -> list[tuple[int, bytes]]:
    """Send ``requests`` (type, payload) in one go and return their answers in the same
    order: one round trip for requests that need no answer of each other."""
    wire = Wire(client)
    parts: list[bytes] = []
    ids: list[tuple[int, Span]] = []
    for i, (kind, payload) in enumerate(requests):
        rid = wire.next_id()
        parts.append(_HDR.pack(5 + len(payload), kind, rid) + payload)
        ids.append((rid, (i, 0)))
    answers: list[tuple[int, bytes]] = [(0, b"")] * len(requests)
    try:
        wire.send(b"".join(parts), *ids)
        while wire.waiting:
            reply = wire.reply()
            assert reply is not None
            kind, (i, _n), body = reply
            answers[i] = (kind, bytes(body))
    except BaseException:
        wire.settle()
        raise
    return answers


@dataclass(frozen=True)
class FileAttrs:
    """What an ATTRS answer says (None: not given)."""

    size: int | None
    mode: int | None
    mtime: int | None


def _attrs_at(body: bytes, pos: int) -> tuple[FileAttrs, int]:
    flags = _U32.unpack_from(body, pos)[0]
    pos, size, mode, mtime = pos + 4, None, None, None
    if flags & 0x1:
        size = struct.unpack_from(">Q", body, pos)[0]
        pos += 8
    if flags & 0x2:
        pos += 8  # uid, gid
    if flags & _ATTR_PERMISSIONS:
        mode = _U32.unpack_from(body, pos)[0]
        pos += 4
    if flags & _ATTR_ACMODTIME:
        mtime = _U32.unpack_from(body, pos + 4)[0]
        pos += 8
    if flags & 0x80000000:  # extended pairs: skipped
        count = _U32.unpack_from(body, pos)[0]
        pos += 4
        for _ in range(2 * count):
            pos += 4 + _U32.unpack_from(body, pos)[0]
    return FileAttrs(size, mode, mtime), pos


def attrs_answer(answer: int, body: bytes, what: str) -> FileAttrs:
    """The attributes in the answer to a STAT or FSTAT; raises its refusal."""
    if answer != CMD_ATTRS:
        _raise_status(answer, body, what)
        raise OSError(f"SFTP server answered {what} with an OK status and no attributes")
    try:
        return _attrs_at(body, 0)[0]
    except struct.error:
        raise OSError(f"SFTP server sent malformed attributes for {what}") from None


def opendir_request(path: str) -> tuple[int, bytes]:
    return CMD_OPENDIR, _string(path)


def listing_requests(handle: bytes) -> list[tuple[int, bytes]]:
    """Three READDIRs of an open directory with its CLOSE behind them: one round trip
    for the directories uploads land in (answers to listing_answers)."""
    h = _string(handle)
    return [(CMD_READDIR, h)] * 3 + [(CMD_CLOSE, h)]


def listing_answers(
    client: paramiko.SFTPClient, path: str, answers: Sequence[tuple[int, bytes]]
) -> list[tuple[str, FileAttrs]]:
    """The entries in the answers to listing_requests; a longer listing is read again
    the plain way."""
    entries: list[tuple[str, FileAttrs]] = []
    try:
        for kind, body in answers[:3]:
            if kind != CMD_NAME:
                code, text = parse_status(memoryview(body)) if kind == CMD_STATUS else (4, "")
                if code == SFTP_EOF:
                    return entries
                raise status_error(code, text or f"READDIR answered with packet type {kind}")
            pos = 4
            for _ in range(_U32.unpack_from(body, 0)[0]):
                n = _U32.unpack_from(body, pos)[0]
                name = body[pos + 4 : pos + 4 + n].decode("utf-8", "surrogateescape")
                pos += 4 + n
                pos += 4 + _U32.unpack_from(body, pos)[0]  # longname
                attrs, pos = _attrs_at(body, pos)
                entries.append((name, attrs))
    except struct.error:
        raise OSError(f"SFTP server sent a malformed listing of {path!r}") from None
    return [(a.filename, FileAttrs(a.st_size, a.st_mode, None if a.st_mtime is None
                                   else int(a.st_mtime)))
            for a in client.listdir_attr(path)]


def list_dir(client: paramiko.SFTPClient, path: str) -> list[tuple[str, FileAttrs]]:
    """The entries of directory ``path``: OPENDIR, then listing_requests (two round
    trips for the directories uploads land in)."""
    handle = handle_answer(*exchange(client, [opendir_request(path)])[0], "an OPENDIR")
    return listing_answers(client, path, exchange(client, listing_requests(handle)))


def handle_answer(answer: int, body: bytes, what: str) -> bytes:
    """The handle in the answer to an OPEN; raises its refusal."""
    if answer != CMD_HANDLE:
        _raise_status(answer, body, what)
        raise OSError(f"SFTP server answered {what} with an OK status and no handle")
    n = _U32.unpack_from(body, 0)[0]
    return body[4 : 4 + n]


def status_answer(answer: int, body: bytes, what: str) -> None:
    """Raises the refusal in a STATUS answer (SFTPStatusError), if it is one."""
    _raise_status(answer, body, what)


def close_quietly(client: paramiko.SFTPClient, handle: bytes) -> None:
    """CLOSE a raw handle after a failure, whatever the answer (or the channel) does."""
    with contextlib.suppress(Exception):
        request(client, CMD_CLOSE, _string(handle))


def limits_request() -> tuple[int, bytes]:
    """limits@openssh.com, for exchange; its answer goes to remember_limits."""
    return CMD_EXTENDED, LIMITS_REQUEST


def stat_request(path: str) -> tuple[int, bytes]:
    return CMD_STAT, _string(path)


def open_request(
    path: str, *, resume: bool, mode: int | None, new_name: bool = False
) -> tuple[int, bytes]:
    return CMD_OPEN, upload_open_payload(path, resume=resume, mode=mode, new_name=new_name)


def read_open_request(path: str) -> tuple[int, bytes]:
    """The OPEN of ``path`` for reading (its answer to handle_answer)."""
    return CMD_OPEN, _string(path) + _U32.pack(SFTP_FLAG_READ) + encode_attrs()


def close_unanswered(client: paramiko.SFTPClient, handle: bytes) -> None:
    """CLOSE a handle only read from without waiting for the answer: nothing depends on
    it, and whoever reads this client next skips it (Wire and paramiko skip answers to
    ids they do not know). Saves a download its last round trip. A channel already
    gone takes the handle with it, so that is no error."""
    payload = _string(handle)
    with contextlib.suppress(EOFError, OSError, paramiko.SSHException):
        wire = Wire(client)
        wire.send(_HDR.pack(5 + len(payload), CMD_CLOSE, wire.next_id()) + payload)


def close_request(handle: bytes) -> tuple[int, bytes]:
    return CMD_CLOSE, _string(handle)


def remove_request(path: str) -> tuple[int, bytes]:
    return CMD_REMOVE, _string(path)


def finish_requests(handle: bytes, mode: int | None) -> list[tuple[int, bytes]]:
    """FSTAT (the size check), FSETSTAT of ``mode`` if given, CLOSE: one handle's
    requests, which servers run in order, so they can go right behind its WRITEs."""
    h = _string(handle)
    requests = [(CMD_FSTAT, h)]
    if mode is not None:
        requests.append((CMD_FSETSTAT, h + encode_attrs(mode)))
    requests.append((CMD_CLOSE, h))
    return requests


def note_unsupported(client: paramiko.SFTPClient, what: str, exc: SFTPStatusError) -> None:
    """Remember a server's OP_UNSUPPORTED for ``what`` on this connection."""
    transport = transport_of(client)
    if exc.code == SFTP_OP_UNSUPPORTED and transport is not None:
        unsupported_error[what].add(transport)


def refused_before(client: paramiko.SFTPClient, what: str) -> bool:
    transport = transport_of(client)
    return transport is not None and transport in unsupported_error[what]


@dataclass
class Tail:
    """Requests ``upload`` sends right behind the last WRITE on the same handle (the
    server runs them after every write), and their answers, in order."""

    requests: Sequence[tuple[int, bytes]]
    answers: list[tuple[int, bytes]] = field(default_factory=list)
    sent: bool = False


def _raise_status(answer: int, body: bytes, what: str) -> None:
    if answer != CMD_STATUS:
        raise OSError(f"SFTP server answered {what} with packet type {answer}")
    code, text = parse_status(memoryview(body))
    if code != SFTP_OK:
        raise status_error(code, text)


# Connections whose server answered OP_UNSUPPORTED: not asked again (a tree of files
# on such a server would pay a round trip per file for the same answer).
unsupported_error: dict[str, weakref.WeakSet[paramiko.Transport]] = {
    "setstat": weakref.WeakSet(),
    "fsetstat": weakref.WeakSet(),
    "posix-rename": weakref.WeakSet(),
}


def _status_request(client: paramiko.SFTPClient, what: str, kind: int, payload: bytes) -> None:
    if refused_before(client, what):
        raise status_error(
            SFTP_OP_UNSUPPORTED,
            f"Operation unsupported (SFTP status {SFTP_OP_UNSUPPORTED}: this server refused "
            f"{what} earlier on this connection)",
        )
    status_of(client, what, *request(client, kind, payload))


def status_of(client: paramiko.SFTPClient, what: str, answer: int, body: bytes) -> None:
    """Raise the refusal in the STATUS answer to ``what`` (an unsupported_error key),
    remembering an OP_UNSUPPORTED for the connection."""
    try:
        _raise_status(answer, body, what)
    except SFTPStatusError as exc:
        note_unsupported(client, what, exc)
        raise


def setstat(
    client: paramiko.SFTPClient,
    path: str,
    *,
    mode: int | None = None,
    times: tuple[float, float] | None = None,
) -> None:
    """SETSTAT the mode and/or times in one request; SFTPStatusError if refused."""
    _status_request(client, "setstat", CMD_SETSTAT, _string(path) + encode_attrs(mode, times))


def posix_rename_request(old: str, new: str) -> tuple[int, bytes]:
    """posix-rename@openssh.com, for exchange; its answer goes to status_of."""
    return CMD_EXTENDED, _string("posix-rename@openssh.com") + _string(old) + _string(new)


def posix_rename(client: paramiko.SFTPClient, old: str, new: str) -> None:
    """posix-rename@openssh.com; SFTPStatusError (code OP_UNSUPPORTED) where it is missing."""
    _status_request(client, "posix-rename", *posix_rename_request(old, new))


def upload_open_payload(
    path: str, *, resume: bool, mode: int | None, new_name: bool = False
) -> bytes:
    """The OPEN of ``path`` for writing: a new or truncated file created with ``mode``
    (the server's umask applies), or with ``resume`` the kept partial, which must exist
    (a vanished partial must not come back as an empty file to write past).

    ``new_name``: ``path`` is a random name made for this upload (temp_name), so there
    is nothing to cut and the OPEN does not truncate: ext4 and XFS flush a file that was
    truncated when it is closed (measured: the CLOSE of 128 MiB took 37 ms more). A file
    that did hold the name keeps its bytes past the upload's end, which the size check
    then reports; nothing is put in place."""
    if resume:
        flags = SFTP_FLAG_READ | SFTP_FLAG_WRITE
    elif new_name:
        flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE
    else:
        flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC
    return _string(path) + _U32.pack(flags) + encode_attrs(None if resume else mode)


def open_for_upload(
    client: paramiko.SFTPClient, path: str, *, resume: bool, mode: int | None,
    new_name: bool = False,
) -> paramiko.SFTPFile:
    """Open ``path`` for writing (see upload_open_payload)."""
    payload = upload_open_payload(path, resume=resume, mode=mode, new_name=new_name)
    answer, body = request(client, CMD_OPEN, payload)
    if answer != CMD_HANDLE:
        _raise_status(answer, body, "an OPEN")
        raise OSError("SFTP server answered an OPEN with an OK status and no handle")
    n = _U32.unpack_from(body, 0)[0]
    return paramiko.SFTPFile(client, body[4 : 4 + n], "r+b" if resume else "wb")


def open_beside(
    client: paramiko.SFTPClient, path: str, *, create: bool, mode: int | None
) -> paramiko.SFTPFile:
    """Open ``path`` for writing next to the channel that opens it with open_for_upload:
    never truncated (the two opens may land in either order, and no write is sent until
    that one has been answered), created with the same ``mode`` when ``create``."""
    flags = SFTP_FLAG_WRITE | (SFTP_FLAG_CREATE if create else 0)
    payload = _string(path) + _U32.pack(flags) + encode_attrs(mode if create else None)
    answer, body = request(client, CMD_OPEN, payload)
    if answer != CMD_HANDLE:
        _raise_status(answer, body, "an OPEN")
        raise OSError("SFTP server answered an OPEN with an OK status and no handle")
    n = _U32.unpack_from(body, 0)[0]
    return paramiko.SFTPFile(client, body[4 : 4 + n], "wb")


def transport_of(client: paramiko.SFTPClient) -> paramiko.Transport | None:
    chan = client.get_channel()
    return None if chan is None else chan.get_transport()


def temp_name(target: str, *, resume: bool) -> str:
    """Hidden sibling of ``target`` to write into before the rename.

    Random per call, or derived from the name alone when the transfer is resumable (so
    the next attempt finds the partial). Long names are shortened to stay under the
    255-byte name limit, with a hash keeping them distinct.
    """
    directory, name = posixpath.split(target)
    stem = name
    if len(name.encode("utf-8", "surrogateescape")) > 180:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        stem = name[:60] + "~" + digest
    tag = "sshbridge" if resume else f"sshbridge-{secrets.token_hex(4)}"
    return posixpath.join(directory, f".{stem}.{tag}.part")


def upload(
    client: paramiko.SFTPClient,
    handle: bytes,
    read_into: Callable[[memoryview], int],
    *,
    start: int = 0,
    total: int | None = None,
    progress: Progress | None = None,
    block: int | None = None,
    depth: int = WRITE_DEPTH,
    tail: Tail | None = None,
) -> TransferStats:
    """Write what ``read_into`` yields to an open remote handle, from offset ``start``.

    ``read_into`` fills the buffer it is given and returns the count, 0 at the end (like
    ``readinto``). ``progress`` gets (acknowledged bytes + start, total or bytes so far).
    ``tail`` goes right behind the last WRITE; its answers are all in when this returns.
    """
    t0 = time.perf_counter()
    wire = Wire(client)
    if block is None:
        block = server_limits(client).write
    hlen = len(handle)
    head = 13 + hlen + 12  # length, type, id, handle string, offset, data length
    buf = bytearray(head + block)
    view = memoryview(buf)
    _U32.pack_into(buf, 9, hlen)
    buf[13 : 13 + hlen] = handle
    payload = view[head:]
    waiting = wire.waiting
    offset = start
    acked = 0
    eof = False

    def take(reply: tuple[int, Span, memoryview]) -> int:
        kind, (off, _n), body = reply
        if off < 0 and tail is not None:  # an answer to the tail, not a WRITE
            tail.answers[-1 - off] = (kind, bytes(body))
            return 0
        return _write_ack(reply)

    try:
        while True:
            while not eof and len(waiting) < depth:
                try:
                    n = read_into(payload)
                except OSError as exc:
                    raise LocalError(exc) from None
                if not n:
                    eof = True
                    if tail is not None:
                        _send_tail(wire, tail)
                    break
                rid = wire.next_id()
                _HDR.pack_into(buf, 0, head - 4 + n, CMD_WRITE, rid)
                _OFFSET_LEN.pack_into(buf, 13 + hlen, offset, n)
                wire.send(view[: head + n], (rid, (offset, n)))
                offset += n
                # Take acks as they arrive; wait for one only when the pipe is full.
                while waiting:
                    reply = wire.reply(block=len(waiting) >= depth)
                    if reply is None:
                        break
                    got = take(reply)
                    acked += got
                    if progress is not None and got:
                        progress(start + acked, offset if total is None else total)
            if not waiting:
                break
            reply = wire.reply()
            assert reply is not None
            got = take(reply)
            acked += got
            # Reported per acknowledged WRITE: the tail's answers move no byte.
            if progress is not None and got:
                progress(start + acked, offset if total is None else total)
    except BaseException as exc:
        if not isinstance(exc, EOFError):
            wire.settle()
        raise
    return TransferStats(start, offset, offset - start, time.perf_counter() - t0)


def _send_tail(wire: Wire, tail: Tail) -> None:
    parts: list[bytes] = []
    ids: list[tuple[int, Span]] = []
    for i, (kind, payload) in enumerate(tail.requests):
        rid = wire.next_id()
        parts.append(_HDR.pack(5 + len(payload), kind, rid) + payload)
        ids.append((rid, (-1 - i, 0)))
    tail.answers = [(0, b"")] * len(tail.requests)
    tail.sent = True  # from here on the handle may be closed: never CLOSE it again
    wire.send(b"".join(parts), *ids)


def _write_ack(reply: tuple[int, Span, memoryview]) -> int:
    kind, (_offset, n), body = reply
    if kind != CMD_STATUS:
        raise OSError(f"SFTP server answered a write with packet type {kind}")
    code, text = parse_status(body)
    if code != SFTP_OK:
        raise status_error(code, text)
    return n


# -- byte ranges on several channels -----------------------------------------------------


class BlockPlan(Protocol):
    """Blocks of one file shared by the channels that move it (see ``_ranges``)."""

    def take(self, most: int) -> Span | None:
        """The next block of at most ``most`` bytes; None if there is none right now."""
        ...

    def wait(self) -> bool:
        """Block until something changed; False once nothing is left to take."""
        ...

    def done(self, offset: int, n: int) -> None:
        """``n`` bytes from ``offset`` are written (acknowledged, or stored locally)."""
        ...

    def cut(self, at: int) -> None:
        """The file ends at ``at``: nothing from there on is moved."""
        ...

    def exhausted(self) -> bool:
        """Every block has been handed out (or the plan failed)."""
        ...


def write_blocks(
    client: paramiko.SFTPClient,
    handle: bytes,
    plan: BlockPlan,
    read_at: Callable[[memoryview, int], int],
    *,
    block: int,
    depth: int = WRITE_DEPTH,
    tick: Callable[[], None] | None = None,
    tail: Tail | None = None,
) -> None:
    """Write the blocks ``plan`` hands out to an open remote handle, ``depth`` in flight.

    ``read_at(buf, offset)`` fills ``buf`` from the local file at ``offset`` and returns
    the count (short at its end). ``tick`` runs after every acknowledgement taken here
    and every change seen while waiting (the caller's progress and cancellation point).
    ``tail`` goes behind this channel's last WRITE, once no block is left to hand out
    (other channels may still have writes in flight then).
    Every request sent is answered before this returns or raises.
    """
    wire = Wire(client)
    hlen = len(handle)
    head = 13 + hlen + 12
    buf = bytearray(head + block)
    view = memoryview(buf)
    _U32.pack_into(buf, 9, hlen)
    buf[13 : 13 + hlen] = handle
    payload = view[head:]
    waiting = wire.waiting

    def ack(reply: tuple[int, Span, memoryview]) -> None:
        kind, (off, _n), body = reply
        if off < 0 and tail is not None:  # an answer to the tail, not a WRITE
            tail.answers[-1 - off] = (kind, bytes(body))
            return
        plan.done(off, _write_ack(reply))
        if tick is not None:
            tick()

    try:
        while True:
            while len(waiting) < depth:
                span = plan.take(block)
                if span is None:
                    if tail is not None and not tail.sent and plan.exhausted():
                        _send_tail(wire, tail)
                    break
                off, want = span
                try:
                    n = read_at(payload[:want], off)
                except OSError as exc:
                    raise LocalError(exc) from None
                if n < want:
                    plan.cut(off + n)  # the local file is shorter than it was
                if n <= 0:
                    break
                rid = wire.next_id()
                _HDR.pack_into(buf, 0, head - 4 + n, CMD_WRITE, rid)
                _OFFSET_LEN.pack_into(buf, 13 + hlen, off, n)
                wire.send(view[: head + n], (rid, (off, n)))
                while waiting:
                    reply = wire.reply(block=len(waiting) >= depth)
                    if reply is None:
                        break
                    ack(reply)
            if waiting:
                reply = wire.reply()
                assert reply is not None
                ack(reply)
                continue
            if not plan.wait():
                if tail is not None and not tail.sent:
                    _send_tail(wire, tail)
                    continue  # its answers, then done
                return
            if tick is not None:
                tick()
    except BaseException as exc:
        if not isinstance(exc, EOFError):
            wire.settle()
        raise


def read_blocks(
    client: paramiko.SFTPClient,
    handle: bytes,
    plan: BlockPlan,
    sink: Sink,
    *,
    block: int,
    depth: int = READ_DEPTH,
    tick: Callable[[], None] | None = None,
    probe: int | None = None,
) -> bool:
    """Read the blocks ``plan`` hands out from an open remote handle into ``sink``.

    A short answer is asked again for the rest; end-of-file inside a block cuts the
    plan there. With ``probe`` (the size expected), one read there once nothing is left
    to take tells whether the file grew: True if it did (those bytes are not written).
    ``tick`` as in write_blocks.
    """
    wire = Wire(client)
    prefix = _U32.pack(len(handle)) + handle
    req_len = 1 + 4 + len(prefix) + 12
    refill = max(1, depth // 4)
    waiting = wire.waiting
    again: list[Span] = []
    probed = probe is None
    grew = False
    with _chunk_pipe(wire.chan):
        try:
            while True:
                parts: list[bytes] = []
                spans: list[tuple[int, Span]] = []
                room = depth - len(waiting) if len(waiting) <= depth - refill else 0
                while len(spans) < room:
                    span = again.pop() if again else plan.take(block)
                    if span is None:
                        break
                    rid = wire.next_id()
                    spans.append((rid, span))
                    parts.append(_HDR.pack(req_len, CMD_READ, rid) + prefix
                                 + _OFFSET_LEN.pack(*span))
                if parts:
                    wire.send(b"".join(parts), *spans)
                if not waiting:
                    if plan.wait():
                        if tick is not None:
                            tick()
                        continue
                    if probed or probe is None:
                        return grew
                    probed = True
                    rid = wire.next_id()
                    wire.send(_HDR.pack(req_len, CMD_READ, rid) + prefix
                              + _OFFSET_LEN.pack(probe, block), (rid, (probe, block)))
                reply = wire.reply()
                assert reply is not None
                kind, (off, n), body = reply
                past = probe is not None and off >= probe  # the probe's answer
                if kind == CMD_DATA:
                    got = _U32.unpack_from(body, 0)[0]
                    if got == 0 or got > n or len(body) < 4 + got:
                        raise OSError(f"SFTP server answered a {n}-byte read with {got} bytes")
                    if past:
                        grew = True
                    else:
                        sink.write_at(body[4 : 4 + got], off)
                        plan.done(off, got)
                        if got < n:
                            again.append((off + got, n - got))
                elif kind == CMD_STATUS:
                    code, text = parse_status(body)
                    if code != SFTP_EOF:
                        raise status_error(code, text)
                    if not past:
                        plan.cut(off)  # the file is shorter than it was
                else:
                    raise OSError(f"SFTP server answered a read with packet type {kind}")
                if tick is not None:
                    tick()
        except BaseException as exc:
            if not isinstance(exc, EOFError):
                wire.settle()
            raise


class Sink(Protocol):
    def write_at(self, data: memoryview, offset: int) -> None: ...


class FdSink:
    """Positional writes into a local file descriptor, in any order."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write_at(self, data: memoryview, offset: int) -> None:
        try:
            while data:
                n = os.pwrite(self.fd, data, offset)
                data = data[n:]
                offset += n
        except OSError as exc:
            raise LocalError(exc) from None


class StreamSink:
    """Writes into a stream in file order; an early chunk waits (bounded by the depth)."""

    def __init__(self, stream: IO[bytes], start: int = 0, *, hasher: _Hash | None = None) -> None:
        self.stream = stream
        self.next = start
        self.early: dict[int, bytes] = {}
        self.hasher = hasher

    def _put(self, data: bytes | memoryview) -> None:
        if self.hasher is not None:
            self.hasher.update(data)
        try:
            self.stream.write(data)
        except OSError as exc:
            raise LocalError(exc) from None
        self.next += len(data)

    def write_at(self, data: memoryview, offset: int) -> None:
        if offset != self.next:
            self.early[offset] = bytes(data)
            return
        self._put(data)
        while self.early:
            chunk = self.early.pop(self.next, None)
            if chunk is None:
                break
            self._put(chunk)


class _DepthTuner:
    """Hill-climbs the number of reads in flight: more while each step raises the rate.

    Past the bandwidth-delay product more reads only queue at the server, so the first
    step that does not add 5 % ends the climb; so does the cap.
    """

    def __init__(self, depth: int, cap: int, block: int) -> None:
        self.block = block
        self.cap = max(depth, cap)
        self.active = depth < self.cap
        self.mark = 0
        self.since = time.perf_counter()
        self.rate = 0.0

    def grown(self, done: int, depth: int, backlog: int) -> int:
        if done - self.mark < max(_TUNE_SPAN, depth * self.block):
            return depth
        now = time.perf_counter()
        rate = (done - self.mark) / max(now - self.since, 1e-6)
        self.mark, self.since = done, now
        # Answers already waiting to be parsed: this side sets the pace, and more in
        # flight would only pile up unread (measured on loopback: slower, +30 MiB RSS).
        if rate < self.rate * 1.05 or backlog >= 4 * self.block:
            self.active = False
            return depth
        self.rate = rate
        depth = min(self.cap, depth + max(4, depth // 2))
        self.active = depth < self.cap
        return depth


def download(
    client: paramiko.SFTPClient,
    handle: bytes,
    sink: Sink,
    *,
    size: int,
    start: int = 0,
    progress: Progress | None = None,
    block: int | None = None,
    depth: int = READ_DEPTH,
    path: str = "",
    max_depth: int | None = None,
) -> TransferStats:
    """Read an open remote file from ``start`` to its end into ``sink``.

    ``size`` is the expected size: requests are pipelined up to it, then one probe at a
    time follows the file until the server says end-of-file, so growth is read too and
    the caller compares ``end`` with what it expected. A short read asks again for the
    rest. Raises RemotePathError when the bytes received do not form one run. ``depth``
    reads start in flight and more are added while that raises the rate, up to
    ``max_depth`` (default: READ_BUDGET bytes' worth).
    """
    t0 = time.perf_counter()
    wire = Wire(client)
    if block is None:
        block = server_limits(client).read
    prefix = _U32.pack(len(handle)) + handle
    req_len = 1 + 4 + len(prefix) + 12
    refill = max(1, depth // 4)
    tune = _DepthTuner(depth, READ_BUDGET // block if max_depth is None else max_depth, block)
    waiting = wire.waiting
    again: list[Span] = []
    offset = start
    got_total = 0
    eof_at: int | None = None
    probing = False
    # The pipe goes back only once nothing is in flight: settle inside the block.
    with _chunk_pipe(wire.chan):
        try:
            while True:
                parts: list[bytes] = []
                spans: list[tuple[int, Span]] = []
                # Refill in batches: every send is a trip through paramiko's packet
                # path, which costs as much for 40 bytes as for 32 KiB.
                room = depth - len(waiting) if len(waiting) <= depth - refill else 0
                while len(spans) < room:
                    if again:
                        off, n = again.pop()
                    elif offset < size:
                        off, n = offset, min(block, size - offset)
                        offset += n
                    elif eof_at is None and not probing:
                        off, n = offset, block
                        offset += n
                        probing = True
                    else:
                        break
                    rid = wire.next_id()
                    spans.append((rid, (off, n)))
                    parts.append(_HDR.pack(req_len, CMD_READ, rid) + prefix
                                 + _OFFSET_LEN.pack(off, n))
                if parts:
                    # One send for the lot: one SSH packet carries many requests.
                    wire.send(b"".join(parts), *spans)
                if not waiting:
                    break
                reply = wire.reply()
                assert reply is not None
                kind, (off, n), body = reply
                if kind == CMD_DATA:
                    got = _U32.unpack_from(body, 0)[0]
                    if got == 0 or got > n or len(body) < 4 + got:
                        raise OSError(f"SFTP server answered a {n}-byte read with {got} bytes")
                    sink.write_at(body[4 : 4 + got], off)
                    got_total += got
                    if tune.active:
                        depth = tune.grown(got_total, depth, wire.backlog())
                        refill = max(1, depth // 4)
                    if got < n:
                        again.append((off + got, n - got))
                    if off + n > size:
                        # Longer than expected: keep probing, one block at a time.
                        size = offset
                        probing = False
                    if progress is not None:
                        progress(start + got_total, max(size, start + got_total))
                elif kind == CMD_STATUS:
                    code, text = parse_status(body)
                    if code != SFTP_EOF:
                        raise status_error(code, text)
                    eof_at = off if eof_at is None else min(eof_at, off)
                else:
                    raise OSError(f"SFTP server answered a read with packet type {kind}")
        except BaseException as exc:
            if not isinstance(exc, EOFError):
                wire.settle()
            raise
    end = start + got_total if eof_at is None else eof_at
    if end != start + got_total:
        raise RemotePathError(
            f"download of {path!r}: the file changed during the transfer (end of file at "
            f"byte {end}, {got_total} bytes received from byte {start}); try again",
            path=path,
        )
    return TransferStats(start, end, got_total, time.perf_counter() - t0)


# -- checksums --------------------------------------------------------------------------


class _Hash(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def check_verify(verify: object) -> Verify:
    if verify not in ("size", "sha256"):
        raise InvalidArgument(f"verify must be 'size' or 'sha256', got {verify!r}")
    return "sha256" if verify == "sha256" else "size"


def remote_sha256(source: object, path: str, *, size: int = 0) -> str:
    """sha256 of a remote file, computed on the sandbox (``sha256sum``, else ``shasum``)."""
    opener = getattr(source, "open_channel", None)
    if opener is None:
        raise InvalidArgument("verify='sha256' needs a source that can run commands")
    script = (
        "if command -v sha256sum >/dev/null 2>&1; then sha256sum; "
        f"else shasum -a 256; fi < {shlex.quote(path)}"
    )
    command = "sh -c " + shlex.quote(script)  # whatever the login shell is
    chan: paramiko.Channel = opener()
    out = bytearray()
    err = bytearray()
    try:
        # Hashing runs at hundreds of MB/s; the floor covers a slow or busy sandbox.
        chan.settimeout(60.0 + size / 20e6)
        chan.exec_command(command)
        while True:
            data = chan.recv(65536)
            if not data:
                break
            out += data
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        status = chan.recv_exit_status()
    except TimeoutError:
        raise RemotePathError(f"checksum of {path!r} on the sandbox timed out", path=path) from None
    finally:
        chan.close()
    digest = out.decode("ascii", "replace").split(" ", 1)[0].strip().lower()
    if status != 0 or len(digest) != 64:
        detail = err.decode("utf-8", "replace").strip() or f"exit status {status}"
        raise RemotePathError(f"checksum of {path!r} on the sandbox failed: {detail}", path=path)
    return digest


def local_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def in_background(fn: Callable[[], str]) -> Future[str]:
    """Run ``fn`` on its own thread (hashlib drops the GIL while it hashes)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sshbridge-hash")
    try:
        return pool.submit(fn)
    finally:
        pool.shutdown(wait=False)


# -- directory trees --------------------------------------------------------------------


SymlinkOrder = Literal["openssh", "draft"]
_symlink_orders: weakref.WeakKeyDictionary[paramiko.Transport, SymlinkOrder] = (
    weakref.WeakKeyDictionary()
)


def _is_link(client: paramiko.SFTPClient, path: str) -> bool:
    try:
        return stat_mod.S_ISLNK(client.lstat(path).st_mode or 0)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise


def symlink_order(client: paramiko.SFTPClient, directory: str) -> SymlinkOrder:
    """How this server reads SYMLINK's two paths, probed once per connection.

    OpenSSH's sftp-server takes (target, link), the reverse of the SFTP draft's
    (linkpath, targetpath); paramiko and AsyncSSH servers follow OpenSSH for clients
    like ours, servers written to the draft do not. Guessing wrong makes the link at
    the target's path, possibly outside the tree. The probe sends two fresh names
    inside ``directory`` and looks which one became a link; nothing else is touched.
    """
    transport = transport_of(client)
    cached = _symlink_orders.get(transport) if transport is not None else None
    if cached is not None:
        return cached
    tag = secrets.token_hex(4)
    first = posixpath.join(directory, f".sshbridge-probe-{tag}-1")
    second = posixpath.join(directory, f".sshbridge-probe-{tag}-2")
    client.symlink(first, second)  # paramiko sends its two arguments in this order
    try:
        order: SymlinkOrder
        if _is_link(client, second):
            order = "openssh"  # a link at the second path, reading the first
        elif _is_link(client, first):
            order = "draft"
        else:
            raise OSError("the SFTP server answered SYMLINK with OK but made no link")
    finally:
        for probe in (first, second):
            with contextlib.suppress(OSError):  # the one never made is absent
                client.remove(probe)
    if transport is not None:
        _symlink_orders[transport] = order
    return order


def make_symlink(client: paramiko.SFTPClient, link_to: str, path: str, directory: str) -> None:
    """Make the link ``path`` -> ``link_to`` in the server's SYMLINK order, then check it
    with readlink; anything else it made is removed and the call fails."""
    order = symlink_order(client, directory)
    with contextlib.suppress(OSError):
        client.remove(path)  # replaces a file or link; a directory stays and SYMLINK fails
    if order == "openssh":
        client.symlink(link_to, path)
    else:
        client.symlink(path, link_to)
    try:
        made: str | None = client.readlink(path)
    except OSError:
        made = None
    if made == link_to:
        return
    # Not what was asked. Take away what this request can have made: a link at ``path``,
    # or, read the other way round, a link at ``link_to`` that reads ``path``.
    with contextlib.suppress(OSError):
        if _is_link(client, path):
            client.remove(path)
    with contextlib.suppress(OSError):
        if client.readlink(link_to) == path:
            client.remove(link_to)
    raise RemotePathError(
        f"create link {path!r} -> {link_to!r}: the server's SYMLINK did not make that link "
        f"(readlink gives {made!r}); whatever it made was removed",
        path=path,
    )


def set_attrs(
    client: paramiko.SFTPClient,
    path: str,
    notes: list[str],
    *,
    mode: int | None = None,
    times: tuple[float, float] | None = None,
) -> None:
    """SETSTAT, noting a refusal instead of failing: the data is in place either way."""
    try:
        setstat(client, path, mode=mode, times=times)
    except SFTPStatusError as exc:
        if times is None and mode is not None:
            with contextlib.suppress(OSError):  # already right (say, from mkdir): no news
                if stat_mod.S_IMODE(client.stat(path).st_mode or 0) == mode:
                    return
        what = "mode" if times is None else "times" if mode is None else "mode and times"
        notes.append(f"{what} of {path!r} not set ({exc})")


def attributes_warning(what: str, notes: list[str]) -> str:
    shown = "; ".join(notes[:3]) + (f"; and {len(notes) - 3} more" if len(notes) > 3 else "")
    return f"{what}: the server did not set every attribute: {shown}"



def real_dir(path: Path, root: Path) -> None:
    """Refuse to write below a symbolic link inside the tree being downloaded."""
    here = path
    while True:
        if here.is_symlink():
            raise InvalidArgument(
                f"local path {str(here)!r} is a symbolic link; get_dir does not write "
                "through links"
            )
        if here == root or here.parent == here:
            return
        here = here.parent
