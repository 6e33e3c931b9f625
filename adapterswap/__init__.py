"""adapterswap: move adapters across diffusion backbones and measure how many steps they need."""

from __future__ import annotations

import pluggy

__version__ = "0.2.0"

#: Decorator for plugin hook implementations (``@hookimpl def register_backbones(register): ...``).
hookimpl = pluggy.HookimplMarker("adapterswap")

__all__ = ["__version__", "hookimpl"]
