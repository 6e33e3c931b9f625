"""``python -m adapterswap`` (also what ``torchrun -m adapterswap`` runs)."""

from adapterswap.cli import run

run()
