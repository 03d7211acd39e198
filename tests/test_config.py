"""Configuration resolution, as the provider's own tools do it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sshbridge import ConfigurationError, InvalidArgument, load_config
from sshbridge._config import (
    DEFAULT_BASE_URL,
    ConfigSources,
    describe_config,
    load_config_with_sources,
    normalize_base_url,
)


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


# -- PRIME_CONTEXT -----------------------------------------------------------------------


def write_context(home: Path, name: str, data: object) -> Path:
    path = home / ".prime" / "environments" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_context_overrides_file(isolated_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(
        isolated_config,
        {"api_key": "file-key", "base_url": "https://file.example", "team_id": "team-file"},
    )
    write_context(isolated_config, "dev", {"base_url": "https://dev.example/api/v1"})
    monkeypatch.setenv("PRIME_CONTEXT", "dev")
    cfg, sources = load_config_with_sources()
    # Keys the context lacks still come from config.json.
    assert (cfg.api_key, cfg.base_url, cfg.team_id) == (
        "file-key",
        "https://dev.example",
        "team-file",
    )
    assert sources == ConfigSources(
        api_key="~/.prime/config.json",
        base_url="~/.prime/environments/dev.json",
        team_id="~/.prime/config.json",
        context="dev",
    )
    write_context(isolated_config, "dev", {"api_key": "dev-key", "base_url": None, "team_id": None})
    cfg, sources = load_config_with_sources()
    # A key present in the context, even null, replaces the file's (dict.update in the SDK).
    assert (cfg.api_key, cfg.base_url, cfg.team_id) == ("dev-key", DEFAULT_BASE_URL, None)
    assert sources.api_key == "~/.prime/environments/dev.json"
    assert sources.base_url == "default"
    assert sources.team_id == "~/.prime/environments/dev.json"


def test_context_works_without_config_file(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_context(isolated_config, "staging", {"api_key": "k", "team_id": "t"})
    monkeypatch.setenv("PRIME_CONTEXT", "staging")
    cfg = load_config()
    assert (cfg.api_key, cfg.base_url, cfg.team_id) == ("k", DEFAULT_BASE_URL, "t")


def test_env_and_arguments_beat_context(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_context(
        isolated_config,
        "dev",
        {"api_key": "dev-key", "base_url": "https://dev.example", "team_id": "team-dev"},
    )
    monkeypatch.setenv("PRIME_CONTEXT", "dev")
    monkeypatch.setenv("PRIME_API_KEY", "env-key")
    monkeypatch.setenv("PRIME_BASE_URL", "https://env.example")
    monkeypatch.setenv("PRIME_TEAM_ID", "team-env")
    cfg = load_config()
    assert (cfg.api_key, cfg.base_url, cfg.team_id) == (
        "env-key",
        "https://env.example",
        "team-env",
    )
    cfg = load_config(api_key="arg-key", base_url="https://arg.example", team_id="team-arg")
    assert (cfg.api_key, cfg.base_url, cfg.team_id) == (
        "arg-key",
        "https://arg.example",
        "team-arg",
    )


@pytest.mark.parametrize("name", ["production", "Production", "PRODUCTION"])
def test_production_context(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    write_config(
        isolated_config,
        {"api_key": "file-key", "base_url": "https://file.example", "team_id": "team-file"},
    )
    # The built-in context ignores a file of that name, as the SDK does.
    write_context(isolated_config, "production", {"api_key": "x", "base_url": "https://x.example"})
    monkeypatch.setenv("PRIME_CONTEXT", name)
    cfg, sources = load_config_with_sources()
    assert (cfg.api_key, cfg.base_url, cfg.team_id) == ("file-key", DEFAULT_BASE_URL, None)
    assert sources == ConfigSources(
        api_key="~/.prime/config.json",
        base_url="PRIME_CONTEXT=production",
        team_id="PRIME_CONTEXT=production",
        context=name,
    )
    # Environment variables still win over it.
    monkeypatch.setenv("PRIME_API_BASE_URL", "https://env.example")
    monkeypatch.setenv("PRIME_TEAM_ID", "team-env")
    cfg = load_config()
    assert (cfg.base_url, cfg.team_id) == ("https://env.example", "team-env")


def test_missing_context_file_names_path_and_variable(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(isolated_config, {"api_key": "file-key"})
    write_context(isolated_config, "other", {})
    monkeypatch.setenv("PRIME_CONTEXT", "dev")
    # Checked even when the environment supplies every setting, as the SDK does.
    monkeypatch.setenv("PRIME_API_KEY", "env-key")
    for call in (load_config, describe_config):
        with pytest.raises(ConfigurationError) as info:
            call()
        msg = str(info.value)
        assert str(isolated_config / ".prime" / "environments" / "dev.json") in msg
        assert "PRIME_CONTEXT" in msg
        assert "other" in msg  # lists the saved contexts


@pytest.mark.parametrize("name", ["../config", "a/b", "dev.json", "dev ", " ", "dév", "a\nb"])
def test_invalid_context_name(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    write_config(isolated_config, {"api_key": "file-key"})
    monkeypatch.setenv("PRIME_CONTEXT", name)
    with pytest.raises(ConfigurationError, match="not a valid context name"):
        load_config()


def test_empty_context_is_no_context(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(isolated_config, {"api_key": "file-key"})
    monkeypatch.setenv("PRIME_CONTEXT", "")
    cfg, sources = load_config_with_sources()
    assert cfg.api_key == "file-key"
    assert sources.context is None


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2]", "must hold a JSON object"),
        ('"dev"', "must hold a JSON object"),
        ("{not json", "not valid JSON"),
        ("", "is empty"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        ('{"team_id": 5}', "team_id in"),
    ],
)
def test_bad_context_file_names_path(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch, content: str | bytes, match: str
) -> None:
    path = write_context(isolated_config, "dev", {})
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    monkeypatch.setenv("PRIME_CONTEXT", "dev")
    with pytest.raises(ConfigurationError, match=match) as info:
        load_config(api_key="k")
    assert str(path) in str(info.value)


def test_unreadable_context_file_names_path(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A directory in the file's place fails to read even as root.
    path = isolated_config / ".prime" / "environments" / "dev.json"
    path.mkdir(parents=True)
    monkeypatch.setenv("PRIME_CONTEXT", "dev")
    with pytest.raises(ConfigurationError, match="cannot read") as info:
        load_config(api_key="k")
    assert str(path) in str(info.value)


def test_context_with_empty_key_explains(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(isolated_config, {"api_key": "file-key"})
    path = write_context(isolated_config, "dev", {"api_key": ""})
    monkeypatch.setenv("PRIME_CONTEXT", "dev")
    with pytest.raises(ConfigurationError) as info:
        load_config()
    msg = str(info.value)
    assert str(path) in msg and "PRIME_API_KEY" in msg
    assert describe_config().api_key is None
    # Without a key anywhere, the message offers both files.
    write_context(isolated_config, "dev", {})
    write_config(isolated_config, {})
    with pytest.raises(ConfigurationError) as info:
        load_config()
    assert str(path) in str(info.value)
    assert str(isolated_config / ".prime" / "config.json") in str(info.value)


# -- team ----------------------------------------------------------------------------------


def test_empty_team_env_means_no_team(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(isolated_config, {"api_key": "k", "team_id": "team-file"})
    assert load_config().team_id == "team-file"
    for empty in ("", "  "):
        monkeypatch.setenv("PRIME_TEAM_ID", empty)
        cfg, sources = load_config_with_sources()
        assert cfg.team_id is None
        assert sources.team_id == "PRIME_TEAM_ID environment variable"
    # The same beats a context's team.
    write_context(isolated_config, "dev", {"team_id": "team-dev"})
    monkeypatch.setenv("PRIME_CONTEXT", "dev")
    assert load_config().team_id is None


def test_empty_team_argument_means_no_team(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(isolated_config, {"api_key": "k", "team_id": "team-file"})
    monkeypatch.setenv("PRIME_TEAM_ID", "team-env")
    cfg, sources = load_config_with_sources(team_id="")
    assert cfg.team_id is None
    assert sources.team_id == "argument"
    assert load_config(team_id=None).team_id == "team-env"


# -- API key and URL hygiene ----------------------------------------------------------------

KEY_HEAD = "pit_Zq8Xv3Lm"
KEY_TAIL = "Rt2Wy7Kp4Nd"
BAD_CHARS = ["\n", "\r", "\t", "\x00", "\x7f", "\x1b", "\x85", "\x9b", " ", "\u00a0", "\u200b"]


def assert_no_key_part(message: str) -> None:
    for part in (KEY_HEAD, KEY_TAIL, KEY_HEAD[-6:], KEY_TAIL[:6]):
        assert part not in message


@pytest.mark.parametrize("char", BAD_CHARS)
def test_key_with_control_character_from_argument(char: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_config(api_key=KEY_HEAD + char + KEY_TAIL)
    msg = str(info.value)
    assert "argument" in msg
    assert_no_key_part(msg)
    assert_no_key_part(repr(info.value))
    assert info.value.__cause__ is None and info.value.__context__ is None


# The environment cannot hold NUL.
@pytest.mark.parametrize("char", [c for c in BAD_CHARS if c != "\x00"])
def test_key_with_control_character_from_env(monkeypatch: pytest.MonkeyPatch, char: str) -> None:
    monkeypatch.setenv("PRIME_API_KEY", KEY_HEAD + char + KEY_TAIL)
    with pytest.raises(ConfigurationError) as info:
        describe_config()
    msg = str(info.value)
    assert "PRIME_API_KEY" in msg
    assert_no_key_part(msg)


def test_key_with_undecodable_bytes_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # What os.environ holds for a value that is not UTF-8.
    monkeypatch.setenv("PRIME_API_KEY", KEY_HEAD + "\udcff" + KEY_TAIL)
    with pytest.raises(ConfigurationError, match="not valid UTF-8") as info:
        load_config()
    assert_no_key_part(str(info.value))


@pytest.mark.parametrize("char", BAD_CHARS)
@pytest.mark.parametrize("where", ["config", "context"])
def test_key_with_control_character_from_files(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch, char: str, where: str
) -> None:
    data = {"api_key": KEY_HEAD + char + KEY_TAIL}
    if where == "config":
        path = write_config(isolated_config, data)
    else:
        path = write_context(isolated_config, "dev", data)
        monkeypatch.setenv("PRIME_CONTEXT", "dev")
    with pytest.raises(ConfigurationError) as info:
        load_config()
    msg = str(info.value)
    assert str(path) in msg
    assert_no_key_part(msg)


def test_surrounding_whitespace_still_stripped(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_config(api_key="  arg-key\n").api_key == "arg-key"
    monkeypatch.setenv("PRIME_API_KEY", "\tenv-key \r\n")
    assert load_config().api_key == "env-key"
    monkeypatch.delenv("PRIME_API_KEY")
    write_config(isolated_config, {"api_key": "file-key\n"})
    assert load_config().api_key == "file-key"


def test_base_url_with_control_characters(
    isolated_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # urlsplit alone would drop the newline and accept this.
    with pytest.raises(InvalidArgument, match="line break"):
        load_config(api_key="k", base_url="https://api.exa\nmple.com")
    with pytest.raises(InvalidArgument, match="control character"):
        normalize_base_url("https://api.example.com\x1b[0m/x")
    monkeypatch.setenv("PRIME_API_BASE_URL", "https://api.example.com/\x7f")
    with pytest.raises(ConfigurationError, match="PRIME_API_BASE_URL"):
        load_config(api_key="k")
    monkeypatch.delenv("PRIME_API_BASE_URL")
    path = write_config(isolated_config, {"api_key": "k", "base_url": "https://a .example"})
    with pytest.raises(ConfigurationError, match="whitespace") as info:
        load_config()
    assert str(path) in str(info.value)
    assert normalize_base_url(" https://api.example.com/api/v1/\n") == "https://api.example.com"


# -- sources -------------------------------------------------------------------------------


def test_sources_reported(isolated_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert describe_config() == ConfigSources(
        api_key=None, base_url="default", team_id="default", context=None
    )
    write_config(
        isolated_config,
        {"api_key": "file-key", "base_url": "https://file.example", "team_id": "team-file"},
    )
    assert describe_config() == ConfigSources(
        api_key="~/.prime/config.json",
        base_url="~/.prime/config.json",
        team_id="~/.prime/config.json",
    )
    monkeypatch.setenv("PRIME_API_KEY", "env-key")
    monkeypatch.setenv("PRIME_BASE_URL", "https://env.example")
    monkeypatch.setenv("PRIME_TEAM_ID", "team-env")
    assert describe_config() == ConfigSources(
        api_key="PRIME_API_KEY environment variable",
        base_url="PRIME_BASE_URL environment variable",
        team_id="PRIME_TEAM_ID environment variable",
    )
    monkeypatch.setenv("PRIME_API_BASE_URL", "https://env1.example")
    assert describe_config().base_url == "PRIME_API_BASE_URL environment variable"
    sources = describe_config(api_key="arg-key", base_url="https://arg.example", team_id="t")
    assert sources == ConfigSources(api_key="argument", base_url="argument", team_id="argument")
    # Blank arguments fall through, as before.
    assert describe_config(api_key=" ", base_url="").api_key == "PRIME_API_KEY environment variable"
    for value in ("file-key", "env-key", "arg-key"):
        assert value not in repr(sources)
    cfg = load_config(api_key="arg-key")
    assert "arg-key" not in repr(cfg) and "arg-key" not in str(cfg)
