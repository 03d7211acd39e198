"""Fan-out benchmark: ``run("true")`` on N sandboxes (200 by default).

Every client talks to ONE OpenSSH sshd (tests/sshd_server.py) on loopback, N connections
to it standing in for N hosts. sshbridge reaches it through the emulator's HTTP API in
OpenSSH mode (each "sandbox" is a session whose key the emulator authorizes in the
sshd's authorized_keys), so its numbers include what the real service costs per
sandbox: sandbox check, session POST, key authorization, connect, and DELETE at close.
parallel-ssh (``pssh.clients.ParallelSSHClient``, libssh2) connects straight to the
sshd with one key file.

Rows:
- sequential: ``for sid in ids: with SandboxSSH(sid) as s: s.run("true")`` (cold);
  warm = the same loop over N already-open objects.
- Fleet: ``Fleet(ids, max_connections=M).run("true")``; cold opens the N members, warm
  is a second batch on the kept-open members.
- AsyncFleet: the same through asyncio.
- ParallelSSHClient: ``run_command("true")`` + ``join`` with ``pool_size=M``; cold
  connects, warm reuses the connections.

"RSS / conn" is the client process's peak RSS growth (VmHWM, reset through
/proc/self/clear_refs) while N connections were open, over its RSS before, divided by N.
Each client runs in its own subprocess so its memory is its own.

    python benchmarks/bench_fleet.py [--n 200] [--max-connections 200] [--modes ...]
"""

from __future__ import annotations

import argparse
import json
import os
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

MODES = ("sequential", "fleet", "asyncfleet", "pssh")
LABELS = {
    "sequential": "sshbridge, sequential loop",
    "fleet": "sshbridge `Fleet`",
    "asyncfleet": "sshbridge `AsyncFleet`",
    "pssh": "parallel-ssh `ParallelSSHClient`",
}


# -- client side (one subprocess per row) ----------------------------------------------


def _status_kib(name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    # Writing 5 resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _sshbridge(mode: str, cfg: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    from sshbridge import SandboxSSH
    from sshbridge._async import AsyncFleet
    from sshbridge._fleet import Fleet

    ids: list[str] = cfg["ids"]
    opts = {"api_key": cfg["api_key"], "base_url": cfg["base_url"]}
    m = cfg["max_connections"]
    out: dict[str, Any] = {}
    if mode == "sequential":
        start = time.perf_counter()
        for sid in ids:
            with SandboxSSH(sid, **opts) as shell:
                assert shell.run("true").ok
        out["cold"] = time.perf_counter() - start
        base = _status_kib("VmRSS")
        _reset_peak()
        shells = [SandboxSSH(sid, **opts).connect() for sid in ids]
        out["peak_kib"] = _status_kib("VmHWM") - base
        start = time.perf_counter()
        for shell in shells:
            assert shell.run("true").ok
        out["warm"] = time.perf_counter() - start
        for shell in shells:
            shell.close()
        return out
    base = _status_kib("VmRSS")
    _reset_peak()
    if mode == "fleet":
        with Fleet(ids, max_connections=m, **opts) as fleet:
            start = time.perf_counter()
            assert fleet.run("true").ok
            out["cold"] = time.perf_counter() - start
            out["peak_kib"] = _status_kib("VmHWM") - base
            start = time.perf_counter()
            assert fleet.run("true").ok
            out["warm"] = time.perf_counter() - start
        return out

    async def main() -> None:
        async with AsyncFleet(ids, max_connections=m, **opts) as fleet:
            start = time.perf_counter()
            assert (await fleet.run("true")).ok
            out["cold"] = time.perf_counter() - start
            out["peak_kib"] = _status_kib("VmHWM") - base
            start = time.perf_counter()
            assert (await fleet.run("true")).ok
            out["warm"] = time.perf_counter() - start

    asyncio.run(main())
    return out


def _pssh(cfg: dict[str, Any]) -> dict[str, Any]:
    from pssh.clients import ParallelSSHClient

    n = len(cfg["ids"])
    base = _status_kib("VmRSS")
    _reset_peak()
    client = ParallelSSHClient(
        [cfg["host"]] * n,
        port=cfg["port"],
        user=cfg["user"],
        pkey=cfg["key_file"],
        pool_size=cfg["max_connections"],
        num_retries=3,
    )
    out: dict[str, Any] = {}
    for phase in ("cold", "warm"):
        start = time.perf_counter()
        output = client.run_command("true")
        client.join(output)
        out[phase] = time.perf_counter() - start
        codes = [o.exit_code for o in output]
        assert codes == [0] * n, codes[:10]
        if phase == "cold":
            out["peak_kib"] = _status_kib("VmHWM") - base
    return out


def _client_main(mode: str, cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    result = _pssh(cfg) if mode == "pssh" else _sshbridge(mode, cfg)
    print(json.dumps(result))


# -- orchestration -----------------------------------------------------------------------


def _key_file(directory: Path) -> tuple[Path, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    path = directory / "pssh_ed25519"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return path, public.decode() + " pssh-bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="sandboxes / connections")
    parser.add_argument("--max-connections", type=int, default=200)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--reps", type=int, default=3, help="rounds, modes interleaved")
    args = parser.parse_args()
    began = time.perf_counter()

    from sshd_server import start_sshd

    from sshbridge.emulator import Emulator, OpenSSHTarget

    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        tmpdir = Path(tmp)
        # MaxStartups raised: N clients connecting at once are N unauthenticated
        # connections, past sshd's default of 10 (the helper's 100) a random one is dropped.
        server = start_sshd(
            tmpdir / "sshd", max_sessions=64, extra_config="MaxStartups 1000:30:2000\n"
        )
        try:
            key_path, public = _key_file(tmpdir)
            server.add_authorized_key(public)
            target = OpenSSHTarget(
                server.host, server.port, server.username, server.authorized_keys_file
            )
            with Emulator(openssh=target, contract="sidecar") as emu:
                ids = [emu.create_sandbox() for _ in range(args.n)]
                cfg = {
                    "ids": ids,
                    "api_key": emu.api_key,
                    "base_url": emu.base_url,
                    "max_connections": args.max_connections,
                    "host": server.host,
                    "port": server.port,
                    "user": server.username,
                    "key_file": str(key_path),
                }
                cfg_path = tmpdir / "cfg.json"
                cfg_path.write_text(json.dumps(cfg))
                runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
                # Interleaved rounds, so background load falls on every client alike.
                for _ in range(args.reps):
                    for mode in args.modes:
                        proc = subprocess.run(
                            [sys.executable, __file__, "--client", mode, str(cfg_path)],
                            capture_output=True,
                            text=True,
                            timeout=600,
                        )
                        if proc.returncode != 0:
                            print(f"{mode} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                            continue
                        runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                        print(f"{mode}: {runs[mode][-1]}", file=sys.stderr)
                leaked = emu.open_sessions()
        finally:
            server.stop()

    n, m = args.n, args.max_connections
    print(
        f'\n`run("true")` on {n} sandboxes, one OpenSSH sshd on loopback, '
        f"max_connections / pool_size = {m}, {os.cpu_count()} CPUs, "
        f"median of {args.reps} interleaved rounds\n"
    )
    print(
        "| client | cold: connect + run (s) | warm: run again (s) | per sandbox, warm (ms) "
        "| RSS / conn (KiB) |"
    )
    print("|---|---:|---:|---:|---:|")
    for mode, results in runs.items():
        if not results:
            print(f"| {LABELS[mode]} | failed | | | |")
            continue
        cold = statistics.median(r["cold"] for r in results)
        warm = statistics.median(r["warm"] for r in results)
        rss = statistics.median(r["peak_kib"] for r in results)
        print(
            f"| {LABELS[mode]} | {cold:.2f} | {warm:.3f} | {1000 * warm / n:.2f} | {rss / n:.0f} |"
        )
    print(
        f"\nsessions left open after all runs: {len(leaked)}; "
        f"benchmark took {time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--client":
        _client_main(sys.argv[2], sys.argv[3])
    else:
        main()
