"""Hook implementations of the adapterswap-sdxl plugin (no torch import here: listing stays
fast; the classes import torch and diffusers inside their methods)."""

from __future__ import annotations

from collections.abc import Callable

from adapterswap import hookimpl


@hookimpl
def register_backbones(register: Callable[[type], None]) -> None:
    from adapterswap_sdxl.backbones import SDXLBackbone, SDXLLightningBackbone
    from adapterswap_sdxl.distilled import (
        SDXLDMD2Backbone,
        SDXLHyperBackbone,
        SDXLTCDBackbone,
        SDXLTurboBackbone,
    )

    register(SDXLBackbone)
    register(SDXLLightningBackbone)
    register(SDXLTurboBackbone)
    register(SDXLHyperBackbone)
    register(SDXLDMD2Backbone)
    register(SDXLTCDBackbone)


@hookimpl
def register_adapters(register: Callable[[type], None]) -> None:
    from adapterswap_sdxl.adapters import StyleIPAdapter

    register(StyleIPAdapter)
