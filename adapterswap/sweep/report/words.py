"""Numbers and verdicts in words, as the page shows them: plurals, dates, means with their
intervals (decimals from the interval's width), signed deltas, step spans, latency
quartiles, setting order and file-name fragments."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from adapterswap.sweep.analysis import BETTER, N_TOO_SMALL, WORSE


def safe_name(text: str, limit: int = 60) -> str:
    """A file-name fragment: letters, digits, '-', '_' only, bounded length."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:limit]
    return cleaned or "x"


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 step``, ``2 steps``; ``many`` for irregular plurals."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def _iso(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _decimals(width: float, significant: int = 2) -> int:
    """Decimals that show ``width`` (an interval's or a range's) to ``significant`` digits."""
    if not (math.isfinite(width) and width > 0):
        return 4
    return max(0, min(8, significant - 1 - math.floor(math.log10(width))))


def _num(value: float | None, significant: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{significant}g}"


def _interval_decimals(mean: float, low: float, high: float, significant: int) -> int:
    """Decimals that show an interval's width to two digits, but the values to no more
    than ``significant`` digits (a very narrow interval rounds to its ends)."""
    cap = _decimals(max(abs(mean), abs(low), abs(high)) or 1.0, significant)
    return min(_decimals(high - low), cap) if high > low else cap


def _mean_ci(mean: float | None, low: float | None, high: float | None) -> str:
    """``0.589 [0.570, 0.613]`` with decimals from the interval's width (at most five
    significant digits), or the mean and ``n too small``."""
    if mean is None or not math.isfinite(mean):
        return "-"
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{_num(mean)} ({N_TOO_SMALL})"
    d = _interval_decimals(mean, low, high, 5)
    return f"{mean:.{d}f} [{low:.{d}f}, {high:.{d}f}]"


def _signed_ci(delta: Mapping[str, Any]) -> str:
    """``+0.028 [+0.010, +0.050]`` (the header says which interval), or the delta and
    ``n too small``."""
    return _delta_text(delta, label="", too_small="")


def _setting_order(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    """Adapter off first, then by adapter, scale (default first), window start and end."""
    scale = entry.get("scale")
    return (entry.get("adapter") != "none", entry.get("adapter") or "", scale is not None,
            scale or 0.0, entry.get("start") or 0.0,
            1.0 if entry.get("end") is None else entry["end"])


def _delta_text(delta: Mapping[str, Any], *, label: str = "95% CI ",
                too_small: str = " for an interval") -> str:
    """``+0.028 [95% CI +0.010, +0.050]``, or the delta with ``n too small for an interval``
    (``label``/``too_small`` empty where a table header says which interval)."""
    mean, low, high = delta.get("mean"), delta.get("ci_low"), delta.get("ci_high")
    if mean is None:
        return "no pairs"
    if low is None or high is None:
        return f"{mean:+.3g} ({N_TOO_SMALL}{too_small})"
    d = _interval_decimals(mean, low, high, 4)
    return f"{mean:+.{d}f} [{label}{low:+.{d}f}, {high:+.{d}f}]"


def _verdict_html(verdict: str) -> str:
    css = {BETTER: "better", WORSE: "worse"}.get(verdict, "neutral")
    return f'<span class="{css}">{html.escape(verdict)}</span>'


def _window_text(start: float, end: float) -> str:
    return f"{start:g}-{end:g}"


def _span(interval: Sequence[int] | None) -> str:
    return N_TOO_SMALL if not interval else f"{interval[0]}-{interval[1]}"


def _quartiles(entry: Mapping[str, Any]) -> str:
    """A latency row's IQR as ``q1-q3`` (a spread over repeats, not a confidence interval)."""
    if entry.get("iqr_s") is not None:
        return f"{entry['q1_s']:.3g}-{entry['q3_s']:.3g}"
    return "-" if entry.get("method") == "fitted" else N_TOO_SMALL


def _knee_span(curve: Any) -> str:
    if curve.knee_interval:
        return _span(curve.knee_interval)
    if curve.resampling is None or curve.knee_none_share is None:
        return N_TOO_SMALL if curve.effective_regime is not None else "-"
    return "no knee in any resample"


def _share(scored: int, attempted: int) -> str:
    return "-" if not attempted else f"{scored}/{attempted} ({scored / attempted:.0%})"


def _latency_text(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("median_s") is None:
        return "-"
    text = f"{entry['median_s']:.3g} s"
    if entry.get("method") != "fitted" or entry.get("iqr_s") is not None:
        text += f" (IQR {_quartiles(entry)})"
    return text
