"""A local emulator of the Prime Intellect sandbox SSH service: API, gateway and SSH sidecar.

    from sshbridge.emulator import Emulator

    with Emulator() as emu:
        sandbox_id = emu.create_sandbox()
        ...  # point a client at emu.env()

Everything binds 127.0.0.1 on ephemeral ports; it needs the ``emulator`` extra (asyncssh).
Answers to what the provider leaves undocumented, so clients can be tested under each:

- Open connections survive ``expires_at`` unless ``cut_at_expiry`` (then they are
  disconnected at expiry, and running commands are hung up as below). New logins fail
  after expiry either way.
- ``max_channels_per_connection`` refuses extra channel opens with an open failure
  (code ``channel_cap_failure_code``: 4 resource shortage by default, 1 like sshd),
  never a disconnect. A channel stops counting as soon as either side sent CLOSE.
- Host key: one Ed25519 key per sandbox, or one per session with ``rotate_host_key``.
- 429: ``{"detail": ...}`` with an integer ``Retry-After`` unless
  ``rate_limit_retry_after`` is False.
- A channel closed while its process runs: SIGHUP to the process group, SIGKILL to the
  group one second later if its leader survived that. setsid/nohup'd processes live on
  until ``stop()``, which kills every process the sandboxes started.
"""

from ._emulator import Emulator
from ._state import APICall, OpenSSHTarget, SessionRecord

__all__ = ["APICall", "Emulator", "OpenSSHTarget", "SessionRecord"]
