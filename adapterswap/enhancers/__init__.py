"""The built-in enhancers (:mod:`adapterswap.enhancer`), registered like a plugin's:

- ``dcg``: FastFace's decoupled classifier-free guidance (:mod:`adapterswap.enhancers.dcg`);
- ``attention-manipulation``: FastFace's reshaping of an IP-Adapter's image-token attention
  (:mod:`adapterswap.kit.attention_manipulation`).
"""

from __future__ import annotations

from collections.abc import Callable

from adapterswap import hookimpl


@hookimpl
def register_enhancers(register: Callable[[type], None]) -> None:
    from adapterswap.enhancers.dcg import DecoupledGuidance
    from adapterswap.kit.attention_manipulation import AttentionManipulation

    register(DecoupledGuidance)
    register(AttentionManipulation)
