"""paramiko transports to a session: ephemeral keys, socket options, the contract-B
preamble, connect with retry."""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paramiko
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from ._compat import (
    handshake_done,
    pipelining_possible,
    quiet_channel_open_failures,
    set_handshake_timeouts,
    set_rekey_bytes,
    start_pipelined_publickey,
)
from ._exceptions import ConnectionLost, HostKeyMismatch, SSHConnectError
from ._hostkeys import HostKeyPolicy
from ._retry import StopAtDeadline

log = logging.getLogger("sshbridge.transport")


# A refused channel is routine here (another connection is tried): not an ERROR line.
quiet_channel_open_failures()

# Larger than paramiko's 2 MiB default so one command's output rarely waits on a window
# adjust; still small enough that 64 channels stay well inside memory.
WINDOW_SIZE = 4 * 1024 * 1024
MAX_PACKET_SIZE = 32768
# SFTP channels take bigger packets: fewer per-packet Python passes on downloads.
SFTP_MAX_PACKET_SIZE = 262144
_GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# paramiko rekeys every 512 MiB, and its rekey stops the connection for two round
# trips (no channel data goes either way until NEWKEYS): at 50 ms a 128 MiB get lost
# 100 ms to one. This is the top of OpenSSH's own default (1 GiB to 4 GiB by cipher; it
# waits 2^32 blocks, 64 GiB, for AES); the server rekeys on its own limit as ever.
REKEY_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class EphemeralKey:
    """An Ed25519 key made in memory for one session and never written anywhere."""

    pkey: paramiko.PKey
    public_line: str

    def __repr__(self) -> str:
        return f"EphemeralKey({self.pkey.get_name()} {self.pkey.fingerprint})"


def generate_key() -> EphemeralKey:
    pem = Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()
    )
    pkey = paramiko.Ed25519Key(file_obj=io.StringIO(pem.decode("ascii")))
    # No comment: exactly the "ssh-ed25519 AAAA..." the provider's own client sends.
    return EphemeralKey(pkey=pkey, public_line=f"{pkey.get_name()} {pkey.get_base64()}")


class _Retry(Exception):
    """A connect attempt that may succeed later (exposure not ready, key not yet active)."""


class _EarlyAuthRefused(_Retry):
    """The server did not answer a USERAUTH_REQUEST sent before its SERVICE_ACCEPT."""


class _KeyRefused(_Retry):
    """The server answered the USERAUTH_REQUEST, and refused the key."""


# host:port pairs where the pipelined USERAUTH_REQUEST went unanswered and paramiko's
# plain order then got an answer: those get the plain order for the rest of the process.
_plain_auth_only: set[tuple[str, int]] = set()
_plain_auth_lock = threading.Lock()


def _pipelining_allowed(host: str, port: int) -> bool:
    with _plain_auth_lock:
        return (host, port) not in _plain_auth_only


def _stop_pipelining(host: str, port: int) -> None:
    with _plain_auth_lock:
        _plain_auth_only.add((host, port))


def _authenticate(
    transport: paramiko.Transport,
    host: str,
    port: int,
    username: str,
    key: EphemeralKey,
    *,
    pipeline: bool,
) -> None:
    """Publickey authentication. Pipelined, the USERAUTH_REQUEST goes out right behind
    the SERVICE_REQUEST (one round trip less); an attempt the server did not answer in
    order raises _EarlyAuthRefused, anything else is reported as paramiko's own path
    reports it."""
    if not (pipeline and pipelining_possible(transport, key.pkey)):
        try:
            transport.auth_publickey(username, key.pkey)
        except paramiko.AuthenticationException:
            # paramiko raises this for a transport that died mid-way too.
            kind = _KeyRefused if transport.is_active() else _Retry
            raise kind(f"the server at {host}:{port} did not accept the session key") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise _Retry(f"authentication with {host}:{port} failed: {exc}") from None
        return
    auth = None
    try:
        auth = start_pipelined_publickey(transport, username, key.pkey)
        auth.wait()
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if auth is None or auth.refused_early:
            why = (auth.refusal if auth is not None else "") or str(exc) or type(exc).__name__
            raise _EarlyAuthRefused(
                f"the server at {host}:{port} did not answer an early USERAUTH_REQUEST: {why}"
            ) from None
        if isinstance(exc, paramiko.AuthenticationException):
            raise _KeyRefused(
                f"the server at {host}:{port} did not accept the session key"
            ) from None
        raise _Retry(f"authentication with {host}:{port} failed: {exc}") from None


def _open_once(
    host: str,
    port: int,
    username: str,
    key: EphemeralKey,
    *,
    sandbox_id: str,
    policy: HostKeyPolicy,
    timeout: float,
    keepalive: float,
    preamble: bytes | None = None,
    pipeline: bool = False,
) -> paramiko.Transport:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise _Retry(f"TCP connect to {host}:{port} failed: {exc.strerror or exc}") from None
    # Without NODELAY every exec pays the 40 ms delayed-ACK (measured: 48 ms vs 5 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if preamble:
        # Contract B: the session line goes first, before the server's banner is read;
        # sent in the same flight as our own SSH banner, it costs no round trip.
        try:
            sock.sendall(preamble)
        except OSError as exc:
            sock.close()
            raise _Retry(f"sending the session preamble to {host}:{port} failed: {exc}") from None
    transport = paramiko.Transport(
        sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE
    )
    options = transport.get_security_options()
    # AES-GCM first where paramiko has it: measured ~1/3 less CPU per byte than CTR+HMAC.
    gcm = tuple(c for c in _GCM if c in options.ciphers)
    options.ciphers = gcm + tuple(c for c in options.ciphers if c not in gcm)
    set_rekey_bytes(transport, REKEY_BYTES)
    set_handshake_timeouts(transport, timeout)
    try:
        try:
            transport.start_client(timeout=timeout)
            # start_client returns silently when its timeout passes mid-handshake.
            if not transport.is_active() or not handshake_done(transport):
                raise _Retry(
                    f"SSH handshake with {host}:{port} did not finish within {timeout:.1f} s"
                )
            server_key = transport.get_remote_server_key()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            why = str(exc) or type(exc).__name__
            raise _Retry(f"SSH handshake with {host}:{port} failed: {why}") from None
        # The host key is checked before anything signed is sent.
        policy.verify(sandbox_id, host, port, server_key)
        _authenticate(transport, host, port, username, key, pipeline=pipeline)
        if not transport.is_authenticated():
            raise _Retry(f"the server at {host}:{port} did not accept the session key")
    except BaseException:
        transport.close()
        sock.close()
        raise
    if keepalive > 0:
        transport.set_keepalive(int(max(1, keepalive)))
    return transport


def connect(
    host: str,
    port: int,
    username: str,
    key: EphemeralKey,
    *,
    sandbox_id: str,
    policy: HostKeyPolicy,
    deadline: float,
    keepalive: float = 15.0,
    cancelled: Callable[[], bool] | None = None,
    preamble: bytes | None = None,
) -> paramiko.Transport:
    """Connect and authenticate, retrying with backoff until ``deadline`` (monotonic).

    The exposure may refuse, reset or hang for a few seconds after the session is
    created; each attempt gets a growing timeout and the first success returns at once.
    A host-key mismatch is never retried.
    """
    attempt_timeout = [2.0]
    last: list[str] = []

    def once() -> paramiko.Transport:
        if cancelled is not None and cancelled():
            # The owner closed (its session is DELETEd): stop now, don't retry.
            raise ConnectionLost("the link was closed while connecting")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Retry("deadline passed")
        timeout = min(attempt_timeout[0], remaining)
        attempt_timeout[0] = min(attempt_timeout[0] * 2, 15.0)

        def attempt(pipeline: bool, timeout: float) -> paramiko.Transport:
            return _open_once(
                host,
                port,
                username,
                key,
                sandbox_id=sandbox_id,
                policy=policy,
                timeout=max(0.2, timeout),
                keepalive=keepalive,
                preamble=preamble,
                pipeline=pipeline,
            )

        try:
            try:
                return attempt(_pipelining_allowed(host, port), timeout)
            except _EarlyAuthRefused as exc:
                # Maybe a server that takes no request before its SERVICE_ACCEPT: once
                # more at once in paramiko's order, and if that works, keep to it here.
                log.debug("connect attempt to %s:%s: %s; retrying in order", host, port, exc)
                if cancelled is not None and cancelled():
                    raise ConnectionLost("the link was closed while connecting") from None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                try:
                    transport = attempt(False, min(timeout, remaining))
                except _KeyRefused:
                    # An answer in order where the early request got none: the server's
                    # way, whatever it thinks of this key.
                    _stop_pipelining(host, port)
                    raise
                _stop_pipelining(host, port)
                log.debug("%s:%s: pipelined authentication turned off", host, port)
                return transport
        except _Retry as exc:
            last[:] = [str(exc)]
            log.debug("connect attempt to %s:%s: %s", host, port, exc)
            raise

    retrying = Retrying(
        stop=StopAtDeadline(deadline),
        wait=wait_exponential(multiplier=0.05, min=0.05, max=1.0),
        retry=retry_if_exception_type(_Retry),
        reraise=True,
    )
    start = time.monotonic()
    try:
        return retrying(once)
    except _Retry:
        waited = time.monotonic() - start
        raise SSHConnectError(
            f"sandbox {sandbox_id}: could not open SSH to {host}:{port} as the session user "
            f"within {waited:.1f} s (last error: {last[0] if last else 'none'}); the exposure "
            "may still be propagating: raise connect_timeout, or check the sandbox"
        ) from None
    except HostKeyMismatch:
        raise
