"""Session lifecycle: the current link, background renewal, drain and reconnect.

Every session lives at most ``ttl_seconds``. A background thread renews it
``renew_before`` seconds before it expires: it creates a new session, authorizes a new
key, connects (host key pinned as before) and swaps the new link in. From that moment
new work goes to the new link, while work already running on the old one is left to
finish; the old session is DELETEd when its last channel closes, or at its expiry.

The manager is a small state machine (:class:`State`). Its lock guards transitions only
and is never held across I/O (API calls, SSH connects, joins): the I/O runs in a worker
thread that produces "the next link" into one shared :class:`_Pending`, which every
caller that needs it waits on. ``close()`` flips the state, fails that pending at once,
closes every link (which stops in-flight connects) and joins the workers for a bounded
time; a worker that finishes later finds the manager closed and closes (DELETEs) what
it made itself.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator

import paramiko

from ._api import validate_ttl
from ._broker import OpenCancelled, SessionBroker
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
from ._options import check_renew_before
from ._options import default_renew_before as default_renew_before  # re-exported
from ._retry import Backoff

log = logging.getLogger("sshbridge.lifecycle")

RenewCallback = Callable[[SSHSession, SSHSession], None]
Clock = Callable[[], float]
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
# close() waits this long in all for its worker threads; one stuck in I/O past it is a
# daemon that closes what it made when its I/O ends.
CLOSE_JOIN_TIMEOUT = 1.5


class State(enum.Enum):
    """Where a :class:`SessionManager` is. Transitions happen under its lock only."""

    NEW = "new"  # no link: never connected, or the last one was dropped
    CONNECTING = "connecting"  # a worker makes the next link (reconnect or new session)
    OPEN = "open"  # a link serves new work (it may have died since: checked on use)
    RENEWING = "renewing"  # a link serves new work while the renewer makes its successor
    CLOSING = "closing"  # close() is tearing down
    CLOSED = "closed"


class _Kind(enum.Enum):
    CONNECT = "connect"
    RENEW = "renew"


class _Pending:
    """The next link, made by one thread; every caller that needs it waits on this.

    Resolved once, under the manager's lock: by the thread that made it, or by
    ``close()`` first (then the maker's late result is closed, not delivered).
    """

    __slots__ = ("_done", "error", "kind", "link", "started", "waiters")

    def __init__(self, kind: _Kind) -> None:
        self.kind = kind
        self.link: Link | None = None
        self.error: BaseException | None = None
        self.started = False  # a renewal: the renewer thread has taken it up
        self.waiters = 0
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def resolve(self, link: Link | None = None, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.link, self.error = link, error
        self._done.set()

    def wait(self) -> None:
        self._done.wait()


class SessionManager:
    def __init__(
        self,
        broker: SessionBroker,
        *,
        connect_timeout: float,
        renew_before: float | None = None,
        auto_renew: bool = True,
        on_renew: RenewCallback | None = None,
        clock: Clock | None = None,
    ) -> None:
        ttl = validate_ttl(broker.ttl_seconds)
        renew_before = check_renew_before(renew_before, ttl)
        if on_renew is not None and not callable(on_renew):
            raise InvalidArgument("on_renew must be callable")
        if clock is not None and not callable(clock):
            raise InvalidArgument("clock must be callable")
        self.broker = broker
        self.connect_timeout = connect_timeout
        self.renew_before = float(renew_before)
        self.auto_renew = auto_renew
        self.on_renew = on_renew
        # Due and expiry decisions; it shares time.monotonic's base, like Link expiries.
        self._clock: Clock = clock if clock is not None else time.monotonic
        self.renewals = 0
        self.reconnects = 0
        self._state = State.NEW
        self._link: Link | None = None
        self._pending: _Pending | None = None
        self._retired: list[Link] = []
        # Re-entrant: a SandboxSSH's finalizer (close()) may run from the garbage
        # collector in a thread that holds it.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._workers: set[threading.Thread] = set()
        self._renew_error: BaseException | None = None

    # -- access ------------------------------------------------------------------------------

    @property
    def link(self) -> Link | None:
        return self._link

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state in (State.CLOSING, State.CLOSED)

    def _expired(self, link: Link) -> bool:
        return self._clock() >= link.expires_monotonic

    def _usable(self, link: Link | None) -> bool:
        # link.alive is a non-blocking poll of the socket: no I/O wait under the lock.
        return link is not None and not link.closed and not self._expired(link) and link.alive

    def _closed_error(self, during: str | None = None) -> InvalidArgument:
        name = f"SandboxSSH({self.broker.sandbox_id!r})"
        if during is None:
            return InvalidArgument(f"{name} is closed; create a new one")
        return InvalidArgument(f"{name} was closed {during}; create a new one")

    def _settle_locked(self) -> None:
        """Back to a resting state after an attempt ended (unless closing)."""
        if not self.closed:
            self._state = State.OPEN if self._link is not None else State.NEW

    def current(self) -> Link:
        """The link new work should use; reconnects or waits for a renewal as needed."""
        link = self._link
        if self._usable(link):
            assert link is not None
            return link
        while True:
            expired: tuple[Link, BaseException] | None = None
            with self._lock:
                if self.closed:
                    raise self._closed_error()
                link = self._link
                if self._usable(link):
                    assert link is not None
                    return link
                pending = self._pending
                if pending is None:
                    error, self._renew_error = self._renew_error, None
                    if link is not None and self._expired(link) and error is not None:
                        # The renewal failed and the session is gone: report why, once;
                        # the call after this one tries a fresh session.
                        self._link = None
                        self._state = State.NEW
                        self._retired.append(link)
                        self._start_renewer_locked()
                        expired = (link, error)
                    else:
                        pending = self._start_connect_locked(link)
                if pending is not None:
                    # A renewal in flight is waited for rather than raced.
                    pending.waiters += 1
            if expired is not None:
                self._retire(expired[0])
                raise self._expiry_error(*expired)
            assert pending is not None
            try:
                pending.wait()
            finally:
                with self._lock:
                    pending.waiters -= 1
            if pending.kind is _Kind.CONNECT:
                # Every waiter gets the connect's outcome, its error included.
                if self.closed:
                    raise self._closed_error("while connecting")
                if pending.error is not None:
                    raise pending.error
                assert pending.link is not None
                return pending.link
            # A renewal ended (either way): look again.

    def _expiry_error(self, link: Link, error: BaseException) -> BaseException:
        if isinstance(error, _SPECIFIC):
            return error
        expired = SessionExpired(
            f"sandbox {self.broker.sandbox_id}: session {link.session.session_id} "
            f"expired and could not be renewed: {error}"
        )
        expired.__cause__ = error
        return expired

    # -- connect (reconnect or a new session), in a worker thread ----------------------------

    def _start_connect_locked(self, old: Link | None) -> _Pending:
        pending = _Pending(_Kind.CONNECT)
        pending.started = True
        self._pending = pending
        self._state = State.CONNECTING
        worker = threading.Thread(
            target=self._connect_worker,
            args=(pending, old),
            name=f"sshbridge-connect-{self.broker.sandbox_id}",
            daemon=True,
        )
        self._workers.add(worker)
        worker.start()
        return pending

    def _connect_worker(self, pending: _Pending, old: Link | None) -> None:
        try:
            link: Link | None = None
            error: BaseException | None = None
            try:
                link = self._make_link(old)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                error = exc
            stale: Link | None = None
            with self._lock:
                if self._pending is pending:
                    self._pending = None
                if self.closed:
                    stale = link  # close() already failed the waiters
                elif link is not None:
                    self._link = link
                    if old is not None:
                        self.reconnects += 1
                    self._state = State.OPEN
                    self._start_renewer_locked()
                    pending.resolve(link=link)
                else:
                    self._settle_locked()
                    pending.resolve(error=error)
            self._wake.set()  # the renewer recomputes its due time for the new link
            if stale is not None:
                self.broker.close_link(stale)
        finally:
            with self._lock:
                self._workers.discard(threading.current_thread())

    def _make_link(self, old: Link | None) -> Link:
        """A working link: ``old`` reconnected if its session is still valid, else new."""
        if old is not None and not old.closed and not self._expired(old):
            # Dropped while idle and the session is still valid. A stopped sandbox also
            # drops connections: ask first, so that case fails fast and clearly.
            # If the API is unwell the SSH side may still be fine: go on and reconnect.
            with contextlib.suppress(APIConnectionError, ServerError, RateLimited):
                self.broker.check_sandbox()
            if self.closed:
                raise self._closed_error("while connecting")
            try:
                old.connect(time.monotonic() + min(self.connect_timeout, 5.0))
                log.info(
                    "sandbox %s: reconnected to session %s",
                    self.broker.sandbox_id,
                    old.session.session_id,
                )
                return old
            except SSHConnectError:
                log.info(
                    "sandbox %s: session %s unreachable; opening a new one",
                    self.broker.sandbox_id,
                    old.session.session_id,
                )
        if old is not None:
            with self._lock:
                if self._link is old:
                    self._link = None
                # Expired, but the server still carries its commands: let them finish
                # (drained like a renewal's predecessor) rather than cutting them here.
                keep = (
                    not self.closed
                    and self._expired(old)
                    and not old.closed
                    and old.alive
                    and old.busy > 0
                )
                if keep:
                    self._retired.append(old)
                    self._start_renewer_locked()
            if keep:
                self._retire(old)
            else:
                self.broker.close_link(old)
        try:
            return self.broker.open_link(cancelled=lambda: self.closed)
        except OpenCancelled:
            raise self._closed_error("while connecting") from None

    # -- renewal: one at a time, always on the renewer thread --------------------------------

    def _start_renewer_locked(self, *, force: bool = False) -> None:
        # The same thread drains retired links, so it runs without auto_renew too once
        # there is something to drain (or a renewal asked for by renew_now()).
        if self._thread is not None or self.closed:
            return
        if not (force or self.auto_renew or self._retired):
            return
        self._thread = threading.Thread(
            target=self._run, name=f"sshbridge-renew-{self.broker.sandbox_id}", daemon=True
        )
        self._thread.start()

    def _begin_renewal_locked(self) -> _Pending:
        pending = _Pending(_Kind.RENEW)
        self._pending = pending
        self._state = State.RENEWING
        return pending

    def _run(self) -> None:
        failure: BaseException | None = None
        try:
            while not self._stop.is_set():
                # Cleared before looking, so a wake-up that comes while we look is kept.
                self._wake.clear()
                self._drain_retired()
                job: tuple[Link, _Pending] | None = None
                wait = 1.0
                with self._lock:
                    if self.closed:
                        break
                    link = self._link
                    pending = self._pending
                    if pending is not None and pending.kind is _Kind.RENEW:
                        if not pending.started and link is not None:
                            pending.started = True
                            job = (link, pending)
                    elif (
                        self._state is State.OPEN
                        and self.auto_renew
                        and link is not None
                        and not link.closed
                        and self._renew_error is None
                    ):
                        due = link.expires_monotonic - self.renew_before - self._clock()
                        if due <= 0:
                            pending = self._begin_renewal_locked()
                            pending.started = True
                            job = (link, pending)
                        else:
                            wait = due
                    if self._retired:
                        wait = min(wait, 0.2)
                if job is not None:
                    self._renew(*job)
                    continue
                self._wake.wait(min(wait, 5.0))
        except Exception as exc:
            failure = exc
            log.exception("sandbox %s: session renewal stopped", self.broker.sandbox_id)
        finally:
            with self._lock:
                pending = self._pending
                if pending is not None and pending.kind is _Kind.RENEW:
                    # Nobody is left to make it: its waiters must not hang.
                    self._pending = None
                    self._settle_locked()
                    pending.resolve(error=failure or self._closed_error("while renewing"))
                if self._thread is threading.current_thread() and not self.closed:
                    self._thread = None  # a later need starts a new one

    def _renew(self, old: Link, pending: _Pending) -> None:
        error: BaseException | None = None
        new: Link | None = None
        backoff = Backoff(0.25, 2.0)
        try:
            while not self._stop.is_set():
                remaining = old.expires_monotonic - self._clock()
                if remaining <= 0:
                    break
                try:
                    new = self.broker.open_link(
                        check=False,
                        budget_wait=max(0.0, remaining),
                        cancelled=lambda: self.closed,
                    )
                    break
                except OpenCancelled:
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
                    if self.closed:
                        break
                    if isinstance(exc, (RateLimited, ServerError)) and exc.retry_after:
                        pause = exc.retry_after
                    else:
                        pause = backoff.next()
                    left = old.expires_monotonic - self._clock()
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
            if new is None and not self.closed and isinstance(error, (APIError, SSHConnectError)):
                error = self._classify(error)
        except Exception as exc:  # noqa: BLE001 - recorded; the next call reports it
            error = exc
        finally:
            self._finish_renewal(old, pending, new, error)

    def _finish_renewal(
        self, old: Link, pending: _Pending, new: Link | None, error: BaseException | None
    ) -> None:
        stale: Link | None = None
        with self._lock:
            if self._pending is pending:
                self._pending = None
            if new is not None and (self.closed or self._link is not old):
                stale, new = new, None
            if new is not None:
                self._link = new
                self._retired.append(old)
                self.renewals += 1
                self._renew_error = None
                pending.resolve(link=new)
            elif self.closed:
                pending.resolve(error=self._closed_error("while renewing"))
            elif stale is not None:
                # The link was replaced meanwhile: the replacement serves, if any.
                serving = self._link
                if serving is not None:
                    pending.resolve(link=serving)
                else:
                    pending.resolve(error=ConnectionLost("the session was replaced while renewing"))
            else:
                if error is None:
                    error = SessionExpired("renewal did not finish before expiry")
                self._renew_error = error
                pending.resolve(error=error)
            self._settle_locked()
        if stale is not None:
            self.broker.close_link(stale)
        if new is None:
            if error is not None and not self.closed:
                log.warning(
                    "sandbox %s: session renewal failed: %s", self.broker.sandbox_id, error
                )
            return
        self._retire(old)
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
        """Renew immediately (blocking) and return the new session.

        A renewal already in flight (the background one, or another caller's) is joined,
        not doubled.
        """
        while True:
            link = self.current()
            with self._lock:
                if self.closed:
                    raise self._closed_error()
                pending = self._pending
                if pending is None:
                    if self._link is not link:
                        continue  # replaced meanwhile: look again
                    pending = self._begin_renewal_locked()
                    self._start_renewer_locked(force=True)
                pending.waiters += 1
            self._wake.set()
            try:
                pending.wait()
            finally:
                with self._lock:
                    pending.waiters -= 1
            if pending.kind is _Kind.CONNECT:
                continue  # the link dropped meanwhile: renew the one it gets
            if self.closed:
                raise self._closed_error("while renewing")
            if pending.error is not None:
                with self._lock:
                    # Reported here: the background renewer may try again.
                    if self._renew_error is pending.error:
                        self._renew_error = None
                raise pending.error
            assert pending.link is not None
            return pending.link.session

    # -- drain -------------------------------------------------------------------------------

    def _retire(self, link: Link) -> None:
        """No new work on ``link`` (already in ``_retired``); outside the lock: it
        closes pooled SFTP clients and the spare channel."""
        link.retire()
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

    def close(self, join_timeout: float = CLOSE_JOIN_TIMEOUT) -> None:
        """Close every link, DELETE every session; returns within about ``join_timeout``
        plus the DELETEs, from any state."""
        with self._lock:
            if self.closed:
                return
            self._state = State.CLOSING
            pending, self._pending = self._pending, None
            self._link = None
            self._retired = []
            threads = [t for t in (self._thread, *self._workers) if t is not None]
            if pending is not None:
                # Its waiters raise now; its maker closes its late result itself.
                what = "while connecting" if pending.kind is _Kind.CONNECT else "while renewing"
                pending.resolve(error=self._closed_error(what))
        self._stop.set()
        self._wake.set()
        try:
            # Closing the links also stops connects in flight on them.
            self.broker.close_all()
        finally:
            end = time.monotonic() + join_timeout
            me = threading.current_thread()
            for thread in threads:
                if thread is not me:
                    thread.join(max(0.0, end - time.monotonic()))
            # What a worker registered during the join (it closes it too; idempotent).
            self.broker.close_all()
            with self._lock:
                self._state = State.CLOSED


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
    def sftp(self, opened: Callable[[], None] | None = None) -> Iterator[paramiko.SFTPClient]:
        for attempt in range(5):
            link = self._pick()
            try:
                cm = link.sftp(opened)
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
