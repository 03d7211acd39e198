"""SFTP file operations: atomic uploads and downloads, and the small file-system calls."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import secrets
import stat as stat_mod
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import paramiko

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
        if isinstance(exc, (socket_errors())):
            raise source.lost_error(f"during {action} {path!r}") from None
        raise _remote_error(exc, path, action) from None


def socket_errors() -> tuple[type[BaseException], ...]:
    return (ConnectionError, TimeoutError)


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


def put(
    source: SFTPSource,
    local: str | os.PathLike[str],
    remote: str,
    *,
    preserve_mode: bool = True,
    callback: ProgressCallback | None = None,
) -> str:
    """Upload ``local`` to ``remote`` atomically; returns the final remote path."""
    if not isinstance(local, (str, os.PathLike)):
        raise InvalidArgument("local path must be a str or os.PathLike")
    local_path = Path(local)
    remote = check_remote_path(remote)
    if not local_path.is_file():
        raise InvalidArgument(
            f"local path {str(local_path)!r} is not a file"
            + (" (it is a directory; directory uploads are not supported here)"
               if local_path.is_dir() else " (it does not exist)")
        )
    size = local_path.stat().st_size
    mode = stat_mod.S_IMODE(local_path.stat().st_mode)
    with _mapped(source, remote, "upload to") as client:
        target = _target_for_put(client, local_path, remote)
        directory, name = posixpath.split(target)
        tmp = posixpath.join(directory, f".{name}.sshbridge-{secrets.token_hex(4)}.part")
        try:
            with local_path.open("rb") as fl:
                _write_remote(client, tmp, fl, size, callback)
            written = client.stat(tmp).st_size
            if written != size:
                raise RemotePathError(
                    f"upload to {target!r}: wrote {written} bytes but the file has {size}; "
                    "nothing was put in place, try again",
                    path=target,
                )
            if preserve_mode:
                client.chmod(tmp, mode)
            _rename_into_place(client, tmp, target)
        except BaseException:
            with contextlib.suppress(Exception):
                client.remove(tmp)
            raise
    return target


def putfo(
    source: SFTPSource,
    fileobj: IO[bytes],
    remote: str,
    *,
    mode: int | None = None,
    callback: ProgressCallback | None = None,
) -> str:
    """Upload a binary file object to ``remote`` atomically."""
    remote = check_remote_path(remote)
    if not hasattr(fileobj, "read"):
        raise InvalidArgument("fileobj must be a readable binary file object")
    with _mapped(source, remote, "upload to") as client:
        directory, name = posixpath.split(remote)
        tmp = posixpath.join(directory, f".{name}.sshbridge-{secrets.token_hex(4)}.part")
        try:
            _write_remote(client, tmp, fileobj, None, callback)
            if mode is not None:
                client.chmod(tmp, mode)
            _rename_into_place(client, tmp, remote)
        except BaseException:
            with contextlib.suppress(Exception):
                client.remove(tmp)
            raise
    return remote


def _write_remote(
    client: paramiko.SFTPClient,
    path: str,
    fl: IO[bytes],
    size: int | None,
    callback: ProgressCallback | None,
) -> None:
    done = 0
    with client.open(path, "wb") as fr:
        fr.set_pipelined(True)
        while True:
            data = fl.read(CHUNK)
            if not data:
                break
            if isinstance(data, str):
                raise InvalidArgument("fileobj must be opened in binary mode")
            fr.write(data)
            done += len(data)
            if callback is not None:
                callback(done, size if size is not None else done)


def get(
    source: SFTPSource,
    remote: str,
    local: str | os.PathLike[str],
    *,
    preserve_mode: bool = True,
    callback: ProgressCallback | None = None,
) -> Path:
    """Download ``remote`` to ``local``; the local file appears whole or not at all."""
    remote = check_remote_path(remote)
    if not isinstance(local, (str, os.PathLike)):
        raise InvalidArgument("local path must be a str or os.PathLike")
    local_path = Path(local)
    if local_path.is_dir():
        local_path = local_path / posixpath.basename(remote.rstrip("/"))
    if not local_path.parent.is_dir():
        raise InvalidArgument(f"local directory {str(local_path.parent)!r} does not exist")
    tmp = local_path.parent / f".{local_path.name}.sshbridge-{secrets.token_hex(4)}.part"
    with _mapped(source, remote, "download") as client:
        attrs = client.stat(remote)
        if stat_mod.S_ISDIR(attrs.st_mode or 0):
            raise InvalidArgument(f"remote path {remote!r} is a directory, not a file")
        try:
            with tmp.open("wb") as fl:
                client.getfo(remote, fl, callback=callback, max_concurrent_prefetch_requests=64)
            got = tmp.stat().st_size
            if attrs.st_size is not None and got != attrs.st_size:
                raise RemotePathError(
                    f"download of {remote!r}: received {got} of {attrs.st_size} bytes "
                    "(did the file change during the transfer?); try again",
                    path=remote,
                )
            if preserve_mode and attrs.st_mode is not None:
                os.chmod(tmp, stat_mod.S_IMODE(attrs.st_mode))
            os.replace(tmp, local_path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    return local_path


def getfo(
    source: SFTPSource,
    remote: str,
    fileobj: IO[bytes],
    *,
    callback: ProgressCallback | None = None,
) -> int:
    remote = check_remote_path(remote)
    with _mapped(source, remote, "download") as client:
        return int(
            client.getfo(remote, fileobj, callback=callback, max_concurrent_prefetch_requests=64)
        )


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
