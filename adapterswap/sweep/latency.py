"""Latency a reviewer accepts: timed single-image runs, repeated, with their spread.

The wall time of a shared batch says nothing about the latency of one image, so latency is
measured apart from the sweep's batched runs: one image, batch 1, synchronised, prompt encoding
+ denoising + VAE decode (reference encoding such as face detection excluded).

**Key.** One row per (backbone, adapter, effective scale, start, end, steps, batch, height,
width, dtype, fast path, cache policy): everything that changes the time of one image. Scale 0
and a shorter window skip adapter work; the fast path (:func:`fast_path_label`: compiled or
eager, attention kernel, float8, fused projections) and the dtype change every forward.

**Repeats.** After one warm-up run per loaded backbone (not per step count: compilation and
allocator warm-up happen once), each step count runs ``repeats`` times (``timing_repeats``,
default 5); a row stores the median of the totals with its quartiles (``total_q1_s``,
``total_q3_s``), every timed total (``samples_s``) and the median denoising time.

**Fit.** Repeating every step count can cost too much (FLUX dev at 28 steps is ~6 s an image).
The first timed run gives an estimate of the fixed (encode + decode) and per-step time; when
``repeats x sum over step counts of (fixed + per-step x steps)`` exceeds ``budget_s``
(default 60 s; 5 s for the tiny preset, whose latencies mean nothing), only the smallest and the
middle step count are repeated and a fixed + per-step line is fitted (least squares over every
timed run). Measured step counts keep their own median and quartiles (``method="measured"``);
the others get the line's prediction (``method="fitted"``, no quartiles, ``repeats=0``). Every
row of a fitted setting carries the model and its residuals (median minus prediction) at the
measured step counts (``fit``), so the reader sees how well the line holds.

The per-cell ``timings`` (what the ``latency`` metric reads) come from this table.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapterswap.sweep.spec import Cell

#: Expected seconds of repeated timing above which a line is fitted instead.
DEFAULT_BUDGET_S = 60.0
#: The tiny preset's budget: its latencies only show that the code path works.
TINY_BUDGET_S = 5.0

#: ``run_once(steps)``: one timed image at ``steps``; returns at least ``total_s`` and
#: ``denoise_s`` (and, for the first estimate, ``encode_s`` and ``decode_s``).
RunOnce = Callable[[int], Mapping[str, float]]


@dataclass(frozen=True)
class TimingContext:
    """What of a loaded backbone changes the time of an image, as short strings."""

    device: str
    dtype: str
    fast_path: str
    cache: str


def fast_path_label(fast: Any) -> str:
    """A short label of a :class:`~adapterswap.fastpath.FastPath`'s state, e.g.
    ``"compiled+attn=cudnn+fp8"`` or ``"eager+attn=auto"`` (``"none"`` before one is set)."""
    if fast is None:
        return "none"
    parts = ["compiled" if fast.compile else "eager", f"attn={fast.attention}"]
    if fast.fp8:
        parts.append("fp8")
    if fast.fuse_qkv:
        parts.append("fused-qkv")
    return "+".join(parts)


def timing_context(backbone: Any, accelerator: Any = None) -> TimingContext:
    """The :class:`TimingContext` of a loaded backbone run through ``accelerator`` (its
    :class:`~adapterswap.fastpath.Accelerator`; ``None``: plain eager, no fast path set)."""
    fast = None if accelerator is None else accelerator.fast_path
    dtype = str(backbone.dtype).removeprefix("torch.") if backbone.dtype is not None else ""
    return TimingContext(device=str(backbone.device), dtype=dtype,
                         fast_path=fast_path_label(fast),
                         cache=(fast.cache if fast is not None and fast.cache else "none"))


def effective_scale(cell: Cell) -> float | None:
    """The scale the adapter runs at (its default when the cell gives none; ``None`` without
    an adapter)."""
    if cell.adapter == "none":
        return None
    if cell.scale is not None:
        return float(cell.scale)
    from adapterswap.plugins import get_adapter

    return float(get_adapter(cell.adapter).default_scale)


def latency_key(cell: Cell, steps: int, context: TimingContext, *,
                scale: float | None = None) -> dict[str, Any]:
    """The latency key (the store's ``LATENCY_KEY`` fields) of one image of ``cell``'s
    setting at ``steps`` (``scale``: the effective scale, default :func:`effective_scale`)."""
    return {"backbone": cell.backbone, "adapter": cell.adapter,
            "scale": effective_scale(cell) if scale is None else float(scale),
            "start": float(cell.start), "end": float(cell.end), "steps": int(steps), "batch": 1,
            "height": cell.height, "width": cell.width, "dtype": context.dtype,
            "fast_path": context.fast_path, "cache": context.cache,
            "enhancer": getattr(cell, "enhancer", "none")}


# ---------------------------------------------------------------------- pure parts
def spread(samples: Sequence[float]) -> tuple[float, float, float]:
    """Median, first and third quartile (linear interpolation, as numpy's percentile)."""
    values = sorted(float(v) for v in samples)
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q1, q3


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``y = fixed + per_step x`` through ``(x, y)`` points (two or more
    distinct x) with both terms >= 0 (time cannot shrink with more steps; on a loaded machine
    noise can tilt an unconstrained line below zero); returns ``(fixed, per_step)``."""
    xs = [float(x) for x, _ in points]
    ys = [float(y) for _, y in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread_x = sum((x - mean_x) ** 2 for x in xs)
    if spread_x == 0:
        raise ValueError("a line needs runs at two or more step counts")
    per_step = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread_x
    if per_step < 0:  # the constrained optimum lies on per_step = 0
        return max(mean_y, 0.0), 0.0
    fixed = mean_y - per_step * mean_x
    if fixed < 0:  # ... or on fixed = 0: a line through the origin
        return 0.0, max(sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs), 0.0)
    return fixed, per_step


def expected_seconds(step_counts: Sequence[int], repeats: int, fixed_s: float,
                     per_step_s: float) -> float:
    """Estimated seconds of ``repeats`` timed runs at every step count."""
    return repeats * sum(fixed_s + per_step_s * n for n in step_counts)


def fit_step_counts(step_counts: Sequence[int]) -> list[int]:
    """The step counts a fit repeats: the smallest and the middle one."""
    ordered = sorted(set(step_counts))
    return sorted({ordered[0], ordered[len(ordered) // 2]})


def measure_rows(step_counts: Sequence[int], run_once: RunOnce, *, repeats: int,
                 budget_s: float, warm_up: bool = True,
                 log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Time ``step_counts`` with ``run_once`` and return one row per step count (the
    measured fields of a latency row: ``steps``, ``total_s``, ``total_q1_s``, ``total_q3_s``,
    ``denoise_s``, ``repeats``, ``samples_s``, ``method``, ``fit``).

    ``warm_up``: run once untimed first (once per loaded backbone). The first timed run, at
    the smallest step count, is also the estimate that decides between repeating every step
    count and fitting a line (see the module docstring)."""
    counts = sorted(set(step_counts))
    repeats = max(1, int(repeats))
    if warm_up:
        run_once(counts[0])
    first = dict(run_once(counts[0]))
    fixed_s = max(0.0, first["total_s"] - first["denoise_s"])
    per_step_s = max(0.0, first["denoise_s"]) / counts[0]
    expected = expected_seconds(counts, repeats, fixed_s, per_step_s)
    fitted = len(counts) > 2 and expected > budget_s
    measured = fit_step_counts(counts) if fitted else counts
    if fitted and log is not None:
        log(f"latency: repeating {len(counts)} step counts would take ~{expected:.0f} s "
            f"(> {budget_s:.0f} s budget); timing {measured} x {repeats} and fitting "
            "fixed + per-step time for the others")
    runs: dict[int, list[Mapping[str, float]]] = {n: [] for n in measured}
    runs[counts[0]].append(first)
    for n in measured:
        while len(runs[n]) < repeats:
            runs[n].append(run_once(n))
    rows = {}
    for n, timed in runs.items():
        totals = [float(r["total_s"]) for r in timed]
        median, q1, q3 = spread(totals)
        rows[n] = {"steps": n, "total_s": median, "total_q1_s": q1, "total_q3_s": q3,
                   "denoise_s": statistics.median(float(r["denoise_s"]) for r in timed),
                   "repeats": len(timed), "samples_s": totals, "method": "measured",
                   "fit": None}
    if fitted:
        fixed, per_step = fit_line([(n, r["total_s"]) for n, timed in runs.items()
                                    for r in timed])
        d_fixed, d_per_step = fit_line([(n, r["denoise_s"]) for n, timed in runs.items()
                                        for r in timed])
        fit = {"fixed_s": fixed, "per_step_s": per_step,
               "residuals_s": {str(n): rows[n]["total_s"] - (fixed + per_step * n)
                               for n in measured}}
        for n in counts:
            if n in rows:
                rows[n]["fit"] = fit
            else:
                rows[n] = {"steps": n, "total_s": fixed + per_step * n, "total_q1_s": None,
                           "total_q3_s": None, "denoise_s": d_fixed + d_per_step * n,
                           "repeats": 0, "samples_s": [], "method": "fitted", "fit": fit}
    return [rows[n] for n in counts]


# ---------------------------------------------------------------------- with models and store
class LatencyMeter:
    """Measures the latency rows of a sweep's settings into the store, and reads the per-cell
    timings back from it.

    :param repeats: timed runs per step count (``timing_repeats``).
    :param budget_s: see the module docstring.
    """

    def __init__(self, store: Any, *, repeats: int, budget_s: float = DEFAULT_BUDGET_S,
                 log: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.repeats = repeats
        self.budget_s = budget_s
        self.log = log
        self._warm: set[int] = set()  # loaded backbones already warmed up

    def missing(self, cells: Sequence[Cell], context: TimingContext) -> list[int]:
        """Step counts of a setting's cells that have no latency row yet."""
        first = cells[0]
        return [n for n in sorted({c.steps for c in cells})
                if self.store.latency(latency_key(first, n, context)) is None]

    def measure(self, backbone: Any, adapter: Any, cells: Sequence[Cell],
                context: TimingContext, conditioning: Callable[[], Any], *,
                accelerator: Any = None) -> None:
        """Time one image of the setting of ``cells`` (all of one setting, with ``adapter``
        applied) at each step count without a row; ``conditioning()`` gives the reference's
        encoding (the first cell's prompt, seed and reference are used). The images run
        through the backbone's ``accelerator``, as the sweep's do (``None``: plain eager)."""
        steps = self.missing(cells, context)
        if not steps:
            return
        from adapterswap.denoise import denoise
        from adapterswap.sweep.checks import make_enhancer

        first = cells[0]
        encoded = conditioning()
        enhancer = make_enhancer(first.enhancer)

        def run_once(n: int) -> Mapping[str, float]:
            return denoise(backbone, first.prompt, num_inference_steps=n, seeds=[first.seed],
                           height=first.height, width=first.width,
                           guidance_scale=first.guidance_scale, adapter=adapter,
                           conditioning=encoded, output_type="pil",
                           accelerator=accelerator, enhancer=enhancer).timings

        warm_up = id(backbone) not in self._warm
        self._warm.add(id(backbone))
        rows = measure_rows(steps, run_once, repeats=self.repeats, budget_s=self.budget_s,
                            warm_up=warm_up, log=self.log)
        for row in rows:
            self.store.record_latency({**latency_key(first, row["steps"], context), **row,
                                       "device": context.device})

    def timings(self, cells: Sequence[Cell], context: TimingContext) -> dict[int, dict[str,
                                                                                     float]]:
        """Per step count of a setting's cells: ``{"total_s", "denoise_s", "latency_key"}``
        from the table (``{}`` where there is no row); readers find a cell's latency row by
        the key."""
        first = cells[0]
        out: dict[int, dict[str, float]] = {}
        for n in sorted({c.steps for c in cells}):
            row = self.store.latency(latency_key(first, n, context))
            out[n] = {} if row is None else {"total_s": row["total_s"],
                                             "denoise_s": row["denoise_s"],
                                             "latency_key": row["key"]}
        return out

    def forget(self, backbone: Any) -> None:
        """A backbone was unloaded (a new one at the same address warms up again)."""
        self._warm.discard(id(backbone))
