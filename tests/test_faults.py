"""Hostile and broken servers on loopback: a stand-in API (tests/http_stub.py) pointing the
client at SSH endpoints that stall, so every failure must end typed and in time."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
from conftest import SECRET_KEY
from http_stub import Answer, StubServer

from sshbridge import SandboxSSH, SSHConnectError


class StallServer:
    """Accepts TCP connections, records what the client sent first, optionally sends an
    SSH banner, and then says nothing more until closed."""

    def __init__(self, banner: bytes | None) -> None:
        self.banner = banner
        self.first_bytes: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            if self.banner:
                conn.sendall(self.banner)
            conn.settimeout(1.0)
            try:
                self.first_bytes.append(conn.recv(4096))
            except OSError:
                self.first_bytes.append(b"")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def vm_session(port: int, **over: Any) -> dict[str, Any]:
    body = {
        "session_id": "sess_stall",
        "sandbox_id": "sbx_1",
        "host": "127.0.0.1",
        "port": port,
        "expires_at": "2099-01-01T00:00:00Z",
        "ttl_seconds": 900,
    }
    body.update(over)
    return body


@pytest.mark.parametrize(
    "banner", [None, b"SSH-2.0-Stall_1.0\r\n"], ids=["silent", "banner-then-silence"]
)
def test_a_stalled_handshake_is_retried_until_connect_timeout(
    stub: StubServer, banner: bytes | None
) -> None:
    stall = StallServer(banner)
    try:
        stub.queue(Answer(200, vm_session(stall.port)))
        stub.default = Answer(200, {"ok": True})  # the DELETE (and the GET that explains)
        stub.queue(Answer(200, {"id": "sbx_1", "status": "RUNNING"}))
        shell = SandboxSSH(
            "sbx_1", api_key=SECRET_KEY, base_url=stub.base_url, connect_timeout=2.5
        )
        start = time.monotonic()
        with pytest.raises(SSHConnectError, match="within") as info:
            shell.connect()
        took = time.monotonic() - start
        shell.close()
        assert 2.0 <= took < 15, took
        assert "sandbox sbx_1" in str(info.value)
        # Every attempt began with the session preamble, and more than one was made.
        assert len(stall.first_bytes) >= 2
        assert all(b.startswith(b"PRIME-SSH-SESSION sess_stall\n") for b in stall.first_bytes)
        methods = [(s.method, s.path.split("?")[0]) for s in stub.seen]
        assert ("DELETE", "/api/v1/sandbox/sbx_1/ssh-session/sess_stall") in methods
    finally:
        stall.close()


def test_a_library_does_not_print_when_the_application_configured_no_logging(
    tmp_path: Any,
) -> None:
    """paramiko's "Socket exception: Connection reset by peer" (and sshbridge's own
    warnings) must not reach stderr through Python's last-resort handler."""
    script = tmp_path / "app.py"
    script.write_text(
        "import time\n"
        "from sshbridge import SandboxSSH\n"
        "from sshbridge.emulator import Emulator\n"
        "with Emulator(contract='sidecar') as emu:\n"
        "    sid = emu.create_sandbox()\n"
        "    with SandboxSSH(sid, api_key=emu.api_key, base_url=emu.base_url) as shell:\n"
        "        shell.run('true')\n"
        "        s = shell.session\n"
        "        emu.cut_connections(s.session_id)\n"
        "        time.sleep(0.5)\n"
        "        assert shell.run('echo back').stdout == 'back\\n'\n"
        "        emu.fail_next(5, 500, endpoint='close_session')\n"  # a warning on close
        "print('done')\n"
    )
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, timeout=60, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "done"
    assert r.stderr == "", r.stderr
