"""The ``latency`` table of a sweep's store: its schema and the key of a timed configuration
(everything that changes the time of one image)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

#: Latency: one row per timed configuration. The key is a JSON of :data:`LATENCY_KEY`.
LATENCY_SCHEMA = """
CREATE TABLE IF NOT EXISTS latency (
    key TEXT PRIMARY KEY, backbone TEXT NOT NULL, adapter TEXT NOT NULL, scale REAL,
    start REAL NOT NULL, "end" REAL NOT NULL, steps INTEGER NOT NULL, batch INTEGER NOT NULL,
    height INTEGER NOT NULL, width INTEGER NOT NULL, dtype TEXT NOT NULL,
    fast_path TEXT NOT NULL, cache TEXT NOT NULL, device TEXT, total_s REAL NOT NULL,
    total_q1_s REAL, total_q3_s REAL, denoise_s REAL, repeats INTEGER NOT NULL, samples_s TEXT,
    method TEXT NOT NULL, fit TEXT, run_id INTEGER, measured_at REAL, enhancer TEXT
);
"""
#: What a latency row is keyed on: everything that changes the time of one image.
LATENCY_KEY = ("backbone", "adapter", "scale", "start", "end", "steps", "batch", "height",
               "width", "dtype", "fast_path", "cache", "enhancer")
LATENCY_COLUMNS = (*LATENCY_KEY, "device", "total_s", "total_q1_s", "total_q3_s", "denoise_s",
                   "repeats", "samples_s", "method", "fit", "run_id", "measured_at")


def latency_key(row: Mapping[str, Any]) -> str:
    """The identity of a latency configuration: its :data:`LATENCY_KEY` fields as JSON."""
    values = {}
    for name in LATENCY_KEY:
        value = row.get(name)
        if name == "batch":
            value = int(value or 1)
        elif name in ("dtype", "fast_path", "cache"):
            value = str(value or "")
        elif name in ("scale", "start", "end") and value is not None:
            value = float(value)
        elif name == "enhancer":
            if value in (None, "", "none"):
                continue  # the key of rows timed before enhancers existed
            value = str(value)
        values[name] = value
    return json.dumps(values, sort_keys=True)


def migrate_latency(db: Any) -> None:
    """Bring a store's latency table to this schema: an old table keyed on less than today's
    is kept aside unread (``latency_v1``); the ``enhancer`` column is added where missing."""
    latency = {r[1] for r in db.execute("PRAGMA table_info(latency)")}
    if latency and "key" not in latency:
        db.execute("DROP TABLE IF EXISTS latency_v1")
        db.execute("ALTER TABLE latency RENAME TO latency_v1")
        latency = set()
    db.executescript(LATENCY_SCHEMA)
    if latency and "enhancer" not in latency:
        db.execute("ALTER TABLE latency ADD COLUMN enhancer TEXT")


def legacy_latency(backbone: str, adapter: str, steps: int, height: int, width: int,
                    total_s: float | None = None, denoise_s: float | None = None,
                    repeats: int = 1, device: str | None = None, start: float = 0.0,
                    end: float = 1.0) -> dict[str, Any]:
    row: dict[str, Any] = {"backbone": backbone, "adapter": adapter, "scale": None,
                           "start": start, "end": end, "steps": steps, "batch": 1,
                           "height": height, "width": width, "dtype": "", "fast_path": "",
                           "cache": "", "device": device, "repeats": repeats,
                           "method": "measured"}
    if total_s is not None:
        row.update(total_s=total_s, denoise_s=denoise_s, samples_s=[total_s])
    return row


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, ``None`` for ``None``, NaN or infinity (SQLite keeps no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
