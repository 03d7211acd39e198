"""The persistent session holder: one background process per (credentials, sandbox).

Like OpenSSH's ControlMaster/ControlPersist. The first CLI call for a sandbox starts a
holder (``python -m sshbridge._holder``) that keeps a ``SandboxSSH`` open and renewing,
and later calls attach to it over a Unix socket (see ``sshbridge_fast._protocol`` for
the wire). The holder exits, DELETEing its sessions, after ``persist`` idle seconds, on
``sshbridge close``, on SIGTERM/SIGINT/SIGHUP, or when its sandbox or key fails for good.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from sshbridge_fast import _protocol

from ._config import Config
from ._exceptions import (
    AuthenticationError,
    ConnectionLost,
    InvalidArgument,
    NotFound,
    SandboxError,
    SSHBridgeError,
    SSHError,
)
from ._sandbox import SandboxSSH
from ._stream import command_of, stream_command

log = logging.getLogger("sshbridge.holder")

# Errors after which this holder's session is no use to anyone: it closes and exits.
_FATAL = (SandboxError, AuthenticationError, NotFound)


class HolderStartError(SSHBridgeError):
    """The holder could not open its session (the message says why)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


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


def status_for(exc: BaseException) -> int:
    if isinstance(exc, InvalidArgument):
        return 2
    if isinstance(exc, (SSHError, ConnectionLost)):
        return 255
    return 1


# -- the client side (used by the full CLI) -----------------------------------------------


def holder_path(config: Config, sandbox_id: str) -> Path | None:
    directory = _protocol.runtime_dir()
    name = _protocol.holder_name(config.base_url, config.team_id, config.api_key, sandbox_id)
    return _protocol.socket_path(directory, name)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_holder(
    config: Config, sandbox_id: str, *, ttl: int, persist: float, verbose: int = 0
) -> Path | None:
    """The socket of a live holder for this sandbox, starting one if needed (under a
    lock, so concurrent first calls start one). None when holders cannot be used here
    (the socket path would be too long)."""
    path = holder_path(config, sandbox_id)
    if path is None:
        log.debug("runtime directory path too long for a socket; not persisting")
        return None
    if _protocol.is_alive(path):
        return path
    with _locked(path.with_suffix(".lock")):
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
        proc = subprocess.Popen(
            [sys.executable, "-m", "sshbridge._holder"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd="/",
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            # The key travels on a pipe, never on a command line.
            proc.stdin.write(json.dumps(spec).encode() + b"\n")
            proc.stdin.close()
            line = proc.stdout.readline()
        finally:
            proc.stdout.close()
        try:
            answer = json.loads(line) if line else {}
        except ValueError:
            answer = {}
        if not answer.get("ok"):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            raise HolderStartError(
                str(answer.get("error") or "the session holder did not start"),
                int(answer.get("code") or 1),
            )
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


# -- the holder process ------------------------------------------------------------------


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
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.bound_inode: int | None = None

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
                return
            message = reader.read(maxfds=3)
            if message is None:
                return
            op = message.get("op")
            if op == "exec":
                self.exec(conn, message, reader.fds)
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

    def exec(self, conn: socket.socket, job: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 3:
            _protocol.send_message(conn, {"status": 2, "error": "exec needs three descriptors"})
            return
        with self.lock:
            if self.stopping:
                return  # EOF before "accepted": the client starts a new holder
            self.active += 1
        fatal = False
        try:
            persist = job.get("persist")
            if isinstance(persist, (int, float)) and persist > 0:
                self.persist = float(persist)
            _protocol.send_message(conn, {"accepted": True})
            words = job.get("command")
            if not isinstance(words, list) or not words:
                raise InvalidArgument("missing the command to run")
            try:
                outcome = stream_command(
                    self.shell.channel_source(),
                    command_of(words),
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
                fatal = isinstance(exc, _FATAL)
                if isinstance(exc, ConnectionLost):
                    # A stopped sandbox ends the holder; a passing drop does not.
                    fatal = fatal or self._sandbox_gone()
                reply = {"status": status_for(exc), "error": str(exc)}
            with contextlib.suppress(OSError):
                _protocol.send_message(conn, reply)
        finally:
            with self.lock:
                self.active -= 1
                self.last_used = time.monotonic()
            self.wake()
        if fatal:
            log.warning("the session failed for good: exiting")
            self.request_stop()

    def _sandbox_gone(self) -> bool:
        try:
            sandbox = self.shell.sandbox()
        except SSHBridgeError as exc:
            return isinstance(exc, _FATAL)
        return sandbox.status != "RUNNING"


def _setup_logging(path: Path, verbose: int) -> None:
    handler = logging.FileHandler(path.with_suffix(".log"))
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


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    out = os.fdopen(os.dup(1), "w")

    def answer(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()
        out.close()

    path = Path(spec["path"])
    os.umask(0o077)
    _setup_logging(path, int(spec.get("verbose") or 0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through SandboxSSH's close: no session left

    # Until the holder is serving, a SIGTERM or SIGHUP ends it cleanly (sessions DELETEd).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)
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
        answer({"ok": False, "error": str(exc), "code": status_for(exc)})
        return 1
    holder = Holder(shell, path, float(spec["persist"]), spec["base_url"])
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, holder.request_stop)
    try:
        holder.bind()
    except OSError as exc:
        shell.close()
        answer({"ok": False, "error": f"cannot listen on {path}: {exc}", "code": 1})
        return 1
    pid_file = path.with_suffix(".pid")
    pid_file.write_text(f"{os.getpid()}\n")
    answer({"ok": True, "pid": os.getpid()})
    _detach_stdio()
    log.info("holding %s (idle timeout %g s)", spec["sandbox"], holder.persist)
    try:
        holder.serve()
        if holder.close_requested:
            holder.replied.wait(5)  # `sshbridge close` is told before the process ends
    finally:
        with contextlib.suppress(OSError):
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
        log.info("exited; sessions closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
