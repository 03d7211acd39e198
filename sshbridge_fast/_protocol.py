"""Client side of the session holder protocol: standard library only.

A holder is a background process keeping one sandbox's ``SandboxSSH`` open. It listens
on a Unix socket in a per-user 0700 runtime directory (``$XDG_RUNTIME_DIR/sshbridge``, or
``~/.sshbridge/run``); the socket's name is a hash of (base URL, team, API key, sandbox
id), never the key itself, so a holder is only ever used with the credentials it was
started with.

The wire: each side sends JSON objects, one per line. A client's first line is the
request (``op``):

* ``exec``: a command (``command`` words, ``env``, ``cwd``, ``timeout``, ``pty``,
  ``stdin``; ``login`` for a login shell instead, ``ssh`` for ssh's exit statuses). It
  travels with the caller's stdin, stdout and stderr file descriptors (SCM_RIGHTS), so
  the holder reads and writes them directly.
* ``cp``: a copy (``direction`` ``put``/``get``, absolute ``local`` path, ``remote``
  path, ``recursive``, ``progress``) run by the holder on its session; with
  ``progress`` it sends ``{"progress": [name, done, total]}`` lines as it goes.
* ``forward``: port forwards (``forwards``: a list of ``listen`` and ``target`` ports,
  ``host``, ``bind``, ``reverse``) the holder starts on its session and keeps while the
  client stays connected. After ``accepted`` it answers ``{"forwarding": [PORT, ...]}``
  (the bound ports, in order) or a final status; the client's EOF closes them, and the
  holder confirms with ``{"status": 0, "error": null}``.
* ``info``, ``ping``, ``close``: one answer each.

For ``exec`` and ``cp`` the holder answers ``{"accepted": true}`` once it has taken the
job (EOF before that means it was shutting down and nothing ran), then
``{"status": N, "error": "..."|null}`` at the end. A client that goes away (EOF on the
socket) cancels its job. Both ends check the other's uid with SO_PEERCRED.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import stat
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROTOCOL = "sshbridge-holder-1"
PERSIST_ENV = "SSHBRIDGE_PERSIST"
DEFAULT_PERSIST = 600.0
# sun_path is 108 bytes on Linux, NUL included.
_MAX_SOCKET_PATH = 107
_MAX_LINE = 1 << 20


class HolderUnavailable(Exception):
    """No live holder at that path (absent, stale, or shutting down): nothing ran."""


class ProtocolError(Exception):
    """The holder broke off after taking the job, or answered nonsense."""


class UnsafeRuntimeDir(PermissionError):
    """The runtime directory (or a file in it) is not private to this user: not used."""


def runtime_dir(create: bool = True) -> Path:
    """The per-user directory for holder sockets, created 0700; refused (UnsafeRuntimeDir)
    unless it is a real directory owned by this user with mode 0700."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "sshbridge" if base else Path.home() / ".sshbridge" / "run"
    if create:
        old = os.umask(0o077)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        finally:
            os.umask(old)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise UnsafeRuntimeDir(
            f"the session holder directory {path} is not a directory owned by this user; "
            "remove it, or use --no-persist"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        # Never repaired silently: someone else may already have planted files in it.
        raise UnsafeRuntimeDir(
            f"the session holder directory {path} has mode {stat.S_IMODE(st.st_mode):04o}, "
            f"not 0700; run `chmod 700 {path}` (after checking its contents), or use "
            "--no-persist"
        )
    return path


def open_private(path: Path, *, create: bool = False, exclusive: bool = False) -> int:
    """An O_RDWR descriptor on a regular file of ours in the runtime directory.

    Never through a symbolic link (O_NOFOLLOW); ``exclusive`` creates it anew (O_EXCL,
    after removing whatever was there). Raises UnsafeRuntimeDir for a planted link or a
    file that is not ours."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    if exclusive:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a link planted there goes, its target untouched
        flags |= os.O_CREAT | os.O_EXCL
    elif create:
        flags |= os.O_CREAT
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeRuntimeDir(f"{path} is a symbolic link; refusing to use it") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise UnsafeRuntimeDir(f"{path} is not a regular file of this user; refusing to use it")
    return fd


def same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` (not followed) still names the file open on ``fd``."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def holder_name(base_url: str, team_id: str | None, api_key: str, sandbox_id: str) -> str:
    """The socket's base name: a hash that never reveals the key."""
    material = "\0".join((PROTOCOL, base_url, team_id or "", api_key, sandbox_id))
    return "h-" + hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def socket_path(directory: Path, name: str) -> Path | None:
    """The socket path, or None if it would not fit in a sockaddr_un."""
    path = directory / f"{name}.sock"
    return path if len(os.fsencode(path)) <= _MAX_SOCKET_PATH else None


def parse_persist(value: str | None) -> float | None:
    """Seconds from ``SSHBRIDGE_PERSIST`` (unset: the default; 0/no/off: disabled).

    Raises ValueError for anything else."""
    if value is None or value.strip() == "":
        return DEFAULT_PERSIST
    text = value.strip().lower()
    if text in ("0", "no", "off", "false", "never"):
        return None
    if text in ("yes", "on", "true"):
        return DEFAULT_PERSIST
    seconds = float(text)
    if not 0 < seconds < 10**7:
        raise ValueError(f"{value!r} is not a number of seconds")
    return seconds


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def send_message(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    if data:
        sock.sendall(data)


class LineReader:
    """Reads JSON lines from a stream socket, collecting any file descriptors sent along."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.fds: list[int] = []

    def read(self, maxfds: int = 0) -> dict[str, Any] | None:
        """The next message; None at EOF."""
        while b"\n" not in self.buffer:
            if len(self.buffer) > _MAX_LINE:
                raise ProtocolError("message too long")
            if maxfds and not self.fds:
                chunk, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, maxfds)
                self.fds.extend(fds)
            else:
                chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            raise ProtocolError("unreadable message") from None
        if not isinstance(message, dict):
            raise ProtocolError("unreadable message")
        return message


def connect(path: Path, timeout: float | None = 5.0) -> socket.socket:
    """A connection to the holder at ``path``, checked to run as this user.

    Raises HolderUnavailable when there is none (no socket, or a stale one)."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise UnsafeRuntimeDir(f"{path} is a symbolic link; refusing to use it")
    except FileNotFoundError:
        raise HolderUnavailable(f"{path}: no such socket") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.EAGAIN):
            raise HolderUnavailable(str(exc)) from None
        raise
    if peer_uid(sock) != os.getuid():
        sock.close()
        raise PermissionError(f"{path}: the holder runs as another user; not using it")
    sock.settimeout(None)
    return sock


def request(path: Path, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One request, one answer (``info``, ``close``, ``ping``)."""
    with connect(path, timeout) as sock:
        sock.settimeout(timeout)
        send_message(sock, message)
        answer = LineReader(sock).read()
    if answer is None:
        raise HolderUnavailable("the holder closed the connection")
    return answer


def is_alive(path: Path) -> bool:
    try:
        sock = connect(path, 2.0)
    except (HolderUnavailable, OSError):  # none, another user's, or hung: not one to use
        return False
    sock.close()
    return True


def unlink_stale(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Interrupted(Exception):
    """The caller was interrupted (Ctrl-C: 130, SIGTERM: 143) while a command ran."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def attach_exec(
    path: Path,
    job: dict[str, Any],
    fds: Sequence[int] = (0, 1, 2),
    on_message: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[int, str | None]:
    """Run ``job`` in the holder at ``path`` on our file descriptors: (status, error).

    ``job["op"]`` defaults to ``exec``; messages the holder sends before its final answer
    (``cp`` progress) go to ``on_message``. Raises HolderUnavailable if no holder took
    the job (nothing ran), ProtocolError if the holder broke off, Interrupted on Ctrl-C /
    SIGTERM (after the holder stopped the command, for a bounded time)."""
    try:
        sock = connect(path)
    except _Terminate:
        raise Interrupted(143, "terminated") from None
    try:
        reader = LineReader(sock)
        try:
            # Until the holder says "accepted", nothing ran: a holder that went away
            # (idle exit) as we came is someone to start again, not an error.
            send_message(sock, {"op": "exec", **job}, fds)
            first = reader.read()
        except OSError as exc:
            raise HolderUnavailable(str(exc)) from None
        except _Terminate:
            raise Interrupted(143, "terminated") from None
        if first is None or not first.get("accepted"):
            if first is not None and "status" in first:
                return int(first["status"]), first.get("error")
            raise HolderUnavailable("the holder is shutting down")
        try:
            while True:
                answer = reader.read()
                if answer is None or "status" in answer:
                    break
                if on_message is not None:
                    on_message(answer)
        except KeyboardInterrupt:
            _cancel(sock, reader)
            raise Interrupted(130, "interrupted") from None
        except _Terminate:
            _cancel(sock, reader)
            raise Interrupted(143, "terminated") from None
        if answer is None:
            raise ProtocolError("the session holder went away while the command ran")
        return int(answer["status"]), answer.get("error")
    finally:
        sock.close()


class _Terminate(BaseException):
    pass


def on_sigterm(signum: int, frame: object) -> None:
    raise _Terminate


def _cancel(sock: socket.socket, reader: LineReader) -> None:
    """Tell the holder to stop the command (our EOF) and wait a little for it to finish."""
    with contextlib.suppress(OSError, BaseException):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(15.0)
        while True:
            answer = reader.read()
            if answer is None or "status" in answer:
                return
