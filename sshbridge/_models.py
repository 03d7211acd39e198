"""Pydantic models that mirror the platform API's wire format field for field."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

__all__ = [
    "AuthorizeKeyRequest",
    "CreateSSHSessionRequest",
    "ErrorDetail",
    "ErrorResponse",
    "SSHSession",
    "Sandbox",
    "SandboxList",
    "SidecarSSHSession",
    "StartCommand",
]


def _aware(value: datetime) -> datetime:
    # RFC 3339 requires an offset; a server that omits it means UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


class CreateSSHSessionRequest(BaseModel):
    """The session POST body. Contract B requires ``public_key``; contract A servers
    ignore it (or, if they forbid unknown fields, are asked again without it)."""

    model_config = ConfigDict(extra="forbid")
    public_key: str | None = None
    ttl_seconds: int | None = None

    def wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


# A session id becomes an SSH user name, a URL path segment and the preamble line: it
# must be one printable token, or the preamble could be split into two lines.
_SESSION_ID = r"^[^\s\x00-\x1f\x7f]{1,256}$"
PREAMBLE_PREFIX = "PRIME-SSH-SESSION"


class SSHSession(BaseModel):
    """One SSH session minted by the API: the fields both contracts answer with.

    Contract B (the provider's current service) answers with exactly these six fields:
    the public key sent in the POST is already authorized, and every TCP connection
    starts with :attr:`preamble`. Contract A answers with :class:`SidecarSSHSession`.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    session_id: str = Field(pattern=_SESSION_ID, strict=True)
    sandbox_id: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    expires_at: datetime
    ttl_seconds: int

    def __repr_args__(self) -> Any:
        # Unknown fields may carry secrets a server added: not shown.
        for name, value in super().__repr_args__():
            if name in type(self).model_fields:
                yield name, value

    @field_validator("expires_at")
    @classmethod
    def _expires_at_aware(cls, value: datetime) -> datetime:
        return _aware(value)

    @property
    def contract(self) -> str:
        """``"vm"`` (contract B: key in the POST, preamble) or ``"sidecar"`` (A)."""
        return "vm"

    @property
    def preamble(self) -> bytes | None:
        """The line sent first on every TCP connection, or None when none is needed."""
        return f"{PREAMBLE_PREFIX} {self.session_id}\n".encode()


class SidecarSSHSession(SSHSession):
    """``SSHSessionResponse`` of the specification (contract A): the session token
    authorizes a key at the gateway, and SSH starts with no preamble.

    ``token`` is a :class:`~pydantic.SecretStr`: it never shows in reprs, logs or dumps;
    ``session.token.get_secret_value()`` reads it.
    """

    exposure_id: str
    external_endpoint: str
    gateway_url: str = Field(min_length=1)
    user_ns: str
    job_id: str
    token: SecretStr

    @property
    def contract(self) -> str:
        return "sidecar"

    @property
    def preamble(self) -> bytes | None:
        return None


# Fields only a contract-A answer has; harmless extras (exposure_id, ...) do not count.
_SIDECAR_MARKERS = ("token", "gateway_url", "user_ns", "job_id")


def is_sidecar_answer(body: object) -> bool:
    """The answer decides the contract: a token and a gateway mean contract A.

    Any one of A's own fields makes it an A answer, to be read strictly: half of the
    gateway flow is a malformed answer, never silently a contract-B one.
    """
    return isinstance(body, dict) and any(k in body for k in _SIDECAR_MARKERS)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    param: str
    details: str


class ErrorResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    errors: list[ErrorDetail]


class StartCommand(BaseModel):
    """``startCommand`` as the current SDK sends it: a process started without a shell."""

    model_config = ConfigDict(extra="allow", frozen=True)
    executable: str
    args: list[str] = Field(default_factory=list)


class Sandbox(BaseModel):
    """``GET /api/v1/sandbox/{id}``: camelCase on the wire; unknown fields are kept.

    Only ``id`` and ``status`` are required: this client reads a sandbox to explain a
    failure, and must not fail itself because the API added or dropped a field.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    id: str
    status: str
    vm: bool = False
    name: str | None = None
    docker_image: str | None = Field(default=None, alias="dockerImage")
    # Older answers spell it as a shell string, the current SDK as {executable, args}.
    start_command: StartCommand | str | None = Field(default=None, alias="startCommand")
    cpu_cores: float | None = Field(default=None, alias="cpuCores")
    memory_gb: float | None = Field(default=None, alias="memoryGB")
    disk_size_gb: float | None = Field(default=None, alias="diskSizeGB")
    disk_mount_path: str | None = Field(default=None, alias="diskMountPath")
    gpu_count: int | None = Field(default=None, alias="gpuCount")
    gpu_type: str | None = Field(default=None, alias="gpuType")
    timeout_minutes: int | None = Field(default=None, alias="timeoutMinutes")
    idle_timeout_minutes: int | None = Field(default=None, alias="idleTimeoutMinutes")
    termination_reason: str | None = Field(default=None, alias="terminationReason")
    labels: list[str] = Field(default_factory=list)
    created_at: datetime | None = Field(default=None, alias="createdAt")
    updated_at: datetime | None = Field(default=None, alias="updatedAt")
    started_at: datetime | None = Field(default=None, alias="startedAt")
    terminated_at: datetime | None = Field(default=None, alias="terminatedAt")
    exit_code: int | None = Field(default=None, alias="exitCode")
    error_type: str | None = Field(default=None, alias="errorType")
    error_message: str | None = Field(default=None, alias="errorMessage")
    user_id: str | None = Field(default=None, alias="userId")
    team_id: str | None = Field(default=None, alias="teamId")
    region: str | None = None

    def __repr_args__(self) -> Any:
        # Unknown fields (environment variables among them) may hold secrets: not shown.
        for name, value in super().__repr_args__():
            if name in type(self).model_fields:
                yield name, value

    @field_validator("created_at", "updated_at", "started_at", "terminated_at")
    @classmethod
    def _times_aware(cls, value: datetime | None) -> datetime | None:
        return None if value is None else _aware(value)

    @field_validator("status", mode="before")
    @classmethod
    def _status_upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("vm", mode="before")
    @classmethod
    def _vm_null(cls, value: Any) -> Any:
        return False if value is None else value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_null(cls, value: Any) -> Any:
        return [] if value is None else value


class SandboxList(BaseModel):
    """``GET /api/v1/sandbox?page=&per_page=``: one page of sandboxes."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    sandboxes: list[Sandbox]
    total: int
    page: int
    per_page: int = Field(alias="perPage")
    has_next: bool = Field(alias="hasNext")


class AuthorizeKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_id: str
    public_key: str
    ttl_seconds: int | None = None
