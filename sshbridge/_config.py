"""Configuration, resolved exactly as the provider's own tools do.

Order (first wins): explicit arguments; environment ``PRIME_API_KEY``,
``PRIME_API_BASE_URL`` / ``PRIME_BASE_URL``, ``PRIME_TEAM_ID``; the JSON file
``~/.prime/config.json`` (keys ``api_key``, ``base_url``, ``team_id``); the default URL.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ._exceptions import ConfigurationError, InvalidArgument

DEFAULT_BASE_URL = "https://api.primeintellect.ai"


def config_file_path() -> Path:
    return Path.home() / ".prime" / "config.json"


def normalize_base_url(url: str) -> str:
    """Strip whitespace, trailing slashes and a trailing ``/api/v1``; require http(s)."""
    if not isinstance(url, str):
        raise InvalidArgument(f"base_url must be a string, got {type(url).__name__}")
    cleaned = url.strip().rstrip("/")
    if cleaned.endswith("/api/v1"):
        cleaned = cleaned[: -len("/api/v1")].rstrip("/")
    parts = urlsplit(cleaned)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidArgument(
            f"base_url {url!r} is not an http(s) URL; expected something like {DEFAULT_BASE_URL}"
        )
    if parts.query or parts.fragment:
        raise InvalidArgument(f"base_url {url!r} must not carry a query or fragment")
    return cleaned


@dataclass(frozen=True)
class Config:
    """The resolved settings. ``repr`` never shows the API key."""

    api_key: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    team_id: str | None = None

    def __repr__(self) -> str:
        return f"Config(base_url={self.base_url!r}, team_id={self.team_id!r}, api_key=***)"


def _read_file(path: Path) -> dict[str, object]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"{path} is not valid JSON (line {exc.lineno}); fix or remove it"
        ) from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} must hold a JSON object")
    return data


def _str_or_none(value: object, name: str, source: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} in {source} must be a string")
    return value.strip() or None


def load_config(
    api_key: str | None = None,
    base_url: str | None = None,
    team_id: str | None = None,
) -> Config:
    """Resolve the configuration; raise :class:`ConfigurationError` if no API key is found."""
    for name, value in (("api_key", api_key), ("base_url", base_url), ("team_id", team_id)):
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(f"{name} must be a string, got {type(value).__name__}")
    path = config_file_path()
    file_data: dict[str, object] | None = None

    def from_file(key: str) -> str | None:
        nonlocal file_data
        if file_data is None:
            file_data = _read_file(path)
        return _str_or_none(file_data.get(key), key, str(path))

    env = os.environ
    key = (
        (api_key or "").strip() or (env.get("PRIME_API_KEY") or "").strip() or from_file("api_key")
    )
    if not key:
        raise ConfigurationError(
            'no API key: set the PRIME_API_KEY environment variable, add "api_key" to '
            f"{path}, or pass api_key=..."
        )
    url = (
        (base_url or "").strip()
        or (env.get("PRIME_API_BASE_URL") or "").strip()
        or (env.get("PRIME_BASE_URL") or "").strip()
        or from_file("base_url")
        or DEFAULT_BASE_URL
    )
    team = (
        (team_id or "").strip() or (env.get("PRIME_TEAM_ID") or "").strip() or from_file("team_id")
    )
    return Config(api_key=key, base_url=normalize_base_url(url), team_id=team or None)
