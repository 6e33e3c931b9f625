"""adapterswap plugin for Stable Diffusion 1.5: the ``sd15`` and ``sd15-lcm`` backbones and the
``object-ip-adapter`` (h94 IP-Adapter Plus)."""

__version__ = "0.1.0"
