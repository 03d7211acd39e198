"""Stopping a remote command for real: one token, one kill script.

Every command sshbridge runs exports a random token (``SSHBRIDGE_CANCEL_ID=<token>``) in
its own text. A second channel, or even another session of the same sandbox, can then
find the command and everything it started, and stop it. This module holds the token
helpers and the one shell script that does the killing; ``_runner.stop_remote`` is the
one function that runs it (for ``run()`` timeouts, Ctrl-C during ``run()``, asyncio
cancellation and ``Fleet`` cancellation alike).

Which processes belong to a command:

- its environment carries the token: every process the command started (the variable
  is exported), including ones that ``exec`` or double-fork;
- or its command line does: the command's own shell, whose environment was fixed at
  exec, before its ``export`` ran (``sh -c '<text with the token>'``);
- or it descends from one of those: children that scrubbed their environment
  (``env -i``) and carry the token nowhere.

They get TERM (and CONT, so stopped ones see it), a short grace to exit, then KILL, with
the tree frozen (STOP) first so that nothing forks between the scan and the kill.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ._exceptions import InvalidArgument, SSHBridgeError

log = logging.getLogger("sshbridge.cancel")

CANCEL_VAR = "SSHBRIDGE_CANCEL_ID"


def new_token() -> str:
    return secrets.token_hex(8)


def is_token(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and value.isascii() and value.isalnum()


def split_token(env: Mapping[str, str] | None) -> tuple[str, Mapping[str, str] | None]:
    """The call's token (a caller's, e.g. a Fleet's, carried in ``env``; else a new one)
    and ``env`` without it, so the token is exported exactly once."""
    if not isinstance(env, Mapping):
        return new_token(), env  # None, or a bad value that build_command reports
    given = env.get(CANCEL_VAR)
    rest = {k: v for k, v in env.items() if k != CANCEL_VAR}
    return (given if given is not None and is_token(given) else new_token()), rest


# The script, in POSIX sh over Linux /proc (no ps: slim images lack procps). The needle is
# split in its own text (m=VAR=""TOKEN) and reaches grep on stdin, so neither this shell
# nor its subshells ever match themselves.
_SCRIPT = r"""m=__VAR__=""__TOKEN__; me=$$
hits() {
  printf '%s\n' "$m" | grep -lFf - /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null |
  while IFS=/ read -r _ _ p _; do [ "$p" = "$me" ] || printf '%s ' "$p"; done
}
tree() {
  all=" $* "; more=1
  while [ "$more" = 1 ]; do
    more=0
    for f in /proc/[0-9]*/stat; do
      p=${f#/proc/}; p=${p%/stat}
      case $all in *" $p "*) continue ;; esac
      { read -r line < "$f"; } 2>/dev/null || continue
      set -- ${line##*) }
      case $all in *" $2 "*) all="$all$p "; more=1 ;; esac
    done
  done
  printf '%s' "$all"
}
alive() {
  for p in $*; do
    { read -r line < "/proc/$p/stat"; } 2>/dev/null || continue
    case ${line##*) } in Z*) ;; *) printf '%s ' "$p" ;; esac
  done
}
sig() { s=$1; shift; for p in "$@"; do [ "$p" = "$me" ] || kill -s "$s" "$p" 2>/dev/null; done; }
t=$(tree $(hits))
[ -n "${t# }" ] || exit 0
sig TERM $t; sig CONT $t
i=0
while [ -n "$(alive $t)" ] && [ "$i" -lt __STEPS__ ]; do
  sleep 0.02 2>/dev/null || { sleep 1; break; }
  i=$((i + 1))
done
k=0
while [ "$k" -lt 5 ]; do
  t=$(tree $(alive $t) $(hits))
  [ -n "$(alive $t)" ] || break
  sig STOP $t; t=$(tree $t); sig KILL $t
  k=$((k + 1))
done
true
"""


def kill_script(token: str, grace: float = 0.3) -> str:
    """Shell that stops every process of one call (see the module docstring).

    ``grace`` is how long processes get to exit after TERM before KILL; the script ends
    as soon as they are all gone.
    """
    if not is_token(token):
        raise InvalidArgument("cancel token must be alphanumeric (at most 64 characters)")
    steps = max(1, round(float(grace) / 0.02))
    return (
        _SCRIPT.replace("__VAR__", CANCEL_VAR)
        .replace("__TOKEN__", token)
        .replace("__STEPS__", str(steps))
    )


class Interrupted(SSHBridgeError):
    """Raised inside a call that was cancelled before or while it ran."""


class CallControl:
    """Cancellation of one call made on a worker thread (an awaited call, a fleet
    member's): a token exported into its command, an event its transfer callbacks
    check, and a way to kill the command by token."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or new_token()
        self.event = threading.Event()
        self.killer: Callable[[str], None] | None = None

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def check(self) -> None:
        if self.event.is_set():
            raise Interrupted("cancelled")

    def env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        return {**(env or {}), CANCEL_VAR: self.token}

    def callback(self, user: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
        # Transfers report progress per chunk: raising there aborts them (and the
        # atomic put/get leave nothing behind).
        def progress(done: int, total: int) -> None:
            self.check()
            if user is not None:
                user(done, total)

        return progress

    def stop(self, fut: cf.Future[Any], bound: float = 15.0) -> None:
        """Cancel; if already running, kill its remote command until the call returns."""
        self.event.set()
        if fut.cancel():
            return
        end = time.monotonic() + bound
        while not fut.done():
            killer = self.killer
            if killer is not None:
                try:
                    killer(self.token)
                except Exception:  # best effort; the loop retries
                    log.debug("stopping a cancelled command failed", exc_info=True)
            left = end - time.monotonic()
            if left <= 0:
                log.warning("a cancelled sandbox call did not stop within %.0f s", bound)
                return
            # Retried: the command may have started just after a kill found nothing.
            cf.wait([fut], timeout=min(left, 1.0))
