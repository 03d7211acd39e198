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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from ._exceptions import (
    CommandError,
    CommandTimeout,
    ConnectionLost,
    InvalidArgument,
    RemotePathError,
    SSHBridgeError,
)
from ._result import CommandResult
from ._retry import Backoff
from ._runner import build_command, check_timeout

if TYPE_CHECKING:
    from ._sandbox import SandboxSSH

T = TypeVar("T")

JOB_ID = re.compile(r"^j[0-9a-f]{12}$")
JOBS_DIR = "$HOME/.sshbridge/jobs"
_SIGNALS = {"TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT"}


def _job_dir(job_id: str) -> str:
    return f'"{JOBS_DIR}/{job_id}"'


# How long a detached job may take to come up (its pid file) before it counts as failed.
START_TIMEOUT = 10
# The exit status of the spawn script when the job did not start (and never will).
_NOT_STARTED = 97


# $0: the job directory, $1: the shell for the command, $2: the command. The runner
# claims the start (mkdir started), so a job given up on can never start late; records
# its pid (= its process group, thanks to setsid); runs the command with no terminal and
# no inherited channel fds; writes the exit status under a temporary name and renames
# it, so "exit" is never seen half-written.
_RUNNER = (
    'mkdir "$0/started" 2>/dev/null || exit 0; '
    'echo $$ > "$0/pid"; '
    '"$1" -c "$2" > "$0/stdout" 2> "$0/stderr" < /dev/null; '
    'echo $? > "$0/exit.tmp"; mv "$0/exit.tmp" "$0/exit"'
)

_PLACEHOLDER = re.compile(r"__([A-Z_]+)__")
# The job is launched without the spawning call's cancel token: a durable job belongs
# to no call, so no cancellation (or timeout) of another command can reach it.
_SPAWN = r"""d=__DIR__
mkdir -p "$d" || exit 1
t=$(date +%s 2>/dev/null) && [ -n "$t" ] && echo $((t + __LIMIT__)) > "$d/start_by"
printf '%s' __DISPLAY__ > "$d/cmd" || exit 1
s=$(readlink /proc/$$/exe 2>/dev/null)
case ${s##*/} in ""|busybox*) s=/bin/sh ;; esac
l=setsid; command -v setsid >/dev/null 2>&1 || l=nohup
(unset SSHBRIDGE_CANCEL_ID; exec "$l" sh -c __RUNNER__ "$d" "$s" __COMMAND__) \
  > /dev/null 2>&1 < /dev/null &
b=$!; n=0; g=0; q=0.01; lim=$((__LIMIT__ * 100)); lost=50
while [ ! -s "$d/pid" ]; do
  kill -0 "$b" 2>/dev/null || g=$((g + 1))
  if [ "$n" -ge "$lim" ] || [ "$g" -ge "$lost" ]; then
    if mkdir "$d/started" 2>/dev/null; then
      echo 'the detached process did not come up' > "$d/failed"
      echo 'sshbridge: the job did not start' >&2; exit __NOT_STARTED__
    fi
    if [ "$n" -ge $((lim * 2)) ]; then
      echo 'sshbridge: the job claimed its start but wrote no pid' >&2; exit __NOT_STARTED__
    fi
  fi
  sleep "$q" 2>/dev/null || { q=1; lim=$((lim / 100)); lost=1; sleep 1; }
  n=$((n + 1))
done
cd "$d" && pwd"""


def spawn_script(job_id: str, command: str, display: str | None = None) -> str:
    """Start ``command`` detached; print the job directory's absolute path once it runs.

    The command runs in the same shell as ``run()``: the login shell the server runs
    this script in (found from ``/proc/$$/exe``), not a hard-coded ``sh``.

    The script returns only once the detached runner has written its pid, i.e. is in a
    session (and process group) of its own: servers that kill the channel's process
    group when the channel closes (x/crypto/ssh-based ones do) would otherwise kill a
    job that had not yet left it. It waits up to START_TIMEOUT, or half a second after
    the launcher died; then it claims the start itself and exits 97 (not started).
    """
    values = {
        "DIR": _job_dir(job_id),
        "LIMIT": str(START_TIMEOUT),
        "NOT_STARTED": str(_NOT_STARTED),
        "RUNNER": shlex.quote(_RUNNER),
        "DISPLAY": shlex.quote(display or command),
        "COMMAND": shlex.quote(command),
    }
    # One pass: text put in (the user's command) is never scanned for placeholders.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], _SPAWN)


def status_script(job_dir: str) -> str:
    d = shlex.quote(job_dir)
    # A job still "starting" past its start_by deadline (its spawner died before it
    # came up) is claimed here, so it is reported as failed once and never starts late.
    return (
        f"cd {d} 2>/dev/null || {{ echo missing; exit 0; }}; "
        'if [ -f exit ]; then echo "exit $(cat exit)"; '
        "elif [ -f failed ]; then echo failed; "
        "elif [ ! -s pid ]; then "
        "if [ ! -d started ] && [ -s start_by ] "
        '&& [ "$(date +%s)" -gt "$(cat start_by)" ] 2>/dev/null '
        "&& mkdir started 2>/dev/null; then "
        "echo 'nothing started it before its deadline' > failed; echo failed; "
        "else echo starting; fi; "
        'elif kill -0 "$(cat pid)" 2>/dev/null; then echo running; '
        'elif [ -f exit ]; then echo "exit $(cat exit)"; '
        "else echo lost; fi"
    )


@dataclass(frozen=True)
class JobStatus:
    state: str  # "starting", "running", "exited", "lost", "failed" (never started)
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

    def _retrying(self, fn: Callable[[], T]) -> T:
        # A query is read-only: after a dropped connection it is simply asked again
        # (the next call reconnects), with the backoff every retry here uses.
        for attempt in Retrying(
            stop=stop_after_attempt(4),
            wait=wait_exponential(multiplier=0.2, max=1.6),
            retry=retry_if_exception_type(ConnectionLost),
            reraise=True,
        ):
            with attempt:
                return fn()
        raise AssertionError("unreachable")  # reraise=True: the last error propagates

    def poll(self) -> int | None:
        """The exit code if the job has finished, else None.

        Raises :class:`CommandError` if the job never started (it never will).
        """
        status = self.status()
        if status.state == "failed":
            self._raise_not_started()
        if status.state == "lost":
            return -1
        return status.exit_code if status.state == "exited" else None

    def _raise_not_started(self) -> None:
        reason = self._read("failed").decode("utf-8", errors="replace").strip()
        result = CommandResult(self.command, -1, b"", reason.encode(), 0.0)
        raise CommandError(
            f"job {self.id} never started ({reason or 'no reason recorded'}); nothing ran "
            "and nothing will: spawn it again",
            result=result,
        )

    def status(self) -> JobStatus:
        script = status_script(self.directory)
        result = self._retrying(lambda: self.shell.run(script))
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
        if text in ("running", "starting", "lost", "failed"):
            return JobStatus(text)
        raise SSHBridgeError(f"job {self.id}: unexpected status {text!r}")

    def _read(self, name: str, offset: int = 0) -> bytes:
        path = f"{self.directory}/{name}"
        try:
            if offset == 0:
                return self._retrying(lambda: self.shell.read_bytes(path))
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
        """Wait for the job to end and return its result (the job keeps running on timeout).

        Raises :class:`CommandError` at once if the job never started.
        """
        timeout = check_timeout(timeout)
        poll_interval = check_interval(poll_interval)
        start = time.monotonic()
        backoff = Backoff(0.05, poll_interval)
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
            time.sleep(backoff.next())

    def result(self, exit_code: int, duration: float = 0.0) -> CommandResult:
        return CommandResult(
            self.command, exit_code, self._read("stdout"), self._read("stderr"), duration
        )

    def stream(self, which: str = "stdout", poll_interval: float = 0.2) -> Iterator[str]:
        """Yield the job's output as it grows, until the job ends (follows like tail -f)."""
        if which not in ("stdout", "stderr"):
            raise InvalidArgument("which must be 'stdout' or 'stderr'")
        poll_interval = check_interval(poll_interval)
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
        script = f'p=$(cat {d}/pid 2>/dev/null) && kill -s {name} -- "-$p" 2>/dev/null; true'
        self._retrying(lambda: self.shell.run(script))


def start(
    shell: SandboxSSH,
    command: str | Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Job:
    display, wire = build_command(command, cwd=cwd, env=env)
    job_id = "j" + secrets.token_hex(6)
    result = shell.run(spawn_script(job_id, wire, display))
    lines = result.stdout.strip().splitlines()
    if result.exit_code == _NOT_STARTED:
        raise CommandError(
            f"job {job_id} ({_short(display)}) never started: its detached process did not "
            "come up (the launcher died, or no pid within "
            f"{START_TIMEOUT} s), so nothing ran and nothing will; spawn it again "
            f"({result.stderr.strip()})",
            result=result,
        )
    if result.exit_code != 0 or not lines:
        raise CommandError(
            f"job {job_id} ({_short(display)}) could not be set up under {JOBS_DIR} (exit "
            f"status {result.exit_code}): {result.stderr.strip() or 'no message'}",
            result=result,
        )
    return Job(shell, job_id, lines[-1], display)


def check_interval(value: float) -> float:
    checked = check_timeout(value, "poll_interval")
    if checked is None:
        raise InvalidArgument("poll_interval must be a finite positive number of seconds")
    return checked


def _short(text: str, limit: int = 60) -> str:
    text = text.replace("\n", " ")
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def attach(shell: SandboxSSH, job_id: str) -> Job:
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise InvalidArgument(f"{job_id!r} is not a job id (like 'j0123456789ab')")
    d = _job_dir(job_id)
    result = shell.run(f"cd {d} 2>/dev/null && pwd && cat cmd")
    if result.exit_code != 0:
        raise RemotePathError(f"no job {job_id} in this sandbox", path=f"{JOBS_DIR}/{job_id}")
    directory, _, command = result.stdout.partition("\n")
    return Job(shell, job_id, directory, command)
