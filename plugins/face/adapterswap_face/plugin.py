"""The adapterswap hook implementation of ``adapterswap-face`` (no dlib import here)."""

from __future__ import annotations

from collections.abc import Callable

from adapterswap import hookimpl
from adapterswap_face.identity import DlibIdentity


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    """Register identity-dlib."""
    register(DlibIdentity)
