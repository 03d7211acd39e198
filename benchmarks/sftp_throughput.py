"""SFTP throughput on loopback: sshbridge against paramiko, AsyncSSH and OpenSSH's sftp.

One throwaway OpenSSH sshd (tests/sshd_server.py), one file (256 MiB by default) in a
temporary directory, every client uploading it and downloading it back, repeated and
interleaved so background load falls on all clients alike. Each Python client runs in
its own subprocess so its peak RSS is its own; OpenSSH's ``sftp -b`` is timed per
command from the echo it prints as each batch command starts (connection setup is not
counted, as for the others).

MB/s is 10^6 bytes per second. "RSS +" is the growth of the client process's peak RSS
(VmHWM, reset through /proc/self/clear_refs) over its RSS before the transfer.

    python benchmarks/sftp_throughput.py [--size-mib 256] [--reps 3] [--clients ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CLIENTS = ("sshbridge", "paramiko", "asyncssh", "openssh", "sshbridge-gcm")
LABELS = {
    "sshbridge": "sshbridge `put`/`get`",
    "paramiko": "paramiko `SFTPClient.put/get` defaults",
    "asyncssh": "AsyncSSH `put/get` defaults",
    "openssh": "OpenSSH `sftp -b`",
    "sshbridge-gcm": "sshbridge, aes128-gcm + 256 KiB packets (proposed transport)",
}
BUDGET = 280.0  # seconds: stop adding rounds past this


# -- worker side (one client, one upload + one download, in its own process) -------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _Meter:
    """Wall time and peak RSS growth of one transfer."""

    def __enter__(self) -> _Meter:
        self.exact = _reset_peak()
        self.base = _status_kib("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.rss_growth = (_status_kib("VmHWM") - self.base) * 1024


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    src, remote, dst = args.src, args.remote, args.dst
    out: dict[str, Any] = {}
    if args.worker in ("sshbridge", "sshbridge-gcm"):
        from datetime import datetime, timedelta, timezone

        import paramiko
        from pydantic import SecretStr

        from sshbridge import _sftp, _transport
        from sshbridge._hostkeys import PinFirstHostKey
        from sshbridge._link import Link
        from sshbridge._models import SidecarSSHSession

        if args.worker == "sshbridge-gcm":
            # What benchmarks/README.md proposes for _transport.py, applied from outside.
            tr_class: Any = paramiko.Transport  # private class attribute, no stub
            gcm = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
            prefs = tuple(c for c in tr_class._preferred_ciphers if c not in gcm)
            tr_class._preferred_ciphers = gcm + prefs
            _transport.MAX_PACKET_SIZE = 262144
        pkey = paramiko.Ed25519Key(filename=args.key)
        key = _transport.EphemeralKey(pkey, f"{pkey.get_name()} {pkey.get_base64()}")
        session = SidecarSSHSession(
            session_id=args.user, exposure_id="bench", sandbox_id="bench", host=args.host,
            port=args.port, external_endpoint="bench",
            expires_at=datetime.now(timezone.utc) + timedelta(hours=1), ttl_seconds=3600,
            gateway_url="http://bench/", user_ns="bench", job_id="bench", token=SecretStr("bench"),
        )
        link = Link(
            session, key, sandbox_id="bench", policy=PinFirstHostKey(),
            expires_monotonic=time.monotonic() + 3600, keepalive=15, connect_timeout=10,
            max_connections=2,
        )
        link.connect()
        with link.sftp() as client:  # warm the pooled SFTP client, as a session would be
            client.stat(".")
            chan = client.get_channel()
            t = chan.get_transport() if chan else None
            out["cipher"] = t.local_cipher if t else "?"
        with _Meter() as m:
            _sftp.put(link, src, remote)
        out["up"], out["rss_up"] = m.seconds, m.rss_growth
        with _Meter() as m:
            _sftp.get(link, remote, dst)
        out["down"], out["rss_down"] = m.seconds, m.rss_growth
        link.close()
    elif args.worker == "paramiko":
        import paramiko

        ssh = paramiko.SSHClient()
        ssh.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        ssh.connect(args.host, port=args.port, username=args.user, key_filename=args.key,
                    look_for_keys=False, allow_agent=False)
        sftp = ssh.open_sftp()
        tr = ssh.get_transport()
        out["cipher"] = tr.local_cipher if tr else "?"
        with _Meter() as m:
            sftp.put(src, remote)
        out["up"], out["rss_up"] = m.seconds, m.rss_growth
        with _Meter() as m:
            sftp.get(remote, dst)
        out["down"], out["rss_down"] = m.seconds, m.rss_growth
        ssh.close()
    elif args.worker == "asyncssh":
        import asyncssh

        async def run() -> None:
            async with asyncssh.connect(
                args.host, port=args.port, username=args.user, client_keys=[args.key],
                known_hosts=None,
            ) as conn:
                out["cipher"] = conn.get_extra_info("send_cipher")
                async with conn.start_sftp_client() as sftp:
                    with _Meter() as m:
                        await sftp.put(src, remote)
                    out["up"], out["rss_up"] = m.seconds, m.rss_growth
                    with _Meter() as m:
                        await sftp.get(remote, dst)
                    out["down"], out["rss_down"] = m.seconds, m.rss_growth

        asyncio.run(run())
    else:
        raise SystemExit(f"unknown worker {args.worker}")
    return out


# -- OpenSSH ------------------------------------------------------------------------------


def _openssh(
    server: Any, key: Path, src: Path, remote: str, dst: Path, tmp: Path
) -> dict[str, Any]:
    batch = tmp / "batch"
    batch.write_text(
        f'put "{src}" "{remote}"\nget "{remote}" "{dst}"\npwd\n', encoding="utf-8"
    )
    cmd = [
        "sftp", "-q", "-b", str(batch), "-P", str(server.port), "-i", str(key),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"{server.username}@{server.host}",
    ]
    # sftp echoes each batch command as it starts and flushes: the gaps time the commands.
    stamps: list[float] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(b"sftp> "):
            stamps.append(time.perf_counter())
    err = proc.stderr.read() if proc.stderr else b""
    if proc.wait() != 0 or len(stamps) != 3:
        raise RuntimeError(f"sftp failed: {err.decode(errors='replace')}")
    return {"up": stamps[1] - stamps[0], "down": stamps[2] - stamps[1], "cipher": "default"}


# -- driver -------------------------------------------------------------------------------


def _make_key(path: Path) -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()))
    os.chmod(path, 0o600)
    return key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def _write_file(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)  # incompressible; rotated so blocks differ
    with path.open("wb") as fh:
        left, i = size, 0
        while left > 0:
            chunk = (block[i % 997 :] + block[: i % 997])[:left]
            fh.write(chunk)
            left -= len(chunk)
            i += 1


def _fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def _ratio(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "n/a"
    return f"{statistics.median(a) / statistics.median(b):.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clients", default=",".join(CLIENTS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    for name in ("host", "user", "key", "src", "remote", "dst"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    from sshd_server import start_sshd

    clients = [c for c in args.clients.split(",") if c]
    for c in clients:
        if c not in CLIENTS:
            raise SystemExit(f"unknown client {c!r}; choose from {', '.join(CLIENTS)}")
    if "openssh" in clients and shutil.which("sftp") is None:
        clients.remove("openssh")
    size = args.size_mib * 1024 * 1024
    print("reproduce: python benchmarks/sftp_throughput.py "
          + shlex.join(["--size-mib", str(args.size_mib), "--reps", str(args.reps),
                        "--clients", ",".join(clients)]))
    import asyncssh
    import paramiko

    ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    print(f"python {sys.version.split()[0]}, paramiko {paramiko.__version__}, asyncssh "
          f"{asyncssh.__version__}, {ssh_v}, {os.cpu_count()} CPUs, file {args.size_mib} MiB, "
          f"{args.reps} rounds")
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="sftp-bench-"))
    server = start_sshd(tmp / "sshd")
    results: dict[str, dict[str, list[float]]] = {
        c: {"up": [], "down": [], "rss_up": [], "rss_down": []} for c in clients
    }
    ciphers: dict[str, str] = {}
    try:
        key = tmp / "id_ed25519"
        server.add_authorized_key(_make_key(key))
        src = tmp / "src.bin"
        _write_file(src, size)
        remote_dir = server.home / "bench"
        remote_dir.mkdir()
        for rnd in range(args.reps):
            if rnd and time.monotonic() - start > BUDGET:
                print(f"(stopping after {rnd} rounds: time budget)")
                break
            for client in clients:
                remote = str(remote_dir / f"{client}.bin")
                dst = tmp / f"{client}.down"
                if client == "openssh":
                    res = _openssh(server, key, src, remote, dst, tmp)
                else:
                    proc = subprocess.run(
                        [sys.executable, __file__, "--worker", client, "--host", server.host,
                         "--port", str(server.port), "--user", server.username, "--key",
                         str(key), "--src", str(src), "--remote", remote, "--dst", str(dst)],
                        capture_output=True, text=True, timeout=300,
                    )
                    if proc.returncode != 0:
                        raise RuntimeError(f"{client} worker failed:\n{proc.stderr}")
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                if dst.stat().st_size != size or Path(remote).stat().st_size != size:
                    raise RuntimeError(f"{client}: wrong size after the round trip")
                dst.unlink()
                Path(remote).unlink()
                ciphers[client] = str(res.get("cipher"))
                r = results[client]
                r["up"].append(size / res["up"] / 1e6)
                r["down"].append(size / res["down"] / 1e6)
                for k in ("rss_up", "rss_down"):
                    if k in res:
                        r[k].append(res[k] / 2**20)
                print(f"  round {rnd + 1} {client:14s} up {r['up'][-1]:6.0f} MB/s  "
                      f"down {r['down'][-1]:6.0f} MB/s", flush=True)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    base_p = results.get("paramiko", {"up": [], "down": []})
    base_a = results.get("asyncssh", {"up": [], "down": []})
    print()
    print("| client | cipher | upload MB/s median (min-max) | download MB/s median (min-max) "
          "| up vs paramiko | down vs paramiko | up vs asyncssh | down vs asyncssh "
          "| peak RSS + up / down (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in clients:
        r = results[c]
        rss = (f"{max(r['rss_up']):.1f} / {max(r['rss_down']):.1f}"
               if r["rss_up"] and r["rss_down"] else "n/a")
        print(f"| {LABELS[c]} | {ciphers.get(c, '?')} | {_fmt(r['up'])} | {_fmt(r['down'])} "
              f"| {_ratio(r['up'], base_p['up'])} | {_ratio(r['down'], base_p['down'])} "
              f"| {_ratio(r['up'], base_a['up'])} | {_ratio(r['down'], base_a['down'])} "
              f"| {rss} |")
    print(f"\ntotal {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
