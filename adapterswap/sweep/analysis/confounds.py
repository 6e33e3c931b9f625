"""Confounded cells: flags that change what a cell measures, above all an adapter whose
window acted at no step (an adapter-off cell under an adapter label, left out of its
setting's curve, regime and deltas), counted per setting and step count."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from adapterswap.sweep.analysis.labels import row_label

#: The confound of a cell whose adapter window acted at no step.
WINDOW_NEVER_OPENS = "window_never_opens"


def window_never_opens(row: Mapping[str, Any]) -> bool:
    """An adapter cell whose window acted at no step (an adapter-off cell in disguise)."""
    if row.get("adapter", "none") == "none":
        return False
    return row.get("adapter_active_steps") == 0 or \
        WINDOW_NEVER_OPENS in (row.get("confounds") or [])


def confound_counts(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (backbone, setting, steps, flag): how many finished cells carry the flag, of how
    many. ``window_never_opens`` is also derived from ``adapter_active_steps == 0``."""
    totals: Counter[tuple[str, str, int]] = Counter()
    flagged: Counter[tuple[str, str, int, str]] = Counter()
    for row in rows:
        if row["status"] != "done":
            continue
        key = (row["backbone"], row_label(row), row["steps"])
        totals[key] += 1
        flags = set(row.get("confounds") or [])
        if window_never_opens(row):
            flags.add(WINDOW_NEVER_OPENS)
        for flag in flags:
            flagged[(*key, flag)] += 1
    return [{"backbone": b, "setting": s, "label": f"{b}|{s}", "steps": n, "flag": f,
             "cells": count, "of_cells": totals[(b, s, n)]}
            for (b, s, n, f), count in sorted(flagged.items())]
