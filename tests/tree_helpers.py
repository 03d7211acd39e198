"""Shared setup for the tests that drive the transfer engines over a Link built directly
(test_transfer.py, test_bulk.py, test_trees.py). A helper module, not a test module.

The servers are throwaway OpenSSH sshds on loopback (tests/sshd_server.py), so the
"remote" paths are local paths too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import SecretStr
from sshd_server import SSHDServer, start_sshd

from sshbridge._hostkeys import PinFirstHostKey
from sshbridge._link import Link
from sshbridge._models import SidecarSSHSession
from sshbridge._transport import generate_key


def link_to(server: SSHDServer, sandbox_id: str = "sbx") -> Link:
    """A connected Link to ``server`` with a fresh authorized key (no API, no gateway)."""
    key = generate_key()
    server.add_authorized_key(key.public_line)
    session = SidecarSSHSession(
        session_id=server.username,
        exposure_id="e",
        sandbox_id=sandbox_id,
        host=server.host,
        port=server.port,
        external_endpoint="x",
        expires_at=datetime.now(timezone.utc) + timedelta(hours=1),
        ttl_seconds=3600,
        gateway_url="http://x/",
        user_ns="u",
        job_id="j",
        token=SecretStr("t"),
    )
    link = Link(
        session,
        key,
        sandbox_id=sandbox_id,
        policy=PinFirstHostKey(),
        expires_monotonic=time.monotonic() + 3600,
        keepalive=15,
        connect_timeout=10,
        max_connections=4,
    )
    link.connect()
    return link


def serve_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHDServer]:
    """Body of a module's ``sshd`` fixture: a stock sshd (MaxSessions 10, as shipped),
    stopped when the fixture is torn down."""
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def serve_link(server: SSHDServer, sandbox_id: str = "sbx") -> Iterator[Link]:
    """Body of a ``link`` fixture: a Link to ``server``, closed on teardown."""
    lk = link_to(server, sandbox_id)
    yield lk
    lk.close()


class Boom(Exception):
    """Raised by a progress callback to stop a transfer midway."""


def raise_after(limit: int) -> Callable[[int, int], None]:
    """A progress callback that raises Boom once ``limit`` bytes are done."""

    def cb(done: int, total: int) -> None:
        if done >= limit:
            raise Boom(f"stop at {done}")

    return cb
