"""Connection options, validated once.

``SSHOptions`` is what ``SandboxSSH``, ``Fleet``, the async classes and the CLI take.
Keyword arguments stay the friendly front (``SandboxSSH(id, ttl_seconds=600)``); they
become one of these, checked here and nowhere else: types, ranges, finite numbers. It is
frozen and, when its values are (no ``http`` session, a module-level ``on_renew``),
picklable, so a fleet's executor tasks carry it to their workers.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._api import DEFAULT_TTL, validate_api_timeout, validate_seconds, validate_ttl
from ._exceptions import InvalidArgument
from ._hostkeys import HostKeyPolicy

if TYPE_CHECKING:
    import requests

    from ._models import SSHSession


def check_int(name: str, value: object, low: int, high: int) -> int:
    """An int (not a bool) in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"{name} must be an int between {low} and {high}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be True or False, got {value!r}")
    return value


def default_renew_before(ttl_seconds: int) -> float:
    """40 % of the TTL, at most 5 minutes: with TTL t a session is minted every 0.6 t
    seconds, which stays under 20 per minute for any TTL of 5 s or more."""
    return min(0.4 * ttl_seconds, 300.0)


def check_renew_before(value: object, ttl_seconds: int) -> float:
    """Seconds before expiry to renew: a finite number in ``0 <= x < ttl``; None means
    :func:`default_renew_before`."""
    if value is None:
        return default_renew_before(ttl_seconds)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument("renew_before must be a number of seconds")
    if not math.isfinite(value):
        raise InvalidArgument(f"renew_before must be a finite number, got {value!r}")
    if not 0 <= value < ttl_seconds:
        raise InvalidArgument(
            f"renew_before must be >= 0 and below ttl_seconds ({ttl_seconds}), got {value}"
        )
    return float(value)


@dataclass(frozen=True)
class SSHOptions:
    """Everything that shapes a connection to a sandbox (see :class:`SandboxSSH`)."""

    ttl_seconds: int = DEFAULT_TTL
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    team_id: str | None = None
    known_hosts: str | os.PathLike[str] | None = None
    host_key_policy: HostKeyPolicy | None = None
    connect_timeout: float = 30.0
    keepalive: float = 15.0
    max_connections: int = 16
    api_timeout: float | tuple[float, float] = (5.0, 30.0)
    rate_limit_wait: float = 120.0
    renew_before: float | None = None
    auto_renew: bool = True
    on_renew: Callable[[SSHSession, SSHSession], None] | None = None
    http: requests.Session | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalised values are set once, here
        ttl = validate_ttl(self.ttl_seconds)
        for name in ("api_key", "base_url", "team_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidArgument(f"{name} must be a string")
        if self.known_hosts is not None:
            if not isinstance(self.known_hosts, (str, os.PathLike)):
                raise InvalidArgument("known_hosts must be a path")
            put(self, "known_hosts", os.fspath(self.known_hosts))
        if self.known_hosts is not None and self.host_key_policy is not None:
            raise InvalidArgument("pass known_hosts or host_key_policy, not both")
        if self.host_key_policy is not None and not isinstance(
            self.host_key_policy, HostKeyPolicy
        ):
            raise InvalidArgument("host_key_policy must be a sshbridge HostKeyPolicy")
        put(self, "connect_timeout", validate_seconds("connect_timeout", self.connect_timeout))
        put(self, "keepalive", validate_seconds("keepalive", self.keepalive, allow_zero=True))
        check_int("max_connections", self.max_connections, 1, 256)
        put(self, "api_timeout", validate_api_timeout(self.api_timeout))
        put(
            self,
            "rate_limit_wait",
            validate_seconds("rate_limit_wait", self.rate_limit_wait, allow_zero=True),
        )
        check_renew_before(self.renew_before, ttl)  # None stays None: derived from the TTL
        check_bool("auto_renew", self.auto_renew)
        if self.on_renew is not None and not callable(self.on_renew):
            raise InvalidArgument("on_renew must be callable")

    @classmethod
    def of(cls, options: SSHOptions | None = None, **changes: Any) -> SSHOptions:
        """``options`` (or the defaults) with ``changes``; an unknown name is an
        :class:`InvalidArgument` naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InvalidArgument(
                f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if options is None:
            return cls(**changes)
        if not isinstance(options, SSHOptions):
            raise InvalidArgument("options must be an SSHOptions")
        if not changes:
            return options
        return dataclasses.replace(options, **changes)
