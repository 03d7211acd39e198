"""``python -m sshbridge_fast``: the console script (fast ``exec``, else the full CLI)."""

from . import main

main()
