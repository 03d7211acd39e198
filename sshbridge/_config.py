"""Configuration, resolved as the provider's own SDK does.

Order (first wins), per setting:

1. explicit arguments;
2. environment ``PRIME_API_KEY``; ``PRIME_API_BASE_URL`` then ``PRIME_BASE_URL``;
   ``PRIME_TEAM_ID`` (set but empty means no team);
3. the JSON file ``~/.prime/config.json`` (keys ``api_key``, ``base_url``, ``team_id``),
   overlaid by ``~/.prime/environments/NAME.json`` when ``PRIME_CONTEXT=NAME`` (a key
   present there, even null, replaces the file's); ``PRIME_CONTEXT=production`` instead
   selects the default URL and no team;
4. the default URL.

:func:`describe_config` reports where each setting came from, never the key itself.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ._exceptions import ConfigurationError, InvalidArgument

DEFAULT_BASE_URL = "https://api.primeintellect.ai"

CONTEXT_VAR = "PRIME_CONTEXT"
PRODUCTION_CONTEXT = "production"
_CONTEXT_NAME = re.compile(r"[A-Za-z0-9_-]+")
_KEYS = ("api_key", "base_url", "team_id")

SOURCE_ARGUMENT = "argument"
SOURCE_DEFAULT = "default"


def config_file_path() -> Path:
    return Path.home() / ".prime" / "config.json"


def environments_dir() -> Path:
    return Path.home() / ".prime" / "environments"


def is_production_context(name: str) -> bool:
    # The SDK compares with casefold(): "Production" is the built-in context too.
    return name.casefold() == PRODUCTION_CONTEXT


def context_file_path(name: str) -> Path:
    """``~/.prime/environments/NAME.json``; an invalid NAME is a :class:`ConfigurationError`."""
    # The name becomes a file name: the pattern rules out separators and "..".
    if _CONTEXT_NAME.fullmatch(name) is None:
        raise ConfigurationError(
            f"{CONTEXT_VAR}={name!r} is not a valid context name (letters, digits, '_' and "
            f"'-' only); fix or unset {CONTEXT_VAR}"
        )
    return environments_dir() / f"{name}.json"


def _unsafe_character(text: str) -> str | None:
    """Describe the first character unfit for an HTTP header value, or None."""
    for ch in text:
        if ch in "\r\n":
            return "a line break"
        if ch == "\t":
            return "a tab"
        if ch == "\x00":
            return "a NUL character"
        if ch.isspace():
            return "whitespace"
        category = unicodedata.category(ch)
        if category == "Cc":
            return "a control character"
        if category == "Cf":
            return "an invisible formatting character"
        if category == "Cs":
            # os.environ turns bytes that are not UTF-8 into lone surrogates.
            return "bytes that are not valid UTF-8"
    return None


def normalize_base_url(url: str) -> str:
    """Strip whitespace, trailing slashes and a trailing ``/api/v1``; require http(s)."""
    if not isinstance(url, str):
        raise InvalidArgument(f"base_url must be a string, got {type(url).__name__}")
    cleaned = url.strip().rstrip("/")
    # urlsplit silently drops tabs and newlines, so check before parsing.
    problem = _unsafe_character(cleaned)
    if problem is not None:
        raise InvalidArgument(f"base_url {url!r} contains {problem}; expected a plain URL")
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


@dataclass(frozen=True)
class ConfigSources:
    """Where each setting came from; never holds the key itself.

    Each field is one of ``"argument"``, ``"<VAR> environment variable"``,
    ``"~/.prime/environments/NAME.json"``, ``"PRIME_CONTEXT=production"``,
    ``"~/.prime/config.json"`` or ``"default"``. ``api_key`` is None when no key was found.
    ``context`` is the ``PRIME_CONTEXT`` name in effect, if any.
    """

    api_key: str | None
    base_url: str
    team_id: str
    context: str | None = None


def _display(path: Path) -> str:
    # Source labels are shown to people; "~" is shorter and the same on every machine.
    try:
        return "~/" + path.relative_to(Path.home()).as_posix()
    except ValueError:
        return str(path)


def _env_label(name: str) -> str:
    return f"{name} environment variable"


def _read_json(path: Path, *, missing_ok: bool) -> dict[str, object] | None:
    """The JSON object in ``path``; None if it is absent and ``missing_ok``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"{path} is not valid UTF-8; fix or remove it") from None
    if not text.strip():
        if missing_ok:
            return {}
        raise ConfigurationError(f"{path} is empty; it must hold a JSON object")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        line = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigurationError(f"{path} is not valid JSON{line}; fix or remove it") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} must hold a JSON object")
    return data


def _str_or_none(value: object, name: str, source: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} in {source} must be a string")
    return value.strip() or None


@dataclass
class _FileValue:
    value: str | None
    label: str  # for ConfigSources
    where: str  # for error messages: the full path, or the context selector
    decided: bool  # a layer set this key (even to nothing), so nothing below applies


class _FileLayer:
    """``config.json`` overlaid by the ``PRIME_CONTEXT`` selection.

    The context is checked at once, as the SDK does, so a bad selector is an error even
    when other sources supply everything; ``config.json`` is read only when needed.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.config_path = config_file_path()
        self.context = env.get(CONTEXT_VAR) or None
        self.context_path: Path | None = None
        self._overlay: dict[str, object] = {}
        self._overlay_label = ""
        self._overlay_where = ""
        self._config: dict[str, object] | None = None
        if self.context is None:
            return
        if is_production_context(self.context):
            self._overlay = {"base_url": DEFAULT_BASE_URL, "team_id": None}
            self._overlay_label = self._overlay_where = f"{CONTEXT_VAR}={PRODUCTION_CONTEXT}"
            return
        path = context_file_path(self.context)
        try:
            data = _read_json(path, missing_ok=False)
        except FileNotFoundError:
            raise ConfigurationError(self._missing_message(path)) from None
        assert data is not None
        self.context_path = path
        self._overlay = {k: data[k] for k in _KEYS if k in data}
        self._overlay_label = _display(path)
        self._overlay_where = str(path)

    def _missing_message(self, path: Path) -> str:
        try:
            names = sorted(
                p.stem
                for p in environments_dir().glob("*.json")
                if _CONTEXT_NAME.fullmatch(p.stem) and not is_production_context(p.stem)
            )
        except OSError:
            names = []
        saved = ", ".join(names) if names else "none"
        return (
            f"{CONTEXT_VAR}={self.context} selects {path}, which does not exist; create it "
            f"(prime config save {self.context}) or unset {CONTEXT_VAR} "
            f"(saved contexts: {saved}; built in: {PRODUCTION_CONTEXT})"
        )

    def overrides(self, key: str) -> bool:
        return key in self._overlay

    @property
    def overlay_where(self) -> str:
        return self._overlay_where

    def get(self, key: str) -> _FileValue:
        if key in self._overlay:
            value = _str_or_none(self._overlay[key], key, self._overlay_where)
            return _FileValue(value, self._overlay_label, self._overlay_where, True)
        if self._config is None:
            self._config = _read_json(self.config_path, missing_ok=True) or {}
        where = str(self.config_path)
        value = _str_or_none(self._config.get(key), key, where)
        return _FileValue(value, _display(self.config_path), where, value is not None)


def _check_key(key: str, where: str) -> None:
    problem = _unsafe_character(key)
    if problem is not None:
        # Name the source only: any fragment of a key is a secret.
        raise ConfigurationError(
            f"the API key from {where} contains {problem} inside it; an API key is one "
            "line with no spaces or control characters, so copy it again"
        )


@dataclass(frozen=True)
class _Resolved:
    api_key: str | None
    base_url: str
    team_id: str | None
    sources: ConfigSources
    files: _FileLayer


def _resolve(
    api_key: str | None, base_url: str | None, team_id: str | None, env: Mapping[str, str]
) -> _Resolved:
    for name, value in (("api_key", api_key), ("base_url", base_url), ("team_id", team_id)):
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(f"{name} must be a string, got {type(value).__name__}")
    files = _FileLayer(env)

    key: str | None
    key_label: str | None
    if api_key is not None and api_key.strip():
        key, key_label, key_where = api_key.strip(), SOURCE_ARGUMENT, "the api_key argument"
    elif (env.get("PRIME_API_KEY") or "").strip():
        key = env["PRIME_API_KEY"].strip()
        key_label = _env_label("PRIME_API_KEY")
        key_where = f"the {key_label}"
    else:
        found = files.get("api_key")
        key, key_where = found.value, found.where
        key_label = found.label if key is not None else None
    if key is not None:
        _check_key(key, key_where)

    url: str | None = None
    url_label = url_where = SOURCE_DEFAULT
    if base_url is not None and base_url.strip():
        url, url_label = base_url, SOURCE_ARGUMENT
    else:
        for var in ("PRIME_API_BASE_URL", "PRIME_BASE_URL"):
            if (env.get(var) or "").strip():
                url, url_label = env[var], _env_label(var)
                url_where = f"the {url_label}"
                break
        else:
            found = files.get("base_url")
            if found.value is not None:
                url, url_label, url_where = found.value, found.label, found.where
    try:
        normalized = normalize_base_url(url if url is not None else DEFAULT_BASE_URL)
    except InvalidArgument as exc:
        if url_label == SOURCE_ARGUMENT:
            raise
        raise ConfigurationError(f"{exc} (from {url_where}); fix or remove it") from None

    team: str | None
    # A set-but-empty team (argument or PRIME_TEAM_ID) means "no team": the SDK does not
    # fall back to the file then, and an empty teamId must never reach the wire.
    if team_id is not None:
        team, team_label = team_id.strip() or None, SOURCE_ARGUMENT
    elif "PRIME_TEAM_ID" in env:
        team, team_label = env["PRIME_TEAM_ID"].strip() or None, _env_label("PRIME_TEAM_ID")
    else:
        found = files.get("team_id")
        team = found.value
        team_label = found.label if found.decided else SOURCE_DEFAULT

    sources = ConfigSources(
        api_key=key_label, base_url=url_label, team_id=team_label, context=files.context
    )
    return _Resolved(key, normalized, team, sources, files)


def _no_key_message(files: _FileLayer) -> str:
    if files.overrides("api_key"):
        where = f'{files.overlay_where} (selected by {CONTEXT_VAR}) sets an empty "api_key"'
        return (
            f"no API key: {where}; put the key there, set the PRIME_API_KEY environment "
            "variable, or pass api_key=..."
        )
    targets = str(files.config_path)
    if files.context_path is not None:
        targets = f"{files.context_path} (selected by {CONTEXT_VAR}) or {targets}"
    return (
        'no API key: set the PRIME_API_KEY environment variable, add "api_key" to '
        f"{targets}, or pass api_key=..."
    )


def load_config_with_sources(
    api_key: str | None = None,
    base_url: str | None = None,
    team_id: str | None = None,
) -> tuple[Config, ConfigSources]:
    """Like :func:`load_config`, also saying where each setting came from."""
    resolved = _resolve(api_key, base_url, team_id, os.environ)
    if resolved.api_key is None:
        raise ConfigurationError(_no_key_message(resolved.files))
    config = Config(api_key=resolved.api_key, base_url=resolved.base_url, team_id=resolved.team_id)
    return config, resolved.sources


def load_config(
    api_key: str | None = None,
    base_url: str | None = None,
    team_id: str | None = None,
) -> Config:
    """Resolve the configuration; raise :class:`ConfigurationError` if no API key is found.

    An empty ``team_id`` argument means no team (it does not fall back further); an empty
    ``api_key`` or ``base_url`` argument does fall back.
    """
    return load_config_with_sources(api_key, base_url, team_id)[0]


def describe_config(
    api_key: str | None = None,
    base_url: str | None = None,
    team_id: str | None = None,
) -> ConfigSources:
    """Where each setting would come from; ``api_key`` is None when no key is found.

    Raises :class:`ConfigurationError` for everything :func:`load_config` does except a
    missing key, so a diagnostic can report that itself.
    """
    return _resolve(api_key, base_url, team_id, os.environ).sources
