"""The run as resolved: per run of the newest invocation, what its cells actually ran
(backbones, adapter settings, step grid, size, guidance, weights) and its environment, and
the page's run section with the reference images."""

from __future__ import annotations

import html
import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from adapterswap.sweep.report.images import _reference_name
from adapterswap.sweep.report.page import _Page
from adapterswap.sweep.report.tables import _Raw, _table
from adapterswap.sweep.report.words import _iso, _window_text, plural, safe_name
from adapterswap.sweep.store import RunStore


def _cells_of(run: Mapping[str, Any], by_key: Mapping[str, Mapping[str, Any]],
              store: RunStore) -> list[Mapping[str, Any]]:
    keys = list(run.get("cell_keys") or [])
    missing = [k for k in keys if k not in by_key]
    extra = {r["key"]: r for r in store.rows(missing)} if missing else {}
    return [by_key.get(k) or extra[k] for k in keys if k in by_key or k in extra]


def _guidance(backbone: str, values: Sequence[float | None]) -> str:
    """The guidance scale(s) the cells ran: given, else the backbone's default (from its
    plugin, when installed), or "none" for a backbone without guidance."""
    try:
        from adapterswap.plugins import get_backbone

        cls = get_backbone(backbone)
        mode, default = cls.guidance_mode, cls.default_guidance_scale
    except Exception:  # noqa: BLE001 - plugin not installed: say what the cells say
        mode, default = None, None
    if mode == "none":
        return "none (no guidance)"
    shown = []
    for value in sorted(set(values), key=lambda v: (v is not None, v or 0.0)):
        if value is not None:
            shown.append(f"{value:g}")
        elif default is not None:
            shown.append(f"{default:g} (default)")
        else:
            shown.append("default")
    text = ", ".join(shown) or "-"
    return f"{text}, {mode} guidance" if mode else text


def resolved_runs(store: RunStore, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per run of the newest invocation (:meth:`RunStore.current_runs`), what it ran as
    resolved from its cells and its ``runs`` row: per backbone the adapter setting(s), step
    grid, size, guidance and weights identity; device, dtype, code hash, versions, dates,
    host, status, references, prompts, seeds and metrics."""
    by_key = {r["key"]: r for r in rows}
    resolved = []
    for run in store.current_runs():
        cells = _cells_of(run, by_key, store)
        spec = run.get("spec") or {}
        weights = dict(run.get("weights") or {})
        names = list(dict.fromkeys([*(spec.get("backbones") or []),
                                    *(c["backbone"] for c in cells)]))
        backbones = []
        for name in names:
            mine = [c for c in cells if c["backbone"] == name]
            adapters = sorted({c["adapter"] for c in mine if c["adapter"] != "none"})
            adapter = ", ".join(adapters) or "none"
            if adapters and any(c["adapter"] == "none" for c in mine):
                adapter += " (and adapter off)"
            on = [c for c in mine if c["adapter"] != "none"]
            backbones.append({
                "backbone": name, "weights": weights.pop(f"backbone:{name}", None),
                "adapter": adapter,
                "scales": ", ".join("default" if v is None else f"{v:g}" for v in sorted(
                    {c.get("scale") for c in on}, key=lambda v: (v is not None, v or 0.0)))
                or "-",
                "windows": ", ".join(_window_text(*w) for w in sorted(
                    {(c.get("start") or 0.0, 1.0 if c.get("end") is None else c["end"])
                     for c in on})) or "-",
                "steps": ", ".join(str(s) for s in sorted({c["steps"] for c in mine})) or "-",
                "size": ", ".join(f"{h}x{w}" for h, w in sorted(
                    {(c["height"], c["width"]) for c in mine})) or "-",
                "guidance": _guidance(name, [c.get("guidance_scale") for c in mine]),
                "cells": len(mine),
                "done": sum(c["status"] == "done" for c in mine),
                "failed": sum(c["status"] == "failed" for c in mine),
            })
        argv = run.get("argv") or []
        command = ("adapterswap " + shlex.join(argv[1:])) if argv and \
            "adapterswap" in str(argv[0]) else None
        metrics = run.get("metrics") or {}
        resolved.append({
            "id": run["id"], "status": run["status"], "started": _iso(run["started_at"]),
            "finished": _iso(run.get("finished_at")),
            "seconds": (run["finished_at"] - run["started_at"])
            if run.get("finished_at") else None,
            "host": run.get("host") or "-", "device": run["device"], "dtype": run["dtype"],
            "preset": spec.get("preset"), "code_hash": run["code_hash"],
            "versions": dict(run.get("versions") or {}), "other_weights": weights,
            "backbones": backbones,
            "references": {r: (run.get("reference_hashes") or {}).get(r)
                           for r in sorted({c["reference"] for c in cells})},
            "prompts": list(dict.fromkeys(c["prompt"] for c in cells)),
            "seeds": sorted({c["seed"] for c in cells}),
            "metrics": {m: (metrics.get(m) or {}).get("available", True)
                        for m in spec.get("metrics") or sorted(metrics)},
            "command": command, "cells": len(cells),
        })
    return resolved


def _run_section(page: _Page, runs: Sequence[Mapping[str, Any]],
                 references: Sequence[tuple[str, bytes | None, bool]],
                 versions: Mapping[str, str], spec: Mapping[str, Any]) -> list[str]:
    """The run as resolved: per run of the newest invocation, its backbones (adapter, steps,
    size, guidance, weights) and its environment; then the reference images."""
    parts = ["<h2>Run</h2>"]
    if not runs:  # a store written before runs were recorded: the spec as given
        parts.append("<p>This store records no runs; the spec as given:</p>")
        parts.append(_table(["setting", "value"],
                            [[k, json.dumps(v)] for k, v in sorted((spec or {}).items())]
                            + [[f"version: {k}", v] for k, v in sorted(versions.items())],
                            "kv"))
    for run in runs:
        if len(runs) > 1:
            parts.append(f"<h3>Run {run['id']}</h3>")
        backbones = run["backbones"]
        show_scales = any(b["scales"] not in ("-", "default") for b in backbones)
        show_windows = any(b["windows"] not in ("-", "0-1") for b in backbones)
        headers = ["backbone", "weights", "adapter"] + (["scales"] if show_scales else []) \
            + (["windows"] if show_windows else []) + ["steps run", "size (h x w)",
                                                       "guidance", "cells"]
        body = []
        for b in backbones:
            cells = plural(b["cells"], "cell") + (f" ({b['failed']} failed)"
                                                  if b["failed"] else "")
            body.append([b["backbone"], b["weights"], b["adapter"]]
                        + ([b["scales"]] if show_scales else [])
                        + ([b["windows"]] if show_windows else [])
                        + [b["steps"], b["size"], b["guidance"], cells])
        parts.append(_table(headers, body))
        seconds = run["seconds"]
        duration = f" ({seconds:.1f} s)" if seconds is not None else ""
        refs = ", ".join(_reference_name(r) + (f" ({h[:19]})" if h and h != r else "")
                         for r, h in run["references"].items())
        metrics = ", ".join(m + ("" if ok else " (unavailable)")
                            for m, ok in run["metrics"].items())
        general = [
            ["status", run["status"]],
            ["started", run["started"]], ["finished", f"{run['finished']}{duration}"],
            ["host", run["host"]], ["device", run["device"]], ["dtype", run["dtype"]],
            ["preset", run["preset"] or "none (real weights)"],
            ["code hash", _Raw(f"<code>{html.escape(run['code_hash'])}</code>")],
            ["versions", ", ".join(f"{k} {v}" for k, v in sorted(run["versions"].items()))],
        ]
        general += [[f"weights: {k.replace(':', ' ', 1)}", v]
                    for k, v in sorted(run["other_weights"].items())]
        general += [
            [plural(len(run["references"]), "reference"), refs or "none"],
            [plural(len(run["prompts"]), "prompt"),
             _Raw("<br>".join(html.escape(p) for p in run["prompts"][:12])
                  + ("<br>..." if len(run["prompts"]) > 12 else ""))],
            [plural(len(run["seeds"]), "seed"), ", ".join(map(str, run["seeds"]))],
            ["metrics", metrics or "-"],
        ]
        if run["command"]:
            general.append(["command", _Raw(f"<code>{html.escape(run['command'])}</code>")])
        parts.append(_table(["", f"run {run['id']}"], general, "kv"))
    if references:
        parts.append("<h3>References</h3>")
        tiles = []
        for i, (reference, png, enlarged) in enumerate(references):
            name = _reference_name(reference)
            if png is None:
                tiles.append(f"<div>{html.escape(name)}: not saved</div>")
                continue
            tiles.append(page.zoomable(f"reference-{i:02d}-{safe_name(name, 40)}", png,
                                       f"reference {name}", pixelated=enlarged,
                                       visible_caption=name))
        parts.append('<div class="refs">' + "".join(tiles) + "</div>")
    return parts
