"""The plain result object of a remote command."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CommandResult:
    """What a finished (or stopped) remote command produced.

    ``stdout``/``stderr`` are text decoded as UTF-8 with invalid bytes replaced;
    ``stdout_bytes``/``stderr_bytes`` keep the raw bytes. ``exit_code`` is the remote exit
    status, or -1 if the server sent none (the connection or command was cut).
    """

    command: str
    exit_code: int
    stdout_bytes: bytes = field(repr=False)
    stderr_bytes: bytes = field(repr=False)
    duration: float = 0.0
    signal: str | None = None
    encoding: str = field(default="utf-8", repr=False)

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode(self.encoding, errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode(self.encoding, errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def failed(self) -> bool:
        return not self.ok

    # Fabric/Invoke spellings, for users coming from there.
    @property
    def exited(self) -> int:
        return self.exit_code

    @property
    def return_code(self) -> int:
        return self.exit_code

    def __repr__(self) -> str:
        cmd = self.command if len(self.command) <= 60 else self.command[:57] + "..."
        return (
            f"CommandResult(command={cmd!r}, exit_code={self.exit_code}, "
            f"stdout={len(self.stdout_bytes)} bytes, stderr={len(self.stderr_bytes)} bytes, "
            f"duration={self.duration:.3f})"
        )
