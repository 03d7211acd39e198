"""sshbridge against the alternatives, side by side, in one run on this machine.

    python benchmarks/run_all.py            # everything, under 10 minutes
    python benchmarks/run_all.py --quick    # a 1-2 minute smoke run, fewer repetitions
    python benchmarks/run_all.py --skip-sftp --only cold,warm

Starts its own loopback servers (two OpenSSH sshds with an empty pinned HOME, and the
emulator in a child process), prints one markdown report and writes it to
benchmarks/results.md; the warm-latency cProfile goes to benchmarks/profile-warm.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import ROOT, Goal, Section, log, table  # noqa: E402  (needs sys.path)

SECTIONS = ("cold", "warm", "concurrency", "sftp", "renewal")  # numbered 1-5 in the report
BUDGET = 570.0  # seconds for the whole run; the SFTP subprocess gets what is left


def _versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    for dist in ("paramiko", "asyncssh", "fabric", "parallel-ssh", "requests"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    for cmd in (["ssh", "-V"],):
        with contextlib.suppress(OSError):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            parts.append((out.stderr or out.stdout).strip().split(",")[0])
    return ", ".join(parts)


def _machine() -> str:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, "
        f"load average {load}"
    )


def _sftp(quick: bool, extra: str, timeout: float) -> Section:
    script = HERE / "sftp_throughput.py"
    title = "4. SFTP throughput (benchmarks/sftp_throughput.py)"
    if not script.exists():
        return Section(title, ["(skipped: benchmarks/sftp_throughput.py is not there)"])
    args = (
        shlex.split(extra)
        if extra
        else (
            ["--size-mib", "32", "--reps", "1"] if quick else ["--size-mib", "256", "--reps", "3"]
        )
    )
    cmd = [sys.executable, str(script), *args]
    if timeout < 30:
        return Section(title, [f"(skipped: only {timeout:.0f} s of the time budget left)"])
    log(
        f"sftp: {shlex.join(['python', 'benchmarks/sftp_throughput.py', *args])} "
        f"(timeout {timeout:.0f} s)"
    )
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return Section(title, [f"(stopped: no result within {timeout:.0f} s)"])
    took = time.monotonic() - t
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return Section(
            title, [f"(failed with exit code {proc.returncode})", "", "```", tail, "```"]
        )
    out = proc.stdout.splitlines()
    rows = [ln for ln in out if ln.startswith("|")]
    info = [ln for ln in out if ln.startswith(("python ", "reproduce:"))]
    notes = [f"- {ln}" for ln in info] + [
        f"- run as a subprocess by run_all.py in {took:.0f} s; see the SFTP section of "
        "benchmarks/README.md for the method."
    ]
    return Section(title, rows or ["(no table in its output)"], notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (~1-2 minutes)")
    ap.add_argument("--skip-sftp", action="store_true", help="do not run sftp_throughput.py")
    ap.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    ap.add_argument("--sftp-args", default="", help="arguments for sftp_throughput.py")
    ap.add_argument("--out", type=Path, default=HERE / "results.md")
    ap.add_argument("--profile-out", type=Path, default=HERE / "profile-warm.txt")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in only:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    if args.skip_sftp and "sftp" in only:
        only.remove("sftp")

    import bench_cold
    import bench_concurrency
    import bench_renewal
    import bench_warm
    from sshd_server import find_sshd, start_sshd

    if find_sshd() is None:
        print("OpenSSH sshd is not installed (apt-get install openssh-server)", file=sys.stderr)
        return 2
    start = time.monotonic()
    command = shlex.join(["python", "benchmarks/run_all.py", *sys.argv[1:]])
    header = [
        "## sshbridge against the alternatives",
        "",
        f"`{command}`, {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"- machine: {_machine()}",
        f"- versions: {_versions()}",
        "- servers: OpenSSH sshd on 127.0.0.1 (tests/sshd_server.py: `SetEnv HOME=` an empty "
        "directory, so no rc files run; MaxSessions 10 unless noted), and the sshbridge "
        "emulator in a child process (its HTTP API, and its AsyncSSH sidecar or the sshd "
        "behind it).",
        "- sshbridge goes through the whole flow every time (API, key authorization, SSH); "
        'ratios are "sshbridge / this" on medians, so < 1 means sshbridge is faster.',
    ]
    sections: list[Section] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-sshd-"))
    sshd10 = start_sshd(tmp / "sshd10")
    sshd64 = start_sshd(tmp / "sshd64", max_sessions=64)
    runners: dict[str, Callable[[], Section]] = {
        "cold": lambda: bench_cold.run(args.quick, sshd10),
        "warm": lambda: bench_warm.run(args.quick, sshd10, args.profile_out),
        "concurrency": lambda: bench_concurrency.run(args.quick, sshd10, sshd64),
        "renewal": lambda: bench_renewal.run(args.quick),
    }
    try:
        for name in (s for s in SECTIONS if s in only and s != "sftp"):
            log(f"section {name} ({time.monotonic() - start:.0f} s elapsed)")
            try:
                sections.append(runners[name]())
            except Exception:  # noqa: BLE001  # one broken section must not hide the rest
                number = SECTIONS.index(name) + 1
                sections.append(
                    Section(
                        f"{number}. {name} (failed)", ["```", traceback.format_exc().strip(), "```"]
                    )
                )
    finally:
        sshd10.stop()
        sshd64.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if "sftp" in only:
        sections.append(_sftp(args.quick, args.sftp_args, BUDGET - (time.monotonic() - start)))
    elif args.skip_sftp:
        sections.append(Section("4. SFTP throughput", ["(skipped: --skip-sftp)"]))
    sections.sort(key=lambda s: s.title)

    goals: list[Goal] = [g for s in sections for g in s.goals]
    summary = table(
        ["goal", "target", "measured", "verdict"],
        [[g.name, g.target, g.measured, g.verdict] for g in goals],
    )
    body = [*header, "", "### Goals", "", *summary]
    for s in sections:
        body += ["", s.markdown()]
    body += [
        "",
        f"Total run time {time.monotonic() - start:.0f} s; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}.",
    ]
    report = "\n".join(body) + "\n"
    print(report)
    args.out.write_text(report)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
