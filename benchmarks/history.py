"""The GPU benchmark history kept in the repository: one JSON line per measured run.

Each GPU benchmark (``benchmarks/gpu/bench_*.py --out RESULT.json``) writes its figures with
the card's name. ``append`` adds one line to ``benchmarks/history/gpu.jsonl``: the commit, the
date, the card, torch's version, the benchmark and every figure of the result (flattened to
``row.field`` names, numbers only), so that a later run on the same card can be read against
it; ``plot`` draws chosen figures over the history, one line per card (the plot is written
where you say, not kept in the repository)::

    python benchmarks/history.py append flux.json
    python benchmarks/history.py plot --figure 'schnell.*median_s' --out history.png
    python benchmarks/history.py show --figure speedup

Ratios against a baseline measured in the same run are what compare across cards and days;
absolute times only compare on the same card.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import math
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HISTORY = Path(__file__).parent / "history" / "gpu.jsonl"


def flatten(value: Any, prefix: str = "") -> dict[str, float]:
    """Every finite number in a nested result, by dotted path (lists by index)."""
    out: dict[str, float] = {}
    if isinstance(value, bool):
        return out
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            out[prefix] = float(value)
        return out
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return out
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def git_commit(root: Path) -> str:
    """The checked-out commit (``unknown`` outside a git checkout)."""
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def entry(result: Mapping[str, Any], *, bench: str, commit: str, torch_version: str | None,
          date: str | None = None) -> dict[str, Any]:
    """One history line for a benchmark result (its ``device`` is the card)."""
    figures = flatten({k: v for k, v in result.items()
                       if k not in ("device", "torch", "diffusers")})
    if not figures:
        raise SystemExit(f"{bench}: the result has no numbers to keep")
    return {"commit": commit, "date": date or datetime.date.today().isoformat(),
            "card": str(result.get("device") or "unknown"),
            "torch": str(result.get("torch") or torch_version or "unknown"),
            "bench": bench, "figures": figures}


def read(history: Path) -> list[dict[str, Any]]:
    if not history.is_file():
        return []
    return [json.loads(line) for line in history.read_text().splitlines() if line.strip()]


def append(result_path: Path, history: Path, *, commit: str | None = None,
           torch_version: str | None = None) -> dict[str, Any]:
    """Add ``result_path``'s figures to ``history``; return the line. The torch version is
    the result's own (benchmarks record it), else ``torch_version``; never this machine's,
    which need not be the one that measured."""
    result = json.loads(result_path.read_text())
    line = entry(result, bench=result_path.stem, commit=commit or git_commit(history.parent),
                 torch_version=torch_version)
    history.parent.mkdir(parents=True, exist_ok=True)
    with history.open("a") as handle:
        handle.write(json.dumps(line, sort_keys=True) + "\n")
    return line


def select(lines: Sequence[Mapping[str, Any]], pattern: str) -> dict[str, list[tuple[int, str,
                                                                                      float]]]:
    """``{card | figure: [(line index, commit, value)]}`` of the figures matching ``pattern``
    (shell-style, on ``bench.figure``)."""
    series: dict[str, list[tuple[int, str, float]]] = {}
    for index, line in enumerate(lines):
        for name, value in line["figures"].items():
            full = f"{line['bench']}.{name}"
            if fnmatch.fnmatch(full, pattern) or fnmatch.fnmatch(full, f"*{pattern}*"):
                series.setdefault(f"{line['card']} | {full}", []).append(
                    (index, line["commit"], value))
    return series


def plot(lines: Sequence[Mapping[str, Any]], pattern: str, out: Path) -> Path:
    """Draw the matching figures over the history (x: the line's place, labelled by commit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = select(lines, pattern)
    if not series:
        raise SystemExit(f"no figure in the history matches {pattern!r}")
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
    ticks = sorted({p[0] for points in series.values() for p in points})
    ax.set_xticks(ticks, [lines[i]["commit"][:8] for i in ticks], rotation=45, ha="right")
    ax.set_xlabel("commit (history order)")
    ax.set_ylabel(pattern)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=Path, default=HISTORY)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("append", help="add a benchmark result's figures")
    add.add_argument("result", type=Path)
    add.add_argument("--commit", default=None, help="default: the checked-out commit")
    add.add_argument("--torch", default=None, help="torch version, where the result has none")
    draw = commands.add_parser("plot", help="plot figures over the history")
    draw.add_argument("--figure", required=True, help="shell pattern on bench.figure")
    draw.add_argument("--out", type=Path, required=True)
    show = commands.add_parser("show", help="print figures over the history")
    show.add_argument("--figure", required=True)
    args = parser.parse_args(argv)
    if args.command == "append":
        line = append(args.result, args.history, commit=args.commit, torch_version=args.torch)
        print(f"{args.history}: {line['bench']} on {line['card']} at {line['commit']}, "
              f"{len(line['figures'])} figures")
    elif args.command == "plot":
        print(plot(read(args.history), args.figure, args.out))
    else:
        for label, points in sorted(select(read(args.history), args.figure).items()):
            print(label + ": " + ", ".join(f"{c[:8]} {v:.4g}" for _, c, v in points))


if __name__ == "__main__":
    main()
