"""Helpers shared by the tests that drive the emulator."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import paramiko

from sshbridge.emulator import Emulator


def opts(emu: Emulator) -> dict[str, Any]:
    return {"api_key": emu.api_key, "base_url": emu.base_url}


def library_threads() -> list[threading.Thread]:
    """Threads the library (or paramiko on its behalf) runs; the emulator's excluded."""
    return [
        t
        for t in threading.enumerate()
        if (t.name.startswith("sshbridge") and not t.name.startswith("sshbridge-emulator"))
        or isinstance(t, paramiko.Transport)
    ]


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    what: str | Callable[[], object] = "the condition",
    interval: float = 0.02,
) -> Literal[True]:
    """Poll ``predicate`` until it is true; True, or AssertionError after ``timeout`` s.

    ``what`` names the condition in the failure (a callable is called then, for details
    known only at that moment). The one way tests wait for something to happen."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {detail}")
        time.sleep(interval)
    return True


def settle_threads(timeout: float = 5.0) -> list[threading.Thread]:
    """Library threads still alive after waiting up to ``timeout`` for them to end."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not library_threads(), timeout, "library threads to end", 0.05)
    return library_threads()


def alive(pid: int) -> bool:
    """True while a local process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def pids_with(needle: str) -> list[int]:
    """Live local processes whose command line contains ``needle``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if needle.encode() in cmdline and alive(int(entry)):
            found.append(int(entry))
    return found


# -- the vm contract on the wire: raw sockets and paramiko, no sshbridge code --------------

PREAMBLE = "PRIME-SSH-SESSION {}\n"


def ed25519_pair() -> tuple[paramiko.Ed25519Key, str]:
    """A fresh in-memory Ed25519 key for paramiko and its OpenSSH public line."""
    import io

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return paramiko.Ed25519Key(file_obj=io.StringIO(pem)), public


def preamble_socket(host: str, port: int, line: str | bytes, timeout: float = 5.0) -> socket.socket:
    """A TCP connection that has sent ``line`` (a preamble, or anything else) first."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.sendall(line.encode() if isinstance(line, str) else line)
    return sock


def closed_without_banner(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True if the server closed (EOF or reset) without sending a single byte."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return got == b""


def ssh_banner(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """The server's SSH identification line (the socket stays open)."""
    sock.settimeout(timeout)
    line = b""
    while not line.endswith(b"\n") and len(line) < 256:
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def paramiko_exec(
    host: str,
    port: int,
    session_id: str,
    pkey: paramiko.PKey,
    command: str,
    *,
    username: str | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes, bytes]:
    """Preamble, then raw paramiko: run one command; (exit status, stdout, stderr)."""
    sock = preamble_socket(host, port, PREAMBLE.format(session_id), timeout)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=timeout)
        transport.auth_publickey(username or session_id, pkey)
        chan = transport.open_session(timeout=timeout)
        chan.settimeout(timeout)
        chan.exec_command(command)
        out = chan.makefile("rb").read()
        err = chan.makefile_stderr("rb").read()
        return chan.recv_exit_status(), out, err
    finally:
        transport.close()
        sock.close()
