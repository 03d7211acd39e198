"""sshbridge: real SSH into Prime Intellect sandboxes.

::

    from sshbridge import SandboxSSH
    with SandboxSSH("sbx_123") as shell:
        result = shell.run("python train.py", timeout=600)
        shell.put("data.tar", "/workspace/data.tar")
"""

from ._api import APIClient
from ._async import AsyncFleet, AsyncJob, AsyncSandboxSSH
from ._config import Config, load_config
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeout,
    AuthenticationError,
    ChannelOpenError,
    CommandError,
    CommandTimeout,
    ConfigurationError,
    Conflict,
    ConnectionLost,
    HostKeyMismatch,
    InvalidArgument,
    NotFound,
    PaymentRequired,
    PortForwardError,
    RateBudgetExhausted,
    RateLimited,
    RemotePathError,
    RequestValidationError,
    SandboxError,
    SandboxNotRunning,
    SandboxNotSupported,
    ServerError,
    SessionExpired,
    SSHBridgeError,
    SSHConnectError,
    SSHError,
)
from ._fleet import Fleet, FleetError, FleetResult, FleetResults
from ._hostkeys import AcceptAnyHostKey, HostKeyPolicy, KnownHostsFile, PinFirstHostKey
from ._jobs import Job, JobStatus
from ._models import ErrorDetail, Sandbox, SSHSession
from ._result import CommandResult
from ._sandbox import SandboxSSH
from ._sftp import RemoteFile
from ._tunnels import LocalForward, RemoteForward
from ._version import __version__

__all__ = [
    "APIClient",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeout",
    "AcceptAnyHostKey",
    "AsyncFleet",
    "AsyncJob",
    "AsyncSandboxSSH",
    "AuthenticationError",
    "ChannelOpenError",
    "CommandError",
    "CommandResult",
    "CommandTimeout",
    "Config",
    "ConfigurationError",
    "Conflict",
    "ConnectionLost",
    "ErrorDetail",
    "Fleet",
    "FleetError",
    "FleetResult",
    "FleetResults",
    "HostKeyMismatch",
    "HostKeyPolicy",
    "InvalidArgument",
    "Job",
    "JobStatus",
    "KnownHostsFile",
    "LocalForward",
    "NotFound",
    "PaymentRequired",
    "PinFirstHostKey",
    "PortForwardError",
    "RateBudgetExhausted",
    "RateLimited",
    "RemoteFile",
    "RemoteForward",
    "RemotePathError",
    "RequestValidationError",
    "SSHBridgeError",
    "SSHConnectError",
    "SSHError",
    "SSHSession",
    "Sandbox",
    "SandboxError",
    "SandboxNotRunning",
    "SandboxNotSupported",
    "SandboxSSH",
    "ServerError",
    "SessionExpired",
    "__version__",
    "load_config",
]
