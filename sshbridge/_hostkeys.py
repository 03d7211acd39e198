"""Host-key policies for the sidecar.

The provider's own client disables host-key checking. sshbridge does not: by default the
first host key a sandbox presents is pinned for the life of the ``SandboxSSH`` object, and
every later connection (reconnects, new sessions) must present the same key.
"""

from __future__ import annotations

import threading
from pathlib import Path

import paramiko

from ._exceptions import HostKeyMismatch, InvalidArgument

__all__ = ["AcceptAnyHostKey", "HostKeyPolicy", "KnownHostsFile", "PinFirstHostKey"]


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
                "Someone may be intercepting the connection. If the sidecar rotates its keys "
                "by design, use known_hosts=... or host_key_policy=AcceptAnyHostKey()",
                expected=describe(known),
                actual=describe(key),
            )


class KnownHostsFile(HostKeyPolicy):
    """Check against an OpenSSH ``known_hosts`` file.

    Entries are looked up as ``[host]:port``, then ``host``, then the sandbox id (sidecar
    ports change per session, so a sandbox-id entry is the stable one). With
    ``accept_new=True`` an unknown sandbox is added under its id and the file is saved.
    """

    def __init__(self, path: str | Path, *, accept_new: bool = False) -> None:
        if not isinstance(path, (str, Path)):
            raise InvalidArgument("known_hosts must be a path")
        self.path = Path(path).expanduser()
        self.accept_new = accept_new
        self._lock = threading.Lock()
        self._keys = paramiko.HostKeys()
        if self.path.exists():
            try:
                self._keys.load(str(self.path))
            except (OSError, paramiko.SSHException) as exc:
                raise InvalidArgument(f"cannot read known_hosts file {self.path}: {exc}") from None
        elif not accept_new:
            raise InvalidArgument(
                f"known_hosts file {self.path} does not exist (pass accept_new=True to create it)"
            )

    def verify(self, sandbox_id: str, host: str, port: int, key: paramiko.PKey) -> None:
        names = [f"[{host}]:{port}", host, sandbox_id] if port != 22 else [host, sandbox_id]
        with self._lock:
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
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._keys.save(str(self.path))
                return
        raise HostKeyMismatch(
            f"sandbox {sandbox_id}: no host key for {', '.join(names)} in {self.path}; add one, "
            "or pass accept_new=True to record it on first use",
            expected="(none)",
            actual=describe(key),
        )


class AcceptAnyHostKey(HostKeyPolicy):
    """Accept every host key. Opt-in only: it gives up protection against interception."""

    def verify(self, sandbox_id: str, host: str, port: int, key: paramiko.PKey) -> None:
        return None
