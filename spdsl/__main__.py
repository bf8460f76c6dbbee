"""``python -m spdsl``: the same as the ``spdsl`` command."""

from .cli import main

main()
