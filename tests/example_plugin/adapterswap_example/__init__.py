"""Example adapterswap plugin (tests)."""
