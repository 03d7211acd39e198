"""Durable jobs: commands that outlive any one SSH session.

``spawn()`` starts a command detached in the sandbox (its own session and process group,
``setsid``), with stdout, stderr and the exit status kept in files under
``$HOME/.sshbridge/jobs/<id>/``. Every session of a sandbox reaches the same sandbox, so
the handle keeps working across renewals and reconnects, and ``job(id)`` re-attaches from
another process. Output is read by offset, so a rotation neither loses nor repeats it.
"""

from __future__ import annotations

import codecs
import re
import secrets
import shlex
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._exceptions import (
    CommandTimeout,
    ConnectionLost,
    InvalidArgument,
    RemotePathError,
    SSHBridgeError,
)
from ._result import CommandResult
from ._runner import build_command

if TYPE_CHECKING:
    from ._sandbox import SandboxSSH

JOB_ID = re.compile(r"^j[0-9a-f]{12}$")
JOBS_DIR = "$HOME/.sshbridge/jobs"
_SIGNALS = {"TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT"}


def _job_dir(job_id: str) -> str:
    return f'"{JOBS_DIR}/{job_id}"'


def spawn_script(job_id: str, command: str, display: str | None = None) -> str:
    """Start ``command`` detached; print the job directory's absolute path."""
    d = _job_dir(job_id)
    # The runner shell records its pid (= process group id, thanks to setsid), runs the
    # command with no terminal and no inherited channel fds, then writes the exit status
    # under a temporary name and renames it, so "exit" is never seen half-written.
    runner = (
        'echo $$ > "$0/pid"; '
        'sh -c "$1" > "$0/stdout" 2> "$0/stderr" < /dev/null; '
        'echo $? > "$0/exit.tmp"; mv "$0/exit.tmp" "$0/exit"'
    )
    args = f"{shlex.quote(runner)} {d} {shlex.quote(command)}"
    return (
        f"mkdir -p {d} && printf '%s' {shlex.quote(display or command)} > {d}/cmd || exit 1\n"
        "if command -v setsid >/dev/null 2>&1; then "
        f"setsid sh -c {args} > /dev/null 2>&1 < /dev/null & "
        f"else nohup sh -c {args} > /dev/null 2>&1 < /dev/null & fi\n"
        f"cd {d} && pwd"
    )


def status_script(job_dir: str) -> str:
    d = shlex.quote(job_dir)
    return (
        f"cd {d} 2>/dev/null || {{ echo missing; exit 0; }}; "
        "if [ -f exit ]; then echo \"exit $(cat exit)\"; "
        "elif [ ! -s pid ]; then echo starting; "
        "elif kill -0 \"$(cat pid)\" 2>/dev/null; then echo running; "
        "elif [ -f exit ]; then echo \"exit $(cat exit)\"; "
        "else echo lost; fi"
    )


@dataclass(frozen=True)
class JobStatus:
    state: str  # "starting", "running", "exited", "lost"
    exit_code: int | None = None


class Job:
    """Handle on a durable job. Cheap to create; every method asks the sandbox afresh."""

    def __init__(self, shell: SandboxSSH, job_id: str, directory: str, command: str) -> None:
        self.shell = shell
        self.id = job_id
        self.directory = directory
        self.command = command

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, command={self.command[:40]!r})"

    # -- querying, robust to a session change between calls -----------------------------

    def _retrying(self, fn_name: str, *args: object, attempts: int = 4) -> object:
        delay = 0.2
        for attempt in range(attempts):
            try:
                return getattr(self.shell, fn_name)(*args)
            except ConnectionLost:
                if attempt == attempts - 1:
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def poll(self) -> int | None:
        """The exit code if the job has finished, else None."""
        status = self.status()
        if status.state == "lost":
            return -1
        return status.exit_code if status.state == "exited" else None

    def status(self) -> JobStatus:
        result = self._retrying("run", status_script(self.directory))
        assert isinstance(result, CommandResult)
        text = result.stdout.strip()
        if text.startswith("exit "):
            try:
                return JobStatus("exited", int(text.split()[1]))
            except (IndexError, ValueError):
                return JobStatus("exited", -1)
        if text == "missing":
            raise RemotePathError(
                f"job {self.id}: its directory {self.directory} is gone from the sandbox",
                path=self.directory,
            )
        if text in ("running", "starting", "lost"):
            return JobStatus(text)
        raise SSHBridgeError(f"job {self.id}: unexpected status {text!r}")

    def _read(self, name: str, offset: int = 0) -> bytes:
        path = f"{self.directory}/{name}"
        try:
            if offset == 0:
                data = self._retrying("read_bytes", path)
                assert isinstance(data, bytes)
                return data
            fh = self.shell.open(path, "rb")
            try:
                fh.seek(offset)
                return bytes(fh.read())
            finally:
                fh.close()
        except RemotePathError as exc:
            if exc.is_not_found:
                return b""
            raise

    @property
    def stdout(self) -> str:
        """stdout so far."""
        return self._read("stdout").decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        """stderr so far."""
        return self._read("stderr").decode("utf-8", errors="replace")

    def wait(self, timeout: float | None = None, poll_interval: float = 0.2) -> CommandResult:
        """Wait for the job to end and return its result (the job keeps running on timeout)."""
        if timeout is not None and (isinstance(timeout, bool) or timeout <= 0):
            raise InvalidArgument("timeout must be a positive number of seconds")
        start = time.monotonic()
        delay = min(poll_interval, 0.05)
        while True:
            code = self.poll()
            if code is not None:
                return self.result(code, time.monotonic() - start)
            if timeout is not None and time.monotonic() - start >= timeout:
                partial = self.result(-1, time.monotonic() - start)
                raise CommandTimeout(
                    f"job {self.id} still running after {timeout:g} s (it keeps running; "
                    "wait again, or kill() it)",
                    result=partial,
                    timeout=timeout,
                )
            time.sleep(delay)
            delay = min(delay * 2, poll_interval)

    def result(self, exit_code: int, duration: float = 0.0) -> CommandResult:
        return CommandResult(
            self.command, exit_code, self._read("stdout"), self._read("stderr"), duration
        )

    def stream(self, which: str = "stdout", poll_interval: float = 0.2) -> Iterator[str]:
        """Yield the job's output as it grows, until the job ends (follows like tail -f)."""
        if which not in ("stdout", "stderr"):
            raise InvalidArgument("which must be 'stdout' or 'stderr'")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offset = 0
        while True:
            done = self.poll() is not None
            data = self._read(which, offset)
            if data:
                offset += len(data)
                text = decoder.decode(data)
                if text:
                    yield text
            elif done:
                tail = decoder.decode(b"", final=True)
                if tail:
                    yield tail
                return
            else:
                time.sleep(poll_interval)

    def kill(self, signal: str = "TERM") -> None:
        """Signal the job's whole process group."""
        name = signal.upper().removeprefix("SIG") if isinstance(signal, str) else ""
        if name not in _SIGNALS:
            raise InvalidArgument(f"signal must be one of {sorted(_SIGNALS)}, got {signal!r}")
        d = shlex.quote(self.directory)
        self._retrying(
            "run", f'p=$(cat {d}/pid 2>/dev/null) && kill -s {name} -- "-$p" 2>/dev/null; true'
        )


def start(
    shell: SandboxSSH,
    command: str | Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Job:
    display, wire = build_command(command, cwd=cwd, env=env)
    job_id = "j" + secrets.token_hex(6)
    result = shell.run(spawn_script(job_id, wire, display), check=True)
    directory = result.stdout.strip().splitlines()[-1]
    return Job(shell, job_id, directory, display)


def attach(shell: SandboxSSH, job_id: str) -> Job:
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise InvalidArgument(f"{job_id!r} is not a job id (like 'j0123456789ab')")
    d = _job_dir(job_id)
    result = shell.run(f"cd {d} 2>/dev/null && pwd && cat cmd")
    if result.exit_code != 0:
        raise RemotePathError(f"no job {job_id} in this sandbox", path=f"{JOBS_DIR}/{job_id}")
    directory, _, command = result.stdout.partition("\n")
    return Job(shell, job_id, directory, command)
