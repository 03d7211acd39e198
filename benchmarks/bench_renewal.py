"""Row 5: what background session renewal costs the commands running meanwhile.

Sequential ``run("true")`` for a fixed time on the emulator's sidecar with
``cut_at_expiry=True`` (a connection dies at its session's expiry), once with
``ttl_seconds=5`` (a renewal every ~3 s: new session, new key, new connection, swap, old
one drained and DELETEd) and once with ``ttl_seconds=900`` (no renewal).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bench_common import EmulatorProcess, Goal, Section, log, ms, pct, ratio, table


@dataclass
class Result:
    ttl: int
    times: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    renewals: int = 0


def _chunk(emu: EmulatorProcess, res: Result, seconds: float) -> None:
    """One fresh SandboxSSH (fresh sandbox), back-to-back commands for ``seconds``."""
    from sshbridge import SandboxSSH

    with SandboxSSH(
        emu.create_sandbox(), api_key=emu.api_key, base_url=emu.base_url, ttl_seconds=res.ttl
    ) as sh:
        for _ in range(5):  # warm-up
            sh.run("true")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                r = sh.run("true")
                if r.exit_code != 0:
                    res.errors.append(f"exit {r.exit_code}")
            except Exception as exc:  # noqa: BLE001  # counted and reported
                res.errors.append(f"{type(exc).__name__}: {exc}")
            res.times.append(time.perf_counter() - t)
        res.renewals += sh.renewals


def run(quick: bool) -> Section:
    # Alternating chunks, so drift in background load falls on both alike; a chunk is
    # long enough for ~3 renewals at ttl 5 (one every ~3 s, each old link cut at expiry).
    chunks, seconds = (1, 6.0) if quick else (2, 10.0)
    base, renew = Result(900), Result(5)
    with EmulatorProcess(cut_at_expiry=True) as emu:
        for i in range(chunks):
            log(f"renewal: chunk {i + 1}/{chunks}, {seconds:.0f} s each with ttl 900 and 5")
            _chunk(emu, base, seconds)
            _chunk(emu, renew, seconds)
        leaked = emu.open_sessions()
    seconds *= chunks
    rows = []
    for r in (base, renew):
        name = (
            "ttl_seconds=900, no renewal"
            if r.ttl == 900
            else "ttl_seconds=5, renewal every ~3 s, `cut_at_expiry=True`"
        )
        rows.append(
            [
                f"sshbridge, {name}",
                str(len(r.times)),
                str(r.renewals),
                ms(pct(r.times, 50)),
                ms(pct(r.times, 99)),
                ms(max(r.times)),
                str(sum(t > 0.05 for t in r.times)),
                str(len(r.errors)),
            ]
        )
    lines = table(
        ["client", "commands", "renewals", "p50 ms", "p99 ms", "max ms", "> 50 ms", "failed"],
        rows,
    )
    p50 = pct(renew.times, 50) / pct(base.times, 50)
    p99 = pct(renew.times, 99) / pct(base.times, 99)
    notes = [
        f"- With renewal / without: p50 {ratio(pct(renew.times, 50), pct(base.times, 50))}, "
        f"p99 {ratio(pct(renew.times, 99), pct(base.times, 99))}, max "
        f"{ratio(max(renew.times), max(base.times))}.",
        f"- {seconds:.0f} s of back-to-back commands per row, in {chunks} alternating "
        "chunk(s) per row, each on a fresh `SandboxSSH`, against the emulator's sidecar "
        "(AsyncSSH, in its own process). A renewal creates a session, authorizes a new key "
        "and connects in a background thread, then swaps the link; the old connection is "
        "drained, closed and its session DELETEd.",
    ]
    if renew.errors:
        notes.append(f"- first failure with renewal: {renew.errors[0]}")
    if leaked:
        notes.append(f"- {leaked} session(s) left open on the emulator (a leak!)")
    goals = [
        Goal(
            "commands during renewals (ttl 5 s, connections cut at expiry)",
            "0 failed",
            f"{len(renew.errors)} failed of {len(renew.times)}, {renew.renewals} renewals; "
            f"p50 {p50:.2f}x, p99 {p99:.2f}x of no renewal",
            not renew.errors and renew.renewals > 0,
        )
    ]
    return Section('5. Renewal cost (sequential `run("true")`)', lines, notes, goals)
