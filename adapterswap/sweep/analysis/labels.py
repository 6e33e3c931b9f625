"""Readable names of adapter settings (adapter, scale, window): the label that groups a
store's rows into curves and names them in the report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def setting_label(adapter: str, scale: float | None = None, start: float = 0.0,
                  end: float = 1.0, enhancer: str | None = None) -> str:
    """A readable name of an adapter setting: ``infusenet``, ``none``,
    ``infusenet [scale 0.5, window 0-0.25]``, ``infusenet + dcg:a=1.5`` (with an enhancer,
    :mod:`adapterswap.enhancer`)."""
    if adapter == "none":
        return "none"
    parts = []
    if scale is not None:
        parts.append(f"scale {scale:g}")
    if (start, end) != (0.0, 1.0):
        parts.append(f"window {start:g}-{end:g}")
    label = f"{adapter} [{', '.join(parts)}]" if parts else adapter
    return f"{label} + {enhancer}" if enhancer and enhancer != "none" else label


def row_label(row: Mapping[str, Any]) -> str:
    return setting_label(row["adapter"], row.get("scale"), row.get("start") or 0.0,
                         1.0 if row.get("end") is None else row["end"], row.get("enhancer"))
