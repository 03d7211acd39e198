"""The API client against a real loopback HTTP server with scripted answers.

These cover wire-format reading, the error hierarchy and the retry rules. The emulator
tests cover the same client against the emulated service end to end.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import pytest
from conftest import SECRET_KEY
from http_stub import Answer, StubServer

from sshbridge import (
    APIClient,
    APIConnectionError,
    APIError,
    APITimeout,
    AuthenticationError,
    InvalidArgument,
    NotFound,
    PaymentRequired,
    RateBudgetExhausted,
    RateLimited,
    RequestValidationError,
    ServerError,
    SidecarSSHSession,
    SSHSession,
    UnexpectedResponse,
)
from sshbridge._api import parse_retry_after
from sshbridge._ratelimit import SlidingWindowBudget

TOKEN = "session_token_secret_abcdef123456"


def session_body(**over: Any) -> dict[str, Any]:
    body = {
        "session_id": "sess_1",
        "exposure_id": "exp_1",
        "sandbox_id": "sbx_1",
        "host": "127.0.0.1",
        "port": 2222,
        "external_endpoint": "127.0.0.1:2222",
        "expires_at": "2030-01-01T00:00:00Z",
        "ttl_seconds": 900,
        "gateway_url": "http://127.0.0.1:1/gw/",
        "user_ns": "ns",
        "job_id": "job",
        "token": TOKEN,
    }
    body.update(over)
    return body


def client(stub: StubServer, **kw: Any) -> APIClient:
    kw.setdefault("max_retries", 3)
    return APIClient(api_key=SECRET_KEY, base_url=stub.base_url, **kw)


@pytest.mark.parametrize(
    "spelling,expected",
    [
        ("2030-01-01T00:00:00Z", datetime(2030, 1, 1, tzinfo=timezone.utc)),
        ("2030-01-01T00:00:00.123456789Z", datetime(2030, 1, 1, 0, 0, 0, 123456, timezone.utc)),
        ("2030-01-01T02:00:00+02:00", datetime(2030, 1, 1, tzinfo=timezone.utc)),
        ("2030-01-01 00:00:00", datetime(2030, 1, 1, tzinfo=timezone.utc)),
        ("2030-01-01t00:00:00z", datetime(2030, 1, 1, tzinfo=timezone.utc)),
    ],
)
def test_session_time_spellings_are_timezone_aware(
    stub: StubServer, spelling: str, expected: datetime
) -> None:
    stub.queue(Answer(200, session_body(expires_at=spelling)))
    session = client(stub).create_ssh_session("sbx_1", 900)
    assert session.expires_at.tzinfo is not None
    assert session.expires_at == expected


def test_create_session_wire_format_and_secrets(stub: StubServer) -> None:
    stub.queue(Answer(200, session_body(extra_field="kept")))
    api = client(stub)
    session = api.create_ssh_session("sbx_1", 60)
    seen = stub.seen[0]
    assert (seen.method, seen.path) == ("POST", "/api/v1/sandbox/sbx_1/ssh-session")
    assert seen.body == {"ttl_seconds": 60}
    assert seen.headers["Authorization"] == f"Bearer {SECRET_KEY}"
    assert session.port == 2222 and session.session_id == "sess_1"
    assert session.token.get_secret_value() == TOKEN
    for text in (repr(session), str(session), repr(session.model_dump()), repr(api)):
        assert TOKEN not in text
        assert SECRET_KEY not in text


def test_authorize_uses_gateway_and_token(stub: StubServer) -> None:
    stub.queue(Answer(200, session_body(gateway_url=stub.base_url + "/gw/")), Answer(200, {}))
    api = client(stub)
    session = api.create_ssh_session("sbx_1")
    api.authorize_key(session, "ssh-ed25519 AAAAC3 test")
    seen = stub.seen[1]
    assert (seen.method, seen.path) == ("POST", "/gw/ns/job/authorize")
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert seen.body == {
        "session_id": "sess_1",
        "public_key": "ssh-ed25519 AAAAC3 test",
        "ttl_seconds": 900,
    }


def test_missing_field_is_a_clear_error(stub: StubServer) -> None:
    body = session_body()
    del body["token"]
    stub.queue(Answer(200, body))
    with pytest.raises(APIError, match="token"):
        client(stub).create_ssh_session("sbx_1")


@pytest.mark.parametrize("ttl", [0, 3601, -5, 1.5, True, "900", None])
def test_ttl_validated_before_any_request(stub: StubServer, ttl: Any) -> None:
    with pytest.raises(InvalidArgument, match="ttl_seconds"):
        client(stub).create_ssh_session("sbx_1", ttl)
    assert stub.seen == []


@pytest.mark.parametrize("bad", ["../x", "a/b", "sbx 1", "", "x?y", "%2e%2e", ".", "a" * 200, 5])
def test_sandbox_id_cannot_change_the_path(stub: StubServer, bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="sandbox_id"):
        client(stub).get_sandbox(bad)
    assert stub.seen == []


@pytest.mark.parametrize(
    "status,body,exc",
    [
        (401, {"detail": "Invalid API key"}, AuthenticationError),
        (402, {"detail": "Payment required"}, PaymentRequired),
        (404, {"detail": "Sandbox not found"}, NotFound),
        (429, {"detail": "Too many requests"}, RateLimited),
        (500, {"detail": "boom"}, ServerError),
    ],
)
def test_status_maps_to_error_class(
    stub: StubServer, status: int, body: Any, exc: type[Exception]
) -> None:
    stub.default = Answer(status, body)
    with pytest.raises(exc) as info:
        client(stub, max_retries=0).create_ssh_session("sbx_1")
    assert info.value.status_code == status  # type: ignore[attr-defined]
    assert body["detail"] in str(info.value)


def test_422_carries_errors_list(stub: StubServer) -> None:
    stub.queue(Answer(422, {"errors": [{"param": "ttl_seconds", "details": "must be <= 3600"}]}))
    with pytest.raises(RequestValidationError) as info:
        client(stub).create_ssh_session("sbx_1", 60)
    assert info.value.errors[0].param == "ttl_seconds"
    assert "ttl_seconds: must be <= 3600" in str(info.value)
    assert len(stub.seen) == 1


def test_422_fastapi_detail_list(stub: StubServer) -> None:
    stub.queue(
        Answer(422, {"detail": [{"loc": ["body", "ttl_seconds"], "msg": "bad", "type": "x"}]})
    )
    with pytest.raises(RequestValidationError) as info:
        client(stub).create_ssh_session("sbx_1", 60)
    assert info.value.errors[0].param == "ttl_seconds"


def test_post_not_retried_on_500_but_get_is(stub: StubServer) -> None:
    stub.queue(Answer(500, {"detail": "x"}))
    with pytest.raises(ServerError):
        client(stub).create_ssh_session("sbx_1")
    assert len(stub.seen) == 1
    stub.queue(
        Answer(500, {"detail": "x"}),
        Answer(502, "bad gateway"),
        Answer(200, {"id": "sbx_1", "status": "RUNNING"}),
    )
    sandbox = client(stub).get_sandbox("sbx_1")
    assert sandbox.status == "RUNNING"
    assert len(stub.seen) == 4


def test_post_retried_on_503_and_429_with_retry_after(stub: StubServer) -> None:
    stub.queue(
        Answer(503, {"detail": "busy"}, {"Retry-After": "0"}),
        Answer(429, {"detail": "slow down"}, {"Retry-After": "1"}),
        Answer(200, session_body()),
    )
    start = time.monotonic()
    session = client(stub).create_ssh_session("sbx_retry_after")
    assert session.session_id == "sess_1"
    assert [s.method for s in stub.seen] == ["POST"] * 3
    assert time.monotonic() - start >= 0.9  # honoured Retry-After: 1


def test_post_429_without_retry_after_is_not_retried(stub: StubServer) -> None:
    stub.queue(Answer(429, {"detail": "slow down"}))
    with pytest.raises(RateLimited) as info:
        client(stub).create_ssh_session("sbx_1")
    assert info.value.retry_after is None
    assert len(stub.seen) == 1


def test_post_not_retried_when_connection_cut_after_sending(stub: StubServer) -> None:
    stub.queue(Answer(cut=True))
    with pytest.raises(APIConnectionError):
        client(stub).create_ssh_session("sbx_1")
    assert len(stub.seen) == 1  # the server saw it once: retrying could create two


def test_get_retried_when_connection_cut(stub: StubServer) -> None:
    stub.queue(Answer(cut=True), Answer(200, {"id": "sbx_1", "status": "RUNNING", "vm": False}))
    assert client(stub).get_sandbox("sbx_1").id == "sbx_1"
    assert len(stub.seen) == 2


def test_read_timeout_post_raises_without_retry(stub: StubServer) -> None:
    stub.queue(Answer(200, session_body(), delay=1.5))
    with pytest.raises(APITimeout):
        client(stub, timeout=(2.0, 0.5)).create_ssh_session("sbx_1")
    assert len(stub.seen) == 1


def test_post_retried_when_never_sent() -> None:
    # Nothing listens on this port: the connect fails, so the POST provably never arrived.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = APIClient(api_key=SECRET_KEY, base_url=f"http://127.0.0.1:{port}", max_retries=2)
    with pytest.raises(APIConnectionError) as info:
        api.create_ssh_session("sbx_1")
    assert "refused" in str(info.value).lower()
    assert len([c for c in api.calls if c[1] == "POST"]) == 3


def test_delete_404_means_already_closed(stub: StubServer) -> None:
    stub.queue(Answer(404, {"detail": "Session not found"}), Answer(200, {"ok": True}))
    api = client(stub)
    assert api.close_ssh_session("sbx_1", "sess_1") is False
    assert api.close_ssh_session("sbx_1", "sess/../x") is True
    assert stub.seen[1].path == "/api/v1/sandbox/sbx_1/ssh-session/sess%2F..%2Fx"


def test_secrets_never_in_errors_or_logs(
    stub: StubServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # A server that echoes the credentials back must not get them into our messages.
    stub.queue(
        Answer(200, session_body(gateway_url=stub.base_url + "/gw/")),
        Answer(401, {"detail": f"bad token {TOKEN}"}),
        Answer(500, {"detail": f"key {SECRET_KEY} broke"}),
    )
    api = client(stub, max_retries=0)
    session = api.create_ssh_session("sbx_1")
    with pytest.raises(AuthenticationError) as auth:
        api.authorize_key(session, "ssh-ed25519 AAAA x")
    with pytest.raises(ServerError) as server:
        api.get_sandbox("sbx_1")
    for text in (str(auth.value), repr(auth.value), str(server.value), caplog.text):
        assert TOKEN not in text
        assert SECRET_KEY not in text
    assert "session may have expired" in str(auth.value)


def test_sandbox_model_reads_camel_case_and_unknown_fields(stub: StubServer) -> None:
    stub.queue(
        Answer(
            200,
            {
                "id": "sbx_1",
                "name": "n",
                "dockerImage": "python:3.11",
                "status": "running",
                "vm": None,
                "createdAt": "2026-01-01T00:00:00Z",
                "timeoutMinutes": 60,
                "newField": 1,
            },
        )
    )
    sandbox = client(stub).get_sandbox("sbx_1")
    assert sandbox.status == "RUNNING" and sandbox.vm is False
    assert sandbox.docker_image == "python:3.11" and sandbox.timeout_minutes == 60
    assert sandbox.created_at is not None and sandbox.created_at.tzinfo is not None


def test_retry_after_spellings() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    later = (datetime.now(timezone.utc) + timedelta(seconds=30)).strftime(
        "%a, %d %b %Y %H:%M:%S GMT"
    )
    value = parse_retry_after(later)
    assert value is not None and 25 <= value <= 31
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_budget_waits_then_refuses() -> None:
    budget = SlidingWindowBudget(limit=2, window=1.0)
    for _ in range(2):
        assert budget.acquire(0) < 0.05
    with pytest.raises(RateBudgetExhausted) as info:
        budget.acquire(0.05)
    assert info.value.wait > 0.5
    assert "2 per 1 s" in str(info.value)
    waited = budget.acquire(3.0)  # the oldest slot frees after 1 s
    assert 0.5 <= waited <= 2.5


def test_budget_shared_per_sandbox_and_key(stub: StubServer) -> None:
    stub.default = Answer(200, session_body())
    a = APIClient(api_key=SECRET_KEY, base_url=stub.base_url, rate_limit_wait=0)
    b = APIClient(api_key=SECRET_KEY, base_url=stub.base_url, rate_limit_wait=0)
    for i in range(20):
        (a if i % 2 else b).create_ssh_session("sbx_budget")
    with pytest.raises(RateBudgetExhausted):
        a.create_ssh_session("sbx_budget")
    assert len(stub.seen) == 20  # the 21st never reached the server
    # Another sandbox has its own budget.
    a.create_ssh_session("sbx_budget_other")


# -- contracts: the key in the POST, the answer decides --------------------------------------

PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKj8"


def vm_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "session_id": "sess_vm",
        "sandbox_id": "sbx_1",
        "host": "127.0.0.1",
        "port": 2222,
        "expires_at": "2030-01-01T00:00:00Z",
        "ttl_seconds": 900,
    }
    body.update(over)
    return body


def test_public_key_goes_in_the_post_and_six_fields_mean_contract_b(stub: StubServer) -> None:
    stub.queue(Answer(200, vm_body(newField={"x": 1})))
    session = client(stub).create_ssh_session("sbx_1", 60, public_key=PUBLIC)
    assert stub.seen[0].body == {"public_key": PUBLIC, "ttl_seconds": 60}
    assert type(session) is SSHSession and session.contract == "vm"
    assert session.preamble == b"PRIME-SSH-SESSION sess_vm\n"
    assert "newField" not in repr(session)


def test_token_and_gateway_mean_contract_a(stub: StubServer) -> None:
    stub.queue(Answer(200, session_body()))
    session = client(stub).create_ssh_session("sbx_1", public_key=PUBLIC)
    assert isinstance(session, SidecarSSHSession) and session.preamble is None


@pytest.mark.parametrize(
    "body",
    [
        {"errors": [{"param": "public_key", "details": "Extra inputs are not permitted"}]},
        {
            "detail": [
                {
                    "type": "extra_forbidden",
                    "loc": ["body", "public_key"],
                    "msg": "Extra inputs are not permitted",
                }
            ]
        },
    ],
    ids=["spec-errors", "fastapi-detail"],
)
def test_422_naming_public_key_is_asked_once_more_without_it(
    stub: StubServer, body: dict[str, Any]
) -> None:
    stub.queue(Answer(422, body), Answer(200, session_body()), Answer(200, session_body()))
    api = client(stub)
    session = api.create_ssh_session("sbx_1", 60, public_key=PUBLIC)
    assert isinstance(session, SidecarSSHSession)
    assert [s.body for s in stub.seen] == [
        {"public_key": PUBLIC, "ttl_seconds": 60},
        {"ttl_seconds": 60},
    ]
    api.create_ssh_session("sbx_1", 60, public_key=PUBLIC)  # remembered: no second 422
    assert stub.seen[2].body == {"ttl_seconds": 60}


def test_422_about_another_field_is_reported(stub: StubServer) -> None:
    stub.queue(Answer(422, {"errors": [{"param": "ttl_seconds", "details": "too big"}]}))
    with pytest.raises(RequestValidationError, match="ttl_seconds: too big"):
        client(stub).create_ssh_session("sbx_1", 60, public_key=PUBLIC)
    assert len(stub.seen) == 1


@pytest.mark.parametrize(
    "over",
    [
        {"host": None},
        {"port": 70000},
        {"expires_at": "soon"},
        {"session_id": "sess bad"},
        {"session_id": "sess\nPRIME-SSH-SESSION other"},
        {"token": "t0ken-without-gateway-fields"},
    ],
    ids=["no-host", "port", "time", "space", "newline", "half-contract-a"],
)
def test_unreadable_answer_is_deleted_first(stub: StubServer, over: dict[str, Any]) -> None:
    stub.queue(Answer(200, vm_body(**over)), Answer(200, {"ok": True}))
    with pytest.raises(UnexpectedResponse, match="cannot read") as info:
        client(stub).create_ssh_session("sbx_1", public_key=PUBLIC)
    assert len(stub.seen) == 2
    delete = stub.seen[1]
    sid = over.get("session_id", "sess_vm")
    assert delete.method == "DELETE"
    assert delete.path == f"/api/v1/sandbox/sbx_1/ssh-session/{quote(sid, safe='')}"
    assert "closed it" in str(info.value)
    assert "t0ken-without" not in str(info.value)


@pytest.mark.parametrize("sid", ["", "   ", 7, None, {"id": "x"}])
def test_answer_without_usable_session_id_is_refused(stub: StubServer, sid: object) -> None:
    stub.queue(Answer(200, vm_body(session_id=sid)))
    with pytest.raises(UnexpectedResponse, match="no usable session_id"):
        client(stub).create_ssh_session("sbx_1", public_key=PUBLIC)
    assert len(stub.seen) == 1  # nothing to DELETE by


def test_a_non_json_or_empty_success_is_a_clear_error(stub: StubServer) -> None:
    stub.queue(Answer(200, "<html>oops</html>"), Answer(200, None))
    with pytest.raises(APIError, match="not JSON"):
        client(stub).create_ssh_session("sbx_1", public_key=PUBLIC)
    with pytest.raises(UnexpectedResponse, match="no usable session_id"):
        client(stub).create_ssh_session("sbx_1", public_key=PUBLIC)


def test_bad_public_key_argument_makes_no_request(stub: StubServer) -> None:
    for bad in ("", "not a key", "ssh-ed25519 AAAA\nx", 5):
        with pytest.raises(InvalidArgument, match="public_key"):
            client(stub).create_ssh_session("sbx_1", public_key=bad)  # type: ignore[arg-type]
    assert stub.seen == []


def test_echoed_secrets_are_redacted_in_every_spelling(stub: StubServer) -> None:
    escaped = SECRET_KEY.encode("unicode_escape").decode()
    stub.queue(
        Answer(400, {"detail": f"bad {SECRET_KEY}", "echo": {"auth": f"Bearer {SECRET_KEY}"}}),
        Answer(422, {"errors": [{"param": "key", "details": f"{escaped} / {quote(SECRET_KEY)}"}]}),
    )
    api = client(stub, max_retries=0)
    with pytest.raises(APIError) as first:
        api.get_sandbox("sbx_1")
    with pytest.raises(RequestValidationError) as second:
        api.create_ssh_session("sbx_1")
    for exc in (first.value, second.value):
        text = f"{exc} {exc!r} {getattr(exc, 'body', '')} {getattr(exc, 'errors', '')}"
        assert SECRET_KEY not in text and quote(SECRET_KEY) not in text


def test_list_sandboxes_reads_a_page(stub: StubServer) -> None:
    sandbox = {"id": "sbx_1", "status": "RUNNING", "startCommand": None, "labels": None}
    page = {"sandboxes": [sandbox], "total": 3, "page": 2, "perPage": 1, "hasNext": True}
    stub.queue(Answer(200, page))
    listed = client(stub).list_sandboxes(page=2, per_page=1)
    assert stub.seen[0].path == "/api/v1/sandbox?page=2&per_page=1"
    assert listed.total == 3 and listed.has_next and listed.sandboxes[0].id == "sbx_1"
    with pytest.raises(InvalidArgument):
        client(stub).list_sandboxes(per_page=0)


class DripServer:
    """Answers every request one byte every ``interval`` seconds, forever (until closed):
    no single read ever times out, so only a bound on the whole call stops a client."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" * 1000:
                if self.stop.wait(self.interval):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(5)


def test_a_dripped_answer_cannot_hold_a_call_past_its_bound() -> None:
    drip = DripServer()
    try:
        api = APIClient(
            api_key=SECRET_KEY,
            base_url=f"http://127.0.0.1:{drip.port}",
            timeout=(0.5, 0.5),
            max_retries=0,
        )
        start = time.monotonic()
        with pytest.raises(APITimeout, match="no complete answer within 1 s"):
            api.get_sandbox("sbx_1")
        assert time.monotonic() - start < 5  # 1 s bound; a drip would go on for minutes
        api.close()
    finally:
        drip.close()


@pytest.mark.parametrize(
    "timeout", [(5,), (0, 0), (-1, -1), (float("nan"), 5), float("inf"), "5", True, (1, 2, 3)]
)
def test_api_timeout_is_validated_up_front(timeout: Any) -> None:
    with pytest.raises(InvalidArgument, match="api_timeout"):
        APIClient(api_key=SECRET_KEY, base_url="http://127.0.0.1:9", timeout=timeout)


def test_a_server_that_stops_refusing_public_key_gets_it_again(stub: StubServer) -> None:
    refusal = {"errors": [{"param": "public_key", "details": "Extra inputs are not permitted"}]}
    stub.queue(
        Answer(422, refusal),
        Answer(200, session_body()),
        Answer(200, vm_body()),  # the same URL now speaks contract B
        Answer(200, {"ok": True}),  # the DELETE of that keyless session
        Answer(200, vm_body(session_id="sess_keyed")),
    )
    api = client(stub)
    api.create_ssh_session("sbx_1", 60, public_key=PUBLIC)
    session = api.create_ssh_session("sbx_1", 60, public_key=PUBLIC)
    assert session.session_id == "sess_keyed"
    assert [(s.method, s.body) for s in stub.seen[2:]] == [
        ("POST", {"ttl_seconds": 60}),
        ("DELETE", None),
        ("POST", {"public_key": PUBLIC, "ttl_seconds": 60}),
    ]
