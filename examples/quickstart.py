"""sshbridge quickstart: run commands in a sandbox and move a file each way.

With no arguments it starts the local emulator (no account needed) and uses an emulated
sandbox. With a real key and sandbox id it uses those::

    python examples/quickstart.py                      # local emulator
    PRIME_API_KEY=... python examples/quickstart.py sbx_123
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from sshbridge import CommandTimeout, SandboxSSH, SSHBridgeError


def main(argv: list[str]) -> int:
    with contextlib.ExitStack() as stack:
        if len(argv) > 1:
            sandbox_id = argv[1]
            print(f"using sandbox {sandbox_id} on the real service")
        else:
            from sshbridge.emulator import Emulator

            emu = stack.enter_context(Emulator())
            os.environ.update(emu.env())
            sandbox_id = emu.create_sandbox()
            print(f"started the local emulator at {emu.base_url}; sandbox {sandbox_id}")

        start = time.perf_counter()
        with SandboxSSH(sandbox_id, ttl_seconds=600) as shell:
            session = shell.session
            assert session is not None
            print(
                f"connected in {time.perf_counter() - start:.2f} s: session "
                f"{session.session_id} at {session.host}:{session.port}, "
                f"expires {session.expires_at:%H:%M:%S %Z}"
            )

            result = shell.run('uname -s; echo "hello from $(pwd)"', check=True)
            print(f"$ uname -s; echo hello  -> exit {result.exit_code}")
            print("  " + result.stdout.strip().replace("\n", "\n  "))

            listed = shell.run(["ls", "-la", "my dir"], cwd=".")
            print(
                f"$ ls -la 'my dir'      -> exit {listed.exit_code} (a missing dir is not an error "
                "unless check=True)"
            )

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            data = os.urandom(3 * 1024 * 1024 + 7)
            local = tmp / "payload.bin"
            local.write_bytes(data)
            shell.makedirs("upload dir")
            remote = shell.put(local, "upload dir/payload.bin")
            print(f"put {len(data)} bytes -> {remote!r}")

            digest = shell.run(["sha256sum", remote], check=True).stdout.split()[0]
            assert digest == hashlib.sha256(data).hexdigest(), "remote checksum differs"
            print(f"remote sha256 matches: {digest[:16]}...")

            back = shell.get(remote, tmp / "copy.bin")
            assert back.read_bytes() == data
            print(f"get {remote!r} -> {back.name}: identical")

            try:
                shell.run("sleep 60", timeout=1)
            except CommandTimeout as exc:
                print(f"$ sleep 60 (timeout 1 s) -> {type(exc).__name__}: stopped on the sandbox")
        print("closed: session deleted, nothing left open")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except SSHBridgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
