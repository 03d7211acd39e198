"""Configuration resolution, as the provider's own tools do it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sshbridge import ConfigurationError, InvalidArgument, load_config
from sshbridge._config import DEFAULT_BASE_URL


def write_config(home: Path, data: object) -> Path:
    path = home / ".prime" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_no_key_names_variable_and_file(isolated_config: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_config()
    msg = str(info.value)
    assert "PRIME_API_KEY" in msg
    assert str(isolated_config / ".prime" / "config.json") in msg


def test_env_wins_over_file_and_args_win_over_env(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(
        isolated_config,
        {"api_key": "file-key", "base_url": "https://file.example", "team_id": "team-file"},
    )
    assert load_config().api_key == "file-key"
    assert load_config().base_url == "https://file.example"
    assert load_config().team_id == "team-file"
    monkeypatch.setenv("PRIME_API_KEY", "env-key")
    monkeypatch.setenv("PRIME_BASE_URL", "https://env2.example")
    monkeypatch.setenv("PRIME_TEAM_ID", "team-env")
    cfg = load_config()
    assert (cfg.api_key, cfg.base_url, cfg.team_id) == (
        "env-key",
        "https://env2.example",
        "team-env",
    )
    # PRIME_API_BASE_URL is preferred to PRIME_BASE_URL.
    monkeypatch.setenv("PRIME_API_BASE_URL", "https://env1.example")
    assert load_config().base_url == "https://env1.example"
    cfg = load_config(api_key="arg-key", base_url="http://127.0.0.1:9", team_id="t")
    assert (cfg.api_key, cfg.base_url, cfg.team_id) == ("arg-key", "http://127.0.0.1:9", "t")


def test_default_url_and_api_v1_suffix_stripped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIME_API_KEY", "k")
    assert load_config().base_url == DEFAULT_BASE_URL
    monkeypatch.setenv("PRIME_API_BASE_URL", "https://api.example.com/api/v1/")
    assert load_config().base_url == "https://api.example.com"


def test_repr_hides_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIME_API_KEY", "very-secret-key-123")
    cfg = load_config()
    assert "very-secret-key-123" not in repr(cfg)
    assert "very-secret-key-123" not in str(cfg)


@pytest.mark.parametrize("url", ["ftp://x", "api.example.com", "http://", "https://x?y=1"])
def test_bad_base_url(url: str) -> None:
    with pytest.raises(InvalidArgument):
        load_config(api_key="k", base_url=url)


def test_bad_config_file(isolated_config: Path) -> None:
    path = write_config(isolated_config, {})
    path.write_text("{not json")
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        load_config()
    write_config(isolated_config, ["a"])
    with pytest.raises(ConfigurationError, match="JSON object"):
        load_config()
    write_config(isolated_config, {"api_key": 12})
    with pytest.raises(ConfigurationError, match="api_key"):
        load_config()


def test_non_string_argument() -> None:
    with pytest.raises(InvalidArgument):
        load_config(api_key=123)  # type: ignore[arg-type]
