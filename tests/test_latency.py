"""Latency: repeats, median and quartiles, the fixed + per-step fit and its residuals, and what
the key tells apart. Nothing here is timed: a fake run stands in for the clock."""

from __future__ import annotations

import pytest

from adapterswap.fastpath import FastPath
from adapterswap.sweep.latency import (
    LatencyMeter,
    TimingContext,
    fast_path_label,
    fit_line,
    fit_step_counts,
    latency_key,
    measure_rows,
    spread,
)
from adapterswap.sweep.spec import Cell
from adapterswap.sweep.store import RunStore

CONTEXT = TimingContext(device="cpu", dtype="float32", fast_path="eager+attn=auto", cache="none")


def cell(adapter: str = "toy-adapter", scale: float | None = 1.0, steps: int = 4) -> Cell:
    return Cell(backbone="toy-dev", adapter=adapter, scale=scale, start=0.0, end=1.0,
                reference="synthetic:0", prompt="p", seed=0, steps=steps, height=16, width=16,
                guidance_scale=None, source="tiny", adapter_source="tiny", dtype="")


class FakeRun:
    """One image costs ``fixed + per_step x steps`` plus a repeating jitter; the warm-up
    (the first call) costs more. Records every call."""

    def __init__(self, fixed: float = 0.5, per_step: float = 0.1,
                 jitter: tuple[float, ...] = (0.0, 0.02, -0.01, 0.04, -0.02)) -> None:
        self.fixed, self.per_step, self.jitter = fixed, per_step, jitter
        self.calls: list[int] = []

    def __call__(self, steps: int) -> dict[str, float]:
        self.calls.append(steps)
        extra = 10.0 if len(self.calls) == 1 else self.jitter[len(self.calls) % len(self.jitter)]
        denoise = self.per_step * steps + extra
        return {"encode_s": self.fixed / 2, "denoise_s": denoise, "decode_s": self.fixed / 2,
                "total_s": self.fixed + denoise}


def test_spread_is_the_median_and_quartiles() -> None:
    assert spread([5.0, 1.0, 4.0, 2.0, 3.0]) == (3.0, 2.0, 4.0)
    assert spread([1.0, 2.0, 3.0, 4.0]) == (2.5, 1.75, 3.25)  # numpy's linear percentile
    assert spread([7.0]) == (7.0, 7.0, 7.0)


def test_fit_line_is_least_squares() -> None:
    fixed, per_step = fit_line([(1, 0.7), (8, 2.1), (1, 0.7), (8, 2.1)])
    assert fixed == pytest.approx(0.5) and per_step == pytest.approx(0.2)
    fixed, per_step = fit_line([(0, 0.0), (1, 1.0), (2, 1.0)])  # y = 1/6 + x/2
    assert fixed == pytest.approx(1 / 6) and per_step == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two or more"):
        fit_line([(4, 1.0), (4, 1.2)])


def test_every_step_count_is_repeated_within_the_budget() -> None:
    run = FakeRun()
    rows = measure_rows([4, 1, 2], run, repeats=5, budget_s=1000.0)
    # one warm-up, then 5 timed runs per step count (the first timed run is the estimate)
    assert run.calls == [1] + [1] * 5 + [2] * 5 + [4] * 5
    assert [r["steps"] for r in rows] == [1, 2, 4]
    for row in rows:
        assert row["method"] == "measured" and row["fit"] is None and row["repeats"] == 5
        assert len(row["samples_s"]) == 5
        median, q1, q3 = spread(row["samples_s"])
        assert (row["total_s"], row["total_q1_s"], row["total_q3_s"]) == (median, q1, q3)
        assert row["total_q1_s"] <= row["total_s"] <= row["total_q3_s"]
        assert 10.0 not in [s - 0.5 - 0.1 * row["steps"] for s in row["samples_s"]]  # no warm-up
    # no warm-up when the backbone is warm already
    warm = FakeRun()
    measure_rows([1, 2], warm, repeats=2, budget_s=1000.0, warm_up=False)
    assert warm.calls == [1, 1, 2, 2]


def test_over_the_budget_a_line_is_fitted_from_two_step_counts() -> None:
    run = FakeRun(fixed=0.5, per_step=0.1)
    notes: list[str] = []
    counts = [1, 2, 4, 8, 16, 28]
    # estimate: 5 x sum(0.5 + 0.1 n) = 5 x (3 + 5.9) = 44.5 s > 10 s
    rows = {r["steps"]: r for r in measure_rows(counts, run, repeats=5, budget_s=10.0,
                                                log=notes.append)}
    assert fit_step_counts(counts) == [1, 8]
    assert run.calls == [1] + [1] * 5 + [8] * 5  # never the costly step counts
    assert notes and "budget" in notes[0]
    fit = rows[1]["fit"]
    assert fit is rows[28]["fit"]
    assert fit["fixed_s"] == pytest.approx(0.5, abs=0.03)
    assert fit["per_step_s"] == pytest.approx(0.1, abs=0.01)
    for n in (1, 8):
        assert rows[n]["method"] == "measured" and rows[n]["repeats"] == 5
        predicted = fit["fixed_s"] + fit["per_step_s"] * n
        assert fit["residuals_s"][str(n)] == pytest.approx(rows[n]["total_s"] - predicted)
    for n in (2, 4, 16, 28):
        row = rows[n]
        assert row["method"] == "fitted" and row["repeats"] == 0 and row["samples_s"] == []
        assert row["total_q1_s"] is None and row["total_q3_s"] is None
        assert row["total_s"] == pytest.approx(fit["fixed_s"] + fit["per_step_s"] * n)
        assert row["denoise_s"] == pytest.approx(0.1 * n, abs=0.05)
    assert set(fit["residuals_s"]) == {"1", "8"}
    # two step counts are always measured, whatever the budget
    few = FakeRun()
    assert all(r["method"] == "measured"
               for r in measure_rows([1, 4], few, repeats=3, budget_s=0.0))


def test_the_key_tells_apart_scale_window_dtype_and_fast_path() -> None:
    base = latency_key(cell(scale=1.0), 4, CONTEXT)
    assert set(base) == {"backbone", "adapter", "scale", "start", "end", "steps", "batch",
                         "height", "width", "dtype", "fast_path", "cache", "enhancer"}
    assert base["batch"] == 1 and base["enhancer"] == "none"
    from dataclasses import replace

    assert latency_key(replace(cell(scale=1.0), enhancer="dcg"), 4, CONTEXT) != base
    assert latency_key(cell(scale=0.0), 4, CONTEXT) != base  # scale 0 skips adapter work
    assert latency_key(cell(scale=None), 4, CONTEXT) == base  # the toy adapter's default: 1
    assert latency_key(cell(adapter="none", scale=None), 4, CONTEXT)["scale"] is None
    bf16 = TimingContext("cuda", "bfloat16", CONTEXT.fast_path, CONTEXT.cache)
    assert latency_key(cell(), 4, bf16) != base
    assert latency_key(cell(), 8, CONTEXT) != base
    assert fast_path_label(FastPath(compile=True, attention="cudnn")) == "compiled+attn=cudnn"
    assert fast_path_label(FastPath()) == "eager+attn=auto"
    assert fast_path_label(None) == "none"


class FakeBackbone:
    device, dtype, fast_path = "cpu", None, None


def test_the_meter_stores_rows_and_warms_up_once_per_backbone(tmp_path,  # noqa: ANN001
                                                              monkeypatch) -> None:
    import adapterswap.denoise

    calls: list[tuple[int, float | None]] = []
    fake = FakeRun()

    def fake_denoise(backbone, prompt, *, num_inference_steps, adapter=None, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append((num_inference_steps, adapter))

        class Result:
            timings = fake(num_inference_steps)

        return Result()

    monkeypatch.setattr(adapterswap.denoise, "denoise", fake_denoise)
    backbone = FakeBackbone()
    encoded = []
    with RunStore(tmp_path) as store:
        meter = LatencyMeter(store, repeats=3, budget_s=1000.0)
        for scale in (1.0, 0.0):  # two settings of one backbone
            cells = [cell(scale=scale, steps=n) for n in (1, 2)]
            meter.measure(backbone, "adapter", cells, CONTEXT, lambda: encoded.append(1))
        assert [n for n, _ in calls] == [1] + [1, 1, 1, 2, 2, 2] * 2  # one warm-up
        assert len(encoded) == 2
        rows = store.latency_rows()
        assert len(rows) == 4 and {r["scale"] for r in rows} == {0.0, 1.0}
        assert all(r["repeats"] == 3 and r["method"] == "measured" and r["device"] == "cpu"
                   for r in rows)
        # measured already: nothing is timed again; timings come from the table
        meter.measure(backbone, "adapter", cells, CONTEXT, lambda: encoded.append(1))
        assert len(calls) == 13 and len(encoded) == 2
        timings = meter.timings(cells, CONTEXT)
        row = store.latency(latency_key(cells[1], 2, CONTEXT))
        assert timings[2] == {"total_s": row["total_s"], "denoise_s": row["denoise_s"],
                              "latency_key": row["key"]}
        other = TimingContext("cpu", "bfloat16", CONTEXT.fast_path, CONTEXT.cache)
        assert meter.timings(cells, other) == {1: {}, 2: {}}
        meter.forget(backbone)  # unloaded: a new backbone warms up again
        meter.measure(backbone, "adapter", cells, other, lambda: None)
        assert [n for n, _ in calls[13:]] == [1] + [1, 1, 1, 2, 2, 2]


def test_a_sweep_reads_each_cells_timings_from_the_table(tmp_path) -> None:  # noqa: ANN001
    from adapterswap.sweep.engine import run_sweep
    from adapterswap.sweep.spec import SweepSpec

    spec = SweepSpec(backbones=["toy-dev"], preset="tiny", seeds=[0, 1], steps=[1, 2, 4],
                     scales=[0.0, 1.0], metrics=["latency", "sharpness"], timing_repeats=2,
                     out=str(tmp_path))
    summary = run_sweep(spec)
    assert summary.done == 12 and summary.failed == 0
    with RunStore(tmp_path, lock=False) as store:
        rows, latency = store.rows(), store.latency_rows()
    assert len(latency) == 6  # 2 scales x 3 step counts, repeated, none fitted
    assert all(r["repeats"] == 2 and len(r["samples_s"]) == 2 for r in latency)
    by_key = {(r["scale"], r["steps"]): r for r in latency}
    for row in rows:
        lat = by_key[(row["scale"], row["steps"])]
        assert row["timings"] == {"total_s": lat["total_s"], "denoise_s": lat["denoise_s"],
                                  "latency_key": lat["key"]}
        assert row["scores"]["latency"] == lat["total_s"]


def test_the_fit_never_predicts_negative_time():
    from adapterswap.sweep.latency import fit_line

    # noise on a loaded machine: the longer run happened to be faster
    fixed, per_step = fit_line([(1, 1.0), (1, 1.2), (8, 0.9), (8, 0.95)])
    assert per_step == 0.0 and fixed == pytest.approx((1.0 + 1.2 + 0.9 + 0.95) / 4)
    fixed, per_step = fit_line([(1, 0.1), (8, 1.6)])  # unconstrained: fixed < 0
    assert fixed == 0.0 and per_step == pytest.approx((0.1 + 8 * 1.6) / 65)
    assert fit_line([(1, 1.5), (3, 2.5)]) == pytest.approx((1.0, 0.5))
