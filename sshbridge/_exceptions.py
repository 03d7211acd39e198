"""The one exception hierarchy of sshbridge.

Every error the library raises on purpose derives from :class:`SSHBridgeError`, so callers
can catch at whatever level they care about::

    SSHBridgeError
    ├── InvalidArgument (also ValueError)      bad input to a public entry point
    ├── ConfigurationError                     no API key, unusable base URL
    ├── APIError                               the platform API said no, or could not be reached
    │   ├── APIStatusError                     an HTTP error status (.status_code, .detail)
    │   │   ├── AuthenticationError            401 / 403
    │   │   ├── PaymentRequired                402
    │   │   ├── NotFound                       404
    │   │   ├── Conflict                       409 (e.g. the sandbox is not running)
    │   │   ├── RequestValidationError         422 (.errors: list of ErrorDetail)
    │   │   ├── RateLimited                    429 (.retry_after seconds or None)
    │   │   └── ServerError                    5xx
    │   ├── APIConnectionError                 network failure before an answer
    │   │   └── APITimeout                     no answer in time
    │   ├── UnexpectedResponse                 a 2xx answer this client cannot read
    │   └── RateBudgetExhausted                client-side budget would wait too long
    ├── SandboxError
    │   ├── SandboxNotRunning                  status is not RUNNING (.status)
    │   └── SandboxNotSupported                the API says this sandbox cannot serve SSH
    ├── SSHError
    │   ├── SSHConnectError                    the SSH endpoint was not reachable/accepting in time
    │   ├── HostKeyMismatch                    the server presented a different host key
    │   ├── ConnectionLost                     an established connection dropped
    │   │   └── SessionExpired                 ... because the session's life ended
    │   ├── ChannelOpenError                   the server refused a new channel
    │   │   └── ChannelRequestRefused          ... or a request on it (exec, pty-req): never started
    │   └── PortForwardError                   the server refused a port forward
    ├── CommandError                           a command exited non-zero under check=True (.result)
    │   └── CommandTimeout                     a command ran past its timeout (also TimeoutError)
    └── RemotePathError                        a remote file operation failed (.path, .errno)

Messages name what went wrong and what to do. None of them ever carries an API key, a
session token or a private key.
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._models import ErrorDetail
    from ._result import CommandResult

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeout",
    "AuthenticationError",
    "ChannelOpenError",
    "ChannelRequestRefused",
    "CommandError",
    "CommandTimeout",
    "ConfigurationError",
    "Conflict",
    "ConnectionLost",
    "HostKeyMismatch",
    "InvalidArgument",
    "NotFound",
    "PaymentRequired",
    "PortForwardError",
    "RateBudgetExhausted",
    "RateLimited",
    "RemotePathError",
    "RequestValidationError",
    "SSHBridgeError",
    "SSHConnectError",
    "SSHError",
    "SandboxError",
    "SandboxNotRunning",
    "SandboxNotSupported",
    "ServerError",
    "SessionExpired",
    "UnexpectedResponse",
]


class SSHBridgeError(Exception):
    """Base class of every error sshbridge raises."""


class InvalidArgument(SSHBridgeError, ValueError):
    """A public entry point was given a value it cannot use."""


class ConfigurationError(SSHBridgeError):
    """The configuration (API key, base URL) is missing or unusable."""


class APIError(SSHBridgeError):
    """The platform API refused a request or could not be reached."""


class UnexpectedResponse(APIError):
    """A 2xx answer that is not what the endpoint returns (missing or malformed fields).

    For a session answer, a session it names is DELETEd before this is raised.
    """


class APIStatusError(APIError):
    """The API answered with an HTTP error status."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        method: str = "",
        path: str = "",
        detail: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.method = method
        self.path = path
        self.detail = detail
        self.body = body


class AuthenticationError(APIStatusError):
    """401/403: the API key (or session token) was not accepted."""


class PaymentRequired(APIStatusError):
    """402: the account needs credit or a payment method."""


class NotFound(APIStatusError):
    """404: the sandbox (or session) does not exist for this key."""


class Conflict(APIStatusError):
    """409: the request conflicts with the resource's state."""


class RequestValidationError(APIStatusError):
    """422: the API rejected the request's fields; ``errors`` lists them."""

    def __init__(self, message: str, *, errors: list[ErrorDetail], **kw: Any) -> None:
        super().__init__(message, **kw)
        self.errors = errors


class RateLimited(APIStatusError):
    """429: too many requests; ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, message: str, *, retry_after: float | None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(APIStatusError):
    """5xx: the API failed; usually transient."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class APIConnectionError(APIError):
    """The API could not be reached (DNS, refused, reset) before it answered."""


class APITimeout(APIConnectionError, TimeoutError):
    """The API did not answer in time."""


class RateBudgetExhausted(APIError):
    """The client-side session budget (20 per 60 s per sandbox) would need too long a wait."""

    def __init__(self, message: str, *, wait: float) -> None:
        super().__init__(message)
        self.wait = wait


class SandboxError(SSHBridgeError):
    """The sandbox cannot be reached over SSH in its current state."""

    def __init__(self, message: str, *, sandbox_id: str, status: str | None = None) -> None:
        super().__init__(message)
        self.sandbox_id = sandbox_id
        self.status = status


class SandboxNotRunning(SandboxError):
    """The sandbox's status is not RUNNING."""


class SandboxNotSupported(SandboxError):
    """The API refused an SSH session for this sandbox as unsupported (its own answer)."""


class SSHError(SSHBridgeError):
    """An SSH-level failure."""


class SSHConnectError(SSHError):
    """The SSH endpoint could not be reached or did not accept the key before the deadline."""


class HostKeyMismatch(SSHError):
    """The server presented a host key other than the one pinned or known."""

    def __init__(self, message: str, *, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class ConnectionLost(SSHError):
    """An established SSH connection dropped while it was in use."""


class SessionExpired(ConnectionLost):
    """The session reached its ``expires_at`` and its connection is gone."""


class PortForwardError(SSHError):
    """The server refused a port forward (a listener in the sandbox, or a destination)."""


class ChannelOpenError(SSHError):
    """The server refused to open a new channel (e.g. a per-connection channel cap)."""


class CommandError(SSHBridgeError):
    """A command exited with a non-zero status under ``check=True``; ``result`` holds it."""

    def __init__(self, message: str, *, result: CommandResult) -> None:
        super().__init__(message)
        self.result = result


class CommandTimeout(CommandError, TimeoutError):
    """A command ran past its timeout; it was stopped and ``result`` holds its partial output."""

    def __init__(self, message: str, *, result: CommandResult, timeout: float) -> None:
        super().__init__(message, result=result)
        self.timeout = timeout


class RemotePathError(SSHBridgeError, OSError):
    """A remote file operation failed; ``path`` names the remote path."""

    def __init__(self, message: str, *, path: str, errno: int | None = None) -> None:
        SSHBridgeError.__init__(self, message)
        self.path = path
        self.errno = errno
        self.strerror = message
        self.filename = path

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "remote path error"

    @property
    def is_not_found(self) -> bool:
        return self.errno == _errno.ENOENT


class ChannelRequestRefused(ChannelOpenError):
    """The channel opened, but the server answered a request on it (``exec``, ``pty-req``)
    with a failure: the connection is fine and the command never started. ``request``
    names the refused request."""

    def __init__(self, message: str, *, request: str) -> None:
        super().__init__(message)
        self.request = request
