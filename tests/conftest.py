from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
# Tests of what differs between them (sessions, connections, renewal, explanations) are
# marked ``contracts`` and run in both; the rest (what a command or a transfer does once
# connected) runs on contract B only, so the suite stays fast.
CONTRACTS = ("vm", "sidecar")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "contracts: run in both session contracts")
    config.addinivalue_line("markers", "one_contract: contract B only, inside a contracts module")
    config.addinivalue_line("markers", "slow: a soak or scale test (still runs by default)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        sidecar = callspec is not None and callspec.params.get("contract") == "sidecar"
        wanted = item.get_closest_marker("contracts") is not None
        excluded = item.get_closest_marker("one_contract") is not None
        (dropped if sidecar and (not wanted or excluded) else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(params=CONTRACTS)
def contract(request: pytest.FixtureRequest) -> str:
    """The session contract the emulator speaks; override with
    ``@pytest.mark.parametrize("contract", ["vm"])`` for a test that needs only one."""
    return str(request.param)


@contextlib.contextmanager
def running_emulator(*, check_closed: bool = False, **kwargs: Any) -> Iterator[Emulator]:
    """An :class:`Emulator` on loopback (``kwargs`` as its constructor takes them), stopped
    on exit; with ``check_closed``, whatever the body did, every session must end closed.
    The one place tests build an emulator for a fixture."""
    with Emulator(**kwargs) as emulator:
        yield emulator
        if check_closed:
            assert emulator.open_sessions() == [], "a session was left open"


@pytest.fixture
def emu(contract: str) -> Iterator[Emulator]:
    """An emulator on loopback; whatever a test did, every session must end closed."""
    with running_emulator(api_key=SECRET_KEY, contract=contract, check_closed=True) as emulator:
        yield emulator
