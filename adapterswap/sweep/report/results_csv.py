"""``results.csv``: one row per cell, its settings and one column per metric."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CSV_COLUMNS = ["backbone", "adapter", "scale", "start", "end", "reference", "prompt", "seed",
               "steps", "height", "width", "guidance_scale", "status", "image"]


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path, metrics: Sequence[str]) -> None:
    """One row per cell: its settings and one column per metric (empty: not scored)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS + list(metrics) + ["latency_total_s", "latency_denoise_s",
                                                       "adapter_active_steps", "confounds"])
        for row in rows:
            writer.writerow([row.get(c) for c in CSV_COLUMNS]
                            + [row["scores"].get(m) for m in metrics]
                            + [row["timings"].get("total_s"), row["timings"].get("denoise_s"),
                               row.get("adapter_active_steps"),
                               ";".join(row.get("confounds") or [])])
