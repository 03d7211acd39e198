"""Start a throwaway OpenSSH ``sshd`` on a loopback port for interop tests.

This is a helper module, not a test module.  Typical use from a fixture::

    server = start_sshd(tmp_path)
    try:
        server.authorized_keys_file.open("a").write(public_line + "\\n")
        ...  # connect to server.host:server.port as server.username
    finally:
        server.stop()

Design notes
------------
* The server listens on 127.0.0.1 only, on a free ephemeral port (picked by
  binding port 0; a start that loses a bind race is retried on a new port).
* A fresh ed25519 host key is generated for every server (``cryptography`` if
  importable, else ``ssh-keygen``).
* ``StrictModes no``: pytest's temporary directories live under ``/tmp``
  (mode 1777), which sshd's StrictModes path walk rejects for the
  AuthorizedKeysFile.  The file itself is still created with mode 0600.
* HOME pinning: ``SetEnv HOME=<home>`` in sshd_config.  OpenSSH applies the
  server's ``SetEnv`` list *after* it has filled in the login environment
  (``do_setup_env`` in session.c), so it overrides the ``HOME`` taken from the
  passwd entry.  The user's shell then expands ``~`` from ``$HOME``, so bash
  (which sources ``~/.bashrc`` for commands run by sshd) reads the empty
  ``<home>/.bashrc`` instead of the real user's rc files; login shells read the
  empty ``<home>/.bash_profile``.  ``PermitUserRC no`` stops sshd from running
  ``~/.ssh/rc`` (that one is resolved against the passwd home directory, which
  is also the session's working directory).  This needs no system user and no
  change outside ``tmp_dir``; tests/test_sshd_fixture.py proves that the
  pinned rc file is the one that runs.
* SFTP uses ``internal-sftp``: it runs inside sshd without starting the user's
  shell, so it is the fastest and does not depend on the rc files at all.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["PreambleFront", "SSHDServer", "SSHDStartError", "find_sshd", "start_sshd"]

_SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd", "/usr/bin/sshd")
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_BIND_RETRIES = 5
_BIND_ERRORS = ("Address already in use", "Cannot bind any address", "bind to port")


class SSHDStartError(RuntimeError):
    """sshd could not be configured or did not come up."""


@dataclass
class SSHDServer:
    host: str
    port: int
    username: str
    authorized_keys_file: pathlib.Path
    host_key_public: str
    home: pathlib.Path
    # Extras (not needed by most callers).
    config_file: pathlib.Path | None = None
    log_file: pathlib.Path | None = None
    host_key_file: pathlib.Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def add_authorized_key(self, public_line: str) -> None:
        """Append one ``type base64 [comment]`` line to the authorized_keys file."""
        with self.authorized_keys_file.open("a", encoding="utf-8") as fh:
            fh.write(public_line.strip() + "\n")

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_file, lines) if self.log_file else ""

    def stop(self) -> None:
        """Stop sshd and the per-connection processes it forked. Idempotent."""
        proc = self.process
        if proc is None:
            return
        self.process = None
        # Connection handlers call setsid(), so they are not in sshd's process
        # group; find them (descendants of our sshd only) before it goes away.
        children = _descendants(proc.pid) if proc.poll() is None else []
        _terminate(proc)
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        while children and time.monotonic() < deadline:
            children = [p for p in children if _alive(p)]
            if children:
                time.sleep(0.02)
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> SSHDServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def find_sshd() -> str | None:
    """Absolute path of an executable sshd, or None."""
    for cand in _SSHD_CANDIDATES:
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("sshd")
    return os.path.abspath(found) if found else None


def start_sshd(
    tmp_dir: pathlib.Path, *, max_sessions: int = 10, extra_config: str = ""
) -> SSHDServer:
    """Generate keys and config under ``tmp_dir`` and start sshd on 127.0.0.1.

    A keyword given in ``extra_config`` (outside ``Match`` blocks) replaces the
    helper's default line for that keyword (sshd uses the first value it
    reads); ``SetEnv`` entries are merged and ``Subsystem`` lines replace only
    the subsystem of the same name.
    """
    sshd = find_sshd()
    if sshd is None:
        raise SSHDStartError("sshd not found (install openssh-server)")
    tmp_dir = pathlib.Path(tmp_dir).resolve()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    _ensure_privsep_dir()

    username = pwd.getpwuid(os.getuid()).pw_name

    host_key_file = tmp_dir / "ssh_host_ed25519_key"
    host_key_public = _generate_host_key(host_key_file)

    authorized_keys = tmp_dir / "authorized_keys"
    authorized_keys.touch(mode=0o600, exist_ok=True)
    os.chmod(authorized_keys, 0o600)

    home = tmp_dir / "home"
    home.mkdir(mode=0o755, exist_ok=True)
    for name in (".bashrc", ".profile", ".bash_profile", ".bash_login", ".bash_logout"):
        (home / name).write_text("")
    (home / ".hushlogin").write_text("")

    config_file = tmp_dir / "sshd_config"
    log_file = tmp_dir / "sshd.log"
    stderr_file = tmp_dir / "sshd.stderr"
    pid_file = tmp_dir / "sshd.pid"

    last_error = ""
    for _attempt in range(_BIND_RETRIES):
        port = _free_port()
        config_file.write_text(
            _render_config(
                port=port,
                host_key=host_key_file,
                pid_file=pid_file,
                authorized_keys=authorized_keys,
                home=home,
                max_sessions=max_sessions,
                extra_config=extra_config,
            )
        )
        os.chmod(config_file, 0o600)

        check = subprocess.run(
            [sshd, "-t", "-f", str(config_file)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            raise SSHDStartError(
                f"sshd -t rejected {config_file} (exit {check.returncode}):\n"
                f"{check.stderr.strip() or check.stdout.strip()}\n--- config ---\n"
                f"{config_file.read_text()}"
            )

        with log_file.open("a") as lf:
            lf.write(f"=== starting sshd on 127.0.0.1:{port} ===\n")
        with stderr_file.open("ab") as err:
            proc = subprocess.Popen(
                [sshd, "-D", "-e", "-f", str(config_file), "-E", str(log_file)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                close_fds=True,
            )
        server = SSHDServer(
            host="127.0.0.1",
            port=port,
            username=username,
            authorized_keys_file=authorized_keys,
            host_key_public=host_key_public,
            home=home,
            config_file=config_file,
            log_file=log_file,
            host_key_file=host_key_file,
            process=proc,
        )
        if _wait_listening(proc, port, _START_TIMEOUT):
            return server
        server.stop()
        last_error = _tail(log_file, 40) + _tail(stderr_file, 20)
        if any(marker in last_error for marker in _BIND_ERRORS):
            continue  # lost a race for the port: try another one
        break
    raise SSHDStartError(
        f"sshd did not start listening on 127.0.0.1 within {_START_TIMEOUT:.0f}s;"
        f" log tail:\n{last_error}"
    )


# --------------------------------------------------------------------------- preamble front


class PreambleFront:
    """A loopback TCP front that speaks the provider's VM gateway preamble to a plain sshd.

    Each connection must start with ``PRIME-SSH-SESSION <id>\\n`` (at most 256 bytes, within
    ``timeout`` seconds) with ``accept(id)`` true; it is then piped both ways to ``target``
    until both directions end. Anything else is closed before a byte reaches sshd.
    """

    MAX_LINE = 256
    PREFIX = b"PRIME-SSH-SESSION "

    def __init__(
        self,
        target: tuple[str, int],
        accept: Callable[[str], bool],
        *,
        timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.accept = accept
        self.timeout = timeout
        self.accepted = 0
        self.rejected = 0
        self.host = "127.0.0.1"
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._socks: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._wake_r, self._wake_w = socket.socketpair()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((self.host, 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="preamble-front", daemon=True
        )
        self._acceptor.start()

    # -- lifecycle

    def close(self) -> None:
        """Stop listening, drop every connection and join every thread. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        with self._lock:
            socks = list(self._socks)
        for sock in socks:  # ends blocked recv() calls in the connection threads
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> PreambleFront:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._closed.is_set():
                return False
            self._socks.add(sock)
            return True

    def _drop(self, *socks: socket.socket) -> None:
        for sock in socks:
            with self._lock:
                self._socks.discard(sock)
            sock.close()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed.is_set():
                events = sel.select()
                if any(key.fileobj is self._wake_r for key, _ in events):
                    return
                try:
                    conn, _addr = self._listener.accept()
                except OSError:
                    continue
                if not self._track(conn):
                    conn.close()
                    return
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name="preamble-front-conn", daemon=True
                )
                with self._lock:
                    self._threads.add(thread)
                thread.start()

    def _read_line(self, conn: socket.socket) -> bytes | None:
        deadline = time.monotonic() + self.timeout
        buf = b""
        while len(buf) < self.MAX_LINE:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            conn.settimeout(left)
            try:
                # Peek, then consume only up to the newline: what follows is SSH.
                peeked = conn.recv(self.MAX_LINE - len(buf), socket.MSG_PEEK)
            except OSError:  # timeouts included
                return None
            if not peeked:
                return None
            newline = peeked.find(b"\n")
            buf += conn.recv(newline + 1 if newline >= 0 else len(peeked))
            if newline >= 0:
                return buf
        return None

    def _session_id(self, line: bytes | None) -> str | None:
        if line is None or not line.startswith(self.PREFIX) or not line.endswith(b"\n"):
            return None
        try:
            session_id = line[len(self.PREFIX) : -1].decode("ascii")
        except UnicodeDecodeError:
            return None
        if not session_id or any(c.isspace() for c in session_id):
            return None
        try:
            return session_id if self.accept(session_id) else None
        except Exception:  # noqa: BLE001 -- a failing predicate rejects
            return None

    def _serve(self, conn: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            session_id = self._session_id(self._read_line(conn))
            if session_id is None or self._closed.is_set():
                with self._lock:
                    self.rejected += 1
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                with self._lock:
                    self.rejected += 1
                return
            if not self._track(upstream):
                return
            with self._lock:
                self.accepted += 1
            # A relay must not add Nagle + delayed-ACK waits (40 ms) to small packets.
            for sock in (conn, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(conn, upstream)
        finally:
            self._drop(conn, *([upstream] if upstream is not None else []))
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        # One blocking thread per direction: neither can stall the other.
        for sock in (a, b):
            sock.settimeout(None)
        back = threading.Thread(
            target=self._copy, args=(b, a), name="preamble-front-pipe", daemon=True
        )
        with self._lock:
            self._threads.add(back)
        back.start()
        self._copy(a, b)
        back.join()
        with self._lock:
            self._threads.discard(back)

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            for sock in (src, dst):  # a broken side ends both directions
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        else:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on


# --------------------------------------------------------------------------- helpers


def _quote(value: str) -> str:
    if any(c.isspace() for c in value) or '"' in value or "#" in value:
        if '"' in value:
            raise SSHDStartError(f"cannot quote {value!r} for sshd_config")
        return f'"{value}"'
    return value


def _render_config(
    *,
    port: int,
    host_key: pathlib.Path,
    pid_file: pathlib.Path,
    authorized_keys: pathlib.Path,
    home: pathlib.Path,
    max_sessions: int,
    extra_config: str,
) -> str:
    setenv = {"HOME": str(home)}
    defaults: list[tuple[str, str]] = [
        ("ListenAddress", "127.0.0.1"),
        ("Port", str(port)),
        ("AddressFamily", "inet"),
        ("HostKey", _quote(str(host_key))),
        ("PidFile", _quote(str(pid_file))),
        # Tokens in AuthorizedKeysFile are %-expanded: escape a literal '%'.
        ("AuthorizedKeysFile", _quote(str(authorized_keys).replace("%", "%%"))),
        ("StrictModes", "no"),
        ("PubkeyAuthentication", "yes"),
        ("PasswordAuthentication", "no"),
        ("KbdInteractiveAuthentication", "no"),
        ("HostbasedAuthentication", "no"),
        ("PermitEmptyPasswords", "no"),
        ("PermitRootLogin", "prohibit-password"),
        ("UsePAM", "no"),
        ("UseDNS", "no"),
        ("PermitUserRC", "no"),
        ("PermitUserEnvironment", "no"),
        ("PrintMotd", "no"),
        ("PrintLastLog", "no"),
        ("X11Forwarding", "no"),
        ("AllowTcpForwarding", "yes"),
        ("AllowStreamLocalForwarding", "yes"),
        ("MaxSessions", str(max_sessions)),
        ("MaxStartups", "100:30:200"),
        ("MaxAuthTries", "10"),
        ("LoginGraceTime", "30"),
        ("Subsystem", "sftp internal-sftp"),
        ("LogLevel", "VERBOSE"),
    ]

    # Split extra_config into top-level lines and the Match section (which
    # must come last in the file).
    top: list[str] = []
    match_section: list[str] = []
    for raw in extra_config.splitlines():
        line = raw.strip()
        if match_section or line.lower().startswith("match ") or line.lower() == "match":
            match_section.append(raw)
        else:
            top.append(raw)

    override: set[str] = set()
    override_subsystems: set[str] = set()
    kept_top: list[str] = []
    for raw in top:
        line = raw.strip()
        if not line or line.startswith("#"):
            kept_top.append(raw)
            continue
        words = shlex.split(line.replace("=", " ", 1) if "=" in line.split()[0] else line)
        key = words[0].lower()
        if key == "setenv":
            for item in words[1:]:
                name, _, value = item.partition("=")
                setenv[name] = value
            continue
        if key == "subsystem" and len(words) > 1:
            override_subsystems.add(words[1])
        else:
            override.add(key)
        kept_top.append(raw)

    out = ["# Generated by tests/sshd_server.py for a throwaway test sshd."]
    for key, value in defaults:
        if key.lower() in override:
            continue
        if key == "Subsystem" and value.split()[0] in override_subsystems:
            continue
        out.append(f"{key} {value}")
    out.append("SetEnv " + " ".join(_quote(f"{k}={v}") for k, v in setenv.items()))
    out.extend(kept_top)
    out.extend(match_section)
    return "\n".join(out) + "\n"


def _generate_host_key(path: pathlib.Path) -> str:
    """Write an OpenSSH ed25519 private key (0600) and .pub; return the public line."""
    pub_path = path.with_name(path.name + ".pub")
    for p in (path, pub_path):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        keygen = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
        subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)],
            stdin=subprocess.DEVNULL,
            check=True,
            capture_output=True,
        )
        os.chmod(path, 0o600)
        public = pub_path.read_text().strip()
    else:
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private)
        os.chmod(path, 0o600)
        public = (
            key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        pub_path.write_text(public + "\n")
    # Keep only "type base64" (drop any comment).
    return " ".join(public.split()[:2])


def _ensure_privsep_dir() -> None:
    # sshd running as root refuses to start without its privilege separation
    # directory; Debian creates /run/sshd from the systemd unit, which does
    # not run in containers.
    if os.geteuid() != 0:
        return
    run_sshd = pathlib.Path("/run/sshd")
    if not run_sshd.is_dir():
        run_sshd.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(run_sshd, 0o755)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except OSError:
            time.sleep(0.01)
            continue
        # Make sure it is our sshd that answered, not a port thief.
        return proc.poll() is None
    return False


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=_STOP_TIMEOUT)
    else:
        proc.wait()


def _descendants(root_pid: int) -> list[int]:
    """PIDs descending from root_pid (Linux /proc; empty list elsewhere)."""
    parents: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        # Fields after the ")" that closes the command name: state ppid ...
        rest = stat.rsplit(")", 1)[-1].split()
        if len(rest) >= 2:
            parents[int(entry)] = int(rest[1])
    found: list[int] = []
    frontier = [root_pid]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, ppid in parents.items() if ppid == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().decode(errors="replace").rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _tail(path: pathlib.Path | None, lines: int) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:]) + "\n"


# --------------------------------------------------------------------------- dropbear
#
# start_dropbear(tmp_dir) starts Dropbear (2022.83 on Debian 12) the way start_sshd starts
# sshd: 127.0.0.1 on a free port, foreground (-F -E), a fresh ed25519 host key made by
# dropbearkey, password logins off (-s), public keys only, for the current user.
#
# Where Dropbear looks for keys. It has no option for the authorized_keys location in
# this version (``dropbear -h`` lists no -D; the path is compiled in as
# "%s/.ssh/authorized_keys" with %s the login user's passwd home), and it takes HOME for
# the session from the passwd entry too. So the helper starts Dropbear in a private
# mount namespace (``unshare --mount``; as a non-root user ``unshare --user
# --map-current-user --keep-caps --mount``) in which a copy of /etc/passwd, identical
# but for the current user's home (``<tmp_dir>/home``), is bind-mounted over
# /etc/passwd. Only Dropbear and the commands it starts see that copy; nothing outside
# ``tmp_dir`` is written and the real ~/.ssh is never read. Dropbear then reads
# ``<tmp_dir>/home/.ssh/authorized_keys``, sets HOME to ``<tmp_dir>/home`` and starts
# there; bash (the login shell, which sources ~/.bashrc for commands from an SSH server)
# finds the empty rc files of that home. Only the mount table differs: the same file
# systems, network and process table, and commands run as the current user.
#
# expiry-time. Dropbear does not know that option: a line carrying it fails with "Bad
# public key options at .../authorized_keys:N" and the key is refused. So callers (and
# the emulator) write ``authorized_keys_file`` (``<tmp_dir>/authorized_keys``), and a
# small sync thread copies it to the file Dropbear reads, within a few milliseconds of
# each change, dropping the expiry-time option and every line whose expiry-time has
# passed (re-checked when the earliest one falls due), so new logins with an expired key
# fail as they would with sshd. sshbridge retries a refused key while a session is new,
# which covers the copy's delay; ``add_authorized_key`` and ``sync_keys`` copy at once.
#
# SFTP. Dropbear runs the "sftp" subsystem as ``<shell> -c SFTPSERVER_PATH``, a path
# compiled in (/usr/lib/sftp-server on Debian, a link to OpenSSH's
# /usr/lib/openssh/sftp-server from openssh-sftp-server). The helper reads the path out of
# the binary and refuses to start, naming it, when it is missing.
#
# stop() kills Dropbear and everything descending from it (each connection is a forked
# child that calls setsid()).

_DROPBEAR_CANDIDATES = (
    "/usr/sbin/dropbear",
    "/usr/local/sbin/dropbear",
    "/sbin/dropbear",
    "/usr/bin/dropbear",
)
_DROPBEAR_BIND_ERRORS = ("Address already in use", "No listening ports available")
_KEYS_POLL = 0.005
_KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-", "sk-")


class DropbearStartError(RuntimeError):
    """Dropbear could not be configured or did not come up."""


def find_dropbear() -> str | None:
    """Absolute path of an executable dropbear server, or None."""
    for cand in _DROPBEAR_CANDIDATES:
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("dropbear")
    return os.path.abspath(found) if found else None


def find_dropbearkey(dropbear: str | None = None) -> str | None:
    """dropbearkey next to ``dropbear`` (or on PATH), or None."""
    dirs = [os.path.dirname(dropbear)] if dropbear else []
    dirs += ["/usr/bin", "/usr/local/bin", "/usr/sbin", "/usr/local/sbin"]
    for d in dirs:
        cand = os.path.join(d, "dropbearkey")
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("dropbearkey")
    return os.path.abspath(found) if found else None


def dropbear_sftp_server_path(dropbear: str) -> str | None:
    """The SFTPSERVER_PATH compiled into the dropbear binary (what it execs for SFTP)."""
    import re

    try:
        data = pathlib.Path(dropbear).read_bytes()
    except OSError:
        return None
    match = re.search(rb"\x00(/[A-Za-z0-9_./-]*sftp-server)\x00", data)
    return match.group(1).decode() if match else None


def _expiry_epoch(spec: str) -> float | None:
    """sshd's expiry-time (YYYYMMDD[HHMM[SS]], local time unless it ends in Z) as a Unix
    time; None when it cannot be read (sshd refuses such a line)."""
    from datetime import datetime, timezone

    value = spec.strip('"')
    utc = value.endswith("Z")
    digits = value[:-1] if utc else value
    formats = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    if not digits.isdigit() or len(digits) not in formats:
        return None
    try:
        when = datetime.strptime(digits, formats[len(digits)])
    except ValueError:
        return None
    return (when.replace(tzinfo=timezone.utc) if utc else when).timestamp()


def _split_key_options(line: str) -> tuple[list[str], str]:
    """(raw option texts, "type base64 [comment]") of one authorized_keys line."""
    if line.startswith(_KEY_TYPE_PREFIXES):
        return [], line
    options: list[str] = []
    start, quoted = 0, False
    for i, c in enumerate(line):
        if c == '"' and (i == 0 or line[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and c == ",":
            options.append(line[start:i])
            start = i + 1
        elif not quoted and c in " \t":
            options.append(line[start:i])
            return options, line[i:].strip()
    return [*options, line[start:]], ""


def dropbear_key_lines(text: str, now: float) -> tuple[list[str], float | None]:
    """The authorized_keys lines of ``text`` for Dropbear at Unix time ``now``, and the
    earliest expiry still to come: lines whose expiry-time has passed (or cannot be read)
    are dropped, the option itself is removed from the others, the rest is kept as is.
    An unterminated last line (a write in progress) is left for the next pass."""
    kept: list[str] = []
    next_expiry: float | None = None
    for raw in text.splitlines(keepends=True):
        if not raw.endswith("\n"):
            break
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        options, rest = _split_key_options(line)
        if not rest:
            continue
        others: list[str] = []
        expired = False
        for opt in options:
            name, _, value = opt.partition("=")
            if name.strip().lower() != "expiry-time":
                others.append(opt)
                continue
            when = _expiry_epoch(value)
            if when is None or when <= now:
                expired = True
            elif next_expiry is None or when < next_expiry:
                next_expiry = when
        if not expired:
            kept.append((",".join(others) + " " + rest) if others else rest)
    return kept, next_expiry


class _KeySync:
    """Copies ``source`` to ``dest`` (Dropbear's file) on every change, for Dropbear."""

    def __init__(self, source: pathlib.Path, dest: pathlib.Path) -> None:
        self.source = source
        self.dest = dest
        self.copies = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._seen: tuple[int, int, int] | None = None
        self._written: str | None = None
        self._next_expiry: float | None = None
        self.sync()
        self._thread = threading.Thread(target=self._loop, name="dropbear-keysync", daemon=True)
        self._thread.start()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.source)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def sync(self) -> None:
        with self._lock:
            signature = self._signature()
            try:
                text = self.source.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                text = ""
            lines, self._next_expiry = dropbear_key_lines(text, time.time())
            content = "".join(line + "\n" for line in lines)
            self._seen = signature
            if content == self._written:
                return
            tmp = self.dest.with_name(self.dest.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(content)
            os.replace(tmp, self.dest)
            self._written = content
            self.copies += 1

    def _loop(self) -> None:
        while not self._stop.wait(_KEYS_POLL):
            due = self._next_expiry is not None and time.time() >= self._next_expiry
            if due or self._signature() != self._seen:
                with contextlib.suppress(OSError):
                    self.sync()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class DropbearServer:
    host: str
    port: int
    username: str
    # The file to add keys to (the emulator's OpenSSHTarget file); expiry-time allowed.
    authorized_keys_file: pathlib.Path
    host_key_public: str
    home: pathlib.Path
    # Extras (not needed by most callers).
    dropbear_keys_file: pathlib.Path | None = None  # <home>/.ssh/authorized_keys
    sftp_server: str | None = None
    passwd_file: pathlib.Path | None = None
    log_file: pathlib.Path | None = None
    host_key_file: pathlib.Path | None = None
    version: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _sync: _KeySync | None = field(default=None, repr=False)

    def add_authorized_key(self, public_line: str) -> None:
        """Append one ``[options] type base64 [comment]`` line, in effect at once."""
        with self.authorized_keys_file.open("a", encoding="utf-8") as fh:
            fh.write(public_line.strip() + "\n")
        self.sync_keys()

    def sync_keys(self) -> None:
        """Copy ``authorized_keys_file`` to Dropbear's file now (the thread does it too)."""
        if self._sync is not None:
            self._sync.sync()

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_file, lines) if self.log_file else ""

    def stop(self) -> None:
        """Stop the key sync, Dropbear and the connection processes it forked. Idempotent."""
        sync, self._sync = self._sync, None
        if sync is not None:
            sync.close()
        proc = self.process
        if proc is None:
            return
        self.process = None
        children = _descendants(proc.pid) if proc.poll() is None else []
        _terminate(proc)
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        while children and time.monotonic() < deadline:
            children = [p for p in children if _alive(p)]
            if children:
                time.sleep(0.02)
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> DropbearServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _dropbear_host_key(dropbearkey: str, path: pathlib.Path) -> str:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    made = subprocess.run(
        [dropbearkey, "-t", "ed25519", "-f", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if made.returncode != 0:
        raise DropbearStartError(f"dropbearkey failed: {made.stderr.strip() or made.stdout}")
    os.chmod(path, 0o600)
    for line in made.stdout.splitlines():
        if line.startswith("ssh-ed25519 "):
            return " ".join(line.split()[:2])
    raise DropbearStartError(f"no public key in dropbearkey's output:\n{made.stdout}")


def _passwd_copy(username: str, home: pathlib.Path) -> str:
    """/etc/passwd with ``username``'s home set to ``home`` and its shell one that
    /etc/shells allows (Dropbear refuses logins with any other)."""
    try:
        shells = {
            s.strip()
            for s in pathlib.Path("/etc/shells").read_text().splitlines()
            if s.strip() and not s.startswith("#")
        }
    except OSError:
        shells = set()
    entry = pwd.getpwnam(username)
    shell = entry.pw_shell if entry.pw_shell in shells else "/bin/sh"
    ours = f"{username}:x:{entry.pw_uid}:{entry.pw_gid}:{entry.pw_gecos}:{home}:{shell}"
    if ":" in str(home) or "\n" in str(home):
        raise DropbearStartError(f"cannot put {str(home)!r} in a passwd entry")
    try:
        lines = pathlib.Path("/etc/passwd").read_text().splitlines()
    except OSError:
        lines = []
    out = [ln for ln in lines if ln.split(":", 1)[0] != username]
    # Ours first: getpwnam() returns the first entry with the name.
    return "\n".join([ours, *out]) + "\n"


def start_dropbear(tmp_dir: pathlib.Path, *, extra_args: tuple[str, ...] = ()) -> DropbearServer:
    """Start Dropbear on 127.0.0.1 for the current user (see the notes above)."""
    dropbear = find_dropbear()
    if dropbear is None:
        raise DropbearStartError("dropbear not found (apt-get install dropbear-bin)")
    dropbearkey = find_dropbearkey(dropbear)
    if dropbearkey is None:
        raise DropbearStartError("dropbearkey not found (apt-get install dropbear-bin)")
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    if not os.access(unshare, os.X_OK):
        raise DropbearStartError("unshare (util-linux) not found")
    sftp_server = dropbear_sftp_server_path(dropbear)
    if sftp_server is None or not os.access(sftp_server, os.X_OK):
        raise DropbearStartError(
            f"dropbear runs {sftp_server or 'its SFTPSERVER_PATH'} for SFTP, which is missing"
            " (apt-get install openssh-sftp-server)"
        )
    version_run = subprocess.run(
        [dropbear, "-V"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
    )
    version = (version_run.stderr or version_run.stdout).strip().splitlines()[0:1]

    tmp_dir = pathlib.Path(tmp_dir).resolve()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    username = pwd.getpwuid(os.getuid()).pw_name
    root = os.geteuid() == 0

    host_key_file = tmp_dir / "dropbear_ed25519_host_key"
    host_key_public = _dropbear_host_key(dropbearkey, host_key_file)

    home = tmp_dir / "home"
    home.mkdir(mode=0o755, exist_ok=True)
    os.chmod(home, 0o755)  # Dropbear refuses keys under a group/other-writable home
    for name in (".bashrc", ".profile", ".bash_profile", ".bash_login", ".bash_logout"):
        (home / name).write_text("")
    (home / ".hushlogin").write_text("")
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(ssh_dir, 0o700)

    authorized_keys = tmp_dir / "authorized_keys"
    authorized_keys.touch(mode=0o600, exist_ok=True)
    os.chmod(authorized_keys, 0o600)

    passwd_file = tmp_dir / "passwd"
    passwd_file.write_text(_passwd_copy(username, home))
    os.chmod(passwd_file, 0o644)

    log_file = tmp_dir / "dropbear.log"
    pid_file = tmp_dir / "dropbear.pid"
    namespace = [unshare, "--mount", "--propagation", "private"]
    if not root:
        # The current user stays itself (Dropbear then never changes user or groups),
        # keeping the namespace's capabilities for the bind mount.
        namespace[1:1] = ["--user", "--map-current-user", "--keep-caps"]
    # mount, then exec: Dropbear keeps the pid that Popen knows.
    inner = 'mount --bind "$1" /etc/passwd || exit 97; shift; exec "$@"'

    sync = _KeySync(authorized_keys, ssh_dir / "authorized_keys")
    last_error = ""
    try:
        for _attempt in range(_BIND_RETRIES):
            port = _free_port()
            argv = [
                *namespace, "--", "/bin/sh", "-c", inner, "sh", str(passwd_file),
                dropbear, "-F", "-E", "-s", "-p", f"127.0.0.1:{port}",
                "-r", str(host_key_file), "-P", str(pid_file), *extra_args,
            ]  # fmt: skip
            with log_file.open("ab") as log:
                log.write(f"=== starting dropbear on 127.0.0.1:{port} ===\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True
                )
            server = DropbearServer(
                host="127.0.0.1",
                port=port,
                username=username,
                authorized_keys_file=authorized_keys,
                host_key_public=host_key_public,
                home=home,
                dropbear_keys_file=ssh_dir / "authorized_keys",
                sftp_server=sftp_server,
                passwd_file=passwd_file,
                log_file=log_file,
                host_key_file=host_key_file,
                version=version[0] if version else "",
                process=proc,
            )
            if _wait_listening(proc, port, _START_TIMEOUT):
                server._sync = sync
                return server
            server.stop()
            last_error = _tail(log_file, 20)
            if any(marker in last_error for marker in _DROPBEAR_BIND_ERRORS):
                continue
            break
    except BaseException:
        sync.close()
        raise
    sync.close()
    hint = ""
    if proc.returncode == 97 or "unshare" in last_error:
        hint = "\n(the helper needs a private mount namespace: root, or user namespaces)"
    raise DropbearStartError(
        f"dropbear did not start listening on 127.0.0.1 within {_START_TIMEOUT:.0f}s;"
        f" log tail:\n{last_error}{hint}"
    )


__all__ += [
    "DropbearServer",
    "DropbearStartError",
    "dropbear_key_lines",
    "find_dropbear",
    "find_dropbearkey",
    "start_dropbear",
]
