"""A local emulator of the Prime Intellect sandbox SSH service, in both of its contracts.

    from sshbridge.emulator import Emulator

    with Emulator() as emu:  # contract="vm"; Emulator(contract="sidecar") for the spec's
        sandbox_id = emu.create_sandbox()
        ...  # point a client at emu.env()

- ``contract="vm"`` (default; the provider's service today): the POST body carries
  ``public_key``, which is authorized at once; the answer has six fields; every session
  shares one SSH port, and each TCP connection must first send
  ``PRIME-SSH-SESSION <session_id>\\n`` or is closed without an SSH banner. No gateway.
- ``contract="sidecar"`` (the project's specification): a twelve-field answer with a
  token, a gateway that authorizes keys, one SSH port per session, no preamble.

Everything binds 127.0.0.1 on ephemeral ports; it needs the ``emulator`` extra (asyncssh).
Answers to what the provider leaves undocumented, so clients can be tested under each:

- Open connections survive ``expires_at`` unless ``cut_at_expiry`` (then they are
  disconnected at expiry, and running commands are hung up as below). New logins fail
  after expiry either way.
- ``max_channels_per_connection`` refuses extra channel opens with an open failure
  (code ``channel_cap_failure_code``: 4 resource shortage by default, 1 like sshd),
  never a disconnect. A channel stops counting as soon as either side sent CLOSE.
- Host key: one Ed25519 key per sandbox, or one per session with ``rotate_host_key``.
- ``exposure_delay``: sidecar, the session's port refuses connections until then; vm,
  connections are closed right after their preamble until then (clients retry).
- Sidecar contract: an unknown ``public_key`` POST field is ignored, or answered 422
  naming it (no session made) with ``reject_unknown_fields``.
- 429: ``{"detail": ...}`` with an integer ``Retry-After`` unless
  ``rate_limit_retry_after`` is False.
- A channel closed while its process runs: SIGHUP to the process group, SIGKILL to the
  group one second later if its leader survived that. setsid/nohup'd processes live on
  until ``stop()``, which kills every process the sandboxes started.
"""

from ._emulator import Emulator
from ._state import APICall, OpenSSHTarget, SessionRecord

__all__ = ["APICall", "Emulator", "OpenSSHTarget", "SessionRecord"]
