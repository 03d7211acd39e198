"""CLI benchmark through an emulated wide-area link: `sshbridge exec SANDBOX true` warm
(through the session holder), next to OpenSSH ControlMaster and the cold path.

The API and the SSH port are behind ``latency_proxy.py`` (one-way delay, bandwidth cap),
as in ``bench_wan.py``: the sandbox is a real OpenSSH sshd behind the preamble front of
``tests/sshd_server.py`` (contract B), its sessions minted by the emulator's API in
OpenSSH mode. OpenSSH talks to the same sshd through a proxy of its own (no preamble, no
API). Each CLI call is a fresh process of the installed console script, as an agent or a
shell script would run it::

    python benchmarks/bench_cli_wan.py                 # 50 ms round trip
    python benchmarks/bench_cli_wan.py --rtt-ms 10 -n 30
    python benchmarks/bench_cli_wan.py --burst 100     # also: 100 calls, POSTs counted

Figures are medians (and p90) in ms and in round trips (time / rtt). Loopback only;
everything it starts (holders included) is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_common import SSH_BASE_OPTS, FrontProcess, log, table, write_keyfile
from latency_proxy import ProxyProcess
from sshd_server import start_sshd

from sshbridge.emulator import Emulator, OpenSSHTarget

SSHBRIDGE = str(Path(sys.executable).parent / "sshbridge")


def p90(xs: list[float]) -> float:
    return sorted(xs)[max(0, round(0.9 * len(xs)) - 1)]


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.rtt = args.rtt_ms / 1000.0
        self.bw = args.mbit * 1e6 / 8 if args.mbit else None
        self.work = work
        self.rows: list[list[str]] = []
        self.notes: list[str] = []
        self.sshd = start_sshd(work / "sshd", max_sessions=64)
        self.key = work / "id_ed25519"
        self.sshd.add_authorized_key(write_keyfile(self.key))
        # sshbridge's path: API proxy -> emulator; SSH proxy -> preamble front -> sshd.
        self.front = FrontProcess((self.sshd.host, self.sshd.port))
        self.ssh_link = ProxyProcess(
            (self.front.host, self.front.port), rtt=self.rtt, bandwidth=self.bw
        )
        target = OpenSSHTarget(
            self.ssh_link.host,
            self.ssh_link.port,
            self.sshd.username,
            self.sshd.authorized_keys_file,
        )
        self.emu = Emulator(openssh=target, contract="vm").start()
        self.emu.rate_limit = (10_000, 60.0)
        api_host, api_port = self.emu.base_url.split("//")[1].rsplit(":", 1)
        self.api_link = ProxyProcess((api_host, int(api_port)), rtt=self.rtt, bandwidth=self.bw)
        self.sid = self.emu.create_sandbox()
        # OpenSSH's path: SSH proxy -> sshd.
        self.alt_link = ProxyProcess(
            (self.sshd.host, self.sshd.port), rtt=self.rtt, bandwidth=self.bw
        )
        # Short: the holder's socket path must fit in a sockaddr_un.
        self.runtime = Path(tempfile.mkdtemp(prefix="sbcw-", dir="/tmp"))
        home = work / "home"
        home.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
        self.env.update(
            PRIME_API_KEY=self.emu.api_key,
            PRIME_API_BASE_URL=f"http://{self.api_link.host}:{self.api_link.port}",
            HOME=str(home),
            XDG_RUNTIME_DIR=str(self.runtime),
        )
        self.env.pop("SSHBRIDGE_PERSIST", None)

    def close(self) -> None:
        subprocess.run([SSHBRIDGE, "close", "--all"], env=self.env, capture_output=True, timeout=60)
        subprocess.run(
            ["ssh", *self._mux_opts(), "-O", "exit", self._dest()],
            capture_output=True,
            timeout=30,
        )
        for c in (self.api_link, self.ssh_link, self.alt_link):
            c.close()
        self.emu.stop()
        self.front.close()
        self.sshd.stop()
        shutil.rmtree(self.runtime, ignore_errors=True)

    def _dest(self) -> str:
        return f"{self.sshd.username}@{self.alt_link.host}"

    def _mux_opts(self) -> list[str]:
        return [
            *SSH_BASE_OPTS,
            "-i",
            str(self.key),
            "-p",
            str(self.alt_link.port),
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={self.work / 'cm-%C'}",
            "-o",
            "ControlPersist=60",
        ]

    def timed(self, argv: list[str], n: int, warmup: int = 1) -> list[float]:
        for _ in range(warmup):
            subprocess.run(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                check=True,
                capture_output=True,
                timeout=120,
            )
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            subprocess.run(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                check=True,
                capture_output=True,
                timeout=120,
            )
            samples.append(time.perf_counter() - t)
        return samples

    def row(self, label: str, argv: list[str], samples: list[float]) -> None:
        med = statistics.median(samples)
        self.rows.append(
            [
                label,
                f"{med * 1000:.0f}",
                f"{p90(samples) * 1000:.0f}",
                f"{med / self.rtt:.1f}",
                f"`{' '.join(argv)}`",
            ]
        )
        log(f"{label}: {med * 1000:.0f} ms")

    def run(self) -> None:
        n = self.args.n
        py = [sys.executable, "-c", "pass"]
        self.row("interpreter start (`python -c pass`, local floor)", py, self.timed(py, n))
        warm = [SSHBRIDGE, "exec", self.sid, "true"]
        posts_before = self._posts()
        self.row("sshbridge exec, warm (holder)", warm, self.timed(warm, n))
        self.notes.append(
            f"warm sshbridge exec: {self._posts() - posts_before} session POST(s) for {n + 1} calls"
        )
        ssh = [SSHBRIDGE, "ssh", self.sid, "true"]  # no terminal on stdin: the holder too
        self.row("sshbridge ssh (no tty), warm (holder)", ssh, self.timed(ssh, n))
        mux = ["ssh", *self._mux_opts(), self._dest(), "true"]
        self.row("OpenSSH ControlMaster, warm", mux, self.timed(mux, n))
        cold = [SSHBRIDGE, "--no-persist", "exec", self.sid, "true"]
        self.row("sshbridge exec --no-persist (cold)", cold, self.timed(cold, max(3, n // 4), 0))
        plain = [
            "ssh",
            *SSH_BASE_OPTS,
            "-i",
            str(self.key),
            "-p",
            str(self.alt_link.port),
            self._dest(),
            "true",
        ]
        self.row("OpenSSH, no master (cold, no API)", plain, self.timed(plain, max(3, n // 4), 0))
        if self.args.burst:
            self.burst(self.args.burst)

    def _posts(self) -> int:
        return sum(
            1
            for c in self.emu.api_calls
            if c.endpoint == "create_session" and c.sandbox_id == self.sid
        )

    def burst(self, count: int) -> None:
        """``count`` exec calls, 4 at a time, against the one sandbox: all must succeed."""
        self.emu.rate_limit = (20, 60.0)  # the real API's per-sandbox budget
        before = self._posts()
        start = time.perf_counter()

        def one(i: int) -> bool:
            r = subprocess.run(
                [SSHBRIDGE, "exec", self.sid, f"echo {i}"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=120,
            )
            return r.returncode == 0 and r.stdout == f"{i}\n".encode()

        with ThreadPoolExecutor(4) as pool:
            ok = sum(pool.map(one, range(count)))
        elapsed = time.perf_counter() - start
        self.notes.append(
            f"burst: {ok}/{count} `sshbridge exec` calls succeeded in {elapsed:.1f} s "
            f"(4 at a time), {self._posts() - before} session POST(s)"
        )

    def report(self) -> str:
        head = [
            f"# CLI through a {self.args.rtt_ms:g} ms round trip"
            + (f", {self.args.mbit:g} Mbit/s" if self.args.mbit else ""),
            "",
        ]
        body = table(["", "median ms", "p90 ms", "round trips", "command"], self.rows)
        return "\n".join([*head, *body, "", *(f"- {n}" for n in self.notes), ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--mbit", type=float, default=1000.0, help="0: no bandwidth cap")
    ap.add_argument("-n", type=int, default=20, help="samples per warm row")
    ap.add_argument("--burst", type=int, default=0, help="also run this many exec calls")
    args = ap.parse_args()
    if not Path(SSHBRIDGE).exists():
        print(f"the console script {SSHBRIDGE} is not installed", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-cli-wan-"))
    bench = Bench(args, work)
    try:
        bench.run()
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    print(bench.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
