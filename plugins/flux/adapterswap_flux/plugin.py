"""Hook implementations of the ``flux`` plugin (entry point group ``adapterswap``).

Only hook implementations live here; the classes' modules import torch and diffusers lazily, so
``adapterswap list`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable

from adapterswap import hookimpl


@hookimpl
def register_backbones(register: Callable[[type], None]) -> None:
    from adapterswap_flux.backbones import FluxDev, FluxSchnell
    from adapterswap_flux.distilled import FluxDevHyper, FluxDevTurbo

    register(FluxDev)
    register(FluxSchnell)
    register(FluxDevTurbo)
    register(FluxDevHyper)


@hookimpl
def register_adapters(register: Callable[[type], None]) -> None:
    from adapterswap_flux.infusenet import InfuseNet

    register(InfuseNet)


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    from adapterswap_flux.identity import IdentityMetric

    register(IdentityMetric)
