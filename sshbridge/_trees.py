"""Directory trees without a round trip per file: pipelined SFTP, tar streams, sync.

The SFTP paths keep many files in flight on one channel: each file is a short chain of
requests (OPEN; WRITEs or READs, FSTAT, FSETSTAT and CLOSE on the handle; RENAME), and
the chains of up to ``WINDOW`` files overlap, every answer matched to its request by id.
Requests on one handle are sent together: SFTP servers handle a handle's requests in
the order they came (OpenSSH, Dropbear's sftp-server, paramiko and AsyncSSH all serve a
channel's requests one after another). Requests that depend on an earlier answer (a
WRITE needs the handle, a RENAME the closed and checked file) wait for it.

The tar paths stream one archive over one exec channel. Downloads unpack it here into
temporary names, refuse anything that would land outside the tree or pass through a
link, and rename into place only once the remote tar has exited cleanly.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import os
import posixpath
import secrets
import shlex
import shutil
import stat as stat_mod
import struct
import tarfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import paramiko
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_FSETSTAT,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_MKDIR,
    CMD_NAME,
    CMD_OPEN,
    CMD_OPENDIR,
    CMD_READ,
    CMD_READDIR,
    CMD_READLINK,
    CMD_REMOVE,
    CMD_RENAME,
    CMD_RMDIR,
    CMD_SETSTAT,
    CMD_STAT,
    CMD_STATUS,
    CMD_WRITE,
    SFTP_EOF,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_READ,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
)
from paramiko.sftp import CMD_SYMLINK as _CMD_SYMLINK

from . import _runner, _sftp, _transfer
from ._exceptions import ChannelOpenError, ConnectionLost, InvalidArgument, RemotePathError


class TreeSource(Protocol):
    """What the tree calls use: SFTP clients and exec channels on one sandbox."""

    def sftp(
        self, opened: Callable[[], None] | None = None
    ) -> contextlib.AbstractContextManager[paramiko.SFTPClient]: ...

    def open_channel(self) -> paramiko.Channel: ...

    def lost_error(self, what: str) -> ConnectionLost: ...


SFTPSource = TreeSource

Method = _transfer.Method
SyncResult = _transfer.SyncResult
Progress = Callable[[int, int], None]

# Files up to this size travel in the pipeline, read whole; bigger ones go one at a
# time through the bulk engine, which keeps its own 16 writes or 32 reads in flight.
SMALL = 4 << 20
# Files in flight at once: half the open handles a server says it allows (OpenSSH's
# limits@openssh.com), at most MAX_WINDOW, else WINDOW; and the bytes of their data
# not yet acknowledged.
WINDOW = 64
MAX_WINDOW = 256
INFLIGHT = 16 << 20


def window(client: paramiko.SFTPClient) -> int:
    limits = _transfer.cached_limits(client)
    if limits is None or not limits.handles:
        return WINDOW
    return max(8, min(MAX_WINDOW, limits.handles // 2))

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HDR = struct.Struct(">IBI")
_ATTR_SIZE, _ATTR_UIDGID, _ATTR_PERM, _ATTR_TIME = 0x1, 0x2, 0x4, 0x8
_ATTR_EXT = 0x80000000

# Exit codes of our remote scripts, chosen outside what tar, find and sh use.
_NO_TOOL = 120
_NOT_DIR = 121

# Links (sessions) whose sandbox has no tar (or no GNU find): not asked again.
_no_tar: weakref.WeakSet[object] = weakref.WeakSet()
_no_find: weakref.WeakSet[object] = weakref.WeakSet()
# Servers that refuse FSETSTAT (SETSTAT has its own record in _transfer).
_no_fsetstat: weakref.WeakSet[paramiko.Transport] = weakref.WeakSet()


def check_method(method: object) -> Method:
    if method not in ("auto", "sftp", "tar"):
        raise InvalidArgument(f"method must be 'auto', 'sftp' or 'tar', got {method!r}")
    return "tar" if method == "tar" else "sftp" if method == "sftp" else "auto"


# -- wire helpers -----------------------------------------------------------------------


def _enc(path: str) -> bytes:
    data = path.encode("utf-8", "surrogateescape")
    return _U32.pack(len(data)) + data


def _string_at(body: bytes, pos: int) -> tuple[bytes, int]:
    n = _U32.unpack_from(body, pos)[0]
    start = pos + 4
    if start + n > len(body):
        raise OSError("malformed SFTP answer (a string runs past the packet)")
    return body[start : start + n], start + n


@dataclass
class Attrs:
    size: int | None = None
    mode: int | None = None
    atime: int | None = None
    mtime: int | None = None


def _attrs_at(body: bytes, pos: int) -> tuple[Attrs, int]:
    flags = _U32.unpack_from(body, pos)[0]
    pos += 4
    out = Attrs()
    if flags & _ATTR_SIZE:
        out.size = _U64.unpack_from(body, pos)[0]
        pos += 8
    if flags & _ATTR_UIDGID:
        pos += 8
    if flags & _ATTR_PERM:
        out.mode = _U32.unpack_from(body, pos)[0]
        pos += 4
    if flags & _ATTR_TIME:
        out.atime, out.mtime = struct.unpack_from(">II", body, pos)
        pos += 8
    if flags & _ATTR_EXT:
        count = _U32.unpack_from(body, pos)[0]
        pos += 4
        for _ in range(count):
            _, pos = _string_at(body, pos)
            _, pos = _string_at(body, pos)
    return out, pos


def _status_of(kind: int, body: bytes) -> tuple[int, str]:
    """(code, text) of a STATUS answer; anything else is a protocol error."""
    if kind != CMD_STATUS:
        raise OSError(f"SFTP server answered with packet type {kind} where a status was due")
    return _transfer.parse_status(memoryview(body))


def _check(kind: int, body: bytes) -> None:
    code, text = _status_of(kind, body)
    if code != SFTP_OK:
        raise _transfer.status_error(code, text)


def _handle(kind: int, body: bytes) -> bytes:
    if kind == CMD_HANDLE:
        return _string_at(body, 0)[0]
    code, text = _status_of(kind, body)
    raise _transfer.status_error(code if code != SFTP_OK else 4, text or "no handle in answer")


def _attrs_reply(kind: int, body: bytes) -> Attrs:
    if kind == CMD_ATTRS:
        return _attrs_at(body, 0)[0]
    code, text = _status_of(kind, body)
    raise _transfer.status_error(code if code != SFTP_OK else 4, text or "no attributes")


def _attr_bytes(mode: int | None, times: tuple[float, float] | None) -> bytes:
    return _transfer.encode_attrs(mode, times)


Handler = Callable[[int, bytes], None]


class Batch:
    """Requests queued and sent together on a held SFTP client; answers by id.

    ``run`` sends what is queued, then takes answers (every one already there before
    sending again), calling each request's handler, which may queue more.
    """

    def __init__(self, client: paramiko.SFTPClient) -> None:
        self.wire = _transfer.Wire(client)
        self._parts: list[bytes] = []
        self._spans: list[tuple[int, _transfer.Span]] = []
        self._handlers: dict[int, Handler] = {}
        self.sent = 0  # requests, for the curious (tests, benchmarks)

    def queue(self, kind: int, payload: bytes, handler: Handler) -> None:
        rid = self.wire.next_id()
        self._parts.append(_HDR.pack(5 + len(payload), kind, rid) + payload)
        self._spans.append((rid, (rid, 0)))
        self._handlers[rid] = handler
        self.sent += 1

    def flush(self) -> None:
        if self._parts:
            data = b"".join(self._parts)
            spans = self._spans
            self._parts, self._spans = [], []
            self.wire.send(data, *spans)

    def run(self, refill: Callable[[], None] | None = None) -> None:
        while True:
            if refill is not None:
                refill()
            self.flush()
            if not self._handlers:
                return
            reply = self.wire.reply()
            while reply is not None:
                kind, (rid, _), body = reply
                handler = self._handlers.pop(rid)
                handler(kind, bytes(body))
                if not self._handlers:
                    break
                reply = self.wire.reply(block=False)

    def abort(self) -> None:
        """After a failure: forget what is queued, take the answers still owed."""
        self._parts.clear()
        self._spans.clear()
        self._handlers.clear()
        self.wire.settle()


def _ignore(kind: int, body: bytes) -> None:
    del kind, body


def _usable(client: paramiko.SFTPClient) -> bool:
    chan = client.get_channel()
    return chan is not None and not chan.closed and chan.get_transport().is_active()


# -- local trees ------------------------------------------------------------------------


Entry = tuple[str, str, os.stat_result]  # kind ("dir", "file", "link"), relative path, lstat


def local_plan(root: Path) -> list[Entry]:
    """Everything under ``root``, parents before children; specials skipped."""
    plan: list[Entry] = []
    for here, dirs, files in os.walk(root, followlinks=False):
        rel_here = Path(here).relative_to(root).as_posix()
        for name in sorted(dirs + files):
            st = (Path(here) / name).lstat()
            rel = name if rel_here == "." else f"{rel_here}/{name}"
            if stat_mod.S_ISLNK(st.st_mode):
                plan.append(("link", rel, st))
            elif stat_mod.S_ISDIR(st.st_mode):
                plan.append(("dir", rel, st))
            elif stat_mod.S_ISREG(st.st_mode):
                plan.append(("file", rel, st))
    plan.sort(key=lambda e: e[1].split("/"))
    return plan


@dataclass
class _Counter:
    total: int
    callback: Progress | None
    done: int = 0

    def add(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, max(self.total, self.done))

    def file(self) -> Progress | None:
        if self.callback is None:
            return None
        base, total, callback = self.done, self.total, self.callback
        return lambda done, _size: callback(base + done, max(total, base + done))


def _remote_error(exc: BaseException, path: str, action: str) -> RemotePathError:
    err = _sftp.remote_error(exc, path, action)
    err.__cause__ = exc
    return err


# -- uploads over SFTP --------------------------------------------------------------------


@dataclass
class _Up:
    rel: str
    target: str
    tmp: str
    mode: int
    times: tuple[float, float]
    data: bytes = b""
    digest: str = ""
    handle: bytes = b""
    have_mode: int | None = None
    fsetstat_refused: _transfer.SFTPStatusError | None = None
    attrs_done: bool = False


class _Pusher:
    """Uploads small files through one client, ``WINDOW`` at a time."""

    def __init__(
        self,
        source: SFTPSource,
        client: paramiko.SFTPClient,
        root: Path,
        counter: _Counter,
        notes: list[str],
        *,
        preserve_mode: bool,
        preserve_times: bool,
        hold: bool,
    ) -> None:
        self.source = source
        self.client = client
        self.root = root
        self.counter = counter
        self.notes = notes
        self.preserve_mode = preserve_mode
        self.preserve_times = preserve_times
        self.hold = hold
        self.batch = Batch(client)
        self.block = _transfer.server_limits(client).write
        self.window = window(client)
        self.transport = _transfer.transport_of(client)
        self.todo: list[tuple[str, str, os.stat_result]] = []
        self.active = 0
        self.inflight = 0
        self.maybe: set[str] = set()  # temporaries that may exist on the server
        self.handles: dict[str, bytes] = {}  # temporary -> open handle
        self.parked: list[_Up] = []
        self.slow: list[_Up] = []
        self.written: list[str] = []

    def _known(self, what: str) -> bool:
        t = self.transport
        return t is not None and t in _transfer.unsupported_error[what]

    def _learn(self, what: str) -> None:
        if self.transport is not None:
            _transfer.unsupported_error[what].add(self.transport)

    # -- the chain of one file --

    def _refill(self) -> None:
        while self.todo and self.active < self.window and self.inflight < INFLIGHT:
            rel, target, st = self.todo.pop()
            self._start(rel, target, st)

    def _start(self, rel: str, target: str, st: os.stat_result) -> None:
        path = self.root / rel
        try:
            # No link is followed: the plan saw a regular file here.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0))
            with os.fdopen(fd, "rb") as fh:
                now = os.fstat(fh.fileno())
                data = fh.read()
        except OSError as exc:
            raise _transfer.LocalError(exc) from None
        u = _Up(rel, target, _transfer.temp_name(target, resume=False),
                stat_mod.S_IMODE(now.st_mode), (st.st_atime, st.st_mtime), data)
        if self.hold:
            u.digest = hashlib.sha256(data).hexdigest()
        self.active += 1
        self.inflight += len(data)
        self.maybe.add(u.tmp)
        create = _sftp.create_mode(u.mode) if self.preserve_mode else None
        payload = (_enc(u.tmp) + _U32.pack(SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC)
                   + _attr_bytes(create, None))
        self.batch.queue(CMD_OPEN, payload, lambda k, b: self._opened(u, k, b))

    def _fail(self, u: _Up, exc: BaseException, action: str = "upload to") -> RemotePathError:
        return _remote_error(exc, u.target, action)

    def _opened(self, u: _Up, kind: int, body: bytes) -> None:
        try:
            u.handle = _handle(kind, body)
        except OSError as exc:
            self.maybe.discard(u.tmp)  # not created (or not ours to remove)
            raise self._fail(u, exc) from exc
        self.handles[u.tmp] = u.handle
        h = _U32.pack(len(u.handle)) + u.handle
        data = u.data
        for off in range(0, len(data), self.block):
            chunk = data[off : off + self.block]
            n = len(chunk)
            self.batch.queue(CMD_WRITE, h + struct.pack(">QI", off, n) + chunk,
                             functools.partial(self._wrote, u, n))
        if not data:
            self.counter.add(0)
        self.batch.queue(CMD_FSTAT, h, lambda k, b: self._fstat(u, k, b))
        mode = u.mode if self.preserve_mode else None
        times = u.times if self.preserve_times else None
        if mode is not None or times is not None:
            if self.transport is not None and self.transport in _no_fsetstat:
                u.fsetstat_refused = _transfer.status_error(
                    SFTP_OP_UNSUPPORTED, "Operation unsupported (FSETSTAT refused earlier)")
            else:
                self.batch.queue(CMD_FSETSTAT, h + _attr_bytes(mode, times),
                                 lambda k, b: self._fsetstat(u, k, b))
        self.batch.queue(CMD_CLOSE, h, lambda k, b: self._closed(u, k, b))

    def _wrote(self, u: _Up, n: int, kind: int, body: bytes) -> None:
        try:
            _check(kind, body)
        except OSError as exc:
            raise self._fail(u, exc) from exc
        self.inflight -= n
        self.counter.add(n)

    def _fstat(self, u: _Up, kind: int, body: bytes) -> None:
        try:
            attrs = _attrs_reply(kind, body)
        except OSError as exc:
            raise self._fail(u, exc) from exc
        if attrs.size is not None and attrs.size != len(u.data):
            raise RemotePathError(
                f"upload to {u.target!r}: the sandbox has {attrs.size} bytes but the local "
                f"file has {len(u.data)}; nothing was put in place, try again",
                path=u.target,
            )
        u.have_mode = None if attrs.mode is None else stat_mod.S_IMODE(attrs.mode)

    def _fsetstat(self, u: _Up, kind: int, body: bytes) -> None:
        try:
            _check(kind, body)
            u.attrs_done = True
        except _transfer.SFTPStatusError as exc:
            if exc.code == SFTP_OP_UNSUPPORTED and self.transport is not None:
                _no_fsetstat.add(self.transport)
            u.fsetstat_refused = exc

    def _closed(self, u: _Up, kind: int, body: bytes) -> None:
        self.handles.pop(u.tmp, None)
        try:
            _check(kind, body)
        except OSError as exc:
            raise self._fail(u, exc) from exc
        u.data = b""
        wants = (self.preserve_mode and u.mode != u.have_mode) or self.preserve_times
        if u.attrs_done or not wants:
            self._ready(u)
            return
        refused = u.fsetstat_refused
        unsupported = refused is not None and refused.code == SFTP_OP_UNSUPPORTED
        if unsupported and not self._known("setstat"):
            # Some servers take SETSTAT on a path but not FSETSTAT on a handle.
            mode = u.mode if self.preserve_mode and u.mode != u.have_mode else None
            times = u.times if self.preserve_times else None
            self.batch.queue(CMD_SETSTAT, _enc(u.tmp) + _attr_bytes(mode, times),
                             lambda k, b: self._setstat(u, k, b))
            return
        self._note(u, refused)
        self._ready(u)

    def _setstat(self, u: _Up, kind: int, body: bytes) -> None:
        try:
            _check(kind, body)
        except _transfer.SFTPStatusError as exc:
            if exc.code == SFTP_OP_UNSUPPORTED:
                self._learn("setstat")
            self._note(u, exc)
        self._ready(u)

    def _note(self, u: _Up, exc: BaseException | None) -> None:
        mode_bad = self.preserve_mode and u.have_mode is not None and u.have_mode != u.mode
        what = "mode and times" if mode_bad and self.preserve_times else (
            "mode" if mode_bad else "times" if self.preserve_times else "")
        if what:
            reason = exc if exc is not None else "refused"
            self.notes.append(f"{what} of {u.target!r} not set ({reason})")

    def _ready(self, u: _Up) -> None:
        self.active -= 1
        if self.hold:
            self.parked.append(u)
        else:
            self.rename(u)

    def rename(self, u: _Up) -> None:
        if self._known("posix-rename"):
            self._plain_rename(u)
            return
        payload = _enc("posix-rename@openssh.com") + _enc(u.tmp) + _enc(u.target)
        self.batch.queue(CMD_EXTENDED, payload, lambda k, b: self._renamed(u, k, b))

    def _plain_rename(self, u: _Up) -> None:
        self.batch.queue(CMD_RENAME, _enc(u.tmp) + _enc(u.target),
                         lambda k, b: self._renamed_plain(u, k, b))

    def _renamed(self, u: _Up, kind: int, body: bytes) -> None:
        try:
            _check(kind, body)
        except _transfer.SFTPStatusError as exc:
            if exc.code == SFTP_OP_UNSUPPORTED:
                self._learn("posix-rename")
            elif exc.errno in (errno.ENOENT, errno.EACCES):
                raise self._fail(u, exc) from exc
            self._plain_rename(u)
            return
        self._done(u)

    def _renamed_plain(self, u: _Up, kind: int, body: bytes) -> None:
        try:
            _check(kind, body)
        except _transfer.SFTPStatusError:
            self.slow.append(u)  # a target in the way: the careful dance, after the rest
            return
        self._done(u)

    def _done(self, u: _Up) -> None:
        self.maybe.discard(u.tmp)
        self.written.append(u.target)

    # -- driving --

    def push(self, files: list[tuple[str, str, os.stat_result]]) -> None:
        self.todo = list(reversed(files))
        self.batch.run(self._refill)
        if self.parked:
            parked, self.parked = self.parked, []
            digests = remote_digests(self.source, [u.tmp for u in parked])
            for u, theirs in zip(parked, digests, strict=True):
                if theirs != u.digest:
                    raise RemotePathError(
                        f"upload to {u.target!r}: sha256 differs between the local file and "
                        f"the sandbox's copy ({u.digest[:16]}... vs {(theirs or '?')[:16]}...); "
                        "nothing was put in place",
                        path=u.target,
                    )
            for u in parked:
                self.rename(u)
            self.batch.run()
        for u in self.slow:
            try:
                _sftp.rename_into_place(self.source, self.client, u.tmp, u.target)
            except OSError as exc:
                raise self._fail(u, exc) from exc
            self._done(u)
        self.slow = []

    def cleanup(self) -> None:
        """After a failure: close what is open and remove every temporary of ours."""
        with contextlib.suppress(Exception):
            self.batch.abort()
        leftovers = sorted(self.maybe)
        if not leftovers and not self.handles:
            return
        owner = _sftp.owner_of(self.source)
        with _sftp.leftover_lock:
            _sftp.abandoned.update((owner, p) for p in leftovers)
        gone: list[str] = []

        def remove_all(client: paramiko.SFTPClient) -> None:
            batch = Batch(client)
            if client is self.client:
                for handle in self.handles.values():
                    batch.queue(CMD_CLOSE, _U32.pack(len(handle)) + handle, _ignore)

            def removed(path: str, kind: int, body: bytes) -> None:
                code, _ = _status_of(kind, body)
                if code in (SFTP_OK, SFTP_NO_SUCH_FILE):
                    gone.append(path)

            for path in leftovers:
                batch.queue(CMD_REMOVE, _enc(path), functools.partial(removed, path))
            try:
                batch.run()
            except BaseException:
                batch.abort()
                raise

        try:
            if _usable(self.client):
                remove_all(self.client)
            else:
                _sftp.on_fresh(self.source, "remove temporary files", remove_all)
        except Exception:  # noqa: BLE001 - the next upload into the directory retries
            pass
        for path in gone:
            _sftp.forget_leftover((owner, path))


def _prepare(
    source: SFTPSource,
    client: paramiko.SFTPClient,
    remote_dir: str,
    dirs: list[tuple[str, int]],
    *,
    root_exists: bool,
) -> None:
    """In one round trip as a rule: the server's limits asked, ``remote_dir`` made (or
    found to be a directory), every directory of the tree made. What was refused is
    looked at after: directories already there are fine, anything else is an error."""
    batch = Batch(client)
    failed: list[tuple[str, int]] = []
    state: dict[str, Attrs] = {}

    def limits(kind: int, body: bytes) -> None:
        _transfer.remember_limits(client, kind, body)

    def statted(kind: int, body: bytes) -> None:
        if kind == CMD_ATTRS:
            state["root"] = _attrs_at(body, 0)[0]

    def made(item: tuple[str, int], kind: int, body: bytes) -> None:
        if _status_of(kind, body)[0] != SFTP_OK:
            failed.append(item)

    if _transfer.cached_limits(client) is None:
        batch.queue(CMD_EXTENDED, _transfer.LIMITS_REQUEST, limits)
    if not root_exists:
        batch.queue(CMD_MKDIR, _enc(remote_dir) + _attr_bytes(0o755, None), _ignore)
        batch.queue(CMD_STAT, _enc(remote_dir), statted)
    for item in dirs:
        batch.queue(CMD_MKDIR, _enc(f"{remote_dir}/{item[0]}") + _attr_bytes(item[1], None),
                    functools.partial(made, item))
    try:
        batch.run()
    except BaseException:
        batch.abort()
        raise
    if not root_exists:
        attrs = state.get("root")
        if attrs is None or attrs.mode is None:
            # Missing parents (or a server that answered out of order): the slow way.
            _sftp.makedirs(source, remote_dir)
            failed = list(dirs)
        elif not stat_mod.S_ISDIR(attrs.mode):
            raise RemotePathError(
                f"create directory {remote_dir!r}: it exists and is not a directory",
                path=remote_dir, errno=errno.ENOTDIR,
            )
    if failed:
        _make_dirs(client, remote_dir, sorted(failed, key=lambda i: i[0].split("/")),
                   look_first=True)


def _make_dirs(client: paramiko.SFTPClient, remote_dir: str,
               dirs: list[tuple[str, int]], *, look_first: bool = False) -> None:
    """MKDIR every (relative path, mode) at once; those that failed for want of their
    parent (a server answering out of order) go again; those that exist must be
    directories. ``look_first``: the MKDIRs were refused once already, STAT first."""
    left = list(dirs)
    while left:
        missing = _mkdir_round(client, remote_dir, left, look_first=look_first)
        looked, look_first = look_first, False
        if len(missing) == len(left) and not looked:
            path = f"{remote_dir}/{missing[0][0]}"
            raise RemotePathError(f"create directory {path!r}: the server refused it",
                                  path=path, errno=errno.ENOENT)
        left = sorted(missing, key=lambda i: i[0].split("/"))


def _mkdir_round(client: paramiko.SFTPClient, remote_dir: str,
                 dirs: list[tuple[str, int]], *, look_first: bool = False
                 ) -> list[tuple[str, int]]:
    """One round of MKDIRs (then STATs of the refused ones); returns those whose parent
    was missing."""
    failed: list[tuple[str, int]] = []
    missing: list[tuple[str, int]] = []
    batch = Batch(client)

    def made(item: tuple[str, int], kind: int, body: bytes) -> None:
        if _status_of(kind, body)[0] != SFTP_OK:
            failed.append(item)

    def statted(item: tuple[str, int], kind: int, body: bytes) -> None:
        path = f"{remote_dir}/{item[0]}"
        if kind == CMD_ATTRS:
            if not stat_mod.S_ISDIR(_attrs_at(body, 0)[0].mode or 0):
                raise RemotePathError(
                    f"create directory {path!r}: it exists and is not a directory",
                    path=path, errno=errno.ENOTDIR,
                )
            return
        code, text = _status_of(kind, body)
        if code == SFTP_NO_SUCH_FILE:
            missing.append(item)
            return
        raise _remote_error(_transfer.status_error(code, text), path, "create directory")

    try:
        if look_first:
            failed = list(dirs)
        else:
            for item in dirs:
                batch.queue(CMD_MKDIR,
                            _enc(f"{remote_dir}/{item[0]}") + _attr_bytes(item[1], None),
                            functools.partial(made, item))
            batch.run()
        for item in failed:
            batch.queue(CMD_STAT, _enc(f"{remote_dir}/{item[0]}"),
                        functools.partial(statted, item))
        batch.run()
    except BaseException:
        batch.abort()
        raise
    return missing


def _dir_attrs(
    client: paramiko.SFTPClient,
    items: list[tuple[str, int | None, tuple[float, float] | None]],
    notes: list[str],
) -> None:
    """SETSTAT (path, mode, times) for every directory at once, deepest first; a refusal
    is noted (a mode already right is no news)."""
    if not items:
        return
    transport = _transfer.transport_of(client)
    known = transport is not None and transport in _transfer.unsupported_error["setstat"]
    refused: list[tuple[str, int | None, tuple[float, float] | None, str]] = []
    batch = Batch(client)

    def setstat_done(item: tuple[str, int | None, tuple[float, float] | None],
                     kind: int, body: bytes) -> None:
        code, text = _status_of(kind, body)
        if code == SFTP_OK:
            return
        exc = _transfer.status_error(code, text)
        if code == SFTP_OP_UNSUPPORTED and transport is not None:
            _transfer.unsupported_error["setstat"].add(transport)
        refused.append((*item, str(exc)))

    try:
        if known:
            reason = str(_transfer.status_error(
                SFTP_OP_UNSUPPORTED, "Operation unsupported (this server refused setstat "
                "earlier on this connection)"))
            refused = [(*item, reason) for item in items]
        else:
            for item in items:
                path, mode, times = item
                batch.queue(CMD_SETSTAT, _enc(path) + _attr_bytes(mode, times),
                            functools.partial(setstat_done, item))
            batch.run()
        if not refused:
            return
        have: dict[str, int] = {}

        def statted(path: str, kind: int, body: bytes) -> None:
            if kind == CMD_ATTRS:
                mode = _attrs_at(body, 0)[0].mode
                if mode is not None:
                    have[path] = stat_mod.S_IMODE(mode)

        for path, mode, _, _ in refused:
            if mode is not None:
                batch.queue(CMD_STAT, _enc(path), functools.partial(statted, path))
        batch.run()
    except BaseException:
        batch.abort()
        raise
    for path, mode, times, reason in refused:
        mode_bad = mode is not None and have.get(path) != mode
        what = "mode and times" if mode_bad and times else "mode" if mode_bad else (
            "times" if times else "")
        if what:
            notes.append(f"{what} of {path!r} not set ({reason})")


def _make_links(client: paramiko.SFTPClient, remote_dir: str,
                links: list[tuple[str, str]]) -> None:
    """Make every link (path, text) in three rounds, whatever their number: REMOVE what
    is there, SYMLINK in the server's argument order, READLINK to check. A link that
    does not read back as asked goes through make_symlink, which cleans up and fails."""
    try:
        order = _transfer.symlink_order(client, remote_dir)
    except OSError as exc:
        raise _remote_error(exc, remote_dir, "create link in") from exc
    refused: dict[str, BaseException] = {}
    wrong: list[tuple[str, str]] = []
    batch = Batch(client)

    def linked(path: str, kind: int, body: bytes) -> None:
        code, text = _status_of(kind, body)
        if code != SFTP_OK:
            refused[path] = _transfer.status_error(code, text)

    def read(path: str, link_to: str, kind: int, body: bytes) -> None:
        made = None
        if kind == CMD_NAME and _U32.unpack_from(body, 0)[0] >= 1:
            made = _string_at(body, 4)[0].decode("utf-8", "surrogateescape")
        if made != link_to:
            wrong.append((path, link_to))

    try:
        for path, _ in links:
            batch.queue(CMD_REMOVE, _enc(path), _ignore)  # a file or link in the way
        batch.run()
        for path, link_to in links:
            pair = (link_to, path) if order == "openssh" else (path, link_to)
            batch.queue(_CMD_SYMLINK, _enc(pair[0]) + _enc(pair[1]),
                        functools.partial(linked, path))
        batch.run()
        for path, link_to in links:
            if path not in refused:
                batch.queue(CMD_READLINK, _enc(path), functools.partial(read, path, link_to))
        batch.run()
    except BaseException:
        batch.abort()
        raise
    if refused:
        path, why = next(iter(refused.items()))
        raise _remote_error(why, path, "create link")
    for path, link_to in wrong:
        try:
            _transfer.make_symlink(client, link_to, path, remote_dir)
        except OSError as exc:
            if isinstance(exc, RemotePathError):
                raise
            raise _remote_error(exc, path, "create link") from exc


def push_tree(
    source: SFTPSource,
    root: Path,
    remote_dir: str,
    plan: list[Entry],
    *,
    preserve_mode: bool,
    preserve_times: bool,
    verify: _transfer.Verify,
    callback: Progress | None,
    notes: list[str],
    dir_attrs: list[Entry] | None = None,
    root_exists: bool = False,
) -> list[str]:
    """Upload ``plan`` (entries relative to ``root``) into ``remote_dir`` over SFTP.

    ``dir_attrs`` are the directories whose mode and times to set at the end (default:
    every directory of the plan)."""
    files = [e for e in plan if e[0] == "file"]
    counter = _Counter(sum(st.st_size for _, _, st in files), callback)
    small = [(rel, f"{remote_dir}/{rel}", st) for _, rel, st in files if st.st_size <= SMALL]
    large = [(rel, st) for _, rel, st in files if st.st_size > SMALL]
    dirs = [(rel, (stat_mod.S_IMODE(st.st_mode) & 0o777) | 0o700 if preserve_mode else 0o755)
            for kind, rel, st in plan if kind == "dir"]
    links = [rel for kind, rel, _ in plan if kind == "link"]
    written: list[str] = []
    try:
        with _sftp.mapped(source, remote_dir, "upload to") as client:
            _prepare(source, client, remote_dir, dirs, root_exists=root_exists)
            pusher = _Pusher(source, client, root, counter, notes, preserve_mode=preserve_mode,
                             preserve_times=preserve_times, hold=verify == "sha256")
            try:
                pusher.push(small)
            except BaseException:
                pusher.cleanup()
                raise
            written += pusher.written
            for directory in sorted({posixpath.dirname(t) for _, t, _ in small}):
                _sftp.tidy(source, client, directory, None)
            if links:
                _make_links(client, remote_dir,
                            [(f"{remote_dir}/{rel}", os.readlink(root / rel)) for rel in links])
        for rel, st in large:
            target = f"{remote_dir}/{rel}"
            _sftp.upload_file(source, root / rel, target, preserve_mode=preserve_mode,
                              callback=counter.file(), verify=verify, notes=notes)
            counter.done += st.st_size
            written.append(target)
            if preserve_times:
                with _sftp.mapped(source, target, "set times of") as client:
                    _transfer.set_attrs(client, target, notes, times=(st.st_atime, st.st_mtime))
        todo = [e for e in plan if e[0] == "dir"] if dir_attrs is None else dir_attrs
        items = [
            (f"{remote_dir}/{rel}" if rel else remote_dir,
             stat_mod.S_IMODE(st.st_mode) if preserve_mode else None,
             (st.st_atime, st.st_mtime) if preserve_times else None)
            for _, rel, st in sorted(todo, key=lambda e: e[1].split("/"), reverse=True)
        ]
        items = [i for i in items if i[1] is not None or i[2] is not None]
        if items:
            with _sftp.mapped(source, remote_dir, "set attributes in") as client:
                _dir_attrs(client, items, notes)
    except _transfer.LocalError as exc:
        raise exc.original from None
    return written


# -- remote listings ----------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteEntry:
    kind: str  # "dir", "file", "link", "other"
    size: int
    mode: int  # permission bits
    mtime: int
    link: str = ""


def _kind(mode: int) -> str:
    if stat_mod.S_ISDIR(mode):
        return "dir"
    if stat_mod.S_ISREG(mode):
        return "file"
    if stat_mod.S_ISLNK(mode):
        return "link"
    return "other"


def walk_sftp(client: paramiko.SFTPClient, remote_dir: str) -> dict[str, RemoteEntry] | None:
    """The tree under ``remote_dir`` by pipelined OPENDIR/READDIR/READLINK (lstat
    semantics); None when ``remote_dir`` does not exist. Raises InvalidArgument when it
    is not a directory.

    Every directory is opened as soon as it is seen, and keeps two READDIRs in flight
    (the second usually answers EOF), so a level costs two round trips."""
    out: dict[str, RemoteEntry] = {}
    batch = Batch(client)
    top: dict[str, object] = {}

    def statted(kind: int, body: bytes) -> None:
        if kind == CMD_ATTRS:
            top["mode"] = _attrs_at(body, 0)[0].mode or 0
            return
        code, text = _status_of(kind, body)
        top["error"] = _transfer.status_error(code, text)

    def opendir(rel: str) -> None:
        path = f"{remote_dir}/{rel}" if rel else remote_dir
        batch.queue(CMD_OPENDIR, _enc(path), functools.partial(opened, rel, path))

    def opened(rel: str, path: str, kind: int, body: bytes) -> None:
        try:
            handle = _handle(kind, body)
        except OSError as exc:
            if not rel:  # the root: its STAT says why (missing, not a directory)
                top.setdefault("open_error", exc)
                return
            raise _remote_error(exc, path, "list") from exc
        h = _U32.pack(len(handle)) + handle
        state = {"pending": 2, "eof": 0}
        for _ in range(2):
            batch.queue(CMD_READDIR, h, functools.partial(names, rel, path, h, state))

    def names(rel: str, path: str, h: bytes, state: dict[str, int], kind: int,
              body: bytes) -> None:
        state["pending"] -= 1
        if kind != CMD_NAME:
            code, text = _status_of(kind, body)
            if code != SFTP_EOF:
                raise _remote_error(_transfer.status_error(code, text), path, "list")
            state["eof"] = 1
            if not state["pending"]:
                batch.queue(CMD_CLOSE, h, _ignore)
            return
        count = _U32.unpack_from(body, 0)[0]
        pos = 4
        for _ in range(count):
            raw, pos = _string_at(body, pos)
            _, pos = _string_at(body, pos)
            attrs, pos = _attrs_at(body, pos)
            name = raw.decode("utf-8", "surrogateescape")
            if name in (".", "..") or "/" in name:
                continue
            child = f"{rel}/{name}" if rel else name
            mode = attrs.mode or 0
            entry = RemoteEntry(_kind(mode), attrs.size or 0, stat_mod.S_IMODE(mode),
                                attrs.mtime or 0)
            out[child] = entry
            if entry.kind == "dir":
                opendir(child)
            elif entry.kind == "link":
                full = f"{remote_dir}/{child}"
                batch.queue(CMD_READLINK, _enc(full),
                            functools.partial(linked, child, entry, full))
        # More to read: ask twice again once both answers are in (the second of a
        # pair is usually EOF, and asking before it came would cost a round trip).
        if state["pending"] == 0:
            if state["eof"]:
                batch.queue(CMD_CLOSE, h, _ignore)
            else:
                state["pending"] = 2
                for _ in range(2):
                    batch.queue(CMD_READDIR, h, functools.partial(names, rel, path, h, state))

    def linked(child: str, entry: RemoteEntry, full: str, kind: int, body: bytes) -> None:
        if kind != CMD_NAME:
            code, text = _status_of(kind, body)
            raise _remote_error(_transfer.status_error(code, text), full, "read link")
        target, _ = _string_at(body, 4)
        out[child] = RemoteEntry("link", entry.size, entry.mode, entry.mtime,
                                 target.decode("utf-8", "surrogateescape"))

    batch.queue(CMD_STAT, _enc(remote_dir), statted)
    opendir("")
    try:
        batch.run()
    except BaseException:
        batch.abort()
        raise
    error = top.get("error")
    if isinstance(error, _transfer.SFTPStatusError):
        if error.code == SFTP_NO_SUCH_FILE:
            return None
        raise _remote_error(error, remote_dir, "list")
    mode = top.get("mode")
    if not isinstance(mode, int) or not stat_mod.S_ISDIR(mode):
        raise InvalidArgument(f"remote path {remote_dir!r} is not a directory")
    opened_error = top.get("open_error")
    if isinstance(opened_error, OSError):
        raise _remote_error(opened_error, remote_dir, "list")
    return out


_FIND = (
    'cd -- "$1" 2>/dev/null || { [ -e "$1" ] && exit @NOT_DIR@; exit 0; }\n'
    "printf 'sshbridge-listing\\0'\n"
    "exec find . ! -name . -printf '%y\\0%m\\0%s\\0%T@\\0%P\\0%l\\0'\n"
).replace("@NOT_DIR@", str(_NOT_DIR))


def list_remote(source: SFTPSource, remote_dir: str) -> dict[str, RemoteEntry] | None:
    """The remote tree: one exec of GNU find where it works, else a pipelined SFTP walk.
    None when ``remote_dir`` does not exist."""
    key = _link_key(source)
    if key is None or key not in _no_find:
        got = _find_listing(source, remote_dir)
        if not isinstance(got, bool):
            return got
        if key is not None:
            _no_find.add(key)
    with _sftp.mapped(source, remote_dir, "list") as client:
        return walk_sftp(client, remote_dir)


def _link_key(source: object) -> object | None:
    """The link (one session) a call source is on: what a tool probe is remembered for."""
    manager = getattr(source, "manager", None)
    if manager is None:
        return source  # a Link itself
    try:
        link: object = manager.current()
    except Exception:  # noqa: BLE001 - no link yet: nothing remembered
        return None
    return link


def _exec(source: SFTPSource, script: str, *args: str) -> tuple[int, bytes, bytes] | None:
    """Run a POSIX sh script with arguments; None when the command could not start."""
    try:
        r = _runner.execute(source, ["sh", "-c", script, "sh", *args])
    except ChannelOpenError:
        return None
    return r.exit_code, r.stdout_bytes, r.stderr_bytes


def _find_listing(source: SFTPSource, remote_dir: str) -> dict[str, RemoteEntry] | bool | None:
    """The listing, None for no such directory, False when find cannot do it here."""
    got = _exec(source, _FIND, remote_dir)
    if got is None:
        return False
    code, out, _err = got
    if code == _NOT_DIR:
        raise InvalidArgument(f"remote path {remote_dir!r} is not a directory")
    if code == 0 and not out:
        return None  # no such directory
    head = b"sshbridge-listing\0"
    if code != 0 or not out.startswith(head):
        return False
    fields = out[len(head):].split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    if len(fields) % 6:
        return False
    result: dict[str, RemoteEntry] = {}
    for i in range(0, len(fields), 6):
        kind_b, mode_b, size_b, mtime_b, path_b, link_b = fields[i : i + 6]
        kind = {b"d": "dir", b"f": "file", b"l": "link"}.get(kind_b, "other")
        try:
            mode = int(mode_b, 8)
            size = int(size_b)
            mtime = int(mtime_b.split(b".")[0])
        except ValueError:
            return False
        rel = path_b.decode("utf-8", "surrogateescape")
        link = link_b.decode("utf-8", "surrogateescape")
        result[rel] = RemoteEntry(kind, size, mode, mtime, link)
    return result


_HASH = (
    "if command -v sha256sum >/dev/null 2>&1; then h='sha256sum'; "
    "elif command -v shasum >/dev/null 2>&1; then h='shasum -a 256'; else exit @NO_TOOL@; fi\n"
    'for f do if [ -f "$f" ] && [ ! -h "$f" ]; then $h < "$f" || echo -; else echo -; fi; done\n'
).replace("@NO_TOOL@", str(_NO_TOOL))
_ARGS_BUDGET = 64 * 1024


def remote_digests(source: SFTPSource, paths: list[str], *, required: bool = True
                   ) -> list[str | None]:
    """sha256 of each remote file, in one exec per 64 KiB of paths; None for a path that
    is not a regular file. With ``required=False`` a sandbox without a hashing tool
    gives None for all (the caller reads the files instead)."""
    out: list[str | None] = []
    i = 0
    while i < len(paths):
        chunk: list[str] = []
        used = 0
        while i < len(paths) and (not chunk or used + len(paths[i]) + 3 < _ARGS_BUDGET):
            chunk.append(paths[i])
            used += len(paths[i]) + 3
            i += 1
        got = _exec(source, _HASH, *chunk)
        lines = [] if got is None else got[1].decode("ascii", "replace").splitlines()
        if got is None or got[0] != 0 or len(lines) != len(chunk):
            if not required:
                return [None] * len(paths)
            detail = "could not run" if got is None else (
                got[2].decode("utf-8", "replace").strip() or f"exit status {got[0]}")
            raise RemotePathError(f"checksums on the sandbox failed: {detail}",
                                  path=chunk[0] if chunk else "")
        for line in lines:
            digest = line.split(" ", 1)[0].strip().lower()
            out.append(digest if len(digest) == 64 else None)
    return out


# -- downloads over SFTP ----------------------------------------------------------------


@dataclass
class _Down:
    rel: str
    remote: str
    dest: Path
    size: int
    mode: int
    mtime: int
    atime: int
    tmp: Path = field(default_factory=Path)
    fd: int = -1
    handle: bytes = b""
    pending: int = 0
    got: int = 0


class _Puller:
    def __init__(self, client: paramiko.SFTPClient, counter: _Counter, *,
                 preserve_mode: bool, preserve_times: bool, hold: bool) -> None:
        self.client = client
        self.batch = Batch(client)
        self.block = _transfer.server_limits(client).read
        self.window = window(client)
        self.counter = counter
        self.preserve_mode = preserve_mode
        self.preserve_times = preserve_times
        self.hold = hold
        self.todo: list[_Down] = []
        self.active = 0
        self.inflight = 0
        self.open: dict[int, _Down] = {}  # fd -> file, until it is closed or moved
        self.handles: dict[str, bytes] = {}
        self.parked: list[_Down] = []
        self.written: list[Path] = []

    def _refill(self) -> None:
        while self.todo and self.active < self.window and self.inflight < INFLIGHT:
            self._start(self.todo.pop())

    def _fail(self, d: _Down, exc: BaseException) -> RemotePathError:
        return _remote_error(exc, d.remote, "download")

    def _start(self, d: _Down) -> None:
        d.tmp = d.dest.parent / _transfer.temp_name(d.dest.name, resume=False)
        try:
            d.fd = os.open(d.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                           | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise _transfer.LocalError(exc) from None
        self.open[d.fd] = d
        self.active += 1
        self.inflight += d.size
        self.batch.queue(CMD_OPEN, _enc(d.remote) + _U32.pack(SFTP_FLAG_READ)
                         + _attr_bytes(None, None), lambda k, b: self._opened(d, k, b))

    def _read(self, d: _Down, off: int, n: int) -> None:
        h = _U32.pack(len(d.handle)) + d.handle
        d.pending += 1
        self.batch.queue(CMD_READ, h + struct.pack(">QI", off, n),
                         lambda k, b: self._data(d, off, n, k, b))

    def _opened(self, d: _Down, kind: int, body: bytes) -> None:
        try:
            d.handle = _handle(kind, body)
        except OSError as exc:
            raise self._fail(d, exc) from exc
        self.handles[d.remote] = d.handle
        for off in range(0, d.size, self.block):
            self._read(d, off, min(self.block, d.size - off))
        self._read(d, d.size, 1)  # past the end: must be EOF, or the file grew

    def _changed(self, d: _Down) -> RemotePathError:
        return RemotePathError(
            f"download of {d.remote!r}: the file changed during the transfer (it had "
            f"{d.size} bytes when listed); try again", path=d.remote)

    def _data(self, d: _Down, off: int, n: int, kind: int, body: bytes) -> None:
        d.pending -= 1
        if kind == CMD_DATA:
            got = _U32.unpack_from(body, 0)[0]
            if got == 0 or got > n or len(body) < 4 + got:
                raise OSError(f"SFTP server answered a {n}-byte read with {got} bytes")
            if off >= d.size:
                raise self._changed(d)
            _transfer.FdSink(d.fd).write_at(memoryview(body)[4 : 4 + got], off)
            d.got += got
            self.counter.add(got)
            if got < n:
                self._read(d, off + got, n - got)
        else:
            code, text = _status_of(kind, body)
            if code != SFTP_EOF:
                raise self._fail(d, _transfer.status_error(code, text))
            if off < d.size:
                raise self._changed(d)
        if d.pending == 0:
            h = _U32.pack(len(d.handle)) + d.handle
            self.batch.queue(CMD_CLOSE, h, lambda k, b: self._closed(d, k, b))

    def _closed(self, d: _Down, kind: int, body: bytes) -> None:
        del kind, body  # the data is all here; a failed CLOSE changes nothing of it
        self.handles.pop(d.remote, None)
        self.active -= 1
        self.inflight -= d.size
        if d.got != d.size:
            raise self._changed(d)
        try:
            if self.preserve_mode:
                os.fchmod(d.fd, d.mode & 0o777)
            if self.preserve_times:
                os.utime(d.fd, (d.atime or d.mtime, d.mtime))
            os.close(d.fd)
        except OSError as exc:
            raise _transfer.LocalError(exc) from None
        del self.open[d.fd]
        d.fd = -1
        if self.hold:
            self.parked.append(d)
        else:
            self._place(d)

    def _place(self, d: _Down) -> None:
        try:
            os.replace(d.tmp, d.dest)
        except OSError as exc:
            raise _transfer.LocalError(exc) from None
        d.tmp = Path()
        self.written.append(d.dest)

    def pull(self, files: list[_Down], source: SFTPSource) -> None:
        self.todo = list(reversed(files))
        self.batch.run(self._refill)
        if self.parked:
            theirs = remote_digests(source, [d.remote for d in self.parked])
            for d, digest in zip(self.parked, theirs, strict=True):
                mine = _transfer.local_sha256(d.tmp)
                if mine != digest:
                    raise RemotePathError(
                        f"download of {d.remote!r}: sha256 differs between the sandbox's file "
                        f"and the copy received ({(digest or '?')[:16]}... vs {mine[:16]}...); "
                        "nothing was put in place", path=d.remote)
            for d in self.parked:
                self._place(d)
            self.parked = []

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.batch.abort()
        for fd, d in list(self.open.items()):
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                d.tmp.unlink()
        self.open.clear()
        for d in self.parked:
            with contextlib.suppress(OSError):
                d.tmp.unlink()
        self.parked = []
        if self.handles and _usable(self.client):
            batch = Batch(self.client)
            for handle in self.handles.values():
                batch.queue(CMD_CLOSE, _U32.pack(len(handle)) + handle, _ignore)
            try:
                batch.run()
            except Exception:  # noqa: BLE001 - settle closes the channel if it must
                with contextlib.suppress(Exception):
                    batch.abort()


def _special_refused(dest: Path) -> None:
    special = _sftp.streams_into(dest)  # raises for sockets and the like
    if special is not None:
        raise InvalidArgument(
            f"local path {str(dest)!r} is a {special}: get_dir writes regular files only")
    if dest.is_dir() and not dest.is_symlink():
        raise InvalidArgument(f"local path {str(dest)!r} is a directory, not a file")


def _local_dirs(root: Path, rels: Iterable[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _transfer.real_dir(root, root)
    for rel in rels:
        dest = root.joinpath(*rel.split("/"))
        _transfer.real_dir(dest.parent, root)
        _transfer.real_dir(dest, root)
        if not dest.is_dir():
            dest.mkdir()


def _link_refused(dest: Path) -> None:
    if dest.is_dir() and not dest.is_symlink():
        raise InvalidArgument(f"local path {str(dest)!r} is a directory, not a link")


def _local_link(dest: Path, link_to: str) -> None:
    """Make (or replace) the link ``dest``: a temporary link renamed over it, so a file
    or link there is replaced in one step; a real directory there is refused."""
    _link_refused(dest)
    tmp = dest.parent / _transfer.temp_name(dest.name, resume=False)
    os.symlink(link_to, tmp)
    try:
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _local_dir_attrs(root: Path, dirs: list[tuple[str, RemoteEntry]], *,
                     preserve_mode: bool, preserve_times: bool) -> None:
    for rel, entry in sorted(dirs, key=lambda d: d[0].split("/"), reverse=True):
        dest = root.joinpath(*rel.split("/"))
        if preserve_mode:
            os.chmod(dest, entry.mode & 0o777)
        if preserve_times:
            os.utime(dest, (entry.mtime, entry.mtime))


def pull_tree(
    source: SFTPSource,
    remote_dir: str,
    root: Path,
    listing: dict[str, RemoteEntry],
    *,
    preserve_mode: bool,
    preserve_times: bool,
    verify: _transfer.Verify,
    callback: Progress | None,
    only: set[str] | None = None,
) -> list[Path]:
    """Download the entries of ``listing`` (all, or the relative paths in ``only`` and
    the directories) into ``root`` over SFTP."""
    entries = sorted(listing.items(), key=lambda kv: kv[0].split("/"))
    dirs = [(rel, e) for rel, e in entries if e.kind == "dir"]
    picked = [(rel, e) for rel, e in entries
              if e.kind in ("file", "link") and (only is None or rel in only)]
    _local_dirs(root, [rel for rel, _ in dirs])
    files: list[_Down] = []
    large: list[tuple[str, RemoteEntry]] = []
    for rel, e in picked:
        dest = root.joinpath(*rel.split("/"))
        _transfer.real_dir(dest.parent, root)
        if e.kind != "file":
            _link_refused(dest)  # before anything is replaced
            continue
        _special_refused(dest)
        if e.size > SMALL:
            large.append((rel, e))
        else:
            files.append(_Down(rel, f"{remote_dir}/{rel}", dest, e.size, e.mode, e.mtime, e.mtime))
    counter = _Counter(sum(e.size for _, e in picked if e.kind == "file"), callback)
    written: list[Path] = []
    try:
        if files:
            with _sftp.mapped(source, remote_dir, "download") as client:
                puller = _Puller(client, counter, preserve_mode=preserve_mode,
                                 preserve_times=preserve_times, hold=verify == "sha256")
                try:
                    puller.pull(files, source)
                except BaseException:
                    puller.cleanup()
                    raise
                written += puller.written
    except _transfer.LocalError as exc:
        raise exc.original from None
    for rel, e in large:
        dest = root.joinpath(*rel.split("/"))
        _sftp.download_file(source, f"{remote_dir}/{rel}", dest, preserve_mode=preserve_mode,
                            callback=counter.file(), verify=verify, streams=False)
        counter.done += e.size
        written.append(dest)
        if preserve_times:
            os.utime(dest, (e.mtime, e.mtime))
    for rel, e in picked:
        if e.kind == "link":
            _local_link(root.joinpath(*rel.split("/")), e.link)
    _local_dir_attrs(root, dirs, preserve_mode=preserve_mode, preserve_times=preserve_times)
    order = {p: i for i, p in enumerate(root.joinpath(*rel.split("/")) for rel, _ in entries)}
    written.sort(key=lambda p: order.get(p, 0))
    return written


# -- tar ----------------------------------------------------------------------------------


class _ChannelStream(io.RawIOBase):
    """A channel as a raw stream: the base of the reader and the writer below."""

    def __init__(self, chan: paramiko.Channel) -> None:
        super().__init__()
        self.chan = chan


class _ChannelReader(_ChannelStream):
    """A channel's stdout as a raw stream, counting what it read."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.chan.recv(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n


class _ChannelWriter(_ChannelStream):
    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self.chan.sendall(bytes(data))
        return len(data)


def _tar_known_absent(source: SFTPSource) -> bool:
    key = _link_key(source)
    return key is not None and key in _no_tar


def _tar_absent(source: SFTPSource) -> None:
    key = _link_key(source)
    if key is not None:
        _no_tar.add(key)


_TAR_DOWN = (
    f"command -v tar >/dev/null 2>&1 || exit {_NO_TOOL}\n"
    f'cd -- "$1" 2>/dev/null || exit {_NOT_DIR}\n'
    "exec tar -c -f - .\n"
)


class HostileArchive(RemotePathError):
    """The archive from the sandbox names something outside the tree or through a link."""


def _member_path(name: str) -> str | None:
    """The member's path relative to the tree, '' for the tree itself, None if hostile."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def _stream_exit(chan: paramiko.Channel) -> tuple[int, str]:
    while chan.recv(65536):
        pass
    err = bytearray()
    while chan.recv_stderr_ready():
        err += chan.recv_stderr(65536)
    code = chan.recv_exit_status()
    while chan.recv_stderr_ready():
        err += chan.recv_stderr(65536)
    return code, err.decode("utf-8", "replace").strip()


def tar_get(
    source: SFTPSource,
    remote_dir: str,
    root: Path,
    *,
    preserve_mode: bool,
    preserve_times: bool,
    callback: Progress | None,
) -> list[Path] | None:
    """Download the tree as one ``tar -c`` stream; None when the sandbox has no tar
    (or ``remote_dir`` is not a directory: the SFTP path then says exactly why)."""
    try:
        chan = _runner.start_command(
            source,
            "sh -c " + shlex.quote(_TAR_DOWN) + " sh " + shlex.quote(remote_dir),
            "tar -c")
    except ChannelOpenError:
        return None
    staged: list[tuple[Path, Path]] = []  # (temporary, final)
    try:
        with chan:
            unreadable: tarfile.TarError | None = None
            try:
                result = _unpack(chan, remote_dir, root, staged, preserve_mode=preserve_mode,
                                 preserve_times=preserve_times, callback=callback)
            except tarfile.TarError as exc:
                result, unreadable = None, exc  # no archive, or a broken one
            except (EOFError, ConnectionError, TimeoutError) as exc:
                raise source.lost_error(f"during download of {remote_dir!r}") from exc
            code, err = _stream_exit(chan)
            if result is None and code in (_NO_TOOL, 127):
                _tar_absent(source)
                return None
            if result is None and code == _NOT_DIR:
                return None
            transport = chan.get_transport()
            if code == -1 and (transport is None or not transport.is_active()):
                raise source.lost_error(f"during download of {remote_dir!r}")
            if code != 0 or result is None:
                why = err or (f"exit status {code}" if code
                              else f"unreadable archive: {unreadable}")
                raise RemotePathError(
                    f"download of {remote_dir!r}: tar on the sandbox failed ({why}); "
                    "nothing was put in place", path=remote_dir)
        written, links, dirs = result
        for tmp, final in staged:
            os.replace(tmp, final)
        staged.clear()
        for dest, link_to in links:
            _local_link(dest, link_to)
        _local_dir_attrs(root, dirs, preserve_mode=preserve_mode, preserve_times=preserve_times)
        return written
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _unpack(
    chan: paramiko.Channel,
    remote_dir: str,
    root: Path,
    staged: list[tuple[Path, Path]],
    *,
    preserve_mode: bool,
    preserve_times: bool,
    callback: Progress | None,
) -> tuple[list[Path], list[tuple[Path, str]], list[tuple[str, RemoteEntry]]]:
    reader = io.BufferedReader(_ChannelReader(chan), 256 * 1024)
    kinds: dict[str, str] = {}
    files: dict[str, Path] = {}  # relative path -> staged temporary
    links: dict[str, str] = {}
    dirs: list[tuple[str, RemoteEntry]] = []
    order: list[str] = []
    done = total = 0
    made_root = False

    def hostile(why: str) -> HostileArchive:
        return HostileArchive(
            f"download of {remote_dir!r}: refusing the archive the sandbox sent: {why}; "
            "nothing was put in place", path=remote_dir)

    with tarfile.open(fileobj=reader, mode="r|", errorlevel=2) as tar:
        for member in tar:
            rel = _member_path(member.name)
            if rel is None:
                raise hostile(f"member {member.name!r} is outside the tree")
            if not made_root:
                root.mkdir(parents=True, exist_ok=True)
                _transfer.real_dir(root, root)
                made_root = True
            if rel == "":
                continue
            parts = rel.split("/")
            for i in range(1, len(parts)):
                above = "/".join(parts[:i])
                if kinds.get(above, "dir") != "dir":
                    raise hostile(f"member {member.name!r} is below the {kinds[above]} {above!r}")
            if kinds.get(rel) == "dir" and not member.isdir():
                raise hostile(f"member {member.name!r} replaces a directory")
            dest = root.joinpath(*parts)
            if member.isdir():
                if kinds.get(rel, "dir") != "dir":
                    raise hostile(f"member {member.name!r} is a directory and a file")
                for i in range(1, len(parts) + 1):
                    here = "/".join(parts[:i])
                    if here not in kinds:
                        kinds[here] = "dir"
                        _local_dirs(root, [here])
                dirs = [d for d in dirs if d[0] != rel]
                dirs.append((rel, RemoteEntry("dir", 0, stat_mod.S_IMODE(member.mode),
                                              int(member.mtime))))
                continue
            if member.isreg() or member.islnk():
                for i in range(1, len(parts)):
                    here = "/".join(parts[:i])
                    if here not in kinds:
                        kinds[here] = "dir"
                        _local_dirs(root, [here])
                _transfer.real_dir(dest.parent, root)
                _special_refused(dest)
                if member.islnk():
                    # A hard link within the tree: an independent copy, as over SFTP.
                    source_rel = _member_path(member.linkname)
                    origin = files.get(source_rel) if source_rel is not None else None
                    if origin is None:
                        raise hostile(f"hard link {member.name!r} -> {member.linkname!r} "
                                      "does not name an earlier file of the tree")
                    ost = os.stat(origin)
                    size, mode, mtime = ost.st_size, stat_mod.S_IMODE(ost.st_mode), ost.st_mtime
                    fh: IO[bytes] | None = open(origin, "rb")  # noqa: SIM115
                else:
                    size, mode, mtime = member.size, member.mode & 0o777, member.mtime
                    fh = tar.extractfile(member)
                total += size
                tmp = dest.parent / _transfer.temp_name(dest.name, resume=False)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o666)
                staged.append((tmp, dest))
                with os.fdopen(fd, "wb") as out:
                    if fh is not None:
                        with fh:
                            while True:
                                chunk = fh.read(1 << 20)
                                if not chunk:
                                    break
                                out.write(chunk)
                                done += len(chunk)
                                if callback is not None:
                                    callback(done, max(total, done))
                    out.flush()  # before the times: a later write would move them
                    if preserve_mode:
                        os.fchmod(out.fileno(), mode)
                    if preserve_times:
                        os.utime(out.fileno(), (int(mtime), int(mtime)))
                if rel in files:  # named twice: the later one wins
                    old = files[rel]
                    staged.remove(next(s for s in staged if s[0] == old))
                    with contextlib.suppress(OSError):
                        old.unlink()
                else:
                    order.append(rel)
                files[rel] = tmp
                kinds[rel] = "file"
                links.pop(rel, None)
            elif member.issym():
                for i in range(1, len(parts)):
                    here = "/".join(parts[:i])
                    if here not in kinds:
                        kinds[here] = "dir"
                        _local_dirs(root, [here])
                _transfer.real_dir(dest.parent, root)
                _link_refused(dest)
                if rel in files:
                    old = files.pop(rel)
                    staged.remove(next(s for s in staged if s[0] == old))
                    with contextlib.suppress(OSError):
                        old.unlink()
                    order.remove(rel)
                links[rel] = member.linkname
                kinds[rel] = "link"
            # FIFOs and devices are skipped, as the SFTP path skips them.
    if not made_root:
        raise tarfile.ReadError("empty archive")
    if callback is not None:
        callback(done, max(total, done))
    written = [root.joinpath(*rel.split("/")) for rel in order]
    link_list = [(root.joinpath(*rel.split("/")), to) for rel, to in links.items()]
    return written, link_list, dirs


def _tar_up_script(stage: str) -> str:
    # Unpacked into a fresh directory inside the target, then every file and link
    # renamed over its target (one rename(2) each, so none is ever seen half-written)
    # and the stage removed, whatever happened.
    return (
        f"command -v tar >/dev/null 2>&1 || exit {_NO_TOOL}\n"
        'd=$1; case $d in /*) ;; *) d="$PWD/$d" ;; esac\n'
        f's="$d/{stage}"\n'
        f'mkdir -p -- "$d" && mkdir -- "$s" || exit {_NOT_DIR}\n'
        "trap 'rm -rf -- \"$s\"' EXIT\n"
        f'cd -- "$s" || exit {_NOT_DIR}\n'
        "tar -x -o -p -f - || exit 3\n"
        "find . ! -name . -type d -exec sh -c 'for p do [ -d \"$0/$p\" ] || "
        "mkdir -- \"$0/$p\" || exit 1; done' \"$d\" {} + || exit 4\n"
        # One mv per directory: its files and links (dotfiles too), each checked first.
        "find . -type d -exec sh -c '" + _MERGE + "' \"$d\" {} + || exit 5\n"
    )


# For every staged directory given: the names in it that are not directories, after
# a link at the target is removed (mv would follow it) and a directory there refused.
_MERGE = (
    'for dir do set --; for f in "$dir"/* "$dir"/.[!.]* "$dir"/..?*; do '
    '{ [ -e "$f" ] || [ -h "$f" ]; } || continue; '
    '{ [ -d "$f" ] && [ ! -h "$f" ]; } && continue; '
    't="$0/${f#./}"; '
    'if [ -h "$t" ]; then rm -f -- "$t"; '
    'elif [ -d "$t" ]; then echo "$t is a directory" >&2; exit 1; fi; '
    'set -- "$@" "$f"; done; '
    '[ "$#" -eq 0 ] || mv -f -- "$@" "$0/${dir#./}/" || exit 1; done'
)


def tar_put(
    source: SFTPSource,
    root: Path,
    remote_dir: str,
    plan: list[Entry],
    *,
    preserve_mode: bool,
    preserve_times: bool,
    callback: Progress | None,
    notes: list[str],
) -> list[str] | None:
    """Upload the tree as one tar stream into ``tar -x``; None when the sandbox has no
    tar. Directory modes and times are then set over SFTP, as on the SFTP path."""
    stage = f".sshbridge-{secrets.token_hex(4)}.stage"
    command = "sh -c " + shlex.quote(_tar_up_script(stage)) + " sh " + shlex.quote(remote_dir)
    try:
        chan = _runner.start_command(source, command, "tar -x")
    except ChannelOpenError:
        return None
    files = [e for e in plan if e[0] == "file"]
    counter = _Counter(sum(st.st_size for _, _, st in files), callback)
    written: list[str] = []
    with chan:
        failed: BaseException | None = None
        try:
            with tarfile.open(fileobj=_ChannelWriter(chan), mode="w|", format=tarfile.PAX_FORMAT,
                              bufsize=256 * 1024) as tar:
                for kind, rel, st in plan:
                    info = tarfile.TarInfo(rel)
                    info.mtime = int(st.st_mtime if preserve_times else time.time())
                    info.mode = stat_mod.S_IMODE(st.st_mode) if preserve_mode else (
                        0o755 if kind == "dir" else 0o644)
                    if kind == "dir":
                        info.type = tarfile.DIRTYPE
                        info.mode |= 0o700
                        tar.addfile(info)
                    elif kind == "link":
                        info.type = tarfile.SYMTYPE
                        info.linkname = os.readlink(root / rel)
                        tar.addfile(info)
                    else:
                        try:
                            fh = open(root / rel, "rb")  # noqa: SIM115
                        except OSError as exc:
                            raise _transfer.LocalError(exc) from None
                        with fh:
                            size = os.fstat(fh.fileno()).st_size
                            info.size = size
                            tar.addfile(info, _Counting(fh, size, counter))
                        written.append(f"{remote_dir}/{rel}")
            chan.shutdown_write()
        except _transfer.LocalError as exc:
            raise exc.original from None
        except (EOFError, OSError) as exc:
            failed = exc  # the far end went away: its exit status says why
        code, err = _stream_exit(chan)
    # 127: no sh to run the script; inside it, failures map to other codes.
    if code in (_NO_TOOL, 127):
        _tar_absent(source)
        return None
    if code != 0:
        if failed is not None and chan.get_transport() is not None and not (
                chan.get_transport().is_active()):
            raise source.lost_error(f"during upload to {remote_dir!r}") from failed
        raise RemotePathError(
            f"upload to {remote_dir!r}: tar on the sandbox failed "
            f"({err or f'exit status {code}'}); files already renamed into place stay",
            path=remote_dir)
    if failed is not None:
        raise source.lost_error(f"during upload to {remote_dir!r}") from failed
    dirs = [e for e in plan if e[0] == "dir"]
    items = [
        (f"{remote_dir}/{rel}", stat_mod.S_IMODE(st.st_mode) if preserve_mode else None,
         (st.st_atime, st.st_mtime) if preserve_times else None)
        for _, rel, st in sorted(dirs, key=lambda e: e[1].split("/"), reverse=True)
    ]
    items = [i for i in items if i[1] is not None or i[2] is not None]
    if items:
        with _sftp.mapped(source, remote_dir, "set attributes in") as client:
            _dir_attrs(client, items, notes)
    return written


class _Counting(io.RawIOBase):
    """A local file read by tarfile: counted for progress, cut at the size announced."""

    def __init__(self, fh: IO[bytes], size: int, counter: _Counter) -> None:
        super().__init__()
        self.fh = fh
        self.left = size
        self.counter = counter

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        want = self.left if n < 0 else min(n, self.left)
        try:
            data = self.fh.read(want)
        except OSError as exc:
            raise _transfer.LocalError(exc) from None
        if len(data) < want:
            raise _transfer.LocalError(OSError(
                errno.EIO, f"{getattr(self.fh, 'name', 'a file')} shrank during the upload"))
        self.left -= len(data)
        self.counter.add(len(data))
        return data


# -- the public entry points ----------------------------------------------------------------


def _remote_root(remote_dir: str) -> str:
    return _sftp.check_remote_path(remote_dir).rstrip("/") or "/"


def put_dir(
    source: SFTPSource,
    local_dir: str | os.PathLike[str],
    remote_dir: str,
    *,
    preserve_mode: bool = True,
    preserve_times: bool = True,
    verify: _transfer.Verify = "size",
    callback: Progress | None = None,
    method: Method = "auto",
    stacklevel: int = 3,
) -> list[str]:
    """``put_dir``. "auto" and "sftp" upload over pipelined SFTP: atomic per file and
    needing nothing in the sandbox, and no slower than tar for small files. "tar"
    streams one archive (for trees of many medium files); without tar there, SFTP."""
    root = Path(local_dir)
    if not root.is_dir():
        raise InvalidArgument(f"local path {str(root)!r} is not a directory")
    remote_dir = _remote_root(remote_dir)
    verify = _transfer.check_verify(verify)
    method = check_method(method)
    if method == "tar" and verify == "sha256":
        raise InvalidArgument("verify='sha256' needs method='sftp' (or 'auto')")
    plan = local_plan(root)
    notes: list[str] = []
    written: list[str] | None = None
    if method == "tar" and not _tar_known_absent(source):
        written = tar_put(source, root, remote_dir, plan, preserve_mode=preserve_mode,
                          preserve_times=preserve_times, callback=callback, notes=notes)
    if written is None:
        written = push_tree(source, root, remote_dir, plan, preserve_mode=preserve_mode,
                            preserve_times=preserve_times, verify=verify, callback=callback,
                            notes=notes)
    if notes:
        warnings.warn(_transfer.attributes_warning(f"put_dir into {remote_dir!r}", notes),
                      _sftp.FileAttributesWarning, stacklevel=stacklevel)
    return written


def get_dir(
    source: SFTPSource,
    remote_dir: str,
    local_dir: str | os.PathLike[str],
    *,
    preserve_mode: bool = True,
    preserve_times: bool = True,
    verify: _transfer.Verify = "size",
    callback: Progress | None = None,
    method: Method = "auto",
) -> list[Path]:
    """``get_dir``. "auto": one ``tar -c`` stream where the sandbox has tar (and no
    sha256 is asked), else pipelined SFTP; either way nothing lands before it is whole."""
    remote_dir = _remote_root(remote_dir)
    verify = _transfer.check_verify(verify)
    method = check_method(method)
    if method == "tar" and verify == "sha256":
        raise InvalidArgument("verify='sha256' needs method='sftp' (or 'auto')")
    root = Path(local_dir)
    if method != "sftp" and verify == "size" and not _tar_known_absent(source):
        got = tar_get(source, remote_dir, root, preserve_mode=preserve_mode,
                      preserve_times=preserve_times, callback=callback)
        if got is not None:
            return got
    with _sftp.mapped(source, remote_dir, "list") as client:
        listing = walk_sftp(client, remote_dir)
    if listing is None:
        raise RemotePathError(f"list {remote_dir!r}: No such file (no such file or directory "
                              "on the sandbox)", path=remote_dir, errno=errno.ENOENT)
    return pull_tree(source, remote_dir, root, listing, preserve_mode=preserve_mode,
                     preserve_times=preserve_times, verify=verify, callback=callback)


# -- sync -----------------------------------------------------------------------------------


def _local_digests(paths: list[Path]) -> list[str]:
    return [_transfer.local_sha256(p) for p in paths]


def sync_up(
    source: SFTPSource,
    local_dir: str | os.PathLike[str],
    remote_dir: str,
    *,
    delete: bool = False,
    checksum: bool = False,
    progress: Progress | None = None,
    stacklevel: int = 3,
) -> SyncResult:
    root = Path(local_dir)
    if not root.is_dir():
        raise InvalidArgument(f"local path {str(root)!r} is not a directory")
    remote_dir = _remote_root(remote_dir)
    plan = local_plan(root)
    there = list_remote(source, remote_dir)
    remote = there or {}
    ours = {rel: (kind, st) for kind, rel, st in plan}
    send: list[Entry] = []
    unchanged: list[str] = []
    attrs_only: list[Entry] = []
    candidates: list[Entry] = []
    for kind, rel, st in plan:
        other = remote.get(rel)
        if kind == "dir":
            if other is None or other.kind != "dir":
                send.append((kind, rel, st))
            continue
        if kind == "link":
            if other is None or other.kind != "link" or other.link != os.readlink(root / rel):
                send.append((kind, rel, st))
            else:
                unchanged.append(rel)
            continue
        if other is None or other.kind != "file" or other.size != st.st_size:
            send.append((kind, rel, st))
        elif checksum:
            candidates.append((kind, rel, st))
        elif other.mtime != int(st.st_mtime):
            send.append((kind, rel, st))
        else:
            unchanged.append(rel)
            if other.mode != stat_mod.S_IMODE(st.st_mode):
                attrs_only.append((kind, rel, st))
    if candidates:
        theirs = remote_digests(source, [f"{remote_dir}/{rel}" for _, rel, _ in candidates],
                                required=False)
        if any(d is None for d in theirs):
            theirs = _sftp_digests(source, [f"{remote_dir}/{rel}" for _, rel, _ in candidates])
        mine = _local_digests([root / rel for _, rel, _ in candidates])
        for entry, a, b in zip(candidates, mine, theirs, strict=True):
            other = remote[entry[1]]
            if a != b:
                send.append(entry)
            else:
                unchanged.append(entry[1])
                if (other.mode != stat_mod.S_IMODE(entry[2].st_mode)
                        or other.mtime != int(entry[2].st_mtime)):
                    attrs_only.append(entry)
    # Things in the way of what is sent: a file where a directory goes, a directory
    # where a file goes (removed only with delete=True).
    in_way = [rel for kind, rel, _ in send
              if rel in remote and (remote[rel].kind == "dir") != (kind == "dir")]
    extra = [rel for rel in remote if rel not in ours and not _under_any(rel, in_way)]
    deleted: list[str] = []
    notes: list[str] = []
    blocked = [rel for rel in in_way if remote[rel].kind == "dir"]
    if blocked and not delete:
        raise RemotePathError(
            f"sync into {remote_dir!r}: {blocked[0]!r} is a directory on the sandbox and a "
            "file here; pass delete=True to replace it", path=f"{remote_dir}/{blocked[0]}")
    doomed = sorted(set(in_way) | (set(extra) if delete else set()),
                    key=lambda r: r.split("/"))
    if doomed:
        doomed = [r for r in doomed if not _under_any(r, [d for d in doomed if d != r])]
        with _sftp.mapped(source, remote_dir, "remove in") as client:
            _remote_remove(client, remote_dir, doomed, remote)
        deleted = sorted([r for r in remote if r in doomed or _under_any(r, doomed)],
                         key=lambda r: r.split("/"))
    changed_dirs = {posixpath.dirname(rel) for _, rel, _ in send} | {
        posixpath.dirname(rel) for rel in doomed}
    dir_attrs = [
        (kind, rel, st) for kind, rel, st in plan if kind == "dir" and (
            rel not in remote or remote[rel].kind != "dir" or rel in changed_dirs
            or remote[rel].mode != stat_mod.S_IMODE(st.st_mode)
            or remote[rel].mtime != int(st.st_mtime))
    ]
    bytes_sent = sum(st.st_size for kind, _, st in send if kind == "file")
    if send or dir_attrs:
        push_tree(source, root, remote_dir, send, preserve_mode=True, preserve_times=True,
                  verify="size", callback=progress, notes=notes, dir_attrs=dir_attrs,
                  root_exists=there is not None)
    if attrs_only:
        items: list[tuple[str, int | None, tuple[float, float] | None]] = [
            (f"{remote_dir}/{rel}", stat_mod.S_IMODE(st.st_mode), (st.st_atime, st.st_mtime))
            for _, rel, st in attrs_only]
        with _sftp.mapped(source, remote_dir, "set attributes in") as client:
            _dir_attrs(client, items, notes)
    if notes:
        warnings.warn(_transfer.attributes_warning(f"sync into {remote_dir!r}", notes),
                      _sftp.FileAttributesWarning, stacklevel=stacklevel)
    return SyncResult(sent=[rel for kind, rel, _ in send if kind != "dir"], deleted=deleted,
                      unchanged=sorted(unchanged, key=lambda r: r.split("/")),
                      bytes_sent=bytes_sent)


def _under_any(rel: str, tops: Iterable[str]) -> bool:
    return any(rel.startswith(t + "/") for t in tops)


def _sftp_digests(source: SFTPSource, paths: list[str]) -> list[str | None]:
    """sha256 of remote files read over SFTP (a sandbox without sha256sum)."""
    out: list[str | None] = []
    for path in paths:
        sink = _HashSink()
        _sftp.getfo(source, path, sink)  # type: ignore[arg-type]
        out.append(sink.hash.hexdigest())
    return out


class _HashSink:
    """A write-only file object that hashes what it is given."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return len(data)


def _remote_remove(client: paramiko.SFTPClient, remote_dir: str, tops: list[str],
                   listing: dict[str, RemoteEntry]) -> None:
    """Remove the entries ``tops`` (directories with all they hold) under ``remote_dir``:
    files and links at once, then directories deepest first, a level per round."""
    files: list[str] = []
    dirs: list[str] = []
    for rel, e in listing.items():
        if rel in tops or _under_any(rel, tops):
            (dirs if e.kind == "dir" else files).append(rel)
    batch = Batch(client)

    def done(path: str, kind: int, body: bytes) -> None:
        code, text = _status_of(kind, body)
        if code not in (SFTP_OK, SFTP_NO_SUCH_FILE):
            raise _remote_error(_transfer.status_error(code, text), path, "remove")

    try:
        for rel in files:
            path = f"{remote_dir}/{rel}"
            batch.queue(CMD_REMOVE, _enc(path), functools.partial(done, path))
        batch.run()
        by_depth: dict[int, list[str]] = {}
        for rel in dirs:
            by_depth.setdefault(rel.count("/"), []).append(rel)
        for depth in sorted(by_depth, reverse=True):
            for rel in by_depth[depth]:
                path = f"{remote_dir}/{rel}"
                batch.queue(CMD_RMDIR, _enc(path), functools.partial(done, path))
            batch.run()
    except BaseException:
        batch.abort()
        raise


def _local_listing(root: Path) -> dict[str, tuple[str, os.stat_result]]:
    if not root.exists():
        return {}
    return {rel: (kind, st) for kind, rel, st in local_plan(root)}


def sync_down(
    source: SFTPSource,
    remote_dir: str,
    local_dir: str | os.PathLike[str],
    *,
    delete: bool = False,
    checksum: bool = False,
    progress: Progress | None = None,
) -> SyncResult:
    remote_dir = _remote_root(remote_dir)
    root = Path(local_dir)
    listing = list_remote(source, remote_dir)
    if listing is None:
        raise RemotePathError(f"sync from {remote_dir!r}: no such directory on the sandbox",
                              path=remote_dir, errno=errno.ENOENT)
    if root.is_symlink():
        raise InvalidArgument(f"local path {str(root)!r} is a symbolic link; sync_down does "
                              "not write through links")
    ours = _local_listing(root)
    fetch: set[str] = set()
    unchanged: list[str] = []
    candidates: list[str] = []
    for rel, e in listing.items():
        mine = ours.get(rel)
        if e.kind == "link":
            if mine is None or mine[0] != "link" or os.readlink(root / rel) != e.link:
                fetch.add(rel)
            else:
                unchanged.append(rel)
        elif e.kind == "file":
            if mine is None or mine[0] != "file" or mine[1].st_size != e.size:
                fetch.add(rel)
            elif checksum:
                candidates.append(rel)
            elif int(mine[1].st_mtime) != e.mtime:
                fetch.add(rel)
            else:
                unchanged.append(rel)
    if candidates:
        theirs = remote_digests(source, [f"{remote_dir}/{rel}" for rel in candidates],
                                required=False)
        if any(d is None for d in theirs):
            theirs = _sftp_digests(source, [f"{remote_dir}/{rel}" for rel in candidates])
        for rel, digest in zip(candidates, theirs, strict=True):
            if _transfer.local_sha256(root / rel) != digest:
                fetch.add(rel)
            else:
                unchanged.append(rel)
    # Local entries in the way (a file where a directory goes, or the reverse), and
    # extras to delete: removed without following any link.
    in_way = [rel for rel, (kind, _) in ours.items() if rel in listing and (
        (listing[rel].kind == "dir") != (kind == "dir"))]
    extra = [rel for rel in ours if rel not in listing]
    blocked = [rel for rel in in_way if ours[rel][0] == "dir"]
    if blocked and not delete:
        raise InvalidArgument(
            f"local path {str(root / blocked[0])!r} is a directory here and a file on the "
            "sandbox; pass delete=True to replace it")
    doomed = sorted(set(in_way) | (set(extra) if delete else set()), key=lambda r: r.split("/"))
    doomed = [r for r in doomed if not _under_any(r, [d for d in doomed if d != r])]
    deleted: list[str] = []
    for rel in doomed:
        path = root.joinpath(*rel.split("/"))
        _transfer.real_dir(path.parent, root)
        gone = [r for r in ours if r == rel or _under_any(r, [rel])]
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        deleted += gone
    # Directories whose mode or time differ are set again; a tree with nothing to
    # fetch and nothing different costs no SFTP request at all.
    dir_differs = any(
        e.kind == "dir" and (rel not in ours or ours[rel][0] != "dir"
                             or stat_mod.S_IMODE(ours[rel][1].st_mode) != (e.mode & 0o777)
                             or int(ours[rel][1].st_mtime) != e.mtime)
        for rel, e in listing.items())
    bytes_sent = sum(listing[rel].size for rel in fetch if listing[rel].kind == "file")
    if fetch or dir_differs or deleted or not root.exists():
        pull_tree(source, remote_dir, root, listing, preserve_mode=True, preserve_times=True,
                  verify="size", callback=progress, only=fetch)
    return SyncResult(sent=sorted(fetch, key=lambda r: r.split("/")),
                      deleted=sorted(set(deleted), key=lambda r: r.split("/")),
                      unchanged=sorted(unchanged, key=lambda r: r.split("/")),
                      bytes_sent=bytes_sent)


__all__ = ["SyncResult", "TreeSource", "get_dir", "put_dir", "sync_down", "sync_up"]
