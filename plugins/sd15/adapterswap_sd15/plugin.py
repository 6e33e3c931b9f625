"""Hook implementations of the adapterswap-sd15 plugin (no torch import here: listing stays
fast; the classes import torch and diffusers inside their methods)."""

from __future__ import annotations

from collections.abc import Callable

from adapterswap import hookimpl


@hookimpl
def register_backbones(register: Callable[[type], None]) -> None:
    from adapterswap_sd15.backbones import SD15Backbone, SD15LCMBackbone
    from adapterswap_sd15.distilled import SD15HyperBackbone

    register(SD15Backbone)
    register(SD15LCMBackbone)
    register(SD15HyperBackbone)


@hookimpl
def register_adapters(register: Callable[[type], None]) -> None:
    from adapterswap_sd15.adapters import ObjectIPAdapter

    register(ObjectIPAdapter)
