"""HTTP client for the platform API and the SSH gateway.

Retries follow HTTP semantics (tenacity drives them, one rate-budget slot per attempt):

* GET and DELETE are idempotent: retried on network failures, timeouts, 429, 5xx.
* Authorizing a key is idempotent too (the same key for the same session): same policy.
* ``POST .../ssh-session`` creates something, so it is retried only when the request
  provably never reached the server (the TCP connect failed or timed out), or on a 429 or
  503 that carries ``Retry-After`` (the server says it did nothing and when to come back).
"""

from __future__ import annotations

import json as jsonlib
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote

import requests
from pydantic import ValidationError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from ._config import Config, load_config
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeout,
    AuthenticationError,
    Conflict,
    InvalidArgument,
    NotFound,
    PaymentRequired,
    RateLimited,
    RequestValidationError,
    ServerError,
    UnexpectedResponse,
)
from ._httpguard import guarded, guarded_session
from ._models import (
    AuthorizeKeyRequest,
    CreateSSHSessionRequest,
    ErrorDetail,
    ErrorResponse,
    Sandbox,
    SandboxList,
    SidecarSSHSession,
    SSHSession,
    is_sidecar_answer,
)
from ._ratelimit import SlidingWindowBudget, budget_for
from ._retry import StopAtDeadline
from ._version import __version__

log = logging.getLogger("sshbridge.api")

T = TypeVar("T")

_PUBLIC_KEY_RE = re.compile(r"(ssh|ecdsa|sk)-[A-Za-z0-9@._+-]+ [A-Za-z0-9+/=]+( [ -~]*)?")
_SANDBOX_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
MAX_TTL = 3600
DEFAULT_TTL = 900
# Base URLs of contract-A servers that refused ``public_key`` with a 422: remembered for
# the process, so renewals and the members of a fleet do not pay that round trip again.
_REFUSES_PUBLIC_KEY: set[str] = set()
# A Retry-After longer than this is not waited for: the error goes to the caller.
MAX_RETRY_AFTER = 30.0


def validate_seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """A finite number of seconds (> 0, or >= 0 with ``allow_zero``), checked up front.

    NaN compares false with everything: unchecked, a deadline of NaN never passes.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument(
            f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}"
        )
    return float(value)


def validate_api_timeout(value: object) -> float | tuple[float, float]:
    """Seconds, or a (connect, read) pair: finite and above zero, checked up front."""
    if isinstance(value, tuple):
        if len(value) != 2:
            raise InvalidArgument(
                f"api_timeout must be seconds or a (connect, read) pair, got {len(value)} values"
            )
        return (
            validate_seconds("api_timeout connect", value[0]),
            validate_seconds("api_timeout read", value[1]),
        )
    return validate_seconds("api_timeout", value)


def validate_sandbox_id(sandbox_id: object) -> str:
    """Return ``sandbox_id`` if it is a plain id that cannot alter a URL path."""
    if not isinstance(sandbox_id, str):
        raise InvalidArgument(f"sandbox_id must be a string, got {type(sandbox_id).__name__}")
    if not _SANDBOX_ID_RE.fullmatch(sandbox_id):
        raise InvalidArgument(
            f"sandbox_id {sandbox_id[:80]!r} is not a valid sandbox id: use the id shown by "
            "`prime sandbox list` (letters, digits, '_' and '-', at most 128 characters)"
        )
    return sandbox_id


def validate_ttl(ttl_seconds: object) -> int:
    """TTL must be an int in 1..3600 (the API's own bounds), checked before any request."""
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int):
        raise InvalidArgument(
            f"ttl_seconds must be an int number of seconds, got {type(ttl_seconds).__name__}"
        )
    if not 1 <= ttl_seconds <= MAX_TTL:
        raise InvalidArgument(f"ttl_seconds must be between 1 and {MAX_TTL}, got {ttl_seconds}")
    return ttl_seconds


def _seg(value: str) -> str:
    return quote(value, safe="")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class _Redactor:
    """Removes known secrets from any text or JSON that may reach a message or a log.

    Every spelling counts: raw, repr/JSON-escaped (an HTTP library's message shows a key
    with a newline as ``\\n``) and URL-quoted.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        if not secret or len(secret) < 4 or secret in self._secrets:
            return
        # Keep the key plus the most recent tokens; old ones stop mattering.
        self._secrets = self._secrets[:1] + self._secrets[1:][-31:] + [secret]

    @staticmethod
    def _spellings(secret: str) -> set[str]:
        return {
            secret,
            repr(secret)[1:-1],
            secret.encode("unicode_escape").decode("ascii"),
            jsonlib.dumps(secret)[1:-1],
            quote(secret, safe=""),
        }

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            # Longest first: a shorter spelling may be a part of a longer one.
            for spelling in sorted(self._spellings(secret), key=len, reverse=True):
                if spelling:
                    text = text.replace(spelling, "***")
        return text

    def scrub(self, value: Any) -> Any:
        """The same JSON value with every string redacted (server echoes included)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self(str(k)): self.scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.scrub(v) for v in value]
        return value


def _error_detail(body: Any) -> tuple[str | None, list[ErrorDetail]]:
    """FastAPI ``{"detail": ...}`` and the spec's ``{"errors": [...]}`` both appear."""
    errors: list[ErrorDetail] = []
    detail: str | None = None
    if isinstance(body, dict):
        if "errors" in body:
            try:
                errors = ErrorResponse.model_validate(body).errors
            except ValidationError:
                errors = []
        raw = body.get("detail", body.get("message", body.get("error")))
        if isinstance(raw, str):
            detail = raw
        elif isinstance(raw, list):
            # FastAPI's own validation errors: [{"loc": [...], "msg": ...}]
            parts = []
            for item in raw:
                if isinstance(item, dict):
                    loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                    parts.append(f"{loc}: {item.get('msg', '')}".strip(": "))
                    if loc:
                        errors.append(ErrorDetail(param=loc, details=str(item.get("msg", ""))))
            detail = "; ".join(parts) or None
        if detail is None and errors:
            detail = "; ".join(f"{e.param}: {e.details}" for e in errors)
    elif isinstance(body, str) and body.strip():
        detail = body.strip()[:300]
    return detail, errors


_HINTS = {
    401: "check PRIME_API_KEY (or api_key in ~/.prime/config.json)",
    403: "this API key may not access that sandbox; check PRIME_TEAM_ID and the key's scopes",
    402: "the account has no credit or payment method; add one in the Prime Intellect dashboard",
    404: "check the sandbox id and that it belongs to this key's account or team",
    409: "the sandbox is not in a state that allows this; check its status",
    422: "the request's fields were rejected",
    429: "the API's rate limit was hit",
}


class _Attempt:
    """Carries what the retry policy needs to know about a failed attempt."""

    def __init__(self, error: APIError, *, retryable: bool, retry_after: float | None) -> None:
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after


class _RetryableFailure(Exception):
    def __init__(self, attempt: _Attempt) -> None:
        super().__init__(str(attempt.error))
        self.attempt = attempt


class APIClient:
    """Thin, typed client for the sandbox SSH endpoints and the gateway.

    Thread-safe (one ``requests.Session``; requests' connection pool is thread-safe for
    this use). Never logs or repeats the API key or a session token.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        team_id: str | None = None,
        timeout: float | tuple[float, float] = (5.0, 30.0),
        max_retries: int = 4,
        retry_deadline: float = 60.0,
        rate_limit_wait: float = 120.0,
        http: requests.Session | None = None,
    ) -> None:
        self.config = config or load_config(api_key=api_key, base_url=base_url, team_id=team_id)
        self.timeout = validate_api_timeout(timeout)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidArgument("max_retries must be an int >= 0")
        self.max_retries = max_retries
        self.retry_deadline = validate_seconds("retry_deadline", retry_deadline, allow_zero=True)
        self.rate_limit_wait = validate_seconds("rate_limit_wait", rate_limit_wait, allow_zero=True)
        # One attempt, as a whole, lasts at most connect + read timeout: a server that
        # drips its answer cannot hold a call past it (only on our own session, whose
        # connections the guard can cut; a caller's ``http=`` session keeps its own rules).
        connect_t, read_t = self.timeout if isinstance(self.timeout, tuple) else (
            self.timeout,
            self.timeout,
        )
        self._attempt_bound = connect_t + read_t
        self._http = http or guarded_session()
        self._owns_http = http is None
        self._http.headers["User-Agent"] = f"sshbridge/{__version__}"
        self._redact = _Redactor([self.config.api_key])

        # Exposed for tests and tools; each entry: (monotonic time, method, path, status)
        self.calls: deque[tuple[float, str, str, int | None]] = deque(maxlen=1000)

    def __repr__(self) -> str:
        return f"APIClient(base_url={self.config.base_url!r})"

    def __enter__(self) -> APIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    # -- endpoints ---------------------------------------------------------------------

    def get_sandbox(self, sandbox_id: str) -> Sandbox:
        sid = validate_sandbox_id(sandbox_id)
        body = self._call("GET", f"/api/v1/sandbox/{_seg(sid)}", idempotent=True)
        return self._parse(Sandbox, body, "sandbox")

    def list_sandboxes(self, *, page: int = 1, per_page: int = 50) -> SandboxList:
        """One page of ``GET /api/v1/sandbox`` (the team's sandboxes when a team is set)."""
        for name, value, top in (("page", page, 10**9), ("per_page", per_page, 100)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise InvalidArgument(f"{name} must be an int between 1 and {top}")
        query = f"page={page}&per_page={per_page}"
        if self.config.team_id:
            query += f"&team_id={quote(self.config.team_id, safe='')}"
        body = self._call("GET", f"/api/v1/sandbox?{query}", idempotent=True)
        return self._parse(SandboxList, body, "sandbox list")

    def create_ssh_session(
        self,
        sandbox_id: str,
        ttl_seconds: int = DEFAULT_TTL,
        *,
        public_key: str | None = None,
        budget_wait: float | None = None,
    ) -> SSHSession:
        """Create a session; waits for the shared rate budget at most ``budget_wait``
        seconds (default: the client's ``rate_limit_wait``).

        ``public_key`` ("ssh-ed25519 AAAA...") is sent in the body: contract B authorizes
        it with the session. The answer decides the contract: a :class:`SidecarSSHSession`
        (token and gateway: authorize the key with :meth:`authorize_key`) or a plain
        :class:`SSHSession` (already authorized; connect with its preamble). A contract-A
        server that refuses the unknown ``public_key`` field (a 422 naming it, which
        creates no session) is asked once more without it, and is not sent it again by
        this process.
        """
        sid = validate_sandbox_id(sandbox_id)
        ttl = validate_ttl(ttl_seconds)
        if public_key is not None and (
            not isinstance(public_key, str) or not _PUBLIC_KEY_RE.fullmatch(public_key)
        ):
            raise InvalidArgument("public_key must be an OpenSSH public key line ('ssh-...')")
        base = self.config.base_url
        send_key = public_key if base not in _REFUSES_PUBLIC_KEY else None
        try:
            body = self._post_session(sid, ttl, send_key, budget_wait)
        except RequestValidationError as exc:
            if public_key is None or not _names_field(exc, "public_key"):
                raise
            if send_key is None:
                # Remembered as refusing the key, but now it requires one (the server
                # changed): forget that and ask again, with the key.
                _REFUSES_PUBLIC_KEY.discard(base)
                body = self._post_session(sid, ttl, public_key, budget_wait)
            else:
                log.info("the API does not take public_key in the session POST; asking without it")
                _REFUSES_PUBLIC_KEY.add(base)
                body = self._post_session(sid, ttl, None, budget_wait)
            send_key = None if send_key is not None else public_key
        session = self._session_from(sid, body)
        if public_key is not None and send_key is None and session.contract == "vm":
            # A contract-B answer to a POST without the key (the server changed since it
            # refused public_key): that session has no key of ours. Close it, ask again.
            _REFUSES_PUBLIC_KEY.discard(base)
            self.close_ssh_session(sid, session.session_id)
            session = self._session_from(sid, self._post_session(sid, ttl, public_key, budget_wait))
        return session

    def _post_session(
        self, sid: str, ttl: int, public_key: str | None, budget_wait: float | None
    ) -> Any:
        payload = CreateSSHSessionRequest(public_key=public_key, ttl_seconds=ttl).wire()
        return self._call(
            "POST",
            f"/api/v1/sandbox/{_seg(sid)}/ssh-session",
            json=payload,
            idempotent=False,
            budget=budget_for(self.config.base_url, self.config.api_key, sid),
            budget_wait=budget_wait,
            what=f"create an SSH session for sandbox {sid}",
        )

    def _session_from(self, sid: str, body: Any) -> SSHSession:
        """Read a session answer; a malformed one is closed before its error is raised."""
        model: type[SSHSession] = SidecarSSHSession if is_sidecar_answer(body) else SSHSession
        token = body.get("token") if isinstance(body, dict) else None
        if isinstance(token, str):
            # A secret from the moment it arrives, even in an answer we reject.
            self._redact.add(token)
        try:
            session = model.model_validate(body)
        except ValidationError as exc:
            raise self._reject_session(sid, body, exc) from None
        if session.sandbox_id != sid:
            log.debug("session answer names sandbox %r for %s", session.sandbox_id, sid)
        log.debug(
            "created SSH session %s for sandbox %s (%s contract)",
            session.session_id,
            sid,
            session.contract,
        )
        return session

    def _reject_session(self, sid: str, body: Any, exc: ValidationError) -> UnexpectedResponse:
        fields = _invalid_fields(exc)
        raw_id = body.get("session_id") if isinstance(body, dict) else None
        if not isinstance(raw_id, str) or not raw_id.strip():
            return UnexpectedResponse(
                f"sandbox {sid}: the API answered the session request with no usable "
                f"session_id (bad or missing fields: {fields}); if it created a session, "
                "this client cannot close it: it ends at its TTL. Upgrade sshbridge or "
                "report it"
            )
        shown = self._redact(raw_id[:80]).encode("unicode_escape").decode("ascii")
        try:
            closed = self.close_ssh_session(sid, raw_id)
            outcome = "closed it" if closed else "it was already gone"
        except (APIError, InvalidArgument) as close_exc:
            outcome = f"could not close it ({close_exc}); it ends at its TTL"
        return UnexpectedResponse(
            f"sandbox {sid}: the API answered with an SSH session this client cannot read "
            f"(bad or missing fields: {fields}); session {shown!r}: {outcome}. Upgrade "
            "sshbridge or report it"
        )

    def close_ssh_session(self, sandbox_id: str, session_id: str) -> bool:
        """DELETE the session. Returns False if the API no longer knew it (already closed)."""
        sid = validate_sandbox_id(sandbox_id)
        if not isinstance(session_id, str) or not session_id:
            raise InvalidArgument("session_id must be a non-empty string")
        try:
            self._call(
                "DELETE",
                f"/api/v1/sandbox/{_seg(sid)}/ssh-session/{_seg(session_id)}",
                idempotent=True,
            )
        except NotFound:
            # A retried DELETE whose first try succeeded lands here too.
            return False
        log.debug("closed SSH session %s of sandbox %s", session_id, sid)
        return True

    def authorize_key(self, session: SidecarSSHSession, public_key: str) -> None:
        """Contract A: authorize ``public_key`` ("ssh-ed25519 AAAA...") at the gateway."""
        if not isinstance(session, SidecarSSHSession):
            raise InvalidArgument(
                "session must be a SidecarSSHSession (contract A) from create_ssh_session(); "
                "a contract-B session's key is authorized by the POST itself"
            )
        if not isinstance(public_key, str) or not public_key.startswith("ssh-"):
            raise InvalidArgument("public_key must be an OpenSSH public key line ('ssh-...')")
        base = session.gateway_url.rstrip("/")
        url = f"{base}/{_seg(session.user_ns)}/{_seg(session.job_id)}/authorize"
        payload = AuthorizeKeyRequest(
            session_id=session.session_id,
            public_key=public_key,
            ttl_seconds=session.ttl_seconds,
        ).model_dump()
        token = session.token.get_secret_value()
        redact = _Redactor([self.config.api_key, token])
        self._call(
            "POST",
            url,
            json=payload,
            idempotent=True,
            bearer=token,
            redact=redact,
            what="authorize key at the SSH gateway",
        )

    # -- machinery ---------------------------------------------------------------------

    def _parse(self, model: type[T], body: Any, what: str) -> T:
        try:
            return model.model_validate(body)  # type: ignore[attr-defined,no-any-return]
        except ValidationError as exc:
            fields = _invalid_fields(exc)
            raise UnexpectedResponse(
                f"the API answered with a {what} this client cannot read (bad or missing "
                f"fields: {fields}); upgrade sshbridge or report it"
            ) from None

    def _call(
        self,
        method: str,
        path_or_url: str,
        *,
        json: Any = None,
        idempotent: bool,
        bearer: str | None = None,
        budget: SlidingWindowBudget | None = None,
        redact: Callable[[str], str] | None = None,
        what: str | None = None,
        budget_wait: float | None = None,
    ) -> Any:
        url = path_or_url if "://" in path_or_url else self.config.base_url + path_or_url
        red = redact or self._redact
        label = what or f"{method} {path_or_url}"
        deadline = time.monotonic() + self.retry_deadline

        def attempt() -> Any:
            if budget is not None:
                budget.acquire(
                    self.rate_limit_wait if budget_wait is None else budget_wait, what=label
                )
            return self._once(method, url, json, bearer, idempotent, red, label, budget)

        backoff = wait_random_exponential(multiplier=0.25, max=5.0)

        def wait(state: RetryCallState) -> float:
            # The server's Retry-After wins over our own backoff.
            exc = state.outcome.exception() if state.outcome else None
            hinted = exc.attempt.retry_after if isinstance(exc, _RetryableFailure) else None
            if hinted is not None:
                return min(hinted, MAX_RETRY_AFTER)
            return float(backoff(state))

        retrying = Retrying(
            stop=stop_after_attempt(self.max_retries + 1) | StopAtDeadline(deadline),
            wait=wait,
            retry=retry_if_exception(lambda e: isinstance(e, _RetryableFailure)),
            reraise=True,
            before_sleep=lambda s: log.info(
                "%s failed (%s); retrying", label, s.outcome.exception() if s.outcome else "?"
            ),
        )
        try:
            return retrying(attempt)
        except _RetryableFailure as failure:
            raise failure.attempt.error from None

    def _send(
        self, method: str, url: str, json: Any, headers: dict[str, str]
    ) -> requests.Response:
        with guarded(self._attempt_bound) as guard:
            try:
                return self._http.request(
                    method, url, json=json, headers=headers, timeout=self.timeout
                )
            except requests.exceptions.RequestException:
                if guard.expired:
                    raise requests.exceptions.ReadTimeout("attempt deadline passed") from None
                raise

    def _once(
        self,
        method: str,
        url: str,
        json: Any,
        bearer: str | None,
        idempotent: bool,
        redact: Callable[[str], str],
        label: str,
        budget: SlidingWindowBudget | None,
    ) -> Any:
        headers = {"Authorization": f"Bearer {bearer or self.config.api_key}"}
        if json is not None:
            headers["Content-Type"] = "application/json"
        path = url.split("://", 1)[-1]
        path = path[path.find("/") :] if "/" in path else "/"
        try:
            response = self._send(method, url, json, headers)
        except requests.exceptions.ConnectTimeout:
            where = self.config.base_url if url.startswith(self.config.base_url) else "the gateway"
            err: APIError = APITimeout(
                f"{label}: connecting to {where} timed out; check the network or "
                "PRIME_API_BASE_URL"
            )
            self.calls.append((time.monotonic(), method, path, None))
            raise _RetryableFailure(_Attempt(err, retryable=True, retry_after=None)) from None
        except requests.exceptions.Timeout:
            err = APITimeout(
                f"{label}: no complete answer within {self._attempt_bound:g} s "
                f"(api_timeout {self.timeout}); the API is slow or unreachable, retry later"
            )
            self.calls.append((time.monotonic(), method, path, None))
            if idempotent:
                raise _RetryableFailure(_Attempt(err, retryable=True, retry_after=None)) from None
            raise err from None
        except requests.exceptions.ConnectionError as exc:
            never_sent = _never_sent(exc)
            err = APIConnectionError(
                f"{label}: cannot reach the API ({_short_reason(exc, redact)}); check the "
                "network or PRIME_API_BASE_URL"
            )
            self.calls.append((time.monotonic(), method, path, None))
            if idempotent or never_sent:
                raise _RetryableFailure(_Attempt(err, retryable=True, retry_after=None)) from None
            raise err from None
        except requests.exceptions.RequestException as exc:
            self.calls.append((time.monotonic(), method, path, None))
            raise APIConnectionError(f"{label}: {_short_reason(exc, redact)}") from None

        self.calls.append((time.monotonic(), method, path, response.status_code))
        log.debug("%s %s -> %s", method, path, response.status_code)
        if response.status_code < 400:
            if response.status_code == 204 or not response.content:
                return None
            try:
                return response.json()
            except ValueError:
                raise APIError(
                    f"{label}: the API answered {response.status_code} with a body that is not JSON"
                ) from None
        error, retry_after = _status_error(response, method, path, label, redact)
        status = response.status_code
        if status == 429 and retry_after is not None and budget is not None:
            budget.block_for(min(retry_after, MAX_RETRY_AFTER))
        hinted_ok = retry_after is not None and retry_after <= MAX_RETRY_AFTER
        if status in (429, 503) and hinted_ok:
            raise _RetryableFailure(_Attempt(error, retryable=True, retry_after=retry_after))
        if idempotent and (status == 429 or status >= 500) and (retry_after is None or hinted_ok):
            raise _RetryableFailure(_Attempt(error, retryable=True, retry_after=retry_after))
        raise error


def _invalid_fields(exc: ValidationError) -> str:
    names = {".".join(str(p) for p in err["loc"]) or "<body>" for err in exc.errors()}
    return ", ".join(sorted(names))


def _names_field(exc: RequestValidationError, name: str) -> bool:
    """True when a 422 is about ``name`` (the spec's ``errors`` or FastAPI's ``detail``)."""
    if any(e.param.split(".")[-1] == name for e in exc.errors):
        return True
    return name in (exc.detail or "")


def _never_sent(exc: requests.exceptions.ConnectionError) -> bool:
    """True when the failure happened while opening the TCP connection (nothing was sent)."""
    from urllib3.exceptions import NameResolutionError, NewConnectionError

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (NewConnectionError, NameResolutionError, ConnectionRefusedError)):
            return True
        reason = getattr(cur, "reason", None)
        if isinstance(reason, BaseException) and id(reason) not in seen:
            cur = reason
            continue
        args = getattr(cur, "args", ())
        nxt = next((a for a in args if isinstance(a, BaseException)), None)
        cur = nxt or cur.__cause__ or cur.__context__
    return False


def _short_reason(exc: BaseException, redact: Callable[[str], str]) -> str:
    # Redact first, then shorten: a cut can split a secret so no spelling matches.
    text = redact(str(exc))
    m = re.search(
        r"(Connection refused|Name or service not known|"
        r"Temporary failure in name resolution|Connection reset by peer|"
        r"Remote end closed connection without response|timed out)",
        text,
    )
    return m.group(1) if m else text[:200]


def _status_error(
    response: requests.Response,
    method: str,
    path: str,
    label: str,
    redact: Callable[[str], str],
) -> tuple[APIStatusError, float | None]:
    status = response.status_code
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    # A server may echo what it was sent (the key in a header, a token): never keep it.
    scrub = getattr(redact, "scrub", None)
    body = scrub(body) if scrub is not None else redact(body) if isinstance(body, str) else body
    detail, errors = _error_detail(body)
    detail = redact(detail) if detail else None
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    reason = response.reason or ""
    msg = f"{label}: {status} {reason}".rstrip()
    if detail:
        msg += f": {detail}"
    kw: dict[str, Any] = {
        "status_code": status,
        "method": method,
        "path": path,
        "detail": detail,
        "body": body if isinstance(body, (dict, list)) else None,
    }
    hint = _HINTS.get(status)
    if "/authorize" in path and status in (401, 403, 404, 410):
        hint = "the gateway refused the session token; the session may have expired or closed"
    if status in (401, 403):
        return AuthenticationError(f"{msg} ({hint})", **kw), None
    if status == 402:
        return PaymentRequired(f"{msg} ({hint})", **kw), None
    if status == 404:
        return NotFound(f"{msg} ({hint})", **kw), None
    if status == 409:
        return Conflict(f"{msg} ({hint})", **kw), None
    if status == 422:
        listed = "; ".join(f"{e.param}: {e.details}" for e in errors)
        text = f"{label}: 422 invalid request" + (f": {redact(listed)}" if listed else "")
        if not listed and detail:
            text += f": {detail}"
        return RequestValidationError(text, errors=errors, **kw), None
    if status == 429:
        wait = f"retry after {retry_after:g} s" if retry_after is not None else "retry later"
        return RateLimited(f"{msg} ({hint}; {wait})", retry_after=retry_after, **kw), retry_after
    if status >= 500:
        return (
            ServerError(
                f"{msg} (the API failed; usually transient, retry later)",
                retry_after=retry_after,
                **kw,
            ),
            retry_after,
        )
    return APIStatusError(f"{msg}" + (f" ({hint})" if hint else ""), **kw), retry_after
