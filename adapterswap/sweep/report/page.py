"""The HTML page: its style, the collector of its parts and pictures (every picture embedded
once and written once to ``plots/``), and the document written to ``report.html``."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

#: Plot files this module writes into ``plots/`` (stale ones are removed on a rebuild).
_OWN_PLOTS = re.compile(r"^(metric|trajectory|pareto|probes|ablation|grid|cell|reference|"
                        r"strip|swap)[-.]")
STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em auto;
 max-width:1200px;padding:0 1.5em;color:#222;line-height:1.45}
h1{margin:.2em 0} h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.8em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}
td{white-space:nowrap} td.w{white-space:normal;min-width:16em;text-align:left}
.scroll{overflow-x:auto}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
table.kv td,table.kv th{text-align:left} table.kv th{white-space:nowrap}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:.5em 1em}
.banner{background:#fdecea;border:2px solid #c0392b;padding:.7em 1em;font-size:15px;
 margin:1em 0}
.glance{background:#f5f8fc;border:1px solid #c9d7ea;padding:.4em 1.2em}
.glance li{margin:.35em 0}
.better{color:#137333;font-weight:600} .worse{color:#b3261e;font-weight:600}
.neutral{color:#555;font-weight:600}
img{max-width:100%} img.plot{width:100%;height:auto}
figure{margin:1em 0} figcaption{font-size:13px;color:#555}
.refs{display:flex;flex-wrap:wrap;gap:1.5em}
table.grid td,table.grid th{text-align:center;vertical-align:middle;padding:4px}
table.grid th.row{text-align:right;white-space:nowrap;font-weight:600}
table.grid .g{border-left:3px solid #888}
table.grid img,.refs img{width:128px;height:auto}
img.px{image-rendering:pixelated}
.tile{margin:0;display:inline-block} .tile a{cursor:zoom-in} .tile .close,.tile .hint{display:none}
.tile:target{position:fixed;inset:0;z-index:10;margin:0;background:rgba(15,15,15,.9);
 display:flex;flex-direction:column;align-items:center;justify-content:center}
.tile:target img{width:94vw;height:84vh;max-width:none;object-fit:contain}
.tile:target figcaption{color:#fff;font-size:15px;margin-top:.6em}
.tile:target .hint{display:inline;color:#bbb}
.tile:target .close{display:block;position:fixed;inset:0;cursor:zoom-out}
code{font-size:90%} .notes{font-size:13px;color:#555}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class _Page:
    """Collects the page's parts and its pictures; every picture is embedded once and
    written once to ``plots/`` under its own name."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.files: dict[str, bytes] = {}
        self._zooms = 0

    def add(self, *parts: str) -> None:
        self.parts.extend(p for p in parts if p)

    def img(self, name: str, png: bytes, alt: str, css: str = "") -> str:
        base, n = name, 1
        while name in self.files:
            n += 1
            name = f"{base}-{n}"
        self.files[name] = png
        cls = f' class="{css}"' if css else ""
        return f'<img{cls} alt="{html.escape(alt)}" src="{_data_uri(png)}">'

    def zoomable(self, name: str, png: bytes, caption: str, *, pixelated: bool = False,
                 visible_caption: str | None = None) -> str:
        """A picture that opens enlarged on click and closes on the next click (CSS
        ``:target``, no script)."""
        self._zooms += 1
        anchor = f"z{self._zooms}"
        image = self.img(name, png, caption, "px" if pixelated else "")
        shown = html.escape(visible_caption) if visible_caption is not None else ""
        return (f'<figure class="tile" id="{anchor}"><a href="#{anchor}">{image}</a>'
                f'<figcaption>{shown}<span class="hint">{html.escape(caption)} '
                "(click to close)</span></figcaption>"
                '<a class="close" href="#_" aria-label="close"></a></figure>')

    def figure(self, name: str, png: bytes, alt: str, caption: str = "") -> str:
        cap = f"<figcaption>{caption}</figcaption>" if caption else ""
        return f"<figure>{self.img(name, png, alt, 'plot')}{cap}</figure>"


def write_page(page: _Page, out: Path) -> Path:
    """Write the page's pictures to ``out/plots`` (removing this module's stale ones) and the
    self-contained ``report.html``; return the report's path."""
    plot_dir = out / "plots"
    plot_dir.mkdir(exist_ok=True)
    for stale in plot_dir.glob("*.png"):
        if _OWN_PLOTS.match(stale.name) and stale.stem not in page.files:
            stale.unlink()
    for name, png in page.files.items():
        (plot_dir / f"{name}.png").write_bytes(png)
    document = (f"<!doctype html><html><head><meta charset='utf-8'><title>adapterswap report"
                f"</title><meta name='viewport' content='width=device-width'>"
                f"<style>{STYLE}</style></head><body>{''.join(page.parts)}</body></html>")
    report = out / "report.html"
    report.write_text(document, encoding="utf-8")
    return report
