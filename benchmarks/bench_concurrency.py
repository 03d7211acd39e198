"""Row 3: N concurrent ``sleep 0.2`` over one client, wall time against one command.

Two sshds: one with OpenSSH's default ``MaxSessions 10`` (sshbridge must open more
connections to run 32 or 64 at once), and one with ``MaxSessions 64``, where paramiko
and AsyncSSH can run everything over one connection.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
from bench_common import EmulatorProcess, Goal, Section, log, ratio, table, write_keyfile

CMD = "sleep 0.2"


def _threads(n: int, one: Callable[[], None]) -> tuple[float, int]:
    """Wall time of ``n`` threads each calling ``one`` once, released together; failures."""
    go = threading.Event()
    failures: list[BaseException] = []

    def work() -> None:
        go.wait()
        try:
            one()
        except BaseException as exc:  # noqa: BLE001  # counted and reported
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, len(failures)


class Case:
    """One client and concurrency level: ``first`` round (may open connections), then reps."""

    def __init__(self, label: str, n: int) -> None:
        self.label, self.n = label, n
        self.first = float("nan")
        self.times: list[float] = []
        self.failures = 0
        self.error: str | None = None
        self.extra = ""


def _sshbridge(emu: EmulatorProcess, ns: list[int], reps: int, where: str) -> list[Case]:
    from sshbridge import SandboxSSH

    cases = [Case(f"sshbridge, {n} threads on one `SandboxSSH` ({where})", n) for n in ns]
    with SandboxSSH(emu.create_sandbox(), api_key=emu.api_key, base_url=emu.base_url) as sh:

        def one() -> None:
            if sh.run(CMD).exit_code != 0:
                raise RuntimeError("sleep failed")

        for case in cases:
            for i in range(reps + 1):
                wall, fails = _threads(case.n, one)
                case.failures += fails
                if i == 0:
                    case.first = wall
                else:
                    case.times.append(wall)
            refused = _count_refusals(functools.partial(_threads, case.n, one))
            link = sh._manager.link  # private: how many connections the pool opened
            conns = len(getattr(link, "_conns", [])) if link is not None else 0
            case.extra = f"{conns} connection(s); {refused} refused channel opens in a round"
    return cases


def _count_refusals(round_: Callable[[], object]) -> int:
    """Channel opens the server refused during one extra, untimed round."""
    orig = paramiko.Transport.open_session
    count = [0]

    def counting(self: paramiko.Transport, *args: Any, **kwargs: Any) -> paramiko.Channel:
        try:
            return orig(self, *args, **kwargs)
        except Exception:
            count[0] += 1
            raise

    paramiko.Transport.open_session = counting  # type: ignore[method-assign]
    try:
        round_()
    finally:
        paramiko.Transport.open_session = orig  # type: ignore[method-assign]
    return count[0]


def _single_sshbridge(emu: EmulatorProcess, reps: int) -> Case:
    from sshbridge import SandboxSSH

    case = Case('sshbridge, one `run("sleep 0.2")` (the baseline)', 1)
    with SandboxSSH(emu.create_sandbox(), api_key=emu.api_key, base_url=emu.base_url) as sh:
        for i in range(reps + 1):
            t = time.perf_counter()
            sh.run(CMD, check=True)
            wall = time.perf_counter() - t
            if i == 0:
                case.first = wall
            else:
                case.times.append(wall)
    return case


def _paramiko(srv: Any, key: Path, ns: list[int], reps: int) -> list[Case]:
    sock = socket.create_connection((srv.host, srv.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ssh = paramiko.SSHClient()
    ssh.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    ssh.connect(
        srv.host,
        srv.port,
        srv.username,
        key_filename=str(key),
        look_for_keys=False,
        allow_agent=False,
        sock=sock,
    )
    transport = ssh.get_transport()
    assert transport is not None

    def one() -> None:
        chan = transport.open_session()
        chan.exec_command(CMD)
        chan.makefile("rb").read()
        chan.makefile_stderr("rb").read()
        if chan.recv_exit_status() != 0:
            raise RuntimeError("sleep failed")
        chan.close()

    cases = []
    try:
        for n in ns:
            case = Case(f"paramiko, {n} threads on one Transport (MaxSessions 64)", n)
            for i in range(reps + 1):
                wall, fails = _threads(n, one)
                case.failures += fails
                if i == 0:
                    case.first = wall
                else:
                    case.times.append(wall)
            cases.append(case)
    finally:
        ssh.close()
    return cases


def _asyncssh(srv: Any, key: Path, ns: list[int], reps: int) -> list[Case]:
    import asyncssh

    async def go() -> list[Case]:
        cases = []
        async with asyncssh.connect(
            srv.host,
            port=srv.port,
            username=srv.username,
            client_keys=[str(key)],
            known_hosts=None,
            agent_path=None,
            config=[],
        ) as conn:

            async def one() -> None:
                r = await conn.run(CMD)
                if r.exit_status != 0:
                    raise RuntimeError("sleep failed")

            for n in ns:
                case = Case(f"AsyncSSH, `gather` of {n} `conn.run` (MaxSessions 64)", n)
                for i in range(reps + 1):
                    t = time.perf_counter()
                    out = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
                    wall = time.perf_counter() - t
                    case.failures += sum(isinstance(x, BaseException) for x in out)
                    if i == 0:
                        case.first = wall
                    else:
                        case.times.append(wall)
                cases.append(case)
        return cases

    return asyncio.run(go())


def run(quick: bool, sshd10: Any, sshd64: Any) -> Section:
    from sshbridge.emulator import OpenSSHTarget

    reps = 2 if quick else 5
    ns = [32, 64]

    def target(s: Any) -> OpenSSHTarget:
        return OpenSSHTarget(s.host, s.port, s.username, s.authorized_keys_file)

    cases: list[Case] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-conc-") as tmp,
        EmulatorProcess(openssh=target(sshd10)) as emu10,
        EmulatorProcess(openssh=target(sshd64)) as emu64,
    ):
        key = Path(tmp) / "id_ed25519"
        sshd64.add_authorized_key(write_keyfile(key))
        log("concurrency: sshbridge")
        single = _single_sshbridge(emu10, reps)
        cases.append(single)
        sb10 = _sshbridge(emu10, ns, reps, "MaxSessions 10")
        cases += sb10
        cases += _sshbridge(emu64, ns, reps, "MaxSessions 64")
        log("concurrency: paramiko, AsyncSSH")
        for fn, name in ((_paramiko, "paramiko"), (_asyncssh, "AsyncSSH")):
            try:
                cases += fn(sshd64, key, ns, reps)
            except Exception as exc:  # noqa: BLE001  # reported in the table
                c = Case(f"{name} (MaxSessions 64)", 0)
                c.error = f"{type(exc).__name__}: {exc}"
                cases.append(c)

    base = statistics.median(single.times)
    rows = []
    for c in cases:
        if c.error or not c.times:
            rows.append([c.label, "", f"failed: {c.error}", "", "", "", ""])
            continue
        med = statistics.median(c.times)
        rows.append(
            [
                c.label,
                str(len(c.times)),
                f"{med:.3f}",
                f"{min(c.times):.3f} - {max(c.times):.3f}",
                f"{c.first:.3f}",
                f"{med / base:.2f}x",
                "-" if c.label.startswith("sshbridge") else _vs_sshbridge(c, cases),
                f"{c.failures} failed" if c.failures else c.extra,
            ]
        )
    lines = table(
        [
            "client",
            "reps",
            "wall median s",
            "min - max s",
            "first round s",
            "vs one command",
            "sshbridge (MaxSessions 64) / this",
            "note",
        ],
        rows,
    )
    goals = []
    for c in sb10:
        r = statistics.median(c.times) / base if c.times else float("nan")
        # The floor on this machine: the best alternative on one connection, same n.
        others = [
            (statistics.median(o.times), o.label.split(",")[0])
            for o in cases
            if o.n == c.n and o.times and not o.label.startswith("sshbridge")
        ]
        floor = ""
        if others:
            best, who = min(others)
            floor = f"; best alternative {who} {best / base:.2f}x"
        goals.append(
            Goal(
                f"{c.n} concurrent `sleep 0.2` on one SandboxSSH, sshd MaxSessions 10",
                "<= 1.5x one command",
                f"{r:.2f}x ({statistics.median(c.times):.3f} s vs {base:.3f} s{floor})"
                + (f", {c.failures} failed" if c.failures else ""),
                r <= 1.5 and c.failures == 0,
            )
        )
    notes = [
        "- Wall time from releasing all threads (or starting `gather`) to the last result; "
        '"first round" is the first batch on a fresh object, which also opens any extra '
        "connections; the median is over the rounds after it. The refusals are counted "
        "in one more, untimed round.",
        f'- Baseline: one `run("sleep 0.2")` on a warm sshbridge connection, median {base:.3f} s.',
    ]
    return Section("3. Concurrency (`sleep 0.2`, 32 and 64 at once)", lines, notes, goals)


def _vs_sshbridge(c: Case, cases: list[Case]) -> str:
    for other in cases:
        if (
            other.label.startswith("sshbridge")
            and "MaxSessions 64" in other.label
            and other.n == c.n
            and other.times
        ):
            return ratio(statistics.median(other.times), statistics.median(c.times))
    return "n/a"
