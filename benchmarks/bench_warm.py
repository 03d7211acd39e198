"""Row 2: warm command latency, N sequential ``true`` on an open connection.

Every client talks to the same OpenSSH sshd (sshbridge through the emulator's API in
OpenSSH mode). Per repetition and client: connect, 5 untimed warm-up commands, N timed
commands, close; the client order rotates between repetitions so background load falls
on all alike, and only the client being measured has threads alive.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import json
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paramiko
from bench_common import (
    SSH_BASE_OPTS,
    EmulatorProcess,
    Goal,
    Sample,
    Section,
    log,
    ms,
    pct,
    ratio,
    table,
    write_keyfile,
)

WARMUP = 5


class Client:
    label = ""

    def open(self) -> None: ...

    def cmd(self) -> None:
        raise NotImplementedError

    def close(self) -> None: ...

    def loop(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            self.cmd()
            out.append(time.perf_counter() - t)
        return out


class SSHBridge(Client):
    label = 'sshbridge `run("true")`'

    def __init__(self, emu: EmulatorProcess) -> None:
        self.emu = emu
        self.sid = emu.create_sandbox()

    def open(self) -> None:
        from sshbridge import SandboxSSH

        self.shell = SandboxSSH(self.sid, api_key=self.emu.api_key, base_url=self.emu.base_url)
        self.shell.connect()

    def cmd(self) -> None:
        if self.shell.run("true").exit_code != 0:
            raise RuntimeError("true failed")

    def close(self) -> None:
        self.shell.close()


class Paramiko(Client):
    def __init__(self, srv: Any, key: Path, nodelay: bool) -> None:
        self.srv, self.key, self.nodelay = srv, key, nodelay
        self.label = "paramiko `exec_command`, " + ("TCP_NODELAY socket" if nodelay else "defaults")

    def open(self) -> None:
        self.ssh = paramiko.SSHClient()
        self.ssh.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        sock = socket.create_connection((self.srv.host, self.srv.port))
        if self.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ssh.connect(
            self.srv.host,
            self.srv.port,
            self.srv.username,
            key_filename=str(self.key),
            look_for_keys=False,
            allow_agent=False,
            sock=sock,
        )

    def cmd(self) -> None:
        _, stdout, stderr = self.ssh.exec_command("true")
        stdout.read()
        stderr.read()
        if stdout.channel.recv_exit_status() != 0:
            raise RuntimeError("true failed")

    def close(self) -> None:
        self.ssh.close()


class Fabric(Client):
    def __init__(self, srv: Any, key: Path, nodelay: bool) -> None:
        self.srv, self.key, self.nodelay = srv, key, nodelay
        self.label = 'Fabric `Connection.run("true", hide=True)`' + (
            ", TCP_NODELAY socket" if nodelay else ""
        )

    def open(self) -> None:
        import fabric  # type: ignore[import-untyped]

        kwargs: dict[str, Any] = {
            "key_filename": str(self.key),
            "look_for_keys": False,
            "allow_agent": False,
        }
        if self.nodelay:
            sock = socket.create_connection((self.srv.host, self.srv.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            kwargs["sock"] = sock
        config = fabric.Config(overrides={"load_ssh_configs": False})
        self.conn = fabric.Connection(
            self.srv.host,
            user=self.srv.username,
            port=self.srv.port,
            config=config,
            connect_kwargs=kwargs,
        )
        self.conn.open()

    def cmd(self) -> None:
        self.conn.run("true", hide=True)

    def close(self) -> None:
        self.conn.close()


class AsyncSSH(Client):
    label = 'AsyncSSH `conn.run("true")`'

    def __init__(self, srv: Any, key: Path) -> None:
        self.srv, self.key = srv, key

    def open(self) -> None:
        import asyncssh

        self.lp = asyncio.new_event_loop()
        self.conn = self.lp.run_until_complete(
            asyncssh.connect(
                self.srv.host,
                port=self.srv.port,
                username=self.srv.username,
                client_keys=[str(self.key)],
                known_hosts=None,
                agent_path=None,
                config=[],
            )
        )

    def loop(self, n: int) -> list[float]:
        async def go() -> list[float]:
            out = []
            for _ in range(n):
                t = time.perf_counter()
                r = await self.conn.run("true")
                out.append(time.perf_counter() - t)
                if r.exit_status != 0:
                    raise RuntimeError("true failed")
            return out

        return self.lp.run_until_complete(go())

    def close(self) -> None:
        self.conn.close()
        self.lp.run_until_complete(self.conn.wait_closed())
        self.lp.close()


class OpenSSHMux(Client):
    label = "OpenSSH `ssh host true` via ControlMaster (one process per command)"

    def __init__(self, srv: Any, key: Path, tmp: Path) -> None:
        self.srv, self.key = srv, key
        self.opts = [
            *SSH_BASE_OPTS,
            "-i",
            str(key),
            "-p",
            str(srv.port),
            "-o",
            f"ControlPath={tmp / 'cm-%C'}",
        ]
        self.dest = f"{srv.username}@{srv.host}"

    def open(self) -> None:
        subprocess.run(
            [
                "ssh",
                *self.opts,
                "-o",
                "ControlMaster=yes",
                "-o",
                "ControlPersist=60",
                "-fN",
                self.dest,
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )

    def cmd(self) -> None:
        subprocess.run(
            ["ssh", *self.opts, self.dest, "true"],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )

    def close(self) -> None:
        subprocess.run(
            ["ssh", *self.opts, "-O", "exit", self.dest],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )


class ParallelSSH(Client):
    """parallel-ssh (libssh2 + gevent) in a worker process: gevent must not meet our threads."""

    label = 'parallel-ssh `SSHClient.run_command("true")` (libssh2)'

    def __init__(self, srv: Any, key: Path) -> None:
        self.args = [srv.host, str(srv.port), srv.username, str(key)]

    def open(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "pssh-worker", *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._ask(WARMUP)

    def _ask(self, n: int) -> list[float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the parallel-ssh worker died")
        times: list[float] = json.loads(line)
        return times

    def loop(self, n: int) -> list[float]:
        return self._ask(n)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def _pssh_worker(host: str, port: str, user: str, key: str) -> None:
    from pssh.clients.native import SSHClient  # type: ignore[import-untyped]

    client = SSHClient(
        host,
        user=user,
        port=int(port),
        pkey=key,
        num_retries=1,
        allow_agent=False,
        identity_auth=False,
    )
    for line in sys.stdin:
        out = []
        for _ in range(int(line)):
            t = time.perf_counter()
            res = client.run_command("true")
            for _x in res.stdout:
                pass
            for _x in res.stderr:
                pass
            client.wait_finished(res)
            out.append(time.perf_counter() - t)
            if res.exit_code != 0:
                raise RuntimeError("true failed")
        print(json.dumps(out), flush=True)
    client.disconnect()


def _profile(client: SSHBridge, n: int, path: Path) -> str:
    """cProfile (calling thread only) around the sshbridge loop; top 15 cumulative."""
    client.open()
    try:
        client.loop(WARMUP)
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        client.loop(n)
        prof.disable()
        wall = time.perf_counter() - t
    finally:
        client.close()
    buf = io.StringIO()
    buf.write(
        f'cProfile of {n} sequential sshbridge run("true") on a warm connection to '
        f"OpenSSH sshd; {wall / n * 1000:.2f} ms per command under the profiler.\n"
        "Only the calling thread is profiled (paramiko's reader thread is not): time "
        "spent waiting for the server shows up as lock/select waits.\n\n"
    )
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(15)
    buf.write("\nTop 15 by own time (tottime):\n")
    stats.sort_stats("tottime").print_stats(15)
    text = buf.getvalue().replace(str(Path(sys.prefix)), "<prefix>")
    text = text.replace(str(Path(__file__).resolve().parent.parent) + "/", "")
    path.write_text(text)
    return text


def run(quick: bool, sshd: Any, profile_path: Path | None = None) -> Section:
    from sshbridge.emulator import OpenSSHTarget

    reps = 2 if quick else 5
    n = 50 if quick else 200
    n_slow = 30 if quick else 100  # clients at ~50 ms per command
    tmp = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    key = tmp / "id_ed25519"
    sshd.add_authorized_key(write_keyfile(key))
    target = OpenSSHTarget(sshd.host, sshd.port, sshd.username, sshd.authorized_keys_file)
    skipped: list[str] = []
    emu = EmulatorProcess(openssh=target)
    try:
        sb_client = SSHBridge(emu)
        clients: dict[str, Client] = {
            "sshbridge": sb_client,
            "paramiko_nodelay": Paramiko(sshd, key, True),
            "paramiko": Paramiko(sshd, key, False),
            "asyncssh": AsyncSSH(sshd, key),
        }
        try:
            import fabric  # noqa: F401

            clients["fabric"] = Fabric(sshd, key, False)
            clients["fabric_nodelay"] = Fabric(sshd, key, True)
        except ImportError as exc:
            skipped.append(f"Fabric: not installed ({exc}); `pip install fabric`")
        if shutil.which("ssh"):
            clients["openssh"] = OpenSSHMux(sshd, key, tmp)
        else:
            skipped.append("OpenSSH ControlMaster: no `ssh` client on PATH")
        try:
            import pssh  # type: ignore[import-untyped]  # noqa: F401

            clients["pssh"] = ParallelSSH(sshd, key)
        except ImportError as exc:
            skipped.append(f"parallel-ssh: not installed ({exc}); `pip install parallel-ssh`")
        slow = {"paramiko", "fabric", "pssh"}
        counts = {name: (n_slow if name in slow else n) for name in clients}
        res = {name: Sample() for name in clients}
        for i in range(reps):
            names = list(clients)
            names = names[i % len(names) :] + names[: i % len(names)]
            for name in names:
                c = clients[name]
                try:
                    c.open()
                    try:
                        c.loop(WARMUP)
                        res[name].reps.append(c.loop(counts[name]))
                    finally:
                        c.close()
                except Exception as exc:  # noqa: BLE001  # reported in the table
                    res[name].error = f"{type(exc).__name__}: {exc}"
            log(f"warm latency: round {i + 1}/{reps} done")
        profile_text = ""
        if profile_path is not None:
            profile_text = _profile(sb_client, n, profile_path)
    finally:
        emu.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    sb = res["sshbridge"].median
    rows = []
    for name, s in res.items():
        c = clients[name]
        if not s.all:
            rows.append([c.label, "0", f"failed: {s.error}", "", "", "", ""])
            continue
        meds = s.rep_medians()
        rows.append(
            [
                c.label,
                f"{len(s.reps)} x {counts[name]}",
                ms(s.median),
                ms(pct(s.all, 90)),
                f"{ms(min(meds))} - {ms(max(meds))}",
                f"{ms(min(s.all))} / {ms(max(s.all))}",
                "-" if name == "sshbridge" else ratio(sb, s.median),
            ]
        )
    lines = table(
        [
            "client",
            "reps x commands",
            "median ms",
            "p90 ms",
            "rep medians min - max ms",
            "fastest / slowest command ms",
            "sshbridge / this",
        ],
        rows,
    )
    goals: list[Goal] = []
    fastest_pm = min(res["paramiko_nodelay"].median, res["paramiko"].median)
    r = sb / fastest_pm
    goals.append(
        Goal(
            'warm `run("true")` vs fastest paramiko path',
            "<= 1.1x",
            f"{r:.2f}x ({ms(sb)} vs {ms(fastest_pm)} ms)",
            r <= 1.1,
        )
    )
    if "fabric" in res and res["fabric"].all:
        f = res["fabric"].median / sb
        goals.append(
            Goal(
                'warm `run("true")` vs Fabric (defaults)',
                ">= 8x faster",
                f"{f:.1f}x faster ({ms(sb)} vs {ms(res['fabric'].median)} ms)",
                f >= 8,
            )
        )
        if res["fabric_nodelay"].all:
            f = res["fabric_nodelay"].median / sb
            goals.append(
                Goal(
                    "stricter reading: vs Fabric handed a TCP_NODELAY socket",
                    ">= 8x faster",
                    f"{f:.1f}x faster ({ms(sb)} vs {ms(res['fabric_nodelay'].median)} ms; "
                    "Fabric's runner polls with sleep(0.01))",
                    f >= 8,
                )
            )
    else:
        goals.append(Goal("warm vs Fabric", ">= 8x faster", "Fabric not measured", None))
    notes = [
        '- median and p90 pool every timed command of every repetition; "rep medians" is '
        "the spread of the per-repetition medians.",
        f"- The ~50 ms clients (paramiko, Fabric and parallel-ssh without TCP_NODELAY) run "
        f"{n_slow} commands per repetition instead of {n} to keep the run short.",
    ]
    notes += [f"- skipped: {s}" for s in skipped]
    if profile_text and profile_path is not None:
        notes.append(f"- cProfile of the sshbridge loop: `{profile_path.name}`.")
    return Section(f"2. Warm command latency ({n} sequential `true`)", lines, notes, goals)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "pssh-worker":
        _pssh_worker(*sys.argv[2:])
    else:
        raise SystemExit("usage: bench_warm.py pssh-worker HOST PORT USER KEY")
