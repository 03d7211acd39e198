"""The platform API (both contracts) and the sidecar contract's gateway, on one stdlib
HTTP/1.1 server."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import re
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import asyncssh

from ._state import Sandbox, Session, format_time, utcnow

if TYPE_CHECKING:
    from ._emulator import Emulator

logger = logging.getLogger("sshbridge.emulator")

DEFAULT_TTL = 900
MAX_TTL = 3600
MAX_PER_PAGE = 100
_BODY_FIELDS = {"sidecar": ("ttl_seconds",), "vm": ("ttl_seconds", "public_key")}


@dataclass
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def _detail(status: int, detail: str, **headers: str) -> Response:
    return Response(status, {"detail": detail}, dict(headers))


def _param_error(param: str, details: str) -> Response:
    return Response(422, {"errors": [{"param": param, "details": details}]})


def _ttl_error(details: str) -> Response:
    return _param_error("ttl_seconds", details)


Query = dict[str, list[str]]


# (method, pattern, endpoint name, handler) -- handlers are defined below.
_ROUTES: list[tuple[str, re.Pattern[str], str, str]] = [
    ("GET", re.compile(r"/api/v1/sandbox/?"), "list_sandboxes", "_list_sandboxes"),
    ("GET", re.compile(r"/api/v1/sandbox/([^/]+)"), "get_sandbox", "_get_sandbox"),
    (
        "POST",
        re.compile(r"/api/v1/sandbox/([^/]+)/ssh-session"),
        "create_session",
        "_create_session",
    ),
    (
        "DELETE",
        re.compile(r"/api/v1/sandbox/([^/]+)/ssh-session/([^/]+)"),
        "close_session",
        "_close_session",
    ),
    ("POST", re.compile(r"/gateway/([^/]+)/([^/]+)/authorize"), "authorize", "_authorize"),
]

_ADMIN_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"/_emulator/sandboxes"), "_admin_create_sandbox"),
    ("POST", re.compile(r"/_emulator/sandboxes/([^/]+)/status"), "_admin_set_status"),
    ("GET", re.compile(r"/_emulator/sessions"), "_admin_sessions"),
]


def handle(
    emu: Emulator, method: str, raw_path: str, headers: Mapping[str, str], body: bytes
) -> Response:
    """Route one request (header names lowercased); record API and gateway calls."""
    parts = urlsplit(raw_path)
    path = parts.path
    query: Query = parse_qs(parts.query, keep_blank_values=True)
    if path.startswith("/_emulator/"):
        for m, pattern, fn_name in _ADMIN_ROUTES:
            match = pattern.fullmatch(path)
            if match and m == method:
                if not _api_key_ok(emu, headers):
                    return _detail(401, "Invalid API key")
                admin: Callable[..., Response] = globals()[fn_name]
                return admin(emu, body, *match.groups())
        return _detail(404, "Not Found")

    endpoint = "unknown"
    handler: Callable[..., tuple[Response, str | None]] | None = None
    groups: tuple[str, ...] = ()
    path_matched = False
    for m, pattern, name, fn_name in _ROUTES:
        if name == "authorize" and emu.contract != "sidecar":
            continue  # the vm contract has no gateway
        match = pattern.fullmatch(path)
        if not match:
            continue
        path_matched = True
        if m == method:
            endpoint, handler, groups = name, globals()[fn_name], match.groups()
            break

    sandbox_id: str | None = None
    if handler is None:
        resp = _detail(405, "Method Not Allowed") if path_matched else _detail(404, "Not Found")
    else:
        if endpoint not in ("authorize", "list_sandboxes"):
            sandbox_id = groups[0]
        rule = emu.state.take_failure(endpoint)
        if rule is not None:
            resp = Response(
                rule.status, rule.body if rule.body is not None else {"detail": "Injected failure"}
            )
            if rule.retry_after is not None:
                resp.headers["Retry-After"] = str(rule.retry_after)
        else:
            try:
                resp, sid = handler(emu, headers, body, groups, query)
                sandbox_id = sid or sandbox_id
            except Exception:
                logger.exception("emulator failed to handle %s %s", method, endpoint)
                resp = _detail(500, "Internal emulator error")
    emu.state.record_call(method, path, endpoint, sandbox_id, resp.status)
    return resp


# -- helpers ------------------------------------------------------------------------


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization") or ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _api_key_ok(emu: Emulator, headers: Mapping[str, str]) -> bool:
    token = _bearer(headers)
    return token is not None and hmac.compare_digest(token.encode(), emu.api_key.encode())


def _auth_error(headers: Mapping[str, str]) -> Response:
    if _bearer(headers) is None:
        return _detail(401, "Not authenticated")
    return _detail(401, "Invalid API key")


def _json_body(body: bytes) -> tuple[dict[str, Any] | None, Response | None]:
    if not body.strip():
        return {}, None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, Response(422, {"errors": [{"param": "body", "details": "Invalid JSON"}]})
    if not isinstance(data, dict):
        return None, Response(
            422, {"errors": [{"param": "body", "details": "Body must be a JSON object"}]}
        )
    return data, None


def _sandbox_json(emu: Emulator, sb: Sandbox) -> dict[str, Any]:
    """Every field of the official SDK's Sandbox model (camelCase), plus one it lacks."""
    fmt = emu.time_format

    def when(dt: Any) -> str | None:
        return format_time(dt, fmt) if dt is not None else None

    with emu.state.lock:  # one consistent snapshot of a sandbox other threads change
        return {
            "id": sb.id,
            "name": sb.name,
            "dockerImage": "python:3.11-slim",
            "startCommand": None,
            "cpuCores": 1.0,
            "memoryGB": 2.0,
            "diskSizeGB": 10.0,
            "diskMountPath": "/sandbox-workspace",
            "gpuCount": 0,
            "gpuType": None,
            "vm": sb.vm,
            "networkAllowlist": None,
            "networkDenylist": None,
            "status": sb.status,
            "timeoutMinutes": 60,
            "idleTimeoutMinutes": None,
            "terminationReason": "emulator set status" if sb.terminated_at else None,
            "environmentVars": {},
            "secrets": None,
            "advancedConfigs": None,
            "labels": [],
            "createdAt": when(sb.created_at),
            "updatedAt": when(sb.updated_at),
            "startedAt": when(sb.started_at),
            "terminatedAt": when(sb.terminated_at),
            "exitCode": None,
            "errorType": None,
            "errorMessage": None,
            "userId": "usr_emulator",
            "teamId": None,
            "region": "emulator-local",
            "pendingImageBuildId": None,
            # A field clients do not know, as the real API grows them over time.
            "emulatorWorkdir": str(sb.directory),
        }


def _session_json(emu: Emulator, s: Session) -> dict[str, Any]:
    if emu.contract == "vm":
        return {
            "session_id": s.wire_id,
            "sandbox_id": s.sandbox_id,
            "host": s.host,
            "port": s.port,
            "expires_at": format_time(s.expires_at, emu.time_format),
            "ttl_seconds": s.ttl_seconds,
        }
    return {
        "session_id": s.wire_id,
        "exposure_id": s.exposure_id,
        "sandbox_id": s.sandbox_id,
        "host": s.host,
        "port": s.port,
        "external_endpoint": f"{s.host}:{s.port}",
        "expires_at": format_time(s.expires_at, emu.time_format),
        "ttl_seconds": s.ttl_seconds,
        "gateway_url": f"{emu.base_url}/gateway/",
        "user_ns": s.user_ns,
        "job_id": s.job_id,
        "token": s.token,
    }


def _lookup_sandbox(emu: Emulator, sandbox_id: str) -> Sandbox | None:
    return emu.state.sandbox(sandbox_id)


def _query_int(query: Query, name: str, default: int, low: int, high: int | None) -> int | Response:
    values = query.get(name)
    if not values:
        return default
    try:
        value = int(values[-1].strip())
    except ValueError:
        return _param_error(name, "Input should be a valid integer")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        return _param_error(name, f"{name} must be {bound}")
    return value


def _public_key(value: Any) -> asyncssh.SSHKey | Response:
    """An OpenSSH one-line public key (``type base64 [comment]``), or the 422 to send."""
    if value is None:
        return _param_error("public_key", "Field required")
    if not isinstance(value, str):
        return _param_error("public_key", "Input should be a valid string")
    line = value.strip()
    if "\n" in line or "\r" in line or len(line.split()) < 2:
        return _param_error("public_key", "public_key must be one OpenSSH public key line")
    try:
        return asyncssh.import_public_key(line)
    except (asyncssh.KeyImportError, ValueError, TypeError):
        return _param_error("public_key", "public_key is not a valid OpenSSH public key")


# -- API handlers (return the response and the sandbox id to record) -------------------


def _get_sandbox(
    emu: Emulator,
    headers: Mapping[str, str],
    body: bytes,
    groups: tuple[str, ...],
    query: Query,
) -> tuple[Response, str | None]:
    if not _api_key_ok(emu, headers):
        return _auth_error(headers), None
    sandbox = _lookup_sandbox(emu, groups[0])
    if sandbox is None:
        return _detail(404, "Sandbox not found"), None
    return Response(200, _sandbox_json(emu, sandbox)), None


def _list_sandboxes(
    emu: Emulator,
    headers: Mapping[str, str],
    body: bytes,
    groups: tuple[str, ...],
    query: Query,
) -> tuple[Response, str | None]:
    if not _api_key_ok(emu, headers):
        return _auth_error(headers), None
    page = _query_int(query, "page", 1, 1, None)
    if isinstance(page, Response):
        return page, None
    per_page = _query_int(query, "per_page", 50, 1, MAX_PER_PAGE)
    if isinstance(per_page, Response):
        return per_page, None
    statuses = query.get("status")
    status = statuses[-1] if statuses and statuses[-1] else None
    matching = emu.state.sandbox_list(status)
    start = (page - 1) * per_page
    body_out = {
        "sandboxes": [_sandbox_json(emu, sb) for sb in matching[start : start + per_page]],
        "total": len(matching),
        "page": page,
        "perPage": per_page,
        "hasNext": start + per_page < len(matching),
    }
    return Response(200, body_out), None


def _create_session(
    emu: Emulator,
    headers: Mapping[str, str],
    body: bytes,
    groups: tuple[str, ...],
    query: Query,
) -> tuple[Response, str | None]:
    sandbox_id = groups[0]
    if not _api_key_ok(emu, headers):
        return _auth_error(headers), None
    limit, window = emu.rate_limit
    wait = emu.state.rate_check((sandbox_id, emu.api_key), int(limit), float(window))
    if wait is not None:
        resp = _detail(429, f"Rate limit exceeded: {limit} requests per {window:g} seconds")
        if emu.rate_limit_retry_after:
            resp.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return resp, None

    data, err = _json_body(body)
    if err is not None or data is None:
        return err or _ttl_error("invalid body"), None
    if emu.reject_unknown_fields:
        known = _BODY_FIELDS[emu.contract]
        extra = [name for name in data if name not in known]
        if extra:
            details = "Extra inputs are not permitted"
            errors = [{"param": name, "details": details} for name in extra]
            return Response(422, {"errors": errors}), None
    ttl = data.get("ttl_seconds")
    if ttl is None:
        ttl = DEFAULT_TTL
    elif type(ttl) is not int:  # bool is an int subclass and is refused, like floats
        return _ttl_error("Input should be a valid integer"), None
    elif ttl < 1 or ttl > MAX_TTL:
        return _ttl_error(f"ttl_seconds must be between 1 and {MAX_TTL}"), None
    key: asyncssh.SSHKey | None = None
    if emu.contract == "vm":
        parsed = _public_key(data.get("public_key"))
        if isinstance(parsed, Response):
            return parsed, None
        key = parsed

    sandbox = _lookup_sandbox(emu, sandbox_id)
    if sandbox is None:
        return _detail(404, "Sandbox not found"), None
    with emu.state.lock:
        status, vm = sandbox.status, sandbox.vm
    if status != "RUNNING":
        return _detail(409, f"Sandbox is not running (status: {status})"), None
    if vm and emu.contract == "sidecar":
        return _detail(400, "SSH sessions are not supported for VM sandboxes"), None
    if not vm and emu.contract == "vm":
        return _detail(400, "SSH sessions are only supported for VM sandboxes"), None
    try:
        session = emu.mint_session(sandbox, ttl, key)
    except Exception:
        logger.exception("could not open an SSH exposure")
        return _detail(503, "Could not expose the SSH sidecar"), None
    answer: Any = _session_json(emu, session)
    hook = emu.session_answer_hook
    if hook is not None:
        answer = hook(answer)
    return Response(200, answer), None


def _close_session(
    emu: Emulator,
    headers: Mapping[str, str],
    body: bytes,
    groups: tuple[str, ...],
    query: Query,
) -> tuple[Response, str | None]:
    sandbox_id, session_id = groups
    if not _api_key_ok(emu, headers):
        return _auth_error(headers), None
    if _lookup_sandbox(emu, sandbox_id) is None:
        return _detail(404, "Sandbox not found"), None
    found = emu.state.open_session_for(sandbox_id, session_id)
    if found is None:
        return _detail(404, "SSH session not found"), None
    emu.end_session(found)
    return Response(200, {"ok": True}), None


def _authorize(
    emu: Emulator,
    headers: Mapping[str, str],
    body: bytes,
    groups: tuple[str, ...],
    query: Query,
) -> tuple[Response, str | None]:
    user_ns, job_id = groups
    session = emu.state.session_for_token(_bearer(headers))
    if session is None:
        return _detail(401, "Invalid or missing session token"), None
    sid = session.sandbox_id
    if session.user_ns != user_ns or session.job_id != job_id:
        return _detail(404, "Job not found"), sid
    data, err = _json_body(body)
    if err is not None or data is None:
        return err or _detail(422, "invalid body"), sid
    if data.get("session_id") != session.wire_id:
        return _detail(403, "Token does not belong to this session"), sid
    if session.deleted_at is not None:
        return _detail(410, "SSH session was closed"), sid
    if session.expired(utcnow()):
        return _detail(410, "SSH session has expired"), sid
    sandbox = _lookup_sandbox(emu, sid)
    if sandbox is None or sandbox.status != "RUNNING" or session.exposure_closed:
        return _detail(409, "Sandbox is not running"), sid
    public_key = data.get("public_key")
    if not isinstance(public_key, str) or not public_key.strip():
        return _detail(422, "public_key is required"), sid
    try:
        key = asyncssh.import_public_key(public_key.strip())
    except (asyncssh.KeyImportError, ValueError, TypeError):
        return _detail(422, "public_key is not a valid OpenSSH public key"), sid
    emu.authorize_key(session, key)
    return Response(200, {"ok": True}), sid


# -- admin endpoints (not recorded; for driving an emulator in another process) --------


def _admin_create_sandbox(emu: Emulator, body: bytes) -> Response:
    data, err = _json_body(body)
    if err is not None or data is None:
        return err or _detail(422, "invalid body")
    vm = data.get("vm")
    sid = emu.create_sandbox(
        status=str(data.get("status") or "RUNNING"),
        vm=None if vm is None else bool(vm),
        name=data.get("name") if isinstance(data.get("name"), str) else None,
    )
    sandbox = _lookup_sandbox(emu, sid)
    assert sandbox is not None
    return Response(201, _sandbox_json(emu, sandbox))


def _admin_set_status(emu: Emulator, body: bytes, sandbox_id: str) -> Response:
    data, err = _json_body(body)
    if err is not None or data is None or not isinstance(data.get("status"), str):
        return err or _detail(422, "status is required")
    sandbox = _lookup_sandbox(emu, sandbox_id)
    if sandbox is None:
        return _detail(404, "Sandbox not found")
    emu.set_status(sandbox_id, data["status"])
    return Response(200, _sandbox_json(emu, sandbox))


def _admin_sessions(emu: Emulator, body: bytes) -> Response:
    out = []
    for rec in emu.sessions:
        out.append(
            {
                "session_id": rec.session_id,
                "wire_session_id": rec.wire_session_id,
                "sandbox_id": rec.sandbox_id,
                "created_at": format_time(rec.created_at, "Z"),
                "expires_at": format_time(rec.expires_at, "Z"),
                "deleted_at": format_time(rec.deleted_at, "Z") if rec.deleted_at else None,
                "port": rec.port,
                "authorized_keys": rec.authorized_keys,
                "ssh_connections": emu.ssh_connections(rec.session_id),
            }
        )
    return Response(200, out)


# -- server ---------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sshbridge-emulator"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body are separate writes
    server: APIServer

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            self._send(_detail(400, "Malformed request body"))
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        resp = handle(self.server.emu, self.command, self.path, headers, body)
        self._send(resp)

    def _send(self, resp: Response) -> None:
        if resp.status == 204:
            data = b""
        elif isinstance(resp.body, bytes):  # a session_answer_hook may send any bytes
            data = resp.body
        else:
            data = json.dumps(resp.body).encode()
        self.send_response(resp.status)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        if resp.status != 204:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines only (never headers): the API key and tokens live in headers.
        logger.debug("http %s - " + format, self.client_address[0], *args)


class APIServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: a fleet's 200 simultaneous connects overflow
    # it and some are reset, which a real API behind a load balancer would not do.
    request_queue_size = 1024
    block_on_close = False  # keep-alive handlers are shut down explicitly in close_connections

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._conns_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's getfqdn(), a DNS lookup we do not need.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "127.0.0.1"
        self.server_port = self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name="sshbridge-emulator-http-conn",
            daemon=True,
        )
        with self._conns_lock:
            self._conns[thread] = request
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            logger.debug("http connection error", exc_info=True)
        finally:
            self.shutdown_request(request)
            with self._conns_lock:
                self._conns.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("http connection error", exc_info=True)

    def close_connections(self, timeout: float) -> None:
        with self._conns_lock:
            items = list(self._conns.items())
        for _, sock in items:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread, _ in items:
            thread.join(timeout)
