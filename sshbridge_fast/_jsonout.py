"""``sshbridge exec --json``: the result object, shared by the fast path and the full CLI.

Standard library only (the fast path must not import the ``sshbridge`` package).

Shape (one object, one line)::

    {"sandbox": str, "command": [str, ...], "exit_code": int,
     "stdout": str, "stdout_encoding": "utf-8" | "base64",
     "stderr": str, "stderr_encoding": "utf-8" | "base64",
     "duration_seconds": float, "timed_out": bool, "error": str | null}

Output that is valid UTF-8 is given as text; anything else is base64 of the exact bytes,
so nothing is ever lost or replaced.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Sequence
from typing import IO, Any

TIMEOUT_STATUS = 124


def capture_files() -> tuple[IO[bytes], IO[bytes]]:
    """Anonymous files for the command's stdout and stderr: unlike pipes they never
    fill up, so nobody has to drain them while the command runs."""
    return tempfile.TemporaryFile(), tempfile.TemporaryFile()


def _read_all(fh: IO[bytes]) -> bytes:
    # The holder wrote through its own copy of the descriptor: same file, own offset.
    fh.flush()
    fh.seek(0)
    return fh.read()


def encode(data: bytes) -> tuple[str, str]:
    """(text, encoding): UTF-8 text when the bytes are valid UTF-8, else base64."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def exec_result(
    sandbox: str,
    command: Sequence[str],
    status: int,
    error: str | None,
    stdout: IO[bytes],
    stderr: IO[bytes],
    duration: float,
) -> dict[str, Any]:
    out, out_enc = encode(_read_all(stdout))
    err, err_enc = encode(_read_all(stderr))
    return {
        "sandbox": sandbox,
        "command": list(command),
        "exit_code": status,
        "stdout": out,
        "stdout_encoding": out_enc,
        "stderr": err,
        "stderr_encoding": err_enc,
        "duration_seconds": round(max(duration, 0.0), 6),
        # 124 alone could be the command's own status; with a message it was our timeout.
        "timed_out": status == TIMEOUT_STATUS and bool(error),
        "error": " ".join(error.split()) if error else None,
    }


def write_json(obj: Any) -> None:
    """One line on stdout, written in full even if stdout is a slow pipe."""
    data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
    view = memoryview(data)
    while view:
        written = os.write(1, view)
        view = view[written:]
