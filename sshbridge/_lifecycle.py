"""Session lifecycle: the current link, background renewal, drain and reconnect.

Every session lives at most ``ttl_seconds``. A background thread renews it
``renew_before`` seconds before it expires: it creates a new session, authorizes a new
key, connects (host key pinned as before) and swaps the new link in. From that moment
new work goes to the new link, while work already running on the old one is left to
finish; the old session is DELETEd when its last channel closes, or at its expiry.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

import paramiko

from ._api import validate_ttl
from ._broker import SessionBroker
from ._exceptions import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ConnectionLost,
    HostKeyMismatch,
    InvalidArgument,
    NotFound,
    PaymentRequired,
    RateBudgetExhausted,
    RateLimited,
    RequestValidationError,
    SandboxError,
    SandboxNotRunning,
    ServerError,
    SessionExpired,
    SSHBridgeError,
    SSHConnectError,
)
from ._link import Link
from ._models import SSHSession

log = logging.getLogger("sshbridge.lifecycle")

RenewCallback = Callable[[SSHSession, SSHSession], None]
# Errors that another try will not fix: renewal stops and reports them.
_FATAL = (
    AuthenticationError,
    PaymentRequired,
    NotFound,
    RequestValidationError,
    SandboxError,
    HostKeyMismatch,
)
# Raised as themselves after expiry, not wrapped: they say what to do better.
_SPECIFIC = (SandboxError, HostKeyMismatch, AuthenticationError, PaymentRequired)


def default_renew_before(ttl_seconds: int) -> float:
    """40 % of the TTL, at most 5 minutes: with TTL t a session is minted every 0.6 t
    seconds, which stays under 20 per minute for any TTL of 5 s or more."""
    return min(0.4 * ttl_seconds, 300.0)


class SessionManager:
    def __init__(
        self,
        broker: SessionBroker,
        *,
        connect_timeout: float,
        renew_before: float | None = None,
        auto_renew: bool = True,
        on_renew: RenewCallback | None = None,
    ) -> None:
        ttl = validate_ttl(broker.ttl_seconds)
        if renew_before is None:
            renew_before = default_renew_before(ttl)
        if isinstance(renew_before, bool) or not isinstance(renew_before, (int, float)):
            raise InvalidArgument("renew_before must be a number of seconds")
        if not math.isfinite(renew_before):
            raise InvalidArgument(f"renew_before must be a finite number, got {renew_before!r}")
        if not 0 <= renew_before < ttl:
            raise InvalidArgument(
                f"renew_before must be >= 0 and below ttl_seconds ({ttl}), got {renew_before}"
            )
        if on_renew is not None and not callable(on_renew):
            raise InvalidArgument("on_renew must be callable")
        self.broker = broker
        self.connect_timeout = connect_timeout
        self.renew_before = float(renew_before)
        self.auto_renew = auto_renew
        self.on_renew = on_renew
        self.renewals = 0
        self.reconnects = 0
        self._link: Link | None = None
        self._retired: list[Link] = []
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewing = False
        self._renew_error: BaseException | None = None
        self._closed = False

    # -- access ------------------------------------------------------------------------------

    @property
    def link(self) -> Link | None:
        return self._link

    @property
    def closed(self) -> bool:
        return self._closed

    @staticmethod
    def _usable(link: Link | None) -> bool:
        return link is not None and not link.closed and not link.expired and link.alive

    def current(self) -> Link:
        """The link new work should use; reconnects or waits for a renewal as needed."""
        link = self._link
        if self._usable(link):
            assert link is not None
            return link
        with self._lock:
            while True:
                if self._closed:
                    raise InvalidArgument(
                        f"SandboxSSH({self.broker.sandbox_id!r}) is closed; create a new one"
                    )
                link = self._link
                if self._usable(link):
                    assert link is not None
                    return link
                if self._renewing and link is not None:
                    # A renewal is in flight: wait for it rather than racing it.
                    self._changed.wait(timeout=0.5)
                    continue
                break
            error, self._renew_error = self._renew_error, None
            if link is not None and link.expired and error is not None:
                self._retire_locked(link)
                self._link = None
                if isinstance(error, _SPECIFIC):
                    raise error
                raise SessionExpired(
                    f"sandbox {self.broker.sandbox_id}: session {link.session.session_id} "
                    f"expired and could not be renewed: {error}"
                ) from error
            new = self._replace_locked(link)
            self._start_renewer()
            return new

    def _replace_locked(self, link: Link | None) -> Link:
        if link is not None and not link.closed and not link.expired:
            # Dropped while idle and the session is still valid. A stopped sandbox also
            # drops connections: ask first, so that case fails fast and clearly.
            # If the API is unwell the SSH side may still be fine: go on and reconnect.
            with contextlib.suppress(APIConnectionError, ServerError, RateLimited):
                self.broker.check_sandbox()
            try:
                link.connect(time.monotonic() + min(self.connect_timeout, 5.0))
                self.reconnects += 1
                log.info(
                    "sandbox %s: reconnected to session %s",
                    self.broker.sandbox_id,
                    link.session.session_id,
                )
                return link
            except SSHConnectError:
                log.info(
                    "sandbox %s: session %s unreachable; opening a new one",
                    self.broker.sandbox_id,
                    link.session.session_id,
                )
        if link is not None:
            self._link = None
            if link.expired and not link.closed and link.alive and link.busy > 0:
                # Expired, but the server still carries its commands: let them finish
                # (drained like a renewal's predecessor) rather than cutting them here.
                self._retire_locked(link)
            else:
                self.broker.close_link(link)
        new = self.broker.open_link()
        if link is not None:
            self.reconnects += 1
        self._link = new
        self._changed.notify_all()
        return new

    # -- renewal -----------------------------------------------------------------------------

    def _start_renewer(self) -> None:
        # The same thread drains retired links, so it runs without auto_renew too once
        # there is something to drain.
        if self._thread is not None or self._closed:
            return
        if not self.auto_renew and not self._retired:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"sshbridge-renew-{self.broker.sandbox_id}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_retired()
                link = self._link
                wait = 1.0
                if self.auto_renew and link is not None and not link.closed:
                    due = link.expires_monotonic - self.renew_before - time.monotonic()
                    if due <= 0 and self._renew_error is None:
                        self._renew(link)
                        continue
                    wait = max(0.0, due) if self._renew_error is None else 1.0
                if self._retired:
                    wait = min(wait, 0.2)
                self._wake.wait(min(wait, 5.0))
                self._wake.clear()
        except Exception:
            log.exception("sandbox %s: session renewal stopped", self.broker.sandbox_id)

    def _renew(self, old: Link) -> None:
        with self._lock:
            self._renewing = True
        error: BaseException | None = None
        new: Link | None = None
        delay = 0.25
        try:
            while not self._stop.is_set():
                remaining = old.expires_monotonic - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    new = self.broker.open_link(check=False, budget_wait=max(0.0, remaining))
                    break
                except _FATAL as exc:
                    error = exc
                    break
                except RateBudgetExhausted as exc:
                    # Out of budget before expiry: report what made us spend it, if anything.
                    error = error or exc
                    break
                except (APIError, SSHConnectError, ConnectionLost, OSError) as exc:
                    error = exc
                    if isinstance(exc, (RateLimited, ServerError)) and exc.retry_after:
                        pause = exc.retry_after
                    else:
                        pause = delay
                        delay = min(delay * 2, 2.0)
                    left = old.expires_monotonic - time.monotonic()
                    if pause >= left:
                        break  # no time for another try before expiry
                    log.info(
                        "sandbox %s: renewal attempt failed (%s); retrying in %.2f s",
                        self.broker.sandbox_id,
                        exc,
                        pause,
                    )
                    if self._stop.wait(pause):
                        break
            if new is None and isinstance(error, (APIError, SSHConnectError)):
                error = self._classify(error)
        except Exception as exc:  # noqa: BLE001 - recorded; the next call reports it
            error = exc
        finally:
            with self._lock:
                self._renewing = False
                if new is not None and (self._closed or self._link is not old):
                    stale, new = new, None
                    self.broker.close_link(stale)
                if new is not None:
                    self._link = new
                    self._retire_locked(old)
                    self.renewals += 1
                    self._renew_error = None
                elif error is not None:
                    self._renew_error = error
                elif not self._stop.is_set():
                    self._renew_error = SessionExpired("renewal did not finish before expiry")
                self._changed.notify_all()
        if new is not None:
            log.info(
                "sandbox %s: renewed SSH session %s -> %s (expires %s)",
                self.broker.sandbox_id,
                old.session.session_id,
                new.session.session_id,
                new.session.expires_at.isoformat(),
            )
            if self.on_renew is not None:
                try:
                    self.on_renew(old.session, new.session)
                except Exception:
                    log.exception("on_renew callback failed")
        elif error is not None:
            log.warning("sandbox %s: session renewal failed: %s", self.broker.sandbox_id, error)

    def _classify(self, error: BaseException) -> BaseException:
        """After a failed renewal, say whether the sandbox itself is gone."""
        if isinstance(error, APIConnectionError):
            return error
        try:
            self.broker.check_sandbox()
        except SandboxNotRunning as stopped:
            return stopped
        except SSHBridgeError:
            return error
        return error

    def renew_now(self) -> SSHSession:
        """Renew immediately (blocking) and return the new session."""
        link = self.current()
        self._renew(link)
        with self._lock:
            if self._renew_error is not None:
                error, self._renew_error = self._renew_error, None
                raise error
        current = self._link
        assert current is not None
        return current.session

    # -- drain -------------------------------------------------------------------------------

    def _retire_locked(self, link: Link) -> None:
        link.retire()
        self._retired.append(link)
        self._wake.set()

    def _drain_retired(self) -> None:
        with self._lock:
            # Past expiry a link stays while the server still carries its channels: a
            # server that does not cut at expiry lets running commands finish.
            done = [lk for lk in self._retired if lk.closed or lk.busy == 0 or not lk.alive]
            self._retired = [lk for lk in self._retired if lk not in done]
        for link in done:
            self.broker.close_link(link)

    # -- per-call sources (retry when a link closes between pick and use) ---------------

    def source(self) -> CallSource:
        return CallSource(self)

    # -- teardown ----------------------------------------------------------------------------

    def close(self, join_timeout: float = 10.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._link = None
            self._retired = []
            self._changed.notify_all()
        self._stop.set()
        self._wake.set()
        try:
            self.broker.close_all()
        finally:
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(join_timeout)
            # A renewal that finished during the join registered its link: close it too.
            self.broker.close_all()


class CallSource:
    """What one call uses: a channel or SFTP client on the current link.

    If the link it picked was drained and closed between the pick and the open, it
    picks again, so a renewal never fails a call.
    """

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.link: Link | None = None

    def _pick(self) -> Link:
        self.link = self.manager.current()
        return self.link

    def open_channel(self) -> paramiko.Channel:
        for _ in range(5):
            link = self._pick()
            try:
                return link.open_channel()
            except ConnectionLost:
                if link.closed or link.expired or not link.alive:
                    continue
                raise
        return self._pick().open_channel()

    @contextlib.contextmanager
    def sftp(self) -> Iterator[paramiko.SFTPClient]:
        for attempt in range(5):
            link = self._pick()
            try:
                cm = link.sftp()
                client = cm.__enter__()
            except ConnectionLost:
                if attempt < 4 and (link.closed or link.expired or not link.alive):
                    continue
                raise
            break
        with contextlib.ExitStack() as stack:
            stack.push(cm)
            yield client

    def lost_error(self, what: str) -> ConnectionLost:
        link = self.link
        if link is None:
            return ConnectionLost(f"the connection dropped {what}")
        return link.lost_error(what)
