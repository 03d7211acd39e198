"""SFTP file operations: atomic uploads and downloads, and the small file-system calls."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import posixpath
import re
import stat as stat_mod
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import paramiko
from paramiko.sftp import CMD_HANDLE, SFTP_OP_UNSUPPORTED

from . import _ranges, _transfer
from ._exceptions import ConnectionLost, InvalidArgument, RemotePathError

log = logging.getLogger("sshbridge.sftp")

CHUNK = 1 << 20
ProgressCallback = Any  # Callable[[int, int], None]; kept loose for paramiko's callback

# A temporary upload file of sshbridge's naming (temp_name with resume=False) this old
# (by the server's clock) has no writer left: any live upload rewrites it far more often.
STALE_AGE = 3600.0
_TEMP_NAME = re.compile(r"\..+\.sshbridge-[0-9a-f]{8}\.part", re.DOTALL)
# How long a failed upload waits for its temporary file to be removed over a fresh
# connection when its own is gone; past that the removal carries on in the background
# and, failing that, happens at the next put into that directory.
CLEANUP_WAIT = 5.0
_REFUSALS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.EBUSY})


class FileAttributesWarning(UserWarning):
    """A transfer landed, but the server did not set some attribute asked for (a mode,
    times); the message names the files and the server's answer."""


class SFTPSource(Protocol):
    def sftp(
        self, opened: Callable[[], None] | None = None
    ) -> contextlib.AbstractContextManager[paramiko.SFTPClient]: ...

    def lost_error(self, what: str) -> ConnectionLost: ...


def check_remote_path(path: object, what: str = "remote path") -> str:
    if isinstance(path, Path):
        path = path.as_posix()
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"{what} must be a non-empty string")
    if "\x00" in path:
        raise InvalidArgument(f"{what} {path!r} contains a NUL byte")
    return path


def remote_error(exc: BaseException, path: str, action: str) -> RemotePathError:
    code = getattr(exc, "errno", None)
    if isinstance(exc, paramiko.SFTPError) or code is None:
        # paramiko reports a refusal that came without a message as a bare OSError.
        text = str(exc) or (
            f"refused by the SFTP server, which gave no reason ({type(exc).__name__})"
        )
    else:
        text = os.strerror(code) if code else str(exc)
    hint = ""
    if code == errno.ENOENT:
        hint = " (no such file or directory on the sandbox)"
    elif code == errno.EACCES:
        hint = " (permission denied on the sandbox)"
    return RemotePathError(f"{action} {path!r}: {text}{hint}", path=path, errno=code)


# OSErrors that mean the connection failed, not the remote file operation.
_LINK_ERRORS = (ConnectionError, TimeoutError)


@contextlib.contextmanager
def mapped(
    source: SFTPSource, path: str, action: str, opened: Callable[[], None] | None = None
) -> Iterator[paramiko.SFTPClient]:
    # Errors are translated, and chained to what the server or the socket said.
    try:
        with source.sftp(opened) as client:
            yield client
    except (RemotePathError, InvalidArgument, ConnectionLost):
        raise
    except (EOFError, paramiko.SSHException) as exc:
        if isinstance(exc, paramiko.SFTPError):
            raise remote_error(exc, path, action) from exc
        raise source.lost_error(f"during {action} {path!r}") from exc
    except OSError as exc:
        if isinstance(exc, _LINK_ERRORS):
            raise source.lost_error(f"during {action} {path!r}") from exc
        raise remote_error(exc, path, action) from exc


def _is_dir(client: paramiko.SFTPClient, path: str) -> bool:
    try:
        return stat_mod.S_ISDIR(client.stat(path).st_mode or 0)
    except OSError:
        return False


def _target_for_put(client: paramiko.SFTPClient, local: Path, remote: str) -> str:
    if remote.endswith("/") or _is_dir(client, remote):
        return posixpath.join(remote, local.name)
    return remote


def _quiet_close(fh: paramiko.SFTPFile) -> None:
    with contextlib.suppress(Exception):
        fh.close()


# -- after a failure: the upload's own client, or a fresh one ------------------------------


def _usable(client: paramiko.SFTPClient) -> bool:
    chan = client.get_channel()
    return chan is not None and not chan.closed and chan.get_transport().is_active()


def on_fresh(
    source: SFTPSource, what: str, work: Callable[[paramiko.SFTPClient], None]
) -> bool:
    """Run ``work`` on a new SFTP client (a new channel, or a reconnect) when the one in
    hand is gone (a cut, or a Ctrl-C that closed the channel mid-send). Waits at most
    CLEANUP_WAIT; True if it finished. Never raises (but a KeyboardInterrupt)."""
    done = threading.Event()

    def run() -> None:
        try:
            with source.sftp() as fresh:
                work(fresh)
            done.set()
        except Exception as exc:  # noqa: BLE001 - reported by the False it leads to
            log.debug("could not %s on a fresh connection: %s", what, exc)

    worker = threading.Thread(target=run, name="sshbridge-sftp-cleanup", daemon=True)
    worker.start()
    worker.join(CLEANUP_WAIT)
    return done.is_set()


# (sandbox, temporary path) of files a failed upload in this process could not remove:
# their writer is provably gone, so the next upload into that directory removes them.
abandoned: set[tuple[str, str]] = set()
# Directories already swept for stale temporaries, per connection.
_swept: weakref.WeakKeyDictionary[paramiko.Transport, set[str]] = weakref.WeakKeyDictionary()
leftover_lock = threading.Lock()


def owner_of(source: SFTPSource) -> str:
    """The sandbox ``source`` reaches (a Link, or a call source holding one)."""
    for obj in (source, getattr(source, "link", None)):
        sandbox_id = getattr(obj, "sandbox_id", None)
        if isinstance(sandbox_id, str):
            return sandbox_id
    return ""


def forget_leftover(key: tuple[str, str]) -> None:
    with leftover_lock:
        abandoned.discard(key)


def _remove(client: paramiko.SFTPClient, path: str) -> None:
    try:
        client.remove(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def _discard(source: SFTPSource, client: paramiko.SFTPClient, path: str) -> None:
    """Remove a file of ours (a temporary upload file) after a failure, whatever the
    failure was: on the upload's own client if it still works, else on a fresh one.
    Until it is gone it stays on record for the next upload into that directory.
    Never raises (but a KeyboardInterrupt)."""
    key = (owner_of(source), path)
    with leftover_lock:
        abandoned.add(key)
    if _usable(client):
        try:
            _remove(client, path)
            forget_leftover(key)
            return
        except Exception as exc:  # noqa: BLE001 - refused, or the channel broke just now
            # A refusal is an answer: the connection works and a retry would be refused
            # too. Anything else (EOF, a reset) may come before the transport notices it
            # is dead, so the fresh client below gets its turn.
            if isinstance(exc, OSError) and exc.errno in _REFUSALS:
                log.debug("could not remove %r: %s", path, exc)
                return
    if on_fresh(source, f"remove {path!r}", lambda fresh: _remove(fresh, path)):
        forget_leftover(key)


def _restore(source: SFTPSource, client: paramiko.SFTPClient, aside: str, target: str) -> None:
    """Put the old target back after the new one failed to take its place."""

    def back(c: paramiko.SFTPClient) -> None:
        try:
            c.lstat(target)
            return  # something is there now: leave it, and the old copy, alone
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        c.rename(aside, target)

    if _usable(client):
        try:
            back(client)
            return
        except Exception as exc:  # noqa: BLE001 - reported below; the caller raises its own
            if _usable(client):
                log.warning("upload to %r failed and the previous file could not be put "
                            "back (%s); it is kept as %r", target, exc, aside)
                return
    if not on_fresh(source, f"restore {target!r}", back):
        log.warning("upload to %r failed midway; the previous file is kept as %r",
                    target, aside)


def rename_into_place(
    source: SFTPSource,
    client: paramiko.SFTPClient,
    tmp: str,
    target: str,
    behind: Sequence[tuple[int, bytes]] = (),
) -> list[tuple[int, bytes]]:
    """Rename ``tmp`` over ``target``; ``behind`` are requests sent in the same round
    trip (independent of the rename), whose answers are returned.

    posix-rename@openssh.com replaces atomically. Without it, SFTPv3's RENAME refuses
    an existing target, so the old file is renamed aside first (``.NAME.sshbridge-XXXX
    .old``) and back if the second rename fails: the target is briefly absent, never
    partial, and its old content is not lost.
    """
    refused: OSError
    if _transfer.refused_before(client, "posix-rename"):
        others = _transfer.exchange(client, behind) if behind else []
        refused = _transfer.status_error(SFTP_OP_UNSUPPORTED, "posix-rename unsupported")
    else:
        answers = _transfer.exchange(
            client, [_transfer.posix_rename_request(tmp, target), *behind])
        others = answers[1:]
        try:
            _transfer.status_of(client, "posix-rename", *answers[0])
            return others
        except _transfer.SFTPStatusError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES):
                raise  # no other way round those
            refused = exc  # unsupported here, or refused: try the plain way
    try:
        client.rename(tmp, target)
        return others
    except OSError as exc:
        refused = exc
    try:
        existing = client.lstat(target)
    except OSError:
        raise refused from None  # no target in the way: the rename failed for itself
    if stat_mod.S_ISDIR(existing.st_mode or 0):
        raise refused  # never move a directory aside for a file
    aside = _transfer.temp_name(target, resume=False).removesuffix(".part") + ".old"
    client.rename(target, aside)
    try:
        client.rename(tmp, target)
    except BaseException:
        _restore(source, client, aside, target)
        raise
    # The new file is in place: the old copy is garbage, removed now or at the next put.
    _discard(source, client, aside)
    return others


def sweep_due(client: paramiko.SFTPClient, directory: str) -> bool:
    """Whether tidy() would look for stale temporaries in ``directory`` on this
    connection (so an upload can ask for the listing early)."""
    transport = _transfer.transport_of(client)
    with leftover_lock:
        return transport is not None and directory not in _swept.get(transport, ())


def tidy(
    source: SFTPSource,
    client: paramiko.SFTPClient,
    directory: str,
    server_now: float | None,
    listed: list[tuple[str, _transfer.FileAttrs]] | None = None,
) -> None:
    """After an upload: remove what failed uploads of this process left in ``directory``
    and, once per connection and directory, sshbridge temporaries older than STALE_AGE
    (``server_now`` is the server's clock: the mtime of the file just written).
    ``listed``: the directory's entries, when the upload already asked for them.

    Only random-tag names match; a resumable partial (``.NAME.sshbridge.part``) is
    never touched. Best effort: the upload has landed whatever happens here.
    """
    owner = owner_of(source)
    try:
        with leftover_lock:
            mine = [p for o, p in abandoned if o == owner and posixpath.dirname(p) == directory]
        for path in mine:
            try:
                client.remove(path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    continue
            forget_leftover((owner, path))
        transport = _transfer.transport_of(client)
        if server_now is None or transport is None:
            return
        with leftover_lock:
            seen = _swept.setdefault(transport, set())
            if directory in seen:
                return
            seen.add(directory)
        if listed is None:
            listed = _transfer.list_dir(client, directory or ".")
        for name, attrs in listed:
            if (
                _TEMP_NAME.fullmatch(name)
                and stat_mod.S_ISREG(attrs.mode or 0)
                and attrs.mtime is not None
                and server_now - attrs.mtime >= STALE_AGE
            ):
                with contextlib.suppress(OSError):
                    client.remove(posixpath.join(directory, name))
    except Exception as exc:  # noqa: BLE001
        log.debug("tidying %r after an upload failed: %s", directory, exc)


# -- uploads ------------------------------------------------------------------------------


def _partial_size(client: paramiko.SFTPClient, tmp: str, limit: int) -> int:
    """Bytes a resumable upload can keep from an earlier attempt (0: start over)."""
    try:
        attrs = client.stat(tmp)
    except OSError as exc:
        if getattr(exc, "errno", None) == errno.ENOENT:
            return 0
        raise
    size = attrs.st_size or 0
    if not stat_mod.S_ISREG(attrs.st_mode or 0) or size > limit:
        return 0
    return size


def _verify_remote(
    source: SFTPSource,
    remote: str,
    local_digest: Callable[[], str],
    size: int,
    what: str,
    path: str,
) -> None:
    """Compare the sandbox's sha256 of ``remote`` with ours, hashed at the same time."""
    ours = _transfer.in_background(local_digest)
    theirs = _transfer.remote_sha256(source, remote, size=size)
    mine = ours.result()
    if mine != theirs:
        raise RemotePathError(
            f"{what}: sha256 differs between the local file and {remote!r} on the sandbox "
            f"({mine[:16]}... vs {theirs[:16]}...); nothing was put in place",
            path=path,
        )


def create_mode(mode: int) -> int:
    # The temporary file starts with the permission bits asked for (the server's umask
    # applies), writable by its owner so that a kept partial can be resumed; SETSTAT
    # then sets the exact mode where the server allows it.
    return (mode & 0o777) | 0o600


def _apply_mode(
    client: paramiko.SFTPClient, path: str, mode: int, st_mode: int | None,
    notes: list[str],
) -> None:
    have = None if st_mode is None else stat_mod.S_IMODE(st_mode)
    if have == mode:
        return  # the create mode was enough: no SETSTAT needed
    try:
        _transfer.setstat(client, path, mode=mode)
    except _transfer.SFTPStatusError as exc:
        now = "unknown" if have is None else f"{have:04o}"
        notes.append(f"mode {mode:04o} not set, the file has {now} ({exc})")


def _first_temp(local: Path, remote: str) -> str:
    """The temporary file a new upload to ``remote`` opens first (_open_new's guess)."""
    target = posixpath.join(remote, local.name) if remote.endswith("/") else remote
    return _transfer.temp_name(target, resume=False)


def _open_new(
    source: SFTPSource, client: paramiko.SFTPClient, local: Path, remote: str,
    mode: int | None, tmp: str, crew: _ranges.Crew,
) -> tuple[str, str, bytes]:
    """The target, temporary file and open handle of a new upload to ``remote``,
    opening ``tmp`` (from _first_temp) first, as ``crew`` may too (see Crew.guess).

    Whether ``remote`` is a directory is asked together with the OPEN of the temporary
    file it needs if it is not; if it is, that file is closed and removed, and the one
    inside opened, in one more round trip.
    """
    # A client's first transfer also asks the server's request sizes, in the same trip.
    ask_limits = _transfer.cached_limits(client) is None
    extra = [_transfer.limits_request()] if ask_limits else []
    if remote.endswith("/"):
        target = posixpath.join(remote, local.name)
        only = _transfer.exchange(
            client, [_transfer.open_request(tmp, resume=False, mode=mode, new_name=True), *extra])
        if ask_limits:
            _transfer.remember_limits(client, *only[1])
        return target, tmp, _transfer.handle_answer(*only[0], "an OPEN")
    answers = _transfer.exchange(client, [
        _transfer.stat_request(remote),
        _transfer.open_request(tmp, resume=False, mode=mode, new_name=True),
        *extra,
    ])
    if ask_limits:
        _transfer.remember_limits(client, *answers[2])
    (kind, body), opened = answers[0], answers[1]
    try:
        is_dir = stat_mod.S_ISDIR(_transfer.attrs_answer(kind, body, "a STAT").mode or 0)
    except OSError:
        is_dir = False  # absent (or not ours to see): the target is that name
    if not is_dir:
        return remote, tmp, _transfer.handle_answer(*opened, "an OPEN")
    target = posixpath.join(remote, local.name)
    inside = _transfer.temp_name(target, resume=False)
    requests = [_transfer.open_request(inside, resume=False, mode=mode, new_name=True)]
    # The crew's opens of tmp answered first, so that the REMOVE lands after them.
    made = crew.settle() if crew.count else False
    stray = opened[0] == CMD_HANDLE or made
    if stray:
        requests = [_transfer.remove_request(tmp), *requests]
    if opened[0] == CMD_HANDLE:
        wrong = _transfer.handle_answer(*opened, "an OPEN")
        requests = [_transfer.close_request(wrong), *requests]
    try:
        answers = _transfer.exchange(client, requests)
        if stray:
            _transfer.status_answer(*answers[-2], "a REMOVE")
    except BaseException:
        if stray:
            _discard(source, client, tmp)
        raise
    return target, inside, _transfer.handle_answer(*answers[-1], "an OPEN")


def _finished(
    client: paramiko.SFTPClient, tail: _transfer.Tail, tmp: str
) -> tuple[_transfer.FileAttrs, bool]:
    """The answers to finish_requests: the temporary file's attributes (raising what the
    FSTAT or CLOSE met), and whether the FSETSTAT set the mode."""
    answers = tail.answers
    try:
        attrs: _transfer.FileAttrs | None = _transfer.attrs_answer(*answers[0], "an FSTAT")
    except _transfer.SFTPStatusError as exc:
        if exc.code != SFTP_OP_UNSUPPORTED:
            raise
        attrs = None  # a server without FSTAT: the path is asked once the file is closed
    _transfer.status_answer(*answers[-1], "a CLOSE")
    if attrs is None:
        stat = _transfer.exchange(client, [_transfer.stat_request(tmp)])[0]
        attrs = _transfer.attrs_answer(*stat, "a STAT")
    if len(answers) < 3:
        return attrs, False
    try:
        _transfer.status_answer(*answers[1], "an FSETSTAT")
    except _transfer.SFTPStatusError as exc:
        # Some servers take SETSTAT on a path but not FSETSTAT on a handle: the caller
        # tries that (and reports what it says).
        _transfer.note_unsupported(client, "fsetstat", exc)
        return attrs, False
    return attrs, True


def put(
    source: SFTPSource,
    local: str | os.PathLike[str],
    remote: str,
    *,
    preserve_mode: bool = True,
    callback: ProgressCallback | None = None,
    verify: _transfer.Verify = "size",
    resume: bool = False,
) -> str:
    """Upload ``local`` to ``remote`` atomically; returns the final remote path.

    The data goes to a hidden sibling first and is renamed over the target only once
    its size (and with ``verify="sha256"`` its checksum, computed on the sandbox)
    matches. With ``resume=True`` the sibling is named after the target and kept when
    the upload fails, so the next ``resume=True`` call sends only the rest. A mode the
    server would not set is reported as a ``FileAttributesWarning``; the file lands.
    """
    notes: list[str] = []
    target = upload_file(source, local, remote, preserve_mode=preserve_mode, callback=callback,
                         verify=verify, resume=resume, notes=notes, sweep=True)
    if notes:
        warnings.warn(_transfer.attributes_warning(f"upload to {target!r}", notes),
                      FileAttributesWarning, stacklevel=3)
    return target


def upload_file(
    source: SFTPSource,
    local: str | os.PathLike[str],
    remote: str,
    *,
    preserve_mode: bool,
    callback: ProgressCallback | None,
    verify: _transfer.Verify,
    resume: bool = False,
    notes: list[str],
    sweep: bool = False,
) -> str:
    """``put`` without the warning: attributes not set are added to ``notes``.
    ``sweep`` also looks for stale temporaries in the target's directory."""
    if not isinstance(local, (str, os.PathLike)):
        raise InvalidArgument("local path must be a str or os.PathLike")
    verify = _transfer.check_verify(verify)
    local_path = Path(local)
    remote = check_remote_path(remote)
    if not local_path.is_file():
        raise InvalidArgument(
            f"local path {str(local_path)!r} is not a file"
            + (" (it is a directory; use put_dir for trees)"
               if local_path.is_dir() else " (it does not exist)")
        )
    with local_path.open("rb", buffering=0) as fl:
        st = os.fstat(fl.fileno())
        size, mode = st.st_size, stat_mod.S_IMODE(st.st_mode)
        # A large file goes as byte ranges over several channels (see _ranges), whose
        # setup overlaps this one's round trips.
        crew = _ranges.Crew(source, _ranges.channels_for(size) - 1)
        try:
            # The helpers start as soon as this call's own channel is open.
            with mapped(source, remote, "upload to", crew.launch) as client:
                crew.launch()
                open_mode = create_mode(mode) if preserve_mode else None
                handle: bytes | None = None
                start = 0
                if resume:
                    target = _target_for_put(client, local_path, remote)
                    tmp = _transfer.temp_name(target, resume=True)
                    start = _ranges.resume_from(_partial_size(client, tmp, size), size)
                else:
                    first = _first_temp(local_path, remote)
                    if crew.count:
                        crew.guess(first, open_mode)
                    target, tmp, handle = _open_new(source, client, local_path, remote,
                                                    open_mode, first, crew)
                discard = not resume
                directory = posixpath.dirname(target)
                # The first upload into a directory on a connection also lists it for
                # stale temporaries (tidy): its OPENDIR goes behind the last WRITE and
                # its READDIRs behind the rename, so the listing costs no round trip.
                list_early = sweep and not start and sweep_due(client, directory)
                dir_handle: bytes | None = None
                listed: list[tuple[str, _transfer.FileAttrs]] | None = None
                try:
                    channels = crew.count + 1 if _ranges.channels_for(size - start) > 1 else 1
                    if channels > 1:
                        crew.aim_upload(tmp, create=not start, mode=open_mode)
                    # The mode goes with the size check unless a checksum is to be taken
                    # first (a mode without read permission would stop it).
                    set_mode = (preserve_mode and verify != "sha256"
                                and not _transfer.refused_before(client, "fsetstat"))
                    tail: _transfer.Tail | None = None
                    try:
                        if handle is None:
                            handle = _transfer.handle_answer(*_transfer.exchange(client, [
                                _transfer.open_request(tmp, resume=bool(start), mode=open_mode)
                            ])[0], "an OPEN")
                        finish = _transfer.finish_requests(handle, mode if set_mode else None)
                        tail = _transfer.Tail(
                            [*finish, _transfer.opendir_request(directory or ".")]
                            if list_early else finish)
                        if channels > 1:
                            # The tail goes behind this channel's last WRITE; the
                            # other channels' writes may land after its FSTAT, which
                            # is then asked again below, all writes in.
                            stats = _ranges.upload(
                                crew, client, handle, fl.fileno(),
                                start=start, size=size, progress=callback,
                                tail=None if resume else tail,
                            )
                            if not tail.sent:
                                tail.sent = True
                                tail.answers = _transfer.exchange(client, tail.requests)
                        else:
                            fl.seek(start)
                            # A kept partial is closed only once every write is in: its
                            # mode must still let the next attempt write.
                            stats = _transfer.upload(
                                client, handle, fl.readinto, start=start, total=size,
                                progress=callback, tail=None if resume else tail,
                            )
                            if not tail.sent:
                                tail.sent = True
                                tail.answers = _transfer.exchange(client, tail.requests)
                    except BaseException:
                        if handle is not None and (tail is None or not tail.sent):
                            _transfer.close_quietly(client, handle)
                        raise
                    finally:
                        crew.cancel()
                    discard = True  # a complete partial that fails a check is bad
                    if list_early:
                        (kind, body), tail.answers = tail.answers[-1], tail.answers[:-1]
                        if kind == CMD_HANDLE:
                            dir_handle = _transfer.handle_answer(kind, body, "an OPENDIR")
                    attrs, mode_set = _finished(client, tail, tmp)
                    if channels > 1 and attrs.size != size:
                        stat = _transfer.exchange(client, [_transfer.stat_request(tmp)])[0]
                        attrs = _transfer.attrs_answer(*stat, "a STAT")
                    written = attrs.size
                    if written is not None and written > size and stats.end == size and not start:
                        # Never truncated (see upload_open_payload): a file held the name.
                        raise RemotePathError(
                            f"upload to {target!r}: the temporary file {tmp!r} has {written} "
                            f"bytes, more than the {size} sent (a file of that name was there "
                            "before); nothing was put in place, try again",
                            path=target,
                        )
                    if written != size or stats.end != size:
                        raise RemotePathError(
                            f"upload to {target!r}: the sandbox has {written} bytes but the "
                            f"local file has {size} (did it change during the upload?); "
                            "nothing was put in place, try again",
                            path=target,
                        )
                    if verify == "sha256":
                        _verify_remote(source, tmp, lambda: _transfer.local_sha256(local_path),
                                       size, f"upload to {target!r}", target)
                    if preserve_mode and not mode_set:
                        _apply_mode(client, tmp, mode, attrs.mode, notes)
                    behind = [] if dir_handle is None else _transfer.listing_requests(dir_handle)
                    dir_handle = None  # closed by the last of those
                    answers = rename_into_place(source, client, tmp, target, behind)
                    if answers:
                        try:
                            listed = _transfer.listing_answers(client, directory or ".", answers)
                        except OSError:
                            listed = None  # tidy lists it again
                except BaseException:
                    if dir_handle is not None:
                        _transfer.close_quietly(client, dir_handle)
                    if discard:
                        _discard(source, client, tmp)
                    raise
                # The temporary file's mtime is the server's "now", unless nothing was
                # written to a kept partial.
                fresh = stats.sent > 0 or not start
                now = attrs.mtime if sweep and fresh else None
                tidy(source, client, directory, None if now is None else float(now), listed)
        except _transfer.LocalError as exc:
            raise exc.original from None
        finally:
            crew.cancel()
    return target


def putfo(
    source: SFTPSource,
    fileobj: IO[bytes],
    remote: str,
    *,
    mode: int | None = None,
    callback: ProgressCallback | None = None,
    verify: _transfer.Verify = "size",
) -> str:
    """Upload a binary file object (read to its end) to ``remote`` atomically."""
    remote = check_remote_path(remote)
    verify = _transfer.check_verify(verify)
    if not hasattr(fileobj, "read"):
        raise InvalidArgument("fileobj must be a readable binary file object")
    hasher = hashlib.sha256() if verify == "sha256" else None
    read_into = _reader(fileobj, hasher)
    notes: list[str] = []
    try:
        with mapped(source, remote, "upload to") as client:
            tmp = _transfer.temp_name(remote, resume=False)
            try:
                fh = _transfer.open_for_upload(
                    client, tmp, resume=False, mode=None if mode is None else create_mode(mode),
                    new_name=True,
                )
                try:
                    stats = _transfer.upload(
                        client, _transfer.handle_of(fh), read_into, progress=callback
                    )
                except BaseException:
                    _quiet_close(fh)
                    raise
                fh.close()
                attrs = client.stat(tmp)
                written = attrs.st_size
                if written != stats.end:
                    raise RemotePathError(
                        f"upload to {remote!r}: the sandbox has {written} bytes of the "
                        f"{stats.end} sent; nothing was put in place, try again",
                        path=remote,
                    )
                if hasher is not None:
                    digest = hasher.hexdigest()
                    _verify_remote(source, tmp, lambda: digest, stats.end,
                                   f"upload to {remote!r}", remote)
                if mode is not None:
                    _apply_mode(client, tmp, stat_mod.S_IMODE(mode), attrs.st_mode, notes)
                rename_into_place(source, client, tmp, remote)
            except BaseException:
                _discard(source, client, tmp)
                raise
            tidy(source, client, posixpath.dirname(remote), attrs.st_mtime)
    except _transfer.LocalError as exc:
        raise exc.original from None
    if notes:
        warnings.warn(_transfer.attributes_warning(f"upload to {remote!r}", notes),
                      FileAttributesWarning, stacklevel=3)
    return remote


def _reader(
    fileobj: IO[bytes], hasher: hashlib._Hash | None
) -> Callable[[memoryview], int]:
    """A ``readinto`` for any binary file object, hashing what it reads if asked."""
    readinto = getattr(fileobj, "readinto", None)

    def read_into(buf: memoryview) -> int:
        if readinto is not None:
            n = readinto(buf)
            if n is None:  # a non-blocking raw stream with nothing yet
                raise InvalidArgument("fileobj returned no data (non-blocking?)")
        else:
            data = fileobj.read(len(buf))
            if isinstance(data, str):
                raise InvalidArgument("fileobj must be opened in binary mode")
            n = len(data)
            buf[:n] = data
        if hasher is not None:
            hasher.update(buf[:n])
        return int(n)

    if isinstance(fileobj, io.TextIOBase):
        raise InvalidArgument("fileobj must be opened in binary mode")
    return read_into


# -- downloads ----------------------------------------------------------------------------


def _local_open(path: Path, resume: bool) -> tuple[int, int]:
    """The local partial file to download into, and how much of it to keep."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    if not resume:
        flags |= os.O_TRUNC
    fd = os.open(path, flags, 0o666)
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise InvalidArgument(f"local partial file {str(path)!r} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size if resume else 0


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat_mod.S_ISDIR, "directory"),
        (stat_mod.S_ISFIFO, "FIFO"),
        (stat_mod.S_ISCHR, "character device"),
        (stat_mod.S_ISBLK, "block device"),
        (stat_mod.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def streams_into(path: Path) -> str | None:
    """What kind of existing non-regular file ``path`` is, if it is one get() writes
    into directly (a FIFO, a character device such as /dev/null) rather than replace;
    None for a regular file or nothing. Anything else is refused."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # absent (or a dangling link): a new regular file goes there
    if stat_mod.S_ISREG(mode):
        return None
    if stat_mod.S_ISFIFO(mode) or stat_mod.S_ISCHR(mode):
        return _file_kind(mode)
    raise InvalidArgument(
        f"local path {str(path)!r} is a {_file_kind(mode)}; downloads write regular "
        "files, or stream into a FIFO or character device, and never replace one"
    )


def get(
    source: SFTPSource,
    remote: str,
    local: str | os.PathLike[str],
    *,
    preserve_mode: bool = True,
    callback: ProgressCallback | None = None,
    verify: _transfer.Verify = "size",
    resume: bool = False,
) -> Path:
    """Download ``remote`` to ``local``; the local file appears whole or not at all.

    With ``resume=True`` the partial file (``.NAME.sshbridge.part`` next to ``local``)
    is kept when the download fails, and the next ``resume=True`` call fetches only the
    rest. ``verify="sha256"`` also compares checksums (hashed on the sandbox). Modes
    keep the permission bits only (no setuid, setgid or sticky bit, as OpenSSH's sftp).
    A ``local`` that is a FIFO or a character device (``/dev/null``) is written into
    as the data arrives, never replaced; its own mode is left alone.
    """
    return download_file(source, remote, local, preserve_mode=preserve_mode,
                         callback=callback, verify=verify, resume=resume, streams=True)


def download_file(
    source: SFTPSource,
    remote: str,
    local: str | os.PathLike[str],
    *,
    preserve_mode: bool,
    callback: ProgressCallback | None,
    verify: _transfer.Verify,
    resume: bool = False,
    streams: bool,
) -> Path:
    """``get``; with ``streams=False`` a local FIFO or device is refused, not written."""
    remote = check_remote_path(remote)
    verify = _transfer.check_verify(verify)
    if not isinstance(local, (str, os.PathLike)):
        raise InvalidArgument("local path must be a str or os.PathLike")
    local_path = Path(local)
    if local_path.is_dir():
        local_path = local_path / posixpath.basename(remote.rstrip("/"))
    if not local_path.parent.is_dir():
        raise InvalidArgument(f"local directory {str(local_path.parent)!r} does not exist")
    special = streams_into(local_path)
    if special is not None:
        if not streams or resume:
            raise InvalidArgument(
                f"local path {str(local_path)!r} is a {special}: "
                + ("get_dir writes regular files only" if not streams else
                   "resume=True needs a regular file")
            )

        def open_stream() -> IO[bytes]:
            # No O_CREAT, no O_TRUNC: write into the node that is there. A FIFO's
            # open waits for a reader, as a shell redirection does.
            fd = os.open(local_path, os.O_WRONLY | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
            return os.fdopen(fd, "wb", buffering=0)

        _receive(source, remote, open_stream, callback=callback, verify=verify, close=True)
        return local_path
    tmp = local_path.parent / _transfer.temp_name(local_path.name, resume=resume)
    fd, start = _local_open(tmp, resume)
    discard = not resume
    done = False
    try:
        with mapped(source, remote, "download") as client:
            # The OPEN goes with the STAT, in one round trip (a directory opened for
            # reading is closed again), and so does the connection's first ask of the
            # server's request sizes.
            ask_limits = _transfer.cached_limits(client) is None
            answers = _transfer.exchange(client, [
                _transfer.stat_request(remote), _transfer.read_open_request(remote),
                *([_transfer.limits_request()] if ask_limits else []),
            ])
            if ask_limits:
                _transfer.remember_limits(client, *answers[2])
            try:
                attrs = _transfer.attrs_answer(*answers[0], "a STAT")
                if stat_mod.S_ISDIR(attrs.mode or 0):
                    discard = True
                    raise InvalidArgument(f"remote path {remote!r} is a directory, not a file")
                handle = _transfer.handle_answer(*answers[1], "an OPEN")
            except BaseException:
                if answers[1][0] == CMD_HANDLE:
                    _transfer.close_quietly(
                        client, _transfer.handle_answer(*answers[1], "an OPEN"))
                raise
            size = attrs.size or 0
            if start > size:  # not a prefix of this file: start over
                os.ftruncate(fd, 0)
                start = 0
            start = _ranges.resume_from(start, size, download=True)
            channels = _ranges.download_channels(size - start)
            crew = _ranges.Crew(source, channels - 1)
            crew.launch()
            crew.aim_download(remote)
            try:
                try:
                    if channels > 1:
                        stats = _ranges.download(
                            crew, client, handle, _transfer.FdSink(fd),
                            start=start, size=size, channels=channels, progress=callback,
                        )
                    else:
                        stats = _transfer.download(
                            client, handle, _transfer.FdSink(fd), size=size,
                            start=start, progress=callback, path=remote,
                        )
                except BaseException:
                    _transfer.close_quietly(client, handle)
                    raise
            finally:
                crew.cancel()
            _transfer.close_unanswered(client, handle)
            discard = True
            if stats.end != size:
                raise RemotePathError(
                    f"download of {remote!r}: received {stats.end} bytes but the file had "
                    f"{size} when it started (did it change during the transfer?); try again",
                    path=remote,
                )
            if verify == "sha256":
                _verify_remote(source, remote, lambda: _transfer.local_sha256(tmp), size,
                               f"download of {remote!r}", remote)
            if preserve_mode and attrs.mode is not None:
                # Permission bits only: a setuid, setgid or sticky bit from the sandbox
                # is not carried onto this machine (OpenSSH's sftp masks them too).
                os.fchmod(fd, stat_mod.S_IMODE(attrs.mode) & 0o777)
        os.close(fd)
        fd = -1
        os.replace(tmp, local_path)
        done = True
    except _transfer.LocalError as exc:
        raise exc.original from None
    finally:
        if fd >= 0:
            os.close(fd)
        if not done:
            with contextlib.suppress(OSError):
                # A resumable partial is kept, unless it holds nothing worth resuming.
                if discard or tmp.stat().st_size == 0:
                    tmp.unlink()
    return local_path


def getfo(
    source: SFTPSource,
    remote: str,
    fileobj: IO[bytes],
    *,
    callback: ProgressCallback | None = None,
    verify: _transfer.Verify = "size",
) -> int:
    """Download ``remote`` into a binary file object; returns the byte count.

    Data is written as it arrives, so a failure can leave part of the file written.
    """
    return _receive(source, remote, lambda: fileobj, callback=callback, verify=verify,
                    close=False)


def _receive(
    source: SFTPSource,
    remote: str,
    open_sink: Callable[[], IO[bytes]],
    *,
    callback: ProgressCallback | None,
    verify: _transfer.Verify,
    close: bool,
) -> int:
    """Stream ``remote`` in file order into what ``open_sink`` opens once the remote file
    is open (a FIFO then waits for its reader); ``close`` closes it afterwards."""
    remote = check_remote_path(remote)
    verify = _transfer.check_verify(verify)
    hasher = hashlib.sha256() if verify == "sha256" else None
    try:
        with mapped(source, remote, "download") as client:
            attrs = client.stat(remote)
            if stat_mod.S_ISDIR(attrs.st_mode or 0):
                raise InvalidArgument(f"remote path {remote!r} is a directory, not a file")
            size = attrs.st_size or 0
            fh = client.open(remote, "rb")
            try:
                try:
                    stream = open_sink()
                except OSError as exc:
                    raise _transfer.LocalError(exc) from None
                try:
                    sink = _transfer.StreamSink(stream, hasher=hasher)
                    stats = _transfer.download(
                        client, _transfer.handle_of(fh), sink, size=size, progress=callback,
                        path=remote,
                    )
                finally:
                    if close:
                        try:
                            stream.close()
                        except OSError as exc:
                            raise _transfer.LocalError(exc) from None
            except BaseException:
                _quiet_close(fh)
                raise
            fh.close()
            if stats.end != size:
                raise RemotePathError(
                    f"download of {remote!r}: received {stats.end} bytes but the file had "
                    f"{size} when it started (did it change during the transfer?)",
                    path=remote,
                )
            if hasher is not None:
                digest = hasher.hexdigest()
                _verify_remote(source, remote, lambda: digest, size,
                               f"download of {remote!r}", remote)
    except _transfer.LocalError as exc:
        raise exc.original from None
    return stats.sent


# -- small calls --------------------------------------------------------------------------


def listdir(source: SFTPSource, path: str = ".") -> list[str]:
    path = check_remote_path(path)
    with mapped(source, path, "list") as client:
        return sorted(client.listdir(path))


def stat(source: SFTPSource, path: str) -> paramiko.SFTPAttributes:
    path = check_remote_path(path)
    with mapped(source, path, "stat") as client:
        return client.stat(path)


def exists(source: SFTPSource, path: str) -> bool:
    path = check_remote_path(path)
    try:
        with mapped(source, path, "stat") as client:
            client.stat(path)
    except RemotePathError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def makedirs(source: SFTPSource, path: str, mode: int = 0o755, exist_ok: bool = True) -> None:
    path = check_remote_path(path)
    with mapped(source, path, "create directory") as client:
        parts: list[str] = []
        cur = path.rstrip("/") or "/"
        while cur not in ("", "/", "."):
            parts.append(cur)
            cur = posixpath.dirname(cur)
        for i, directory in enumerate(reversed(parts)):
            last = i == len(parts) - 1
            try:
                attrs = client.stat(directory)
            except OSError as exc:
                if getattr(exc, "errno", None) != errno.ENOENT:
                    raise
                try:
                    client.mkdir(directory, mode)
                except OSError:
                    # Lost a race with another creator: fine if it is a directory now.
                    if not _is_dir(client, directory):
                        raise
                continue
            if not stat_mod.S_ISDIR(attrs.st_mode or 0):
                raise RemotePathError(
                    f"create directory {path!r}: {directory!r} exists and is not a directory",
                    path=directory,
                    errno=errno.ENOTDIR,
                )
            if last and not exist_ok:
                raise RemotePathError(
                    f"create directory {path!r}: it already exists", path=path, errno=errno.EEXIST
                )


def remove(source: SFTPSource, path: str) -> None:
    path = check_remote_path(path)
    with mapped(source, path, "remove") as client:
        client.remove(path)


class RemoteFile:
    """A remote file opened over SFTP; a context manager that returns its client on close."""

    def __init__(
        self, cm: contextlib.AbstractContextManager[Any], fh: paramiko.SFTPFile, path: str
    ) -> None:
        self._cm: contextlib.AbstractContextManager[Any] | None = cm
        self._fh = fh
        self.path = path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._fh)

    def __enter__(self) -> RemoteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._fh.close()
        finally:
            cm, self._cm = self._cm, None
            if cm is not None:
                cm.__exit__(None, None, None)

    def __repr__(self) -> str:
        return f"RemoteFile({self.path!r})"


def open_remote(source: SFTPSource, path: str, mode: str = "r", bufsize: int = -1) -> RemoteFile:
    path = check_remote_path(path)
    if not isinstance(mode, str) or not set(mode) <= set("rwaxb+"):
        raise InvalidArgument(f"mode {mode!r} is not a file mode like 'r', 'rb', 'w', 'a'")
    cm = mapped(source, path, "open")
    client = cm.__enter__()
    try:
        fh = client.open(path, mode, bufsize)
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            cm.__exit__(type(exc), exc, exc.__traceback__)
        if isinstance(exc, OSError) and not isinstance(exc, RemotePathError):
            raise remote_error(exc, path, "open") from None
        raise
    return RemoteFile(cm, fh, path)
