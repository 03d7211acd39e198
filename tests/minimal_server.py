"""A deliberately minimal SSH + SFTP server on paramiko's server mode, for tests.

It is the kind of server sshbridge must not assume away: not OpenSSH, no SFTP
extensions, no SETSTAT, short reads, the SFTP draft's SYMLINK argument order, a small
cap on exec channels per connection, and process groups killed when their channel
closes (as x/crypto/ssh-based servers do). This is a helper module, not a test module::

    with MinimalServer(root, keys_file) as server:
        ...  # connect to server.host:server.port as server.username

Paths: absolute SFTP paths are the real file system (like sshd without a chroot),
relative ones start in ``root``. Commands run as the current user with cwd and HOME at
``root``. Everything it starts (listener, connections, commands) ends in ``close()``.
Its paramiko transports are ``paramiko.Transport`` threads: close the server before a
test counts library threads.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import os
import pwd
import selectors
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    MSG_CHANNEL_REQUEST,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)
from paramiko.message import Message
from paramiko.sftp import (
    CMD_EXTENDED,
    CMD_FSETSTAT,
    CMD_INIT,
    CMD_SETSTAT,
    CMD_SYMLINK,
    CMD_VERSION,
    SFTP_FAILURE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
)

__all__ = ["VERSION", "MinimalServer"]

# Not OpenSSH, and not "paramiko" either: AsyncSSH's client (and sshbridge, if it looks
# at the banner) keys the SYMLINK order off those two names.
VERSION = "SSH-2.0-MinimalSFTP_0.1"
_JOIN = 5.0
_KEY_TYPES = ("ssh-", "ecdsa-", "sk-")


def _new_host_key() -> paramiko.PKey:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    return paramiko.Ed25519Key(file_obj=io.StringIO(pem))


# -- authorized_keys ------------------------------------------------------------------------


def _split_options(line: str) -> tuple[dict[str, str], str]:
    """``(options, "type base64 [comment]")`` of one authorized_keys line."""
    if line.startswith(_KEY_TYPES):
        return {}, line
    options: dict[str, str] = {}
    name, value, quoted, i = "", "", False, 0
    in_value = False
    while i < len(line):
        c = line[i]
        if quoted:
            if c == "\\" and i + 1 < len(line) and line[i + 1] == '"':
                value += '"'
                i += 1
            elif c == '"':
                quoted = False
            else:
                value += c
        elif c == '"':
            quoted = True
        elif c in " \t" or c == ",":
            options[name.lower()] = value
            name, value, in_value = "", "", False
            if c != ",":
                return options, line[i:].strip()
        elif c == "=" and not in_value:
            in_value = True
        elif in_value:
            value += c
        else:
            name += c
        i += 1
    return options, ""  # nothing after the options: no key


def _expired(spec: str) -> bool:
    """sshd's expiry-time: YYYYMMDD[HHMM[SS]], local time unless it ends in Z.
    A value it cannot read expires the key (sshd refuses such a line too)."""
    utc = spec.endswith("Z")
    digits = spec[:-1] if utc else spec
    formats = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    if not digits.isdigit() or len(digits) not in formats:
        return True
    try:
        when = datetime.strptime(digits, formats[len(digits)])
    except ValueError:
        return True
    if utc:
        return datetime.now(timezone.utc) >= when.replace(tzinfo=timezone.utc)
    return datetime.now() >= when


def key_authorized(path: Path, key: paramiko.PKey) -> bool:
    """True if an unexpired line of the authorized_keys file at ``path`` holds ``key``."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return False
    blob = key.asbytes()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        options, rest = _split_options(line)
        fields = rest.split()
        if len(fields) < 2:
            continue
        try:
            data = base64.b64decode(fields[1], validate=True)
        except ValueError:
            continue
        if data != blob:
            continue
        expiry = options.get("expiry-time")
        if expiry is not None and _expired(expiry):
            continue
        return True
    return False


# -- SFTP -------------------------------------------------------------------------------------


def _fail(exc: OSError) -> int:
    return paramiko.SFTPServer.convert_errno(exc.errno or 0)


class _Handle(paramiko.SFTPHandle):
    def __init__(self, fd: int, flags: int, read_cap: int) -> None:
        super().__init__(flags)
        self._fd = fd
        self._cap = read_cap

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def read(self, offset: int, length: int) -> bytes | int:
        try:
            return os.pread(self._fd, min(length, self._cap), offset)
        except OSError as exc:
            return _fail(exc)

    def write(self, offset: int, data: Any) -> int:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            return _fail(exc)
        return SFTP_OK

    def stat(self) -> int | paramiko.SFTPAttributes:
        try:
            return paramiko.SFTPAttributes.from_stat(os.fstat(self._fd))
        except OSError as exc:
            return _fail(exc)

    def chattr(self, attr: paramiko.SFTPAttributes) -> int:
        return SFTP_OP_UNSUPPORTED


class _Files(paramiko.SFTPServerInterface):
    def __init__(self, server: paramiko.ServerInterface, *args: Any, **kwargs: Any) -> None:
        super().__init__(server, *args, **kwargs)
        assert isinstance(server, _Connection)
        self.owner = server.owner
        self.root = server.owner.root
        self.read_cap = server.owner.read_cap

    def _path(self, path: str) -> str:
        return path if path.startswith("/") else os.path.join(self.root, path)

    def open(
        self, path: str, flags: int, attr: paramiko.SFTPAttributes
    ) -> paramiko.SFTPHandle | int:
        # The attributes are only the mode of a file this creates (as OpenSSH's
        # sftp-server does); there is no SETSTAT here to apply the rest.
        mode = attr.st_mode if attr.st_mode is not None else 0o666
        try:
            fd = os.open(self._path(path), flags | os.O_CLOEXEC, mode & 0o7777)
        except OSError as exc:
            return _fail(exc)
        return _Handle(fd, flags, self.read_cap)

    def list_folder(self, path: str) -> list[paramiko.SFTPAttributes] | int:
        full = self._path(path)
        try:
            names = os.listdir(full)
            return [
                paramiko.SFTPAttributes.from_stat(os.lstat(os.path.join(full, n)), n)
                for n in names
            ]
        except OSError as exc:
            return _fail(exc)

    def stat(self, path: str) -> paramiko.SFTPAttributes | int:
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(self._path(path)))
        except OSError as exc:
            return _fail(exc)

    def lstat(self, path: str) -> paramiko.SFTPAttributes | int:
        try:
            return paramiko.SFTPAttributes.from_stat(os.lstat(self._path(path)))
        except OSError as exc:
            return _fail(exc)

    def remove(self, path: str) -> int:
        try:
            os.remove(self._path(path))
        except OSError as exc:
            return _fail(exc)
        return SFTP_OK

    def rename(self, oldpath: str, newpath: str) -> int:
        # SFTPv3 RENAME never replaces an existing name.
        old, new = self._path(oldpath), self._path(newpath)
        veto = self.owner.refuse_rename
        if veto is not None and veto(old, new):
            return SFTP_FAILURE
        if os.path.lexists(new):
            return _fail(OSError(errno.EEXIST, "exists"))
        try:
            os.rename(old, new)
        except OSError as exc:
            return _fail(exc)
        return SFTP_OK

    def mkdir(self, path: str, attr: paramiko.SFTPAttributes) -> int:
        mode = attr.st_mode if attr.st_mode is not None else 0o777
        try:
            os.mkdir(self._path(path), mode & 0o7777)
        except OSError as exc:
            return _fail(exc)
        return SFTP_OK

    def rmdir(self, path: str) -> int:
        try:
            os.rmdir(self._path(path))
        except OSError as exc:
            return _fail(exc)
        return SFTP_OK

    def canonicalize(self, path: str) -> str:
        return os.path.realpath(self._path(path))

    def readlink(self, path: str) -> str | int:
        try:
            return os.readlink(self._path(path))
        except OSError as exc:
            return _fail(exc)

    def symlink(self, target_path: str, path: str) -> int:
        # The link's text is stored as given; only where the link goes is mapped.
        try:
            os.symlink(target_path, self._path(path))
        except OSError as exc:
            return _fail(exc)
        return SFTP_OK


class _SFTPServer(paramiko.SFTPServer):
    """paramiko's SFTP server without its extensions, SETSTAT, or OpenSSH's SYMLINK order."""

    def _send_server_version(self) -> int:
        # paramiko advertises check-file; this server advertises nothing.
        t, _data = self._read_packet()  # type: ignore[attr-defined]
        if t != CMD_INIT:
            raise paramiko.SFTPError("Incompatible sftp protocol")
        msg = Message()
        msg.add_int(3)
        self._send_packet(CMD_VERSION, msg)  # type: ignore[attr-defined]
        return 3

    def _process(self, t: int, request_number: int, msg: Message) -> None:
        if t in (CMD_SETSTAT, CMD_FSETSTAT, CMD_EXTENDED):
            # An empty message, as some servers send: the client gets no reason text.
            self._send_status(request_number, SFTP_OP_UNSUPPORTED, "")  # type: ignore[attr-defined]
            return
        if t == CMD_SYMLINK:
            # The draft's order (linkpath, targetpath); OpenSSH and paramiko swap them.
            linkpath = msg.get_text()
            targetpath = msg.get_text()
            self._send_status(  # type: ignore[attr-defined]
                request_number, self.server.symlink(targetpath, linkpath)
            )
            return
        super()._process(t, request_number, msg)  # type: ignore[misc]


# -- SSH ------------------------------------------------------------------------------------


class _Exec:
    """One command on one channel: its process group lives exactly as long as the channel."""

    def __init__(self, owner: MinimalServer, chan: paramiko.Channel, command: bytes) -> None:
        self.owner = owner
        self.chan = chan
        env = {
            "HOME": str(owner.root),
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "USER": owner.login,
            "LOGNAME": owner.login,
            "SHELL": "/bin/sh",
            "LANG": "C.UTF-8",
        }
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", os.fsdecode(command)],
            cwd=owner.root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed as a whole
            close_fds=True,
        )
        self._wake_r, self._wake_w = os.pipe()
        self._started = self._stopping = self._reaped = False
        self._lock = threading.Lock()
        self._pumps = [
            threading.Thread(target=self._feed, name="minimal-server-stdin", daemon=True),
            threading.Thread(target=self._drain, name="minimal-server-output", daemon=True),
        ]
        watcher = threading.Thread(target=self._watch, name="minimal-server-exec", daemon=True)
        self.threads = [*self._pumps, watcher]
        watcher.start()

    def start(self) -> None:
        """Move the command's I/O, once the exec request has been answered."""
        with self._lock:
            if self._stopping:
                return
            self._started = True
            for t in self._pumps:
                t.start()

    def _feed(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        fd = stdin.fileno()
        try:
            while True:
                data = self.chan.recv(32768)  # b"" on EOF and on close
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
        except OSError:  # the command closed its stdin or died
            return
        finally:
            stdin.close()

    def _drain(self) -> None:
        out, err = self.proc.stdout, self.proc.stderr
        assert out is not None and err is not None
        streams = {out.fileno(): self.chan.sendall, err.fileno(): self.chan.sendall_stderr}
        try:
            with selectors.DefaultSelector() as sel:
                for fd in (*streams, self._wake_r):
                    sel.register(fd, selectors.EVENT_READ)
                while streams:
                    for key, _ in sel.select():
                        fd = int(key.fd)
                        if fd == self._wake_r:
                            return  # the channel closed: the watcher killed the group
                        data = os.read(fd, 32768)
                        if not data:
                            sel.unregister(fd)
                            del streams[fd]
                            continue
                        streams[fd](data)
            # Both streams ended: the status, without reaping (the pgid stays ours).
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
            assert info is not None  # None only with WNOHANG
            code = info.si_status if info.si_code == os.CLD_EXITED else 128 + info.si_status
            self.chan.send_exit_status(code)
        except OSError:  # the channel closed under a send
            pass
        finally:
            out.close()
            err.close()
            with contextlib.suppress(EOFError, OSError):  # the connection went first
                self.chan.close()

    def _watch(self) -> None:
        """When the channel closes (either side, or the connection): kill the whole
        group, stop the pumps, then reap the leader."""
        self.chan.status_event.wait()  # paramiko sets it when the channel closes
        with self._lock:
            self._stopping = True
            started = self._started
        self.kill()
        os.write(self._wake_w, b"x")
        if started:
            for t in self._pumps:
                t.join(_JOIN)
        with self._lock:
            self.proc.wait(_JOIN)
            self._reaped = True
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def kill(self) -> None:
        # The leader is reaped only after this, so its group id cannot have been reused.
        with self._lock:
            if self._reaped:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def join(self) -> None:
        for t in self.threads:
            if t.ident is not None:
                t.join(_JOIN)


def _request_then_start(chan: paramiko.Channel, m: Message) -> None:
    """paramiko's channel-request handler, then the start of a command it accepted.

    The handler sends the SUCCESS reply after check_channel_exec_request returns; a fast
    command started inside that check could close its channel first, and paramiko's
    client then fails the exec with "Channel closed".
    """
    paramiko.Channel._handle_request(chan, m)  # type: ignore[attr-defined]
    server = chan.get_transport().server_object
    if isinstance(server, _Connection):
        server.start_pending(chan)


class _Transport(paramiko.Transport):
    _channel_handler_table = {
        **paramiko.Transport._channel_handler_table,  # type: ignore[attr-defined]
        MSG_CHANNEL_REQUEST: _request_then_start,
    }


class _Connection(paramiko.ServerInterface):
    def __init__(self, owner: MinimalServer) -> None:
        self.owner = owner
        self.execs: list[_Exec] = []
        self.pending: dict[int, _Exec] = {}  # by channel id: accepted, not yet answered
        self.lock = threading.Lock()

    def start_pending(self, chan: paramiko.Channel) -> None:
        with self.lock:
            job = self.pending.pop(chan.get_id(), None)
        if job is not None:
            job.start()

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username == self.owner.username and key_authorized(
            self.owner.authorized_keys_file, key
        ):
            return AUTH_SUCCESSFUL
        return AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session" and not self.owner.closed:
            return OPEN_SUCCEEDED
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def _full(self) -> bool:
        # Counted from paramiko's own channel state, which the transport thread updates
        # before it reads the next request: a close the client sent first is seen.
        with self.lock:
            return sum(not e.chan.closed for e in self.execs) >= self.owner.max_exec_channels

    def check_channel_pty_request(
        self, channel: paramiko.Channel, term: bytes, width: int, height: int,
        pixelwidth: int, pixelheight: int, modes: bytes,
    ) -> bool:
        # Accepted (under the cap) but not provided: commands still get pipes.
        return not self._full()

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        if self.owner.closed or self._full():
            return False  # a failure reply; the connection stays up
        try:
            job = _Exec(self.owner, channel, command)
        except OSError:
            return False
        with self.lock:
            self.execs = [e for e in self.execs if not e.chan.closed]
            self.execs.append(job)
            self.pending[channel.get_id()] = job
        self.owner._track_exec(job)
        return True

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        if name != "sftp" or self.owner.closed:
            return False
        handler = _SFTPServer(channel, name, self, _Files)
        handler.name = "minimal-server-sftp"
        handler.daemon = True
        self.owner._track_thread(handler)
        handler.start()
        return True


class MinimalServer:
    """See the module docstring. Starts listening on 127.0.0.1 at once."""

    def __init__(
        self,
        root: Path,
        authorized_keys_file: Path,
        *,
        username: str = "sbx",
        max_exec_channels: int = 3,
        read_cap: int = 32768,
    ) -> None:
        self.root = Path(root).resolve()
        self.authorized_keys_file = Path(authorized_keys_file)
        self.username = username
        self.max_exec_channels = max_exec_channels
        self.read_cap = read_cap
        self.login = pwd.getpwuid(os.getuid()).pw_name
        # A test's veto on RENAME (absolute old, new path; True refuses it): for a refusal
        # at one exact step, which no state of the file system produces on demand.
        self.refuse_rename: Callable[[str, str], bool] | None = None
        self.host = "127.0.0.1"
        self.host_key: paramiko.PKey = _new_host_key()
        self.closed = False
        self._lock = threading.Lock()
        self._transports: list[paramiko.Transport] = []
        self._threads: list[threading.Thread] = []
        self._execs: list[_Exec] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((self.host, 0))
        self._listener.listen(32)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="minimal-server-accept", daemon=True
        )
        self._acceptor.start()

    # -- lifecycle

    def close(self) -> None:
        """Stop listening; end every connection, command and thread. Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._acceptor.join(_JOIN)
        with self._lock:
            transports = list(self._transports)
            execs = list(self._execs)
        for transport in transports:
            transport.close()  # closes its channels: the watchers kill their groups
        for job in execs:
            job.kill()
        for job in execs:
            job.join()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(_JOIN)
        for transport in transports:
            transport.join(_JOIN)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> MinimalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MinimalServer {self.host}:{self.port} root={str(self.root)!r}>"

    @property
    def exec_processes(self) -> list[int]:
        """Process-group ids of commands started so far (for tests that check kills)."""
        with self._lock:
            return [job.proc.pid for job in self._execs]

    # -- internals

    def _track_thread(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.append(thread)

    def _track_exec(self, job: _Exec) -> None:
        with self._lock:
            self._execs.append(job)

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                events = sel.select()
                if any(key.fileobj is self._wake_r for key, _ in events):
                    return
                try:
                    sock, _addr = self._listener.accept()
                except OSError:
                    continue
                self._serve(sock)

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = _Transport(sock)
        transport.local_version = VERSION
        transport.add_server_key(self.host_key)
        transport.name = "minimal-server-transport"
        with self._lock:
            if self.closed:
                sock.close()
                return
            self._transports.append(transport)
        # With an event, start_server returns at once; the transport thread negotiates.
        transport.start_server(event=threading.Event(), server=_Connection(self))
