"""Scaling of a sweep over GPUs: one process against torchrun and Ray on N GPUs of one machine,
the same sweep, through the CLI as a user runs it (issue #21's targets).

    python benchmarks/gpu/bench_scaling.py --out results/scaling.json          # all GPUs
    python benchmarks/gpu/bench_scaling.py --gpus 1,2,4,8 --backends torchrun,ray
    python benchmarks/gpu/bench_scaling.py --tiny --out /tmp/scaling.json     # CPU smoke test

The sweep: ``--backbone sdxl --preset random`` (published size, random weights, the style
IP-Adapter) over steps {1,2,4,8,16,28} x ``--seeds`` x ``--prompts`` (default 8 x 4: 192
cells). Each configuration runs in a fresh output directory, as its own process tree, with
``CUDA_VISIBLE_DEVICES`` naming its GPUs. Per configuration:

- ``wall_s``: process start to exit (loading, latency rows, cells, merge and report);
- ``first_cell_s``: process start to the first cell's ``finished_at`` in the store;
- ``cells_per_s`` and ``efficiency``: throughput per GPU over the one-GPU run's
  (``(T1 / TN) / N``; the target is >= 0.90);
- ``images_equal``: the share of cells whose image file is byte-identical to the one-GPU run's
  (cells are matched by key), and ``max_score_diff`` over every score.

With ``--tiny`` the same runs use ``--preset tiny`` on the CPU, with N processes (gloo) or N
Ray actors instead of GPUs: a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import write  # noqa: E402

PROMPTS = ("a portrait photo of a person, soft studio light", "a red bicycle in the rain",
           "a lighthouse at dusk, oil painting", "a bowl of ramen, top view",
           "a fox in the snow", "a city street at night, neon", "an old map on a desk",
           "a sailing boat on a calm sea")


def command(args: Any, backend: str, n: int, out: Path, prompts: Path) -> list[str]:
    """The CLI command of one configuration (``single``: one process)."""
    cmd = [sys.executable, "-m", "adapterswap", "sweep", "--backbone", args.backbone,
           "--preset", "tiny" if args.tiny else "random", "--steps", args.steps,
           "--seeds", ",".join(str(s) for s in range(args.seeds)), "--prompts", str(prompts),
           "--out", str(out), "--metrics", args.metrics]
    if backend == "torchrun":
        cmd += ["--launcher", "torchrun", "--nproc", str(n)]
    elif backend == "ray":
        cmd += ["--backend", "ray", "--nproc", str(n)]
    return cmd


def cells_of(out: Path) -> dict[str, dict[str, Any]]:
    """Each stored cell's finish time, image digest and scores, by key."""
    db = sqlite3.connect(out / "results.sqlite")
    try:
        rows = db.execute("SELECT key, finished_at, image, backbone, adapter, scale, start, "
                          '"end", reference, prompt, seed, steps, height, width '
                          "FROM cells WHERE status = 'done'").fetchall()
        cells = {key: {"finished_at": at, "image": image, "scores": {}, "fields": fields}
                 for key, at, image, *fields in rows}
        for key, metric, value in db.execute("SELECT cell, metric, value FROM scores"):
            if key in cells and value is not None:
                cells[key]["scores"][metric] = value
    finally:
        db.close()
    for cell in cells.values():
        path = out / str(cell["image"]) if cell["image"] else None
        cell["path"] = path if path is not None and path.is_file() else None
        cell["image"] = (hashlib.sha256(path.read_bytes()).hexdigest()
                         if cell["path"] is not None else None)
    # matched across runs by what the cell is (its key also hashes run-level provenance)
    return {tuple(cell.pop("fields")): dict(cell, key=key) for key, cell in cells.items()}


def run_one(args: Any, backend: str, n: int, root: Path, prompts: Path) -> dict[str, Any]:
    out = root / f"{backend}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    if not args.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
    cmd = command(args, backend, n, out, prompts)
    start = time.time()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True,
                            timeout=args.timeout)
    wall = time.time() - start
    row: dict[str, Any] = {"backend": backend, "gpus": n, "wall_s": wall,
                           "returncode": result.returncode, "command": " ".join(cmd[1:])}
    if result.returncode != 0:
        row["error"] = (result.stderr or result.stdout)[-2000:]
        return row
    cells = cells_of(out)
    row.update(cells=len(cells), cells_per_s=len(cells) / wall,
               first_cell_s=min(c["finished_at"] for c in cells.values()) - start
               if cells else None)
    row["_cells"] = cells
    return row


def compare(row: dict[str, Any], base: dict[str, Any]) -> None:
    """Efficiency and equality of ``row`` against the one-GPU ``base``."""
    if "error" in row or "error" in base:
        return
    row["efficiency"] = (base["wall_s"] / row["wall_s"]) / row["gpus"]
    ours, theirs = row["_cells"], base["_cells"]
    common = sorted(set(ours) & set(theirs))
    row["cells_matched"] = len(common)
    row["same_keys"] = (sum(ours[k]["key"] == theirs[k]["key"] for k in common)
                        / len(common)) if common else None
    row["images_equal"] = (sum(ours[k]["image"] == theirs[k]["image"] for k in common)
                           / len(common)) if common else None
    row["max_pixel_diff"] = max((_pixel_diff(ours[k]["path"], theirs[k]["path"])
                                 for k in common if ours[k]["image"] != theirs[k]["image"]),
                                default=0)
    diffs = [abs(ours[k]["scores"][m] - theirs[k]["scores"][m]) for k in common
             for m in ours[k]["scores"] if m in theirs[k]["scores"]]
    row["max_score_diff"] = max(diffs) if diffs else None


def _pixel_diff(a: Path | None, b: Path | None) -> int | None:
    """The largest 8-bit difference between two images (``None``: one is missing)."""
    if a is None or b is None:
        return None
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (a, b))
    return int(np.abs(x - y).max()) if x.shape == y.shape else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/gpu/results/scaling.json")
    parser.add_argument("--backbone", default="sdxl")
    parser.add_argument("--gpus", default=None,
                        help="GPU counts to run, e.g. 1,2,4,8 (default: 1 and every GPU)")
    parser.add_argument("--backends", default="torchrun,ray")
    parser.add_argument("--steps", default="1,2,4,8,16,28")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4, help=f"at most {len(PROMPTS)}")
    parser.add_argument("--metrics", default="clip-i")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test (tiny preset)")
    args = parser.parse_args()
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts: between 1 and {len(PROMPTS)}")
    import torch

    available = torch.cuda.device_count()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := [b for b in backends if b not in ("torchrun", "ray")]:
        parser.error(f"--backends {args.backends}: {unknown[0]!r} is not torchrun or ray")
    if args.gpus:
        if not all(n.strip().isdigit() and int(n) >= 1 for n in args.gpus.split(",")):
            parser.error(f"--gpus {args.gpus}: give GPU counts >= 1, e.g. 1,2,4,8")
        counts = [int(n) for n in args.gpus.split(",")]
    else:
        counts = sorted({1, available}) if available else [1, 2]
    if not args.tiny and any(n > available for n in counts):
        parser.error(f"--gpus {args.gpus}: this machine has {available} GPU(s)")
    root = Path(tempfile.mkdtemp(prefix="adapterswap-scaling-"))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:args.prompts]) + "\n")
    results: dict[str, Any] = {"backbone": args.backbone, "steps": args.steps,
                               "seeds": args.seeds, "prompts": args.prompts,
                               "tiny": args.tiny, "rows": []}
    base = run_one(args, "single", 1, root, prompts)
    rows = [base]
    for backend in backends:
        for n in counts:
            if n == 1 and backend == "torchrun":
                continue  # torchrun on one GPU is the single process plus a launcher
            row = run_one(args, backend, n, root, prompts)
            compare(row, base)
            rows.append(row)
            print({k: v for k, v in row.items() if k != "_cells"}, flush=True)
    results["rows"] = [{k: v for k, v in r.items() if k != "_cells"} for r in rows]
    write(results, args.out)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
