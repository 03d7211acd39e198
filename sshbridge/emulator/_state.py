"""Bookkeeping shared by the HTTP API and the SSH sidecar: sandboxes, sessions, records."""

from __future__ import annotations

import secrets
import string
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

_ALNUM = string.ascii_lowercase + string.digits

ENDPOINTS = ("get_sandbox", "list_sandboxes", "create_session", "close_session", "authorize")
# "vm": the provider's service today (key in the POST, one shared port, session preamble);
# "sidecar": the project's specification (token, gateway authorize, one port per session).
CONTRACTS = ("vm", "sidecar")
PREAMBLE_PREFIX = b"PRIME-SSH-SESSION "


def new_id(prefix: str, length: int = 20) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def format_time(dt: datetime, style: str) -> str:
    """Spell an aware UTC datetime the way `Emulator.time_format` asks."""
    dt = dt.astimezone(timezone.utc)
    if style == "offset":
        return dt.isoformat(timespec="microseconds")
    if style == "naive":
        return dt.replace(tzinfo=None).isoformat(timespec="microseconds")
    return dt.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


@dataclass(frozen=True)
class APICall:
    """One request the emulator answered (API or gateway)."""

    time: float
    method: str
    path: str
    endpoint: str
    sandbox_id: str | None
    status: int


@dataclass(frozen=True)
class OpenSSHTarget:
    """A real sshd the emulator hands out instead of running its own sidecar."""

    host: str
    port: int
    username: str
    authorized_keys_file: Path


@dataclass(frozen=True)
class SessionRecord:
    """Snapshot of one SSH session. Never carries the session token."""

    session_id: str  # unique internal id; equals wire_session_id unless openssh mode
    sandbox_id: str
    created_at: datetime
    expires_at: datetime
    deleted_at: datetime | None
    host: str
    port: int
    authorized_keys: list[str]  # SHA256 fingerprints
    wire_session_id: str
    exposure_id: str
    ttl_seconds: int
    host_key_fingerprint: str | None


@dataclass
class Sandbox:
    id: str
    name: str
    status: str
    vm: bool
    directory: Path
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    terminated_at: datetime | None = None
    host_key: Any = None  # asyncssh.SSHKey, created lazily by the sidecar


@dataclass
class Session:
    internal_id: str
    wire_id: str
    sandbox_id: str
    exposure_id: str
    user_ns: str
    job_id: str
    token: str
    created_at: datetime
    expires_at: datetime
    ttl_seconds: int
    host: str
    port: int = 0
    deleted_at: datetime | None = None
    exposure_closed: bool = False
    host_key: Any = None
    keys: dict[bytes, str] = field(default_factory=dict)  # public blob -> fingerprint

    def expired(self, now: datetime | None = None) -> bool:
        return (now or utcnow()) >= self.expires_at

    def record(self) -> SessionRecord:
        fp = self.host_key.get_fingerprint() if self.host_key is not None else None
        return SessionRecord(
            session_id=self.internal_id,
            sandbox_id=self.sandbox_id,
            created_at=self.created_at,
            expires_at=self.expires_at,
            deleted_at=self.deleted_at,
            host=self.host,
            port=self.port,
            authorized_keys=list(self.keys.values()),
            wire_session_id=self.wire_id,
            exposure_id=self.exposure_id,
            ttl_seconds=self.ttl_seconds,
            host_key_fingerprint=fp,
        )


@dataclass
class FailRule:
    remaining: int
    status: int
    retry_after: int | float | str | None
    body: Any
    endpoint: str | None


class State:
    """All mutable bookkeeping, guarded by one lock (HTTP threads and the sidecar loop share it)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.sandboxes: dict[str, Sandbox] = {}
        self.sessions: dict[str, Session] = {}  # internal id -> session, in creation order
        self.by_token: dict[str, Session] = {}
        self.rate: dict[tuple[str, str], deque[float]] = {}
        self.fail_rules: list[FailRule] = []
        self.calls: list[APICall] = []

    def record_call(
        self, method: str, path: str, endpoint: str, sandbox_id: str | None, status: int
    ) -> None:
        with self.lock:
            self.calls.append(APICall(time.time(), method, path, endpoint, sandbox_id, status))

    def take_failure(self, endpoint: str) -> FailRule | None:
        with self.lock:
            for rule in self.fail_rules:
                if rule.endpoint is None or rule.endpoint == endpoint:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self.fail_rules.remove(rule)
                    return rule
        return None

    def rate_check(self, key: tuple[str, str], limit: int, window: float) -> float | None:
        """Admit one request into the sliding window, or return seconds until a slot frees."""
        now = time.monotonic()
        with self.lock:
            q = self.rate.setdefault(key, deque())
            while q and q[0] <= now - window:
                q.popleft()
            if len(q) >= limit:
                return (q[0] + window - now) if q else window
            q.append(now)
            return None

    def sandbox(self, sandbox_id: str) -> Sandbox | None:
        with self.lock:
            return self.sandboxes.get(sandbox_id)

    def sandbox_list(self, status: str | None = None) -> list[Sandbox]:
        """Sandboxes in creation order, optionally only those with this status."""
        with self.lock:
            return [s for s in self.sandboxes.values() if status is None or s.status == status]

    def add_session(self, session: Session) -> None:
        with self.lock:
            self.sessions[session.internal_id] = session
            self.by_token[session.token] = session

    def session_for_token(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self.lock:
            return self.by_token.get(token)

    def open_session_for(self, sandbox_id: str, session_id: str) -> Session | None:
        """The newest undeleted session of this sandbox with this wire or internal id."""
        with self.lock:
            # Newest first: in OpenSSH mode every session shares the wire id (the username).
            for cand in reversed(list(self.sessions.values())):
                if (
                    cand.sandbox_id == sandbox_id
                    and cand.deleted_at is None
                    and session_id in (cand.wire_id, cand.internal_id)
                ):
                    return cand
        return None

    def session_usable(self, session: Session) -> bool:
        """May this session still log in: not deleted, not expired, its sandbox RUNNING."""
        with self.lock:
            if session.deleted_at is not None or session.exposure_closed or session.expired():
                return False
            sandbox = self.sandboxes.get(session.sandbox_id)
            return sandbox is not None and sandbox.status == "RUNNING"

    def session_by_any_id(self, session_id: str) -> Session | None:
        with self.lock:
            s = self.sessions.get(session_id)
            if s is not None:
                return s
            for cand in reversed(list(self.sessions.values())):
                if cand.wire_id == session_id:
                    return cand
        return None
