"""``python -m topyaz_mount``: the command line (used to start detached sessions)."""

from .cli import main

main()
