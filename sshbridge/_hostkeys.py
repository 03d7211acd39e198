"""Host-key policies for the sandboxes' SSH servers (both session contracts).

The provider's own client disables host-key checking. sshbridge does not: by default the
first host key a sandbox presents is pinned for the life of the ``SandboxSSH`` object, and
every later connection (reconnects, new sessions) must present the same key.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import paramiko

from ._compat import parse_known_hosts_line
from ._exceptions import HostKeyMismatch, InvalidArgument

__all__ = ["AcceptAnyHostKey", "HostKeyPolicy", "KnownHostsFile", "PinFirstHostKey"]

log = logging.getLogger("sshbridge.hostkeys")


def describe(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


class HostKeyPolicy:
    """Decides whether a presented host key is acceptable; raise :class:`HostKeyMismatch`."""

    def verify(self, sandbox_id: str, host: str, port: int, key: paramiko.PKey) -> None:
        raise NotImplementedError


class PinFirstHostKey(HostKeyPolicy):
    """Trust on first use, per sandbox, for the life of this policy object (the default)."""

    def __init__(self) -> None:
        self._pinned: dict[str, paramiko.PKey] = {}
        self._lock = threading.Lock()

    def pinned(self, sandbox_id: str) -> paramiko.PKey | None:
        with self._lock:
            return self._pinned.get(sandbox_id)

    def verify(self, sandbox_id: str, host: str, port: int, key: paramiko.PKey) -> None:
        with self._lock:
            known = self._pinned.setdefault(sandbox_id, key)
        if known != key:
            raise HostKeyMismatch(
                f"sandbox {sandbox_id}: the SSH server at {host}:{port} presented host key "
                f"{describe(key)}, but this connection pinned {describe(known)} earlier. "
                "Someone may be intercepting the connection. If the server rotates its keys "
                "by design, use known_hosts=... or host_key_policy=AcceptAnyHostKey()",
                expected=describe(known),
                actual=describe(key),
            )


class KnownHostsFile(HostKeyPolicy):
    """Check against an OpenSSH ``known_hosts`` file.

    Entries are looked up as ``[host]:port``, then ``host``, then the sandbox id (ports
    may change per session, so a sandbox-id entry is the stable one). ``@revoked`` keys
    are never accepted; ``@cert-authority`` lines (host certificates, which sandboxes do
    not present) and lines that cannot be read are skipped with a warning naming their
    line numbers. With ``accept_new=True`` an unknown sandbox is appended under its id.
    """

    def __init__(self, path: str | Path, *, accept_new: bool = False) -> None:
        if not isinstance(path, (str, Path)):
            raise InvalidArgument("known_hosts must be a path")
        self.path = Path(path).expanduser()
        self.accept_new = accept_new
        self._lock = threading.Lock()
        self._keys = paramiko.HostKeys()
        self._revoked = paramiko.HostKeys()
        self.skipped: list[int] = []  # line numbers not used (corrupt or @cert-authority)
        if self.path.exists():
            self._load()
        elif not accept_new:
            raise InvalidArgument(
                f"known_hosts file {self.path} does not exist (pass accept_new=True to create it)"
            )

    def _load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read known_hosts file {self.path}: {exc.strerror or exc}"
            ) from None
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            target = self._keys
            if line.startswith("@"):
                marker, _, line = line.partition(" ")
                if marker == "@revoked":
                    target = self._revoked
                else:
                    self.skipped.append(lineno)  # @cert-authority: no certificates here
                    continue
            entry = parse_known_hosts_line(line.strip(), lineno)
            if entry is None:
                self.skipped.append(lineno)
                continue
            for name in entry.hostnames:
                target.add(name, entry.key.get_name(), entry.key)
        if self.skipped:
            log.warning(
                "%s: skipped line(s) %s (unreadable, or @cert-authority, which sshbridge "
                "does not check)",
                self.path,
                ", ".join(map(str, self.skipped[:20])),
            )

    def verify(self, sandbox_id: str, host: str, port: int, key: paramiko.PKey) -> None:
        names = [f"[{host}]:{port}", host, sandbox_id] if port != 22 else [host, sandbox_id]
        with self._lock:
            for name in names:
                revoked = self._revoked.lookup(name)
                if revoked is not None and revoked.get(key.get_name()) == key:
                    raise HostKeyMismatch(
                        f"sandbox {sandbox_id}: host key {describe(key)} at {host}:{port} is "
                        f"marked @revoked for {name!r} in {self.path}; it is never accepted",
                        expected="(not a revoked key)",
                        actual=describe(key),
                    )
            for name in names:
                entry = self._keys.lookup(name)
                if entry is None:
                    continue
                known = entry.get(key.get_name())
                if known is None:
                    continue
                if known == key:
                    return
                raise HostKeyMismatch(
                    f"sandbox {sandbox_id}: host key {describe(key)} at {host}:{port} does not "
                    f"match {describe(known)} recorded for {name!r} in {self.path}",
                    expected=describe(known),
                    actual=describe(key),
                )
            if self.accept_new:
                self._keys.add(sandbox_id, key.get_name(), key)
                self._append(sandbox_id, key)
                return
        raise HostKeyMismatch(
            f"sandbox {sandbox_id}: no host key for {', '.join(names)} in {self.path}; add one, "
            "or pass accept_new=True to record it on first use",
            expected="(none)",
            actual=describe(key),
        )

    def _append(self, name: str, key: paramiko.PKey) -> None:
        # Appended, never rewritten: the user's other lines (markers, comments) stay.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(f"{name} {key.get_name()} {key.get_base64()}\n")


class AcceptAnyHostKey(HostKeyPolicy):
    """Accept every host key. Opt-in only: it gives up protection against interception."""

    def verify(self, sandbox_id: str, host: str, port: int, key: paramiko.PKey) -> None:
        return None
