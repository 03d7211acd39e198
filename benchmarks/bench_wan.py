"""Wide-area benchmark: sshbridge and the alternatives through an emulated internet link.

Users reach sandboxes tens of milliseconds away, so this puts a userspace latency proxy
(``latency_proxy.py``: one-way delay, bandwidth cap, handshake round trip) in front of
BOTH the API and the SSH port, and measures, side by side in one run:

* cold start: ``with SandboxSSH(id)`` to the first ``run("true")`` result (API included),
  against a raw paramiko connect + exec and OpenSSH ``ssh host true``;
* warm ``run("true")`` on an open connection, against paramiko, AsyncSSH and OpenSSH
  ControlMaster;
* bulk ``put``/``get`` in MB/s and as a fraction of the link, against paramiko and
  OpenSSH ``sftp``;
* a tree of small files (``put_dir`` pipelined and with tar, ``get_dir``, ``sync`` of an
  unchanged tree), against ``rsync -a -e ssh``, OpenSSH ``sftp -r`` and ``scp -r``;
* a large file (1 GiB) each way: MB/s against OpenSSH ``sftp``, and the peak RSS growth
  of the client process.

Every figure is also given in round trips (time / rtt). The sandbox is a real OpenSSH
sshd behind the preamble front of ``tests/sshd_server.py`` (contract B, as the service
runs today), its sessions minted by the emulator's API in OpenSSH mode; the alternatives
talk to the same sshd through their own proxy (no preamble, no API)::

    python benchmarks/bench_wan.py                       # 50 ms, 1 Gbit/s
    python benchmarks/bench_wan.py --rtt-ms 10 --mbit 300
    python benchmarks/bench_wan.py --quick               # fewer files, smaller bulk

Loopback only; everything it starts is stopped at the end.
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
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench_common import SSH_BASE_OPTS, FrontProcess, log, table, write_keyfile
from bench_warm import AsyncSSH, OpenSSHMux, Paramiko
from latency_proxy import ProxyProcess
from sshd_server import start_sshd

from sshbridge import SandboxSSH
from sshbridge.emulator import Emulator, OpenSSHTarget

# The memory part's client: peak RSS growth (VmHWM, reset through clear_refs) over the
# RSS before each transfer; prints up-seconds down-seconds up-bytes down-bytes.
_RSS_SCRIPT = """
import sys, time
from sshbridge import SandboxSSH

def kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0

def measured(fn):
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = kib("VmRSS")
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t, (kib("VmHWM") - base) * 1024

sid, url, src, remote, back = sys.argv[1:6]
with SandboxSSH(sid, base_url=url, ttl_seconds=900) as shell:
    shell.run("true")
    up, rss_up = measured(lambda: shell.put(src, remote))
    down, rss_down = measured(lambda: shell.get(remote, back))
print(up, down, rss_up, rss_down)
"""


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.rtt = args.rtt_ms / 1000.0
        self.bw = args.mbit * 1e6 / 8 if args.mbit else None
        self.work = work
        self.rows: dict[str, list[list[str]]] = {}
        self.sshd = start_sshd(work / "sshd", max_sessions=64)
        self.key = work / "id_ed25519"
        self.sshd.add_authorized_key(write_keyfile(self.key))
        # sshbridge's path: API proxy -> emulator; SSH proxy -> preamble front -> sshd.
        self.front = FrontProcess((self.sshd.host, self.sshd.port))
        self.ssh_link = ProxyProcess((self.front.host, self.front.port), rtt=self.rtt,
                                     bandwidth=self.bw)
        target = OpenSSHTarget(self.ssh_link.host, self.ssh_link.port, self.sshd.username,
                               self.sshd.authorized_keys_file)
        self.emu = Emulator(openssh=target, contract="vm").start()
        self.emu.rate_limit = (10_000, 60.0)
        host, port = self.emu.base_url.rsplit(":", 1)[0].split("//")[1], int(
            self.emu.base_url.rsplit(":", 1)[1]
        )
        self.api_link = ProxyProcess((host, port), rtt=self.rtt, bandwidth=self.bw)
        self.base_url = f"http://{self.api_link.host}:{self.api_link.port}"
        self.sid = self.emu.create_sandbox()
        # The alternatives' path: SSH proxy -> sshd.
        self.alt_link = ProxyProcess((self.sshd.host, self.sshd.port), rtt=self.rtt,
                                     bandwidth=self.bw)
        self.alt = SimpleNamespace(host=self.alt_link.host, port=self.alt_link.port,
                                   username=self.sshd.username)
        self.ssh_opts = [*SSH_BASE_OPTS, "-i", str(self.key), "-p", str(self.alt.port)]
        self.dest = f"{self.sshd.username}@{self.alt.host}"

    def close(self) -> None:
        for c in (self.api_link, self.emu, self.ssh_link, self.alt_link, self.front):
            try:
                c.stop() if hasattr(c, "stop") else c.close()  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - teardown goes on
                log(f"teardown: {exc}")
        self.sshd.stop()

    def shell(self) -> SandboxSSH:
        return SandboxSSH(self.sid, api_key=self.emu.api_key, base_url=self.base_url,
                          ttl_seconds=900)

    def rt(self, seconds: float) -> str:
        return f"{seconds / self.rtt:.1f}"

    # -- cold ------------------------------------------------------------------------

    def cold(self) -> None:
        reps = 3 if self.args.quick else 5
        times: dict[str, list[float]] = {}

        def sshbridge() -> None:
            shell = self.shell()
            shell.connect()
            shell.run("true", check=True)
            elapsed = time.perf_counter() - t0
            shell.close()
            times.setdefault('sshbridge `with SandboxSSH(id)` -> `run("true")` (API included)',
                             []).append(elapsed)

        def raw() -> None:
            c = Paramiko(self.alt, self.key, nodelay=True)
            c.open()
            c.cmd()
            times.setdefault("paramiko connect + exec (NODELAY; no API)", []).append(
                time.perf_counter() - t0)
            c.close()

        def openssh() -> None:
            subprocess.run(["ssh", *self.ssh_opts, self.dest, "true"], check=True,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
            times.setdefault("OpenSSH `ssh host true` (no API)", []).append(
                time.perf_counter() - t0)

        for _ in range(reps):
            for fn in (sshbridge, raw, openssh):
                t0 = time.perf_counter()
                fn()
        rows = [
            [label, f"{median(v) * 1000:.0f}", self.rt(median(v))] for label, v in times.items()
        ]
        self.rows["Cold start to the first result"] = rows

    # -- warm ------------------------------------------------------------------------

    def warm(self) -> None:
        n = 10 if self.args.quick else 20
        rows = []
        with self.shell() as shell:
            for _ in range(3):
                shell.run("true")
            samples = []
            for _ in range(n):
                t = time.perf_counter()
                shell.run("true")
                samples.append(time.perf_counter() - t)
        rows.append(['sshbridge `run("true")`', f"{median(samples) * 1000:.1f}",
                     self.rt(median(samples))])
        tmp = Path(tempfile.mkdtemp(dir=self.work))
        for client in (Paramiko(self.alt, self.key, nodelay=True), AsyncSSH(self.alt, self.key),
                       OpenSSHMux(self.alt, self.key, tmp)):
            client.open()
            client.loop(3)
            samples = client.loop(n)
            client.close()
            rows.append([client.label, f"{median(samples) * 1000:.1f}", self.rt(median(samples))])
        self.rows["Warm command"] = rows

    # -- bulk ------------------------------------------------------------------------

    def bulk(self) -> None:
        size = (16 if self.args.quick else self.args.bulk_mib) * 1024 * 1024
        src = self.work / "bulk.bin"
        with open(src, "wb") as fh:
            fh.write(os.urandom(size))
        remote = self.sshd.home / "bulk-remote.bin"
        back = self.work / "bulk-back.bin"
        link = self.bw or float("nan")
        rows = []

        # Every upload and download goes to a path that does not exist yet, for every
        # client alike: replacing last run's copy would add the file system's cost of
        # freeing 128 MiB (tens of ms, in the rename or the truncating open) to the
        # transfer's.
        def clear(path: Path) -> None:
            path.unlink(missing_ok=True)

        reps = 1 if self.args.quick else self.args.bulk_reps
        ups: dict[str, list[float]] = {}
        downs: dict[str, list[float]] = {}

        def timed(label: str, put: Callable[[], object], get: Callable[[], object]) -> None:
            clear(remote)
            t = time.perf_counter()
            put()
            ups.setdefault(label, []).append(time.perf_counter() - t)
            clear(back)
            t = time.perf_counter()
            get()
            downs.setdefault(label, []).append(time.perf_counter() - t)

        first = "sshbridge `put` / `get` (first call)"
        again = "sshbridge `put` / `get` (again, SFTP channels open)"
        para = "paramiko `SFTPClient.put` / `get`"
        for _ in range(reps):
            with self.shell() as shell:
                shell.run("true")
                # First: SFTP channels opened by the call itself (one, and 3 more for the
                # byte ranges of a large upload); then again on the pooled channels.
                for label in (first, again):
                    timed(label, lambda: shell.put(src, str(remote)),
                          lambda: shell.get(str(remote), back))
        c = Paramiko(self.alt, self.key, nodelay=True)
        c.open()
        sftp = c.ssh.open_sftp()
        for _ in range(reps):
            timed(para, lambda: sftp.put(str(src), str(remote)),
                  lambda: sftp.get(str(remote), str(back)))
        sftp.close()
        c.close()
        openssh = "OpenSSH `sftp` (connect subtracted)"
        for _ in range(reps):
            clear(remote)
            ups.setdefault(openssh, []).append(self._sftp_batch(f"put {src} {remote}"))
            clear(back)
            downs.setdefault(openssh, []).append(self._sftp_batch(f"get {remote} {back}"))
        for label in ups:
            up, down = median(ups[label]), median(downs[label])
            rows.append([label + (f" (median of {reps})" if reps > 1 else ""),
                         f"{size / up / 1e6:.1f}", f"{size / down / 1e6:.1f}",
                         f"{size / up / link:.0%}", f"{size / down / link:.0%}"])
        self.rows["Bulk transfer"] = rows

    # -- memory ----------------------------------------------------------------------

    def memory(self) -> None:
        """Peak RSS growth of a client process moving a large file each way (1 GiB by
        default) through the link: a subprocess, so the proxies' buffers and this
        process's history are not counted."""
        mib = 16 if self.args.quick else self.args.rss_mib
        if not mib:
            return
        src = self.work / "rss.bin"
        with open(src, "wb") as fh:
            chunk = os.urandom(1024 * 1024)
            for _ in range(mib):
                fh.write(chunk)
        remote = self.sshd.home / "rss-remote.bin"
        back = self.work / "rss-back.bin"
        out = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, self.sid, self.base_url, str(src), str(remote),
             str(back)],
            env={**os.environ, "PRIME_API_KEY": self.emu.api_key}, check=True,
            capture_output=True, text=True, timeout=900,
        )
        up, down, rss_up, rss_down = (float(x) for x in out.stdout.split())
        size = mib * 1024 * 1024
        if back.stat().st_size != size or remote.stat().st_size != size:
            raise RuntimeError("the memory run's copies differ in size")
        rows = [[
            f"sshbridge `put` / `get` of {mib} MiB", f"{size / up / 1e6:.1f}",
            f"{size / down / 1e6:.1f}", f"{rss_up / 2**20:.1f}", f"{rss_down / 2**20:.1f}",
        ]]
        # The same file with OpenSSH's sftp, for the ratio where fixed round trips no
        # longer count (its memory is another program's: not compared).
        remote.unlink()
        up = self._sftp_batch(f"put {src} {remote}")
        back.unlink()
        down = self._sftp_batch(f"get {remote} {back}")
        rows.append([f"OpenSSH `sftp` of {mib} MiB (connect subtracted)",
                     f"{size / up / 1e6:.1f}", f"{size / down / 1e6:.1f}", "", ""])
        remote.unlink()
        back.unlink()
        self.rows["Large file"] = rows

    def _sftp_batch(self, command: str) -> float:
        def run(batch: str) -> float:
            t = time.perf_counter()
            subprocess.run(["sftp", *self._sftp_opts(), "-b", "-", self.dest], input=batch.encode(),
                           check=True, capture_output=True, timeout=600)
            return time.perf_counter() - t

        base = run("pwd\n")
        return max(1e-6, run(command + "\n") - base)

    def _sftp_opts(self) -> list[str]:
        return [*SSH_BASE_OPTS, "-i", str(self.key), "-P", str(self.alt.port)]

    # -- trees -----------------------------------------------------------------------

    def tree(self) -> None:
        files = 20 if self.args.quick else self.args.files
        src = self.work / "tree"
        for i in range(files):
            d = src / f"d{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}.dat").write_bytes(os.urandom(4096))
        rows = []

        def fresh(name: str) -> Path:
            path = self.sshd.home / f"tree-{name}"
            shutil.rmtree(path, ignore_errors=True)
            return path

        def timed(label: str, fn: Callable[[], Any], reps: int = 1,
                  setup: Callable[[], Any] | None = None) -> None:
            # The median of ``reps`` runs, each after ``setup`` (a fresh destination).
            times = []
            for _ in range(reps):
                if setup is not None:
                    setup()
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            elapsed = median(times)
            rows.append([label + (f" (median of {reps})" if reps > 1 else ""),
                         f"{elapsed:.2f}", self.rt(elapsed)])

        # sshbridge runs on an open connection (its SSH handshake is the cold-start row);
        # the command-line tools below each pay their own connect.
        dest = self.sshd.home / "tree-sshbridge"
        tar_dest = self.sshd.home / "tree-sshbridge-tar"
        sync_dest = self.sshd.home / "tree-sshbridge-sync"
        back = self.work / "tree-back"
        with self.shell() as shell:
            shell.run("true")
            timed(f"sshbridge `put_dir` ({files} x 4 KiB; pipelined SFTP)",
                  lambda: shell.put_dir(src, str(dest)), 3, lambda: fresh("sshbridge"))
            timed("sshbridge `put_dir(method=\"tar\")`",
                  lambda: shell.put_dir(src, str(tar_dest), method="tar"), 3,
                  lambda: fresh("sshbridge-tar"))
            timed("sshbridge `get_dir` (tar stream)", lambda: shell.get_dir(str(dest), back), 3,
                  lambda: shutil.rmtree(back, ignore_errors=True))
            timed("sshbridge `get_dir(method=\"sftp\")`",
                  lambda: shell.get_dir(str(dest), back, method="sftp"), 3,
                  lambda: shutil.rmtree(back, ignore_errors=True))
            timed("sshbridge `sync` (first: everything)", lambda: shell.sync(src, str(sync_dest)),
                  3, lambda: fresh("sshbridge-sync"))
            result: list[Any] = []
            timed("sshbridge `sync` (unchanged tree)",
                  lambda: result.append(shell.sync(src, str(sync_dest))), 3)
            assert all(r.sent == [] for r in result), result
            shutil.rmtree(back, ignore_errors=True)
            shell.sync_down(str(sync_dest), back)
            timed("sshbridge `sync_down` (unchanged tree)",
                  lambda: result.append(shell.sync_down(str(sync_dest), back)), 3)
            assert all(r.sent == [] for r in result), result
        ssh_cmd = " ".join(["ssh", *self.ssh_opts])
        rsync_dest = self.sshd.home / "tree-rsync"
        timed("`rsync -a -e ssh`", lambda: subprocess.run(
            ["rsync", "-a", "-e", ssh_cmd, f"{src}/", f"{self.dest}:{rsync_dest}/"],
            check=True, capture_output=True, timeout=900), 3, lambda: fresh("rsync"))
        timed("`rsync -a -e ssh` (unchanged tree)", lambda: subprocess.run(
            ["rsync", "-a", "-e", ssh_cmd, f"{src}/", f"{self.dest}:{rsync_dest}/"],
            check=True, capture_output=True, timeout=900), 3)
        dest = fresh("sftp")
        timed("OpenSSH `sftp -r` (`put -r`)", lambda: subprocess.run(
            ["sftp", *self._sftp_opts(), "-b", "-", self.dest],
            input=f"mkdir {dest}\nput -r {src}/. {dest}\n".encode(),
            check=True, capture_output=True, timeout=900))
        dest = fresh("scp")
        timed("OpenSSH `scp -r`", lambda: subprocess.run(
            ["scp", *SSH_BASE_OPTS, "-i", str(self.key), "-P", str(self.alt.port), "-r",
             str(src), f"{self.dest}:{dest}"],
            check=True, capture_output=True, timeout=900))
        self.rows["Trees"] = rows

    # -- report ----------------------------------------------------------------------

    def report(self) -> str:
        link = f"{self.args.mbit:g} Mbit/s" if self.args.mbit else "no bandwidth cap"
        out = [f"## Wide-area link: {self.args.rtt_ms:g} ms round trip, {link}", ""]
        heads = {
            "Cold start to the first result": ["client", "ms (median)", "round trips"],
            "Warm command": ["client", "ms (median)", "round trips"],
            "Bulk transfer": ["client", "up MB/s", "down MB/s", "up, of link", "down, of link"],
            "Trees": ["client", "seconds", "round trips"],
            "Large file": ["client", "up MB/s", "down MB/s", "peak RSS growth up (MiB)",
                           "down (MiB)"],
        }
        for name, rows in self.rows.items():
            out += [f"### {name}", "", *table(heads[name], rows), ""]
        return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--mbit", type=float, default=1000.0, help="0: no bandwidth cap")
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--bulk-mib", type=int, default=128)
    ap.add_argument("--bulk-reps", type=int, default=3, help="median of this many per client")
    ap.add_argument("--rss-mib", type=int, default=1024,
                    help="file size of the memory part (0: skip it)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["cold", "warm", "bulk", "tree", "memory"],
                    action="append")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results-wan.md"))
    args = ap.parse_args()
    for tool in ("ssh", "sftp", "scp", "rsync"):
        if shutil.which(tool) is None:
            print(f"{tool} is needed (apt-get install openssh-client rsync)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="sshbridge-wan-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            for part in args.only or ["cold", "warm", "bulk", "tree", "memory"]:
                log(f"{part} ...")
                getattr(bench, part)()
        finally:
            bench.close()
        text = bench.report()
    print(text)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
