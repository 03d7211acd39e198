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
]


def _aware(value: datetime) -> datetime:
    # RFC 3339 requires an offset; a server that omits it means UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


class CreateSSHSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl_seconds: int | None = None


class SSHSession(BaseModel):
    """``SSHSessionResponse``: one SSH session minted by the API.

    ``token`` is a :class:`~pydantic.SecretStr`: it never shows in reprs, logs or dumps;
    ``session.token.get_secret_value()`` reads it.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    session_id: str
    exposure_id: str
    sandbox_id: str
    host: str
    port: int = Field(ge=1, le=65535)
    external_endpoint: str
    expires_at: datetime
    ttl_seconds: int
    gateway_url: str
    user_ns: str
    job_id: str
    token: SecretStr

    @field_validator("expires_at")
    @classmethod
    def _expires_at_aware(cls, value: datetime) -> datetime:
        return _aware(value)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    param: str
    details: str


class ErrorResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    errors: list[ErrorDetail]


class Sandbox(BaseModel):
    """``GET /api/v1/sandbox/{id}``: camelCase on the wire; unknown fields are kept."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    id: str
    status: str
    vm: bool = False
    name: str | None = None
    docker_image: str | None = Field(default=None, alias="dockerImage")
    start_command: str | None = Field(default=None, alias="startCommand")
    cpu_cores: float | None = Field(default=None, alias="cpuCores")
    memory_gb: float | None = Field(default=None, alias="memoryGB")
    disk_size_gb: float | None = Field(default=None, alias="diskSizeGB")
    gpu_count: int | None = Field(default=None, alias="gpuCount")
    timeout_minutes: int | None = Field(default=None, alias="timeoutMinutes")
    created_at: datetime | None = Field(default=None, alias="createdAt")
    updated_at: datetime | None = Field(default=None, alias="updatedAt")
    started_at: datetime | None = Field(default=None, alias="startedAt")
    terminated_at: datetime | None = Field(default=None, alias="terminatedAt")
    user_id: str | None = Field(default=None, alias="userId")
    team_id: str | None = Field(default=None, alias="teamId")

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


class AuthorizeKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_id: str
    public_key: str
    ttl_seconds: int | None = None
