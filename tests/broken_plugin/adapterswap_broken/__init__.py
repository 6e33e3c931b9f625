"""A deliberately broken adapterswap plugin (tests)."""
