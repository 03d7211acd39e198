"""The persistent session holder: one background process per (credentials, sandbox).

Like OpenSSH's ControlMaster/ControlPersist. The first CLI call for a sandbox starts a
holder (this module's ``main``, run with the client's own copy of the package) that keeps
a ``SandboxSSH`` open and renewing, and later calls attach to it over a Unix socket (see
``sshbridge_fast._protocol`` for the wire): ``exec``, ``ssh`` without a terminal, and
``cp`` (the holder runs the copy on paths the client made absolute), and ``forward``
(the holder listens, as this user, while the client stays connected). The holder exits,
DELETEing its sessions and removing its socket, lock, log and pid files, after
``persist`` idle seconds (never while a job or forward is attached), on ``sshbridge
close``, on SIGTERM/SIGINT/SIGHUP, when its sandbox or key fails for good, or, while it
starts, when the client that started it goes away. A holder that cannot open its session
tells that client why.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import posixpath
import select
import signal
import socket
import stat as stat_mod
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from sshbridge_fast import _protocol

from ._config import Config
from ._exceptions import (
    APIConnectionError,
    AuthenticationError,
    ConnectionLost,
    InvalidArgument,
    NotFound,
    RemotePathError,
    SandboxError,
    SSHBridgeError,
    SSHError,
)
from ._sandbox import SandboxSSH
from ._stream import command_of, stream_command
from ._tunnels import LocalForward, RemoteForward

log = logging.getLogger("sshbridge.holder")

# Errors after which this holder's session is no use to anyone: it closes and exits.
_FATAL = (SandboxError, AuthenticationError, NotFound)



def _linger(conn: socket.socket, bound: float = 1.0) -> None:
    """Close our side for writing, then drain what the peer sends (briefly) before the
    socket closes: closing with its request unread would make its send fail (EPIPE) or
    its read reset, so it would never see the answer already sent."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(bound)
        end = time.monotonic() + bound
        while time.monotonic() < end and conn.recv(65536):
            pass

class HolderStartError(SSHBridgeError):
    """The holder could not open its session (the message says why)."""

    def __init__(self, message: str, code: int = 1, ssh_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.ssh_code = code if ssh_code is None else ssh_code


@dataclass
class HolderInfo:
    path: Path
    pid: int | None
    sandbox: str
    session_id: str | None
    expires_at: str | None
    idle: float | None
    active: int
    persist: float | None
    base_url: str | None


def status_for(exc: BaseException, ssh: bool = False) -> int:
    """The exit status the CLI gives ``exc``: ``exec`` and ``cp`` (``ssh=False``), or
    ``ssh``, which exits 255 for anything that kept it from reaching the command."""
    if isinstance(exc, InvalidArgument):
        return 2
    if isinstance(exc, (SSHError, ConnectionLost)):
        return 255
    if ssh and isinstance(exc, (APIConnectionError, SandboxError)):
        return 255
    return 1


# -- the client side (used by the full CLI) -----------------------------------------------


def holder_path(config: Config, sandbox_id: str) -> Path | None:
    directory = _protocol.runtime_dir()
    name = _protocol.holder_name(config.base_url, config.team_id, config.api_key, sandbox_id)
    return _protocol.socket_path(directory, name)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[Callable[[], None]]:
    """The start lock of one holder name. Lock files are removed when their holder exits,
    so a lock taken on a file that has since been unlinked (or replaced) is taken again."""
    while True:
        fd = _protocol.open_private(path, create=True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        if _protocol.same_file(fd, path):
            break
        os.close(fd)

    def discard() -> None:
        # Safe while we hold it: whoever takes the lock next checks it is still the file.
        with contextlib.suppress(OSError):
            if _protocol.same_file(fd, path):
                os.unlink(path)

    try:
        yield discard
    finally:
        os.close(fd)


def _remove_lock(path: Path) -> None:
    """Remove a holder's lock file unless someone holds it (then they are starting a
    holder, and the file is theirs to use)."""
    try:
        fd = _protocol.open_private(path)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _protocol.same_file(fd, path):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


# Run with the package directory this client imported first on sys.path (instead of the
# holder's working directory, "/"), so both run the same code.
_BOOT = (
    "import sys; sys.path[0] = sys.argv[1]; from sshbridge._holder import main; sys.exit(main())"
)
# Variables naming files: the holder runs in "/", so relative ones are made absolute.
_PATH_VARS = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE")


def _holder_env() -> dict[str, str]:
    env = dict(os.environ)
    entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if entries:
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in entries)
    for name in _PATH_VARS:
        if env.get(name):
            env[name] = os.path.abspath(env[name])
    return env


def ensure_holder(
    config: Config, sandbox_id: str, *, ttl: int, persist: float, verbose: int = 0
) -> Path | None:
    """The socket of a live holder for this sandbox, starting one if needed (under a
    lock, so concurrent first calls start one). None when holders cannot be used here
    (the socket path would be too long). Raises HolderStartError with the holder's own
    error when it could not open its session."""
    path = holder_path(config, sandbox_id)
    if path is None:
        log.debug("runtime directory path too long for a socket; not persisting")
        return None
    if _protocol.is_alive(path):
        return path
    with _locked(path.with_suffix(".lock")) as discard_lock:
        if _protocol.is_alive(path):
            return path
        _protocol.unlink_stale(path)
        spec = {
            "api_key": config.api_key,
            "base_url": config.base_url,
            "team_id": config.team_id,
            "sandbox": sandbox_id,
            "ttl": ttl,
            "persist": persist,
            "path": os.fspath(path),
            "verbose": verbose,
        }
        package_parent = os.fspath(Path(__file__).resolve().parent.parent)
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, package_parent],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            cwd="/",
            env=_holder_env(),
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            # The key travels on a pipe, never on a command line.
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(json.dumps(spec).encode() + b"\n")
                proc.stdin.close()
            line = proc.stdout.readline()
        except BaseException:
            # Ctrl-C or SIGTERM while it starts: stop it (it DELETEs what it created and
            # removes its files), so no holder is left that nobody asked for.
            with contextlib.suppress(OSError):
                proc.terminate()
            proc.returncode = 0
            proc.stderr.close()
            discard_lock()
            raise
        finally:
            proc.stdout.close()
        try:
            answer = json.loads(line) if line else {}
        except ValueError:
            answer = {}
        if not isinstance(answer, dict) or not answer.get("ok"):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            error = answer.get("error") if isinstance(answer, dict) else None
            if not error:
                # It died before it could answer (a broken installation, say): its last
                # words are the reason.
                tail = b""
                if proc.returncode is not None:
                    tail = proc.stderr.read()[-4000:]
                text = tail.decode(errors="replace").strip()
                last = text.splitlines()[-1] if text else f"exit status {proc.returncode}"
                error = f"the session holder did not start: {last}"
            proc.stderr.close()
            discard_lock()  # no holder: nothing of it stays behind
            code = int(answer.get("code") or 1) if isinstance(answer, dict) else 1
            ssh_code = int(answer.get("ssh_code") or code) if isinstance(answer, dict) else 1
            raise HolderStartError(str(error), code, ssh_code)
        proc.stderr.close()
        # Not waited for: it outlives us, reparented to init.
        proc.returncode = 0
        return path


def list_holders() -> list[HolderInfo]:
    """This user's live holders; stale sockets found on the way are removed."""
    try:
        directory = _protocol.runtime_dir(create=False)
    except OSError:
        return []
    found: list[HolderInfo] = []
    for sock in sorted(directory.glob("h-*.sock")):
        try:
            info = _protocol.request(sock, {"op": "info"}, timeout=10.0)
        except _protocol.HolderUnavailable:
            with _locked(sock.with_suffix(".lock")):
                if not _protocol.is_alive(sock):
                    _protocol.unlink_stale(sock)
            continue
        except (OSError, _protocol.ProtocolError):
            continue
        found.append(
            HolderInfo(
                path=sock,
                pid=info.get("pid"),
                sandbox=str(info.get("sandbox")),
                session_id=info.get("session_id"),
                expires_at=info.get("expires_at"),
                idle=info.get("idle"),
                active=int(info.get("active") or 0),
                persist=info.get("persist"),
                base_url=info.get("base_url"),
            )
        )
    return found


def close_holder(path: Path) -> bool:
    """Ask a holder to close its sessions and exit; True once it has."""
    try:
        answer = _protocol.request(path, {"op": "close"}, timeout=60.0)
    except (_protocol.HolderUnavailable, _protocol.ProtocolError, OSError) as exc:
        log.debug("could not close the holder at %s: %s", path, exc)
        return False
    return bool(answer.get("closed"))


# -- copies (run by a holder, or directly by the CLI) ------------------------------------

# (name shown, bytes done, bytes in all) as a copy goes.
Report = Callable[[str, int, int], None]


class CopyError(SSHBridgeError):
    """A copy that cannot be done as asked (the message names the path as typed)."""


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root``, links not followed (as put_dir)."""
    total = 0
    for here, _dirs, names in os.walk(root):
        for n in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(here, n))
                if stat_mod.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def remote_is_dir(shell: SandboxSSH, path: str) -> bool:
    try:
        return stat_mod.S_ISDIR(shell.stat(path).st_mode or 0)
    except RemotePathError as exc:
        if exc.is_not_found:
            return False
        raise


def _callback(
    report: Report | None, name: str, total: int | None
) -> Callable[[int, int], None] | None:
    if report is None:
        return None

    def callback(done: int, size: int) -> None:
        report(name, done, size if total is None else total)

    return callback


def upload(
    shell: SandboxSSH, src: Path, shown: str, dst: str, recursive: bool, report: Report | None
) -> None:
    """``cp [-r] SRC SANDBOX:DST``; ``src`` absolute, ``shown`` as the user typed it."""
    if src.is_dir():
        if not recursive:
            raise InvalidArgument(f"{shown!r} is a directory; use -r to copy a tree")
        name = Path(os.path.abspath(src)).name
        target = posixpath.join(dst, name) if remote_is_dir(shell, dst) and name else dst
        # The library's tree copy: modes, mtimes, empty directories, symlinks kept as
        # links (never followed), each file atomic.
        shell.put_dir(src, target, callback=_callback(report, shown, tree_bytes(src)))
        return
    if not src.exists():
        raise CopyError(f"{shown!r}: no such file or directory")
    if not src.is_file():
        raise CopyError(f"{shown!r} is not a regular file")
    size = src.stat().st_size
    name = Path(shown).name or shown
    shell.put(src, dst, callback=_callback(report, name, size))
    if report is not None:
        report(name, size, size)


def download(
    shell: SandboxSSH, src: str, dst: Path, shown: str, recursive: bool, report: Report | None
) -> None:
    """``cp [-r] SANDBOX:SRC DST``; ``dst`` absolute, ``shown`` as the user typed it."""
    attrs = shell.stat(src)
    if stat_mod.S_ISDIR(attrs.st_mode or 0):
        if not recursive:
            raise InvalidArgument(f"remote {src!r} is a directory; use -r to copy a tree")
        name = posixpath.basename(src.rstrip("/"))
        into = dst.is_dir() and name not in ("", ".", "..")
        target = dst / name if into else dst
        if not target.parent.is_dir():
            parent = (Path(shown) / name if into else Path(shown)).parent
            raise CopyError(f"local directory {str(parent)!r} does not exist")
        # get_dir never writes through a local symlink and keeps modes and mtimes.
        shell.get_dir(src, target, callback=_callback(report, src, None))
        return
    if not stat_mod.S_ISREG(attrs.st_mode or stat_mod.S_IFREG):
        raise CopyError(f"remote {src!r} is not a regular file")
    size = attrs.st_size or 0
    shell.get(src, dst, callback=_callback(report, src, size))
    if report is not None:
        report(src, size, size)


def error_text(exc: BaseException) -> str:
    """The CLI's one-line text for a failed copy."""
    if isinstance(exc, OSError) and not isinstance(exc, SSHBridgeError):
        text = exc.strerror or str(exc)
        return f"{exc.filename}: {text}" if exc.filename else text
    return str(exc)


class _UmaskGate:
    """Copies run with their client's umask (the process-wide one), so copies that need
    different umasks take turns; the holder's own is 077 between them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.mask: int | None = None
        self.users = 0

    @contextlib.contextmanager
    def use(self, mask: int) -> Iterator[None]:
        with self.cond:
            while self.users and self.mask != mask:
                self.cond.wait()
            if not self.users:
                os.umask(mask)
                self.mask = mask
            self.users += 1
        try:
            yield
        finally:
            with self.cond:
                self.users -= 1
                if not self.users:
                    os.umask(0o077)
                    self.mask = None
                    self.cond.notify_all()


# -- the holder process ------------------------------------------------------------------


# ``ssh SANDBOX`` without a command and without a terminal: the user's login shell,
# reading commands from stdin (what sshd's "shell" request runs).
_LOGIN_SHELL = 'exec "${SHELL:-/bin/sh}" -l'
_PROGRESS_EVERY = 0.1


class _SocketReport:
    """A copy's progress, sent to the client (at most every 0.1 s); raises
    KeyboardInterrupt, which abandons the copy, once the client has gone away."""

    def __init__(self, conn: socket.socket, enabled: bool) -> None:
        self.conn = conn
        self.enabled = enabled
        self.lock = threading.Lock()
        self.sent = 0.0
        self.pending: list[Any] | None = None

    def __call__(self, name: str, done: int, total: int) -> None:
        # The client sends nothing after its request: anything readable is its EOF.
        poller = select.poll()
        poller.register(self.conn, select.POLLIN)
        if poller.poll(0):
            raise KeyboardInterrupt
        if not self.enabled:
            return
        with self.lock:
            self.pending = [name, done, total]
            now = time.monotonic()
            if now - self.sent >= _PROGRESS_EVERY or done >= total:
                self._send(now)

    def _send(self, now: float) -> None:
        if self.pending is not None:
            with contextlib.suppress(OSError):
                _protocol.send_message(self.conn, {"progress": self.pending})
            self.pending = None
            self.sent = now

    def flush(self) -> None:
        with self.lock:
            self._send(time.monotonic())


class Holder:
    def __init__(self, shell: SandboxSSH, path: Path, persist: float, base_url: str) -> None:
        self.shell = shell
        self.path = path
        self.persist = persist
        self.base_url = base_url
        self.lock = threading.Lock()
        self.active = 0
        self.last_used = time.monotonic()
        self.stopping = False
        self.stop_requested = False
        self.done = threading.Event()
        self.close_requested = False
        self.replied = threading.Event()  # the answer to a `close` request is sent
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        # Written once on shutdown and never read: every attached forward sees it.
        self.quit_r, self.quit_w = os.pipe()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.bound_inode: int | None = None
        self.umask = _UmaskGate()

    def bind(self) -> None:
        old = os.umask(0o177)
        try:
            self.listener.bind(os.fspath(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.bound_inode = os.stat(self.path).st_ino
        self.listener.listen(128)

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self.stop_requested = True
        self.wake()

    def serve(self) -> None:
        import select

        try:
            while not self.stop_requested:
                with self.lock:
                    if self.stopping:
                        break
                    idle_left = (
                        None if self.active else self.last_used + self.persist - time.monotonic()
                    )
                    if idle_left is not None and idle_left <= 0:
                        # Decided under the lock: no job is accepted after this point.
                        self.stopping = True
                if idle_left is not None and idle_left <= 0:
                    log.info("idle for %g s: exiting", self.persist)
                    self._close_down()
                    return
                wait = 60.0 if idle_left is None else min(idle_left, 60.0)
                listen_fd = self.listener.fileno()
                ready, _, _ = select.select([listen_fd, self.wake_r], [], [], wait)
                if self.wake_r in ready:
                    with contextlib.suppress(OSError):
                        os.read(self.wake_r, 4096)
                if listen_fd in ready:
                    try:
                        conn, _ = self.listener.accept()
                    except OSError:
                        continue
                    threading.Thread(
                        target=self.handle, args=(conn,), name="sshbridge-holder", daemon=True
                    ).start()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        with self.lock:
            if self.stopping:
                wait = True
            else:
                self.stopping = True
                wait = False
        if wait:
            self.done.wait(60)
            return
        self._close_down()

    def _close_down(self) -> None:
        try:
            # Only our own socket: a new holder may have replaced a stale one meanwhile.
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self.bound_inode:
                    os.unlink(self.path)
            with contextlib.suppress(OSError):
                self.listener.close()
            self.wake()
            with contextlib.suppress(OSError):
                os.write(self.quit_w, b"x")
            self.shell.close()  # DELETEs every session it created
        finally:
            self.done.set()

    def info(self) -> dict[str, Any]:
        session = self.shell.session
        with self.lock:
            idle = 0.0 if self.active else time.monotonic() - self.last_used
            active = self.active
        return {
            "pid": os.getpid(),
            "sandbox": self.shell.sandbox_id,
            "session_id": session.session_id if session is not None else None,
            "expires_at": session.expires_at.isoformat() if session is not None else None,
            "idle": round(idle, 3),
            "active": active,
            "persist": self.persist,
            "base_url": self.base_url,
        }

    def handle(self, conn: socket.socket) -> None:
        reader = _protocol.LineReader(conn)
        try:
            if _protocol.peer_uid(conn) != os.getuid():
                log.warning("refused a connection from another user")
                _protocol.send_message(
                    conn, {"status": 255, "error": "refused: the holder belongs to another user"}
                )
                _linger(conn)
                return
            message = reader.read(maxfds=3)
            if message is None:
                return
            op = message.get("op")
            if op == "exec":
                self.exec(conn, message, reader.fds)
            elif op == "cp":
                self.copy(conn, message)
            elif op == "forward":
                self.forward(conn, message)
            elif op == "info":
                _protocol.send_message(conn, self.info())
            elif op == "ping":
                _protocol.send_message(conn, {"ok": True})
            elif op == "close":
                self.close_requested = True
                try:
                    self.shutdown()
                finally:
                    # Before the process can end: main() returns once shutdown is done.
                    with contextlib.suppress(OSError):
                        _protocol.send_message(conn, {"closed": True})
                    self.replied.set()
            else:
                _protocol.send_message(conn, {"status": 2, "error": f"unknown request {op!r}"})
        except (OSError, _protocol.ProtocolError):
            log.debug("client connection failed", exc_info=True)
        finally:
            for fd in reader.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()

    def _begin(self, conn: socket.socket, job: dict[str, Any]) -> bool:
        """Take a job (False: shutting down, nothing runs, the client starts another)."""
        with self.lock:
            if self.stopping:
                return False  # EOF before "accepted"
            self.active += 1
        try:
            persist = job.get("persist")
            if isinstance(persist, (int, float)) and persist > 0:
                self.persist = float(persist)
            _protocol.send_message(conn, {"accepted": True})
        except BaseException:
            self._end(False)
            raise
        return True

    def _end(self, fatal: bool) -> None:
        with self.lock:
            self.active -= 1
            self.last_used = time.monotonic()
        self.wake()
        if fatal:
            log.warning("the session failed for good: exiting")
            self.request_stop()

    def _failure(self, exc: SSHBridgeError, ssh: bool = False) -> tuple[dict[str, Any], bool]:
        """The answer for a failed job, and whether the session is gone for good."""
        fatal = isinstance(exc, _FATAL)
        if isinstance(exc, ConnectionLost):
            # A stopped sandbox ends the holder; a passing drop does not.
            fatal = fatal or self._sandbox_gone()
        return {"status": status_for(exc, ssh), "error": str(exc)}, fatal

    def exec(self, conn: socket.socket, job: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 3:
            _protocol.send_message(conn, {"status": 2, "error": "exec needs three descriptors"})
            return
        if not self._begin(conn, job):
            return
        fatal = False
        ssh = bool(job.get("ssh"))
        try:
            try:
                words = job.get("command")
                if job.get("login"):
                    command: str | list[str] = _LOGIN_SHELL
                elif isinstance(words, list) and words:
                    command = command_of(words)
                else:
                    raise InvalidArgument("missing the command to run")
                outcome = stream_command(
                    self.shell.channel_source(),
                    command,
                    cwd=job.get("cwd"),
                    env=job.get("env") or None,
                    timeout=job.get("timeout"),
                    pty=bool(job.get("pty")),
                    stdin_fd=fds[0] if job.get("stdin", True) else None,
                    stdout_fd=fds[1],
                    stderr_fd=fds[2],
                    cancel_fd=conn.fileno(),
                )
                reply: dict[str, Any] = {"status": outcome.status, "error": outcome.message}
            except KeyboardInterrupt:  # the client went away (Ctrl-C): command stopped
                reply = {"status": 130, "error": "interrupted"}
            except SSHBridgeError as exc:
                reply, fatal = self._failure(exc, ssh)
            with contextlib.suppress(OSError):
                _protocol.send_message(conn, reply)
        finally:
            self._end(fatal)

    def copy(self, conn: socket.socket, job: dict[str, Any]) -> None:
        local, remote = job.get("local"), job.get("remote")
        if not (isinstance(local, str) and os.path.isabs(local) and isinstance(remote, str)):
            _protocol.send_message(conn, {"status": 2, "error": "cp needs an absolute local path"})
            return
        if not self._begin(conn, job):
            return
        fatal = False
        try:
            shown = str(job.get("shown") or local)
            recursive = bool(job.get("recursive"))
            report = _SocketReport(conn, bool(job.get("progress")))
            mask = job.get("umask")
            try:
                with self.umask.use(mask if isinstance(mask, int) else 0o022):
                    if job.get("direction") == "put":
                        upload(self.shell, Path(local), shown, remote, recursive, report)
                    elif job.get("direction") == "get":
                        download(self.shell, remote, Path(local), shown, recursive, report)
                    else:
                        raise InvalidArgument("cp needs a direction, put or get")
                reply: dict[str, Any] = {"status": 0, "error": None}
            except KeyboardInterrupt:  # the client went away: the copy was abandoned
                reply = {"status": 130, "error": "interrupted"}
            except SSHBridgeError as exc:
                reply, fatal = self._failure(exc)
            except OSError as exc:
                reply = {"status": 1, "error": error_text(exc)}
            report.flush()
            with contextlib.suppress(OSError):
                _protocol.send_message(conn, reply)
        finally:
            self._end(fatal)

    def forward(self, conn: socket.socket, job: dict[str, Any]) -> None:
        specs = job.get("forwards")
        if not (isinstance(specs, list) and specs and all(isinstance(f, dict) for f in specs)):
            _protocol.send_message(conn, {"status": 2, "error": "forward needs its forwards"})
            return
        if not self._begin(conn, job):
            return
        fatal = False
        opened: list[LocalForward | RemoteForward] = []
        try:
            try:
                ports = [self._open_forward(spec, opened) for spec in specs]
            except (SSHBridgeError, OSError) as exc:
                for fwd in reversed(opened):
                    fwd.close()
                opened.clear()
                reply = self._forward_failure(exc)
                fatal = bool(reply.pop("fatal"))
                with contextlib.suppress(OSError):
                    _protocol.send_message(conn, reply)
                return
            _protocol.send_message(conn, {"forwarding": ports})
            # The client sends nothing more: anything readable on its connection is its
            # going away (EOF, reset). Our own shutdown ends the forwards too.
            poller = select.poll()
            poller.register(conn, select.POLLIN)
            poller.register(self.quit_r, select.POLLIN)
            closing = any(fd == self.quit_r for fd, _event in poller.poll())
            for fwd in reversed(opened):
                fwd.close()
            opened.clear()
            final: dict[str, Any] = {"status": 0, "error": None}
            if closing:
                final = {"status": 1, "error": "the session holder closed; forwarding stopped"}
            with contextlib.suppress(OSError):
                _protocol.send_message(conn, final)
        finally:
            for fwd in reversed(opened):
                fwd.close()
            self._end(fatal)

    def _open_forward(
        self, spec: dict[str, Any], opened: list[LocalForward | RemoteForward]
    ) -> int:
        """Start one forward on our session (listening in this process, or in the sandbox
        for a reverse one); its bound port."""
        listen, target, host, bind = (spec.get(k) for k in ("listen", "target", "host", "bind"))
        if not (
            isinstance(listen, int)
            and isinstance(target, int)
            and isinstance(host, str)
            and isinstance(bind, str)
        ):
            raise InvalidArgument("a forward needs listen and target ports, host and bind")
        fwd: LocalForward | RemoteForward
        if spec.get("reverse"):
            fwd = self.shell.forward_remote(listen, target, local_host=host, remote_host=bind)
        else:
            fwd = self.shell.forward(target, listen, host, bind)
        port = fwd.start()
        opened.append(fwd)
        return port

    def _forward_failure(self, exc: SSHBridgeError | OSError) -> dict[str, Any]:
        """The direct path's status for a failed forward: 2 for a bad argument, else 1."""
        if isinstance(exc, SSHBridgeError):
            reply, fatal = self._failure(exc)
            reply["status"] = 2 if isinstance(exc, InvalidArgument) else 1
            reply["fatal"] = fatal
            return reply
        return {"status": 1, "error": error_text(exc), "fatal": False}

    def _sandbox_gone(self) -> bool:
        try:
            sandbox = self.shell.sandbox()
        except SSHBridgeError as exc:
            return isinstance(exc, _FATAL)
        return sandbox.status != "RUNNING"


class _Files:
    """The holder's pid and log files beside its socket: created anew (O_EXCL, never
    through a link planted there) and removed when it exits, with its lock file."""

    def __init__(self, path: Path) -> None:
        self.pid_path = path.with_suffix(".pid")
        self.log_path = path.with_suffix(".log")
        self.lock_path = path.with_suffix(".lock")
        self.pid_fd: int | None = None
        self.log_fd: int | None = None

    def create(self) -> None:
        self.pid_fd = _protocol.open_private(self.pid_path, exclusive=True)
        os.write(self.pid_fd, f"{os.getpid()}\n".encode())
        self.log_fd = _protocol.open_private(self.log_path, exclusive=True)

    def remove(self) -> None:
        # Only our own: a newer holder of the same name may have replaced them.
        for fd, path in ((self.pid_fd, self.pid_path), (self.log_fd, self.log_path)):
            if fd is not None:
                with contextlib.suppress(OSError):
                    if _protocol.same_file(fd, path):
                        os.unlink(path)
        if self.pid_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pid_fd)
        _remove_lock(self.lock_path)


def _setup_logging(log_fd: int, verbose: int) -> None:
    stream = os.fdopen(os.dup(log_fd), "a", encoding="utf-8", errors="replace")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("sshbridge")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    logging.getLogger("paramiko").setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


class _Starter:
    """The pipe to the client that started us: one answer goes back on it. While we
    connect, its closing (the client was killed) ends us, as its Ctrl-C (SIGTERM) does."""

    def __init__(self) -> None:
        self.fd = os.dup(1)
        self.stop_r, self.stop_w = os.pipe()
        self.thread = threading.Thread(target=self._watch, name="sshbridge-starter", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self.fd, 0)  # POLLERR: the reading end is closed
        poller.register(self.stop_r, select.POLLIN)
        for fd, _event in poller.poll():
            if fd == self.fd:
                log.info("the starting client went away")
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def answer(self, message: dict[str, Any]) -> bool:
        """Send the one answer; False if the client is no longer there to read it."""
        os.write(self.stop_w, b"x")
        self.thread.join()
        try:
            data = (json.dumps(message) + "\n").encode()
            return os.write(self.fd, data) == len(data)
        except OSError:
            return False
        finally:
            for fd in (self.fd, self.stop_r, self.stop_w):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _leave(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every cleanup below


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    path = Path(spec["path"])
    os.umask(0o077)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Until the holder is serving, SIGTERM or SIGHUP ends it cleanly (sessions DELETEd).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _leave)
    files = _Files(path)
    starter = _Starter()
    holder: Holder | None = None
    shell: SandboxSSH | None = None

    def fail(error: str, code: int, ssh_code: int | None = None) -> int:
        starter.answer({"ok": False, "error": error, "code": code, "ssh_code": ssh_code or code})
        return 1

    try:
        try:
            files.create()
        except OSError as exc:
            return fail(error_text(exc), 1)
        assert files.log_fd is not None
        _setup_logging(files.log_fd, int(spec.get("verbose") or 0))
        try:
            shell = SandboxSSH(
                spec["sandbox"],
                api_key=spec["api_key"],
                base_url=spec["base_url"],
                team_id=spec.get("team_id") or "",
                ttl_seconds=int(spec["ttl"]),
            )
            shell.connect()
        except SSHBridgeError as exc:
            log.info("could not open the session: %s", exc)
            return fail(str(exc), status_for(exc), status_for(exc, ssh=True))
        except Exception as exc:  # a bug, but the waiting client hears of it
            log.exception("could not open the session")
            return fail(f"internal error in the session holder: {type(exc).__name__}: {exc}", 1)
        holder = Holder(shell, path, float(spec["persist"]), spec["base_url"])
        try:
            holder.bind()
        except OSError as exc:
            return fail(f"cannot listen on {path}: {exc}", 1)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, holder.request_stop)
        if not starter.answer({"ok": True, "pid": os.getpid()}):
            log.info("the starting client went away: exiting")
            return 0
        _detach_stdio()
        log.info("holding %s (idle timeout %g s)", spec["sandbox"], holder.persist)
        holder.serve()
        if holder.close_requested:
            holder.replied.wait(5)  # `sshbridge close` is told before the process ends
        return 0
    finally:
        # However we leave: the socket (if ours) goes, every session is DELETEd.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if holder is not None:
            holder.shutdown()
        elif shell is not None:
            shell.close()
        files.remove()
        log.info("exited; sessions closed")


if __name__ == "__main__":
    sys.exit(main())
