"""adapterswap-flux: FLUX.1-dev / FLUX.1-schnell backbones and InfiniteYou's InfuseNet adapter.

The classes live in :mod:`adapterswap_flux.backbones` and :mod:`adapterswap_flux.infusenet`;
:mod:`adapterswap_flux.plugin` registers them with adapterswap (entry point ``flux``).
"""

__version__ = "0.1.0"
