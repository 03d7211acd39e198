"""Helpers shared by the tests that drive the emulator."""

from __future__ import annotations

import threading
import time
from typing import Any

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


def settle_threads(timeout: float = 5.0) -> list[threading.Thread]:
    """Library threads still alive after waiting up to ``timeout`` for them to end."""
    end = time.monotonic() + timeout
    while True:
        left = library_threads()
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """True while a local process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
