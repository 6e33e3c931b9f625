"""``python -m adapterswap.cli``, as before the command line became a package."""

from adapterswap.cli import run

run()
