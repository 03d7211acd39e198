"""sshbridge: real SSH into Prime Intellect sandboxes.

::

    from sshbridge import SandboxSSH
    with SandboxSSH("sbx_123") as shell:
        result = shell.run("python train.py", timeout=600)
        shell.put("data.tar", "/workspace/data.tar")
"""

import logging as _logging

from ._api import APIClient
from ._async import AsyncFleet, AsyncForward, AsyncJob, AsyncRemoteFile, AsyncSandboxSSH
from ._config import Config, ConfigSources, describe_config, load_config
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeout,
    AuthenticationError,
    ChannelOpenError,
    ChannelRequestRefused,
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
    UnexpectedResponse,
)
from ._fleet import Fleet, FleetError, FleetResult, FleetResults
from ._hostkeys import AcceptAnyHostKey, HostKeyPolicy, KnownHostsFile, PinFirstHostKey
from ._jobs import Job, JobStatus
from ._models import ErrorDetail, Sandbox, SandboxList, SidecarSSHSession, SSHSession
from ._options import SSHOptions
from ._result import CommandResult
from ._sandbox import SandboxSSH
from ._sftp import FileAttributesWarning, RemoteFile
from ._transfer import SyncResult
from ._tunnels import LocalForward, RemoteForward
from ._version import __version__

# A library does not print: with no logging configured, Python's last-resort handler
# would write sshbridge's warnings and paramiko's socket errors to stderr.
_logging.getLogger("sshbridge").addHandler(_logging.NullHandler())
_logging.getLogger("paramiko").addHandler(_logging.NullHandler())

__all__ = [
    "APIClient",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeout",
    "AcceptAnyHostKey",
    "AsyncFleet",
    "AsyncForward",
    "AsyncJob",
    "AsyncRemoteFile",
    "AsyncSandboxSSH",
    "AuthenticationError",
    "ChannelOpenError",
    "ChannelRequestRefused",
    "CommandError",
    "CommandResult",
    "CommandTimeout",
    "Config",
    "ConfigSources",
    "ConfigurationError",
    "Conflict",
    "ConnectionLost",
    "ErrorDetail",
    "FileAttributesWarning",
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
    "SSHOptions",
    "SSHSession",
    "Sandbox",
    "SandboxError",
    "SandboxList",
    "SandboxNotRunning",
    "SandboxNotSupported",
    "SandboxSSH",
    "ServerError",
    "SessionExpired",
    "SidecarSSHSession",
    "SyncResult",
    "UnexpectedResponse",
    "__version__",
    "describe_config",
    "load_config",
]
