"""The commands that describe the installation: ``plugins``, ``list`` and ``doctor``.

They load the plugins (never torch) and print what is registered and whether the weights are
present; none of them runs a model.
"""

from __future__ import annotations

import json
from typing import Any

import click

from adapterswap.cli.common import warn_plugin_failures


@click.command("plugins", epilog="Examples:\n\n\b\n  adapterswap plugins\n"
                                "  adapterswap plugins --json")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_command(as_json: bool) -> None:
    """List installed plugins with versions, hooks and what they register."""
    from dataclasses import asdict

    from adapterswap.plugins import plugin_failures, plugin_infos

    infos = plugin_infos()
    failures = plugin_failures()
    if as_json:
        click.echo(json.dumps({
            "plugins": [asdict(i) for i in infos],
            "failures": [{"plugin": f.plugin, "entry_point": f.entry_point,
                          "error": f"{type(f.error).__name__}: {f.error}"} for f in failures],
        }, indent=2))
        return
    for info in infos:
        version = f" {info.version}" if info.version else ""
        click.echo(f"{info.name}{version} ({info.distribution or 'not a distribution'})")
        click.echo(f"  hooks: {', '.join(info.hooks) or '-'}")
        for what in ("backbones", "adapters", "metrics", "enhancers"):
            names = getattr(info, what)
            if names:
                click.echo(f"  {what}: {', '.join(names)}")
    for failure in failures:
        click.echo(f"FAILED {failure.message()}")


def _backbone_rows() -> list[dict[str, Any]]:
    from adapterswap.plugins import adapters, backbones

    rows = []
    for entry in backbones().entries():
        cls = entry.cls
        rows.append({
            "name": entry.name, "family": cls.family, "plugin": entry.plugin,
            "default_source": cls.default_source, "default_steps": cls.default_steps,
            "guidance_mode": cls.guidance_mode,
            "default_guidance_scale": cls.default_guidance_scale,
            "adapters": [a.name for a in adapters().entries() if cls.family in a.cls.families],
            "description": cls.description,
        })
    return rows


def _adapter_rows() -> list[dict[str, Any]]:
    from adapterswap.plugins import adapters, backbones

    rows = []
    for entry in adapters().entries():
        cls = entry.cls
        rows.append({
            "name": entry.name, "kind": cls.kind, "families": sorted(cls.families),
            "plugin": entry.plugin, "default_source": cls.default_source,
            "default_scale": cls.default_scale,
            "backbones": [b.name for b in backbones().entries() if b.cls.family in cls.families],
            "description": cls.description,
        })
    return rows


def _metric_rows() -> list[dict[str, Any]]:
    from adapterswap.plugins import metrics

    return [{"name": e.name, "plugin": e.plugin, "needs": sorted(e.cls.needs),
             "higher_is_better": e.cls.higher_is_better, "kinds": sorted(e.cls.kinds),
             "description": e.cls.description} for e in metrics().entries()]


def _enhancer_rows() -> list[dict[str, Any]]:
    from adapterswap.plugins import enhancers

    return [{"name": e.name, "plugin": e.plugin,
             "kinds": sorted(e.cls.kinds) if e.cls.kinds is not None else ["any"],
             "forwards_per_step": e.cls.forwards_per_step,
             "options": [f"{k}: {v}" for k, v in e.cls.option_docs.items()],
             "description": e.cls.description} for e in enhancers().entries()]


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, list):
            return ", ".join(map(str, value)) or "-"
        return "-" if value is None or value == "" else str(value)

    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


LIST_COLUMNS = {
    "backbones": ["name", "family", "default_steps", "guidance_mode", "adapters", "plugin"],
    "adapters": ["name", "kind", "families", "backbones", "plugin"],
    "metrics": ["name", "needs", "higher_is_better", "plugin"],
    "enhancers": ["name", "kinds", "forwards_per_step", "description", "plugin"],
}


@click.command("list", epilog="Examples:\n\n\b\n  adapterswap list backbones\n"
                             "  adapterswap list adapters --json")
@click.argument("what", type=click.Choice(["backbones", "adapters", "metrics", "enhancers"]))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_command(what: str, as_json: bool) -> None:
    """List registered backbones, adapters, metrics or enhancers, with compatibility."""
    rows = {"backbones": _backbone_rows, "adapters": _adapter_rows,
            "metrics": _metric_rows, "enhancers": _enhancer_rows}[what]()
    warn_plugin_failures()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo(f"No {what} registered. Install a plugin (see `adapterswap plugins`).")
    else:
        click.echo(_table(rows, LIST_COLUMNS[what]))


@click.command("doctor", epilog="Examples:\n\n\b\n  adapterswap doctor\n"
                               "  HF_HUB_OFFLINE=1 adapterswap doctor --json")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor_command(as_json: bool) -> None:
    """Check the environment and whether each backbone's, adapter's and metric's weights are
    present locally (configured path or Hugging Face cache). Uses no network; weights that
    would have to be downloaded count as missing, which is reported, not an error."""
    from adapterswap.doctor import collect

    report = collect()
    warn_plugin_failures()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    env = dict(report["environment"])
    if not env.pop("config_present", True):
        env["config"] = (f"{env['config']} (missing: no such file; each backbone and adapter "
                         "uses its default source)")
    click.echo("environment:")
    for key, value in env.items():
        click.echo(f"  {key}: {value}")
    for section in ("backbones", "adapters", "metrics"):
        click.echo(f"{section}:")
        for row in report[section]:
            click.echo(f"  {row['name']}: {row['status']}")
            if row.get("hint") and not row.get("present", True):
                click.echo(f"    {row['hint']}")
