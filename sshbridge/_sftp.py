"""SFTP file operations: atomic uploads and downloads, and the small file-system calls."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import posixpath
import stat as stat_mod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import paramiko

from . import _transfer
from ._exceptions import ConnectionLost, InvalidArgument, RemotePathError

log = logging.getLogger("sshbridge.sftp")

CHUNK = 1 << 20
ProgressCallback = Any  # Callable[[int, int], None]; kept loose for paramiko's callback


class SFTPSource(Protocol):
    def sftp(self) -> contextlib.AbstractContextManager[paramiko.SFTPClient]: ...

    def lost_error(self, what: str) -> ConnectionLost: ...


def check_remote_path(path: object, what: str = "remote path") -> str:
    if isinstance(path, Path):
        path = path.as_posix()
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"{what} must be a non-empty string")
    if "\x00" in path:
        raise InvalidArgument(f"{what} {path!r} contains a NUL byte")
    return path


def _remote_error(exc: BaseException, path: str, action: str) -> RemotePathError:
    code = getattr(exc, "errno", None)
    if isinstance(exc, paramiko.SFTPError) or code is None:
        text = str(exc) or type(exc).__name__
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
def _mapped(source: SFTPSource, path: str, action: str) -> Iterator[paramiko.SFTPClient]:
    try:
        with source.sftp() as client:
            yield client
    except (RemotePathError, InvalidArgument, ConnectionLost):
        raise
    except (EOFError, paramiko.SSHException) as exc:
        if isinstance(exc, paramiko.SFTPError):
            raise _remote_error(exc, path, action) from None
        raise source.lost_error(f"during {action} {path!r}") from None
    except OSError as exc:
        if isinstance(exc, _LINK_ERRORS):
            raise source.lost_error(f"during {action} {path!r}") from None
        raise _remote_error(exc, path, action) from None


def _is_dir(client: paramiko.SFTPClient, path: str) -> bool:
    try:
        return stat_mod.S_ISDIR(client.stat(path).st_mode or 0)
    except OSError:
        return False


def _target_for_put(client: paramiko.SFTPClient, local: Path, remote: str) -> str:
    if remote.endswith("/") or _is_dir(client, remote):
        return posixpath.join(remote, local.name)
    return remote


def _rename_into_place(client: paramiko.SFTPClient, tmp: str, target: str) -> None:
    try:
        client.posix_rename(tmp, target)  # atomic replace (posix-rename@openssh.com)
        return
    except OSError:
        pass
    # No extension: SFTPv3 rename refuses an existing target, so make room first. The
    # target is briefly absent (never partial); the README documents this fallback.
    try:
        client.rename(tmp, target)
        return
    except OSError:
        pass
    with contextlib.suppress(OSError):
        client.remove(target)
    client.rename(tmp, target)


def _quiet_close(fh: paramiko.SFTPFile) -> None:
    with contextlib.suppress(Exception):
        fh.close()


def _quiet_remove(client: paramiko.SFTPClient, path: str) -> None:
    with contextlib.suppress(Exception):
        client.remove(path)


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
    the upload fails, so the next ``resume=True`` call sends only the rest.
    """
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
        try:
            with _mapped(source, remote, "upload to") as client:
                target = _target_for_put(client, local_path, remote)
                tmp = _transfer.temp_name(target, resume=resume)
                start = _partial_size(client, tmp, size) if resume else 0
                discard = not resume
                try:
                    fh = client.open(tmp, "r+b" if start else "wb")
                    try:
                        fl.seek(start)
                        stats = _transfer.upload(
                            client, _transfer.handle_of(fh), fl.readinto, start=start, total=size,
                            progress=callback,
                        )
                    except BaseException:
                        _quiet_close(fh)
                        raise
                    fh.close()
                    discard = True  # a complete partial that fails a check is bad
                    written = client.stat(tmp).st_size
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
                    if preserve_mode:
                        client.chmod(tmp, mode)
                    _rename_into_place(client, tmp, target)
                except BaseException:
                    if discard:
                        _quiet_remove(client, tmp)
                    raise
        except _transfer.LocalError as exc:
            raise exc.original from None
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
    try:
        with _mapped(source, remote, "upload to") as client:
            tmp = _transfer.temp_name(remote, resume=False)
            try:
                fh = client.open(tmp, "wb")
                try:
                    stats = _transfer.upload(
                        client, _transfer.handle_of(fh), read_into, progress=callback
                    )
                except BaseException:
                    _quiet_close(fh)
                    raise
                fh.close()
                written = client.stat(tmp).st_size
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
                    client.chmod(tmp, mode)
                _rename_into_place(client, tmp, remote)
            except BaseException:
                _quiet_remove(client, tmp)
                raise
    except _transfer.LocalError as exc:
        raise exc.original from None
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
    rest. ``verify="sha256"`` also compares checksums (hashed on the sandbox).
    """
    remote = check_remote_path(remote)
    verify = _transfer.check_verify(verify)
    if not isinstance(local, (str, os.PathLike)):
        raise InvalidArgument("local path must be a str or os.PathLike")
    local_path = Path(local)
    if local_path.is_dir():
        local_path = local_path / posixpath.basename(remote.rstrip("/"))
    if not local_path.parent.is_dir():
        raise InvalidArgument(f"local directory {str(local_path.parent)!r} does not exist")
    tmp = local_path.parent / _transfer.temp_name(local_path.name, resume=resume)
    fd, start = _local_open(tmp, resume)
    discard = not resume
    done = False
    try:
        with _mapped(source, remote, "download") as client:
            attrs = client.stat(remote)
            if stat_mod.S_ISDIR(attrs.st_mode or 0):
                discard = True
                raise InvalidArgument(f"remote path {remote!r} is a directory, not a file")
            size = attrs.st_size or 0
            if start > size:  # not a prefix of this file: start over
                os.ftruncate(fd, 0)
                start = 0
            fh = client.open(remote, "rb")
            try:
                stats = _transfer.download(
                    client, _transfer.handle_of(fh), _transfer.FdSink(fd), size=size, start=start,
                    progress=callback, path=remote,
                )
            except BaseException:
                _quiet_close(fh)
                raise
            fh.close()
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
            if preserve_mode and attrs.st_mode is not None:
                os.fchmod(fd, stat_mod.S_IMODE(attrs.st_mode))
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
    remote = check_remote_path(remote)
    verify = _transfer.check_verify(verify)
    hasher = hashlib.sha256() if verify == "sha256" else None
    sink = _transfer.StreamSink(fileobj, hasher=hasher)
    try:
        with _mapped(source, remote, "download") as client:
            attrs = client.stat(remote)
            if stat_mod.S_ISDIR(attrs.st_mode or 0):
                raise InvalidArgument(f"remote path {remote!r} is a directory, not a file")
            size = attrs.st_size or 0
            fh = client.open(remote, "rb")
            try:
                stats = _transfer.download(
                    client, _transfer.handle_of(fh), sink, size=size, progress=callback, path=remote
                )
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


def listdir(source: SFTPSource, path: str = ".") -> list[str]:
    path = check_remote_path(path)
    with _mapped(source, path, "list") as client:
        return sorted(client.listdir(path))


def stat(source: SFTPSource, path: str) -> paramiko.SFTPAttributes:
    path = check_remote_path(path)
    with _mapped(source, path, "stat") as client:
        return client.stat(path)


def exists(source: SFTPSource, path: str) -> bool:
    path = check_remote_path(path)
    try:
        with _mapped(source, path, "stat") as client:
            client.stat(path)
    except RemotePathError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def makedirs(source: SFTPSource, path: str, mode: int = 0o755, exist_ok: bool = True) -> None:
    path = check_remote_path(path)
    with _mapped(source, path, "create directory") as client:
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
    with _mapped(source, path, "remove") as client:
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
    cm = _mapped(source, path, "open")
    client = cm.__enter__()
    try:
        fh = client.open(path, mode, bufsize)
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            cm.__exit__(type(exc), exc, exc.__traceback__)
        if isinstance(exc, OSError) and not isinstance(exc, RemotePathError):
            raise _remote_error(exc, path, "open") from None
        raise
    return RemoteFile(cm, fh, path)
