"""adapterswap plugin for Stable Diffusion XL: the ``sdxl`` and ``sdxl-lightning`` backbones and
the ``style-ip-adapter`` (h94 IP-Adapter with InstantStyle block targeting)."""

__version__ = "0.1.0"
