"""``python -m sshbridge.cli``."""

from . import main

main()
