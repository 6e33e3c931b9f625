"""HTML tables: cells escaped unless already HTML (:class:`_Raw`), long cells wrapping, and
no table at all without rows."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from typing import Any


class _Raw(str):
    """Table cell text that is already HTML."""


def _fmt(value: Any) -> str:
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return html.escape("-" if value is None else str(value))


def _cell(value: Any) -> str:
    text = _fmt(value)
    plain = re.sub(r"<[^>]+>", "", text)
    return f'<td class="w">{text}</td>' if len(plain) > 40 else f"<td>{text}</td>"


def _table(headers: Sequence[str], body: Sequence[Sequence[Any]], css: str = "") -> str:
    """An HTML table (long cells wrap, short ones do not); no rows, no table (an empty
    string)."""
    if not body:
        return ""
    head = "".join(f"<th>{_fmt(h) if isinstance(h, _Raw) else html.escape(h)}</th>"
                   for h in headers)
    rows = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in body)
    cls = f' class="{css}"' if css else ""
    return (f'<div class="scroll"><table{cls}><thead><tr>{head}</tr></thead><tbody>{rows}'
            "</tbody></table></div>")
