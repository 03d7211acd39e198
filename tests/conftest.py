from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from http_stub import StubServer

from sshbridge.emulator import Emulator

SECRET_KEY = "pit_secret_api_key_0123456789abcdef"


@pytest.fixture(autouse=True)
def isolated_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """No test sees the developer's PRIME_* variables or ~/.prime (config.json, contexts)."""
    home = tmp_path_factory.mktemp("home")
    for name in (
        "PRIME_API_KEY",
        "PRIME_API_BASE_URL",
        "PRIME_BASE_URL",
        "PRIME_TEAM_ID",
        "PRIME_CONTEXT",
        "PRIME_USER_ID",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer()
    yield server
    server.stop()


# Both session contracts: B ("vm", the provider's service today) and A ("sidecar").
CONTRACTS = ("vm", "sidecar")


@pytest.fixture(params=CONTRACTS)
def contract(request: pytest.FixtureRequest) -> str:
    """The session contract the emulator speaks; override with
    ``@pytest.mark.parametrize("contract", ["vm"])`` for a test that needs only one."""
    return str(request.param)


@pytest.fixture
def emu(contract: str) -> Iterator[Emulator]:
    """An emulator on loopback; whatever a test did, every session must end closed."""
    with Emulator(api_key=SECRET_KEY, contract=contract) as emulator:
        yield emulator
        assert emulator.open_sessions() == [], "a session was left open"
