"""A sweep computes the first step once for every step count of a seed where the schedules
start alike (flow matching: sigma 1), and the stored cells do not change: the same keys and
cells, and the same images and scores (byte for byte where every forward runs the same batch
with and without sharing; within the stated rounding tolerance where it does not)."""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from adapterswap.sweep.engine import SweepEngine
from adapterswap.sweep.runner import ChunkRunner
from adapterswap.sweep.spec import SweepSpec
from adapterswap.sweep.store import RunStore

# Step-parallel sharing computes the first step in a smaller batch (one row per seed instead
# of one per step count), and another batch size may pick other CPU GEMM blocking, so float
# rounding may differ (max 1 level on 1 pixel of 4096 measured across thread counts and ISAs):
# stored 8-bit pixels may differ by PIXEL_LEVELS on at most PIXEL_SHARE of the pixels, and
# the scores of such an image by SCORE_RTOL (one pixel one level off moves sharpness, the
# variance of the Laplacian, by about 2e-4 of itself; at a 1% share that is below 1e-2).
PIXEL_LEVELS = 1
PIXEL_SHARE = 0.01
SCORE_RTOL = 1e-2


class StoredCell(NamedTuple):
    key: str
    scores: dict
    image_sha256: str
    pixels: np.ndarray


def run(tmp_path, name: str, share: bool, monkeypatch, **fields):  # noqa: ANN001, ANN201
    """Cells (key, scores, image hash and pixels), sorted by key, and the summary of a tiny
    sweep."""
    out = tmp_path / f"{name}-{share}-{len(list(tmp_path.iterdir()))}"
    with monkeypatch.context() as patch:
        if not share:
            patch.setattr(ChunkRunner, "_first_step_plan", lambda *args: None)
        spec = SweepSpec(backbones=[name], preset="tiny", timing_repeats=0,
                         metrics=["sharpness", "contrast"], out=str(out),
                         **fields).validate()
        with RunStore(spec.out) as store:
            summary = SweepEngine(spec, store).run()
            rows = sorted(store.rows(), key=lambda r: r["key"])
    assert summary.failed == 0 and summary.done == len(rows)
    cells = []
    for r in rows:
        path = out / r["image"]
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        cells.append(StoredCell(r["key"], r["scores"],
                                hashlib.sha256(path.read_bytes()).hexdigest(), pixels))
    return cells, summary


def assert_same_cells(shared: list[StoredCell], alone: list[StoredCell], *,
                      same_batches: bool) -> None:
    """Same keys and cells; images and scores byte-equal where every forward ran the same
    batch (``same_batches``) or the images came out equal, else within the tolerances."""
    assert [c.key for c in shared] == [c.key for c in alone]
    for a, b in zip(shared, alone):
        if same_batches or a.image_sha256 == b.image_sha256:
            assert (a.scores, a.image_sha256) == (b.scores, b.image_sha256), a.key
            continue
        off = np.abs(a.pixels - b.pixels).max(axis=-1)
        assert off.max() <= PIXEL_LEVELS, a.key
        assert (off > 0).mean() <= PIXEL_SHARE, a.key
        assert a.scores.keys() == b.scores.keys(), a.key
        for metric, value in a.scores.items():
            assert value == pytest.approx(b.scores[metric], rel=SCORE_RTOL), (a.key, metric)


@pytest.mark.parametrize("parallel", [True, False])
def test_flux_shares_the_first_step_and_stores_the_same_cells(tmp_path, monkeypatch,  # noqa: ANN001
                                                              parallel: bool) -> None:
    fields = dict(steps=[1, 2, 4], seeds=[0, 1], step_parallel=parallel)
    shared, summary = run(tmp_path, "flux-schnell", True, monkeypatch, **fields)
    alone, baseline = run(tmp_path, "flux-schnell", False, monkeypatch, **fields)
    # 3 step counts x 2 seeds start at sigma 1: 2 first steps computed, 4 reused
    assert summary.shared_first_steps == 4 and baseline.shared_first_steps == 0
    # one step count at a time, the first forward is the same batch of 2 seeds either way
    assert_same_cells(shared, alone, same_batches=not parallel)
    if not parallel:  # one step count at a time: the 2nd and 3rd skip their first forward
        assert summary.forwards == baseline.forwards - 2


def test_adapter_window_keeps_apart_runs_that_differ_at_step_zero(tmp_path,  # noqa: ANN001
                                                                   monkeypatch) -> None:
    # end=0.5: at step 0 a 1-step run is past its window ((0+1)/1 > 0.5), 2- and 4-step runs
    # are not; so per seed the 2- and 4-step runs share, the 1-step run computes its own
    fields = dict(steps=[1, 2, 4], seeds=[0], end=0.5, step_parallel=True)
    shared, summary = run(tmp_path, "flux-schnell", True, monkeypatch, **fields)
    alone, _ = run(tmp_path, "flux-schnell", False, monkeypatch, **fields)
    assert summary.shared_first_steps == 1
    assert_same_cells(shared, alone, same_batches=False)  # first forward: 2 rows instead of 3


@pytest.mark.parametrize("name", ["sdxl-lightning", "sd15-lcm"])
def test_trailing_unet_schedules_share_the_first_step(tmp_path, monkeypatch,  # noqa: ANN001
                                                      name: str) -> None:
    # "trailing" spacing (Lightning's Euler, LCM) starts at t=999 whatever the step count;
    # LCM also draws fresh noise at every step, which must not move with the shared forward
    fields = dict(steps=[1, 2, 4], seeds=[0, 1], step_parallel=False)
    shared, summary = run(tmp_path, name, True, monkeypatch, **fields)
    alone, baseline = run(tmp_path, name, False, monkeypatch, **fields)
    assert summary.shared_first_steps == 4 and summary.forwards == baseline.forwards - 2
    assert_same_cells(shared, alone, same_batches=True)  # sequential: the same batches


def test_leading_unet_schedules_and_probes_share_nothing(tmp_path,  # noqa: ANN001
                                                          monkeypatch) -> None:
    # "leading" spacing (SD1.5's DDIM, SDXL-base's Euler): the first timestep and the noise
    # scale depend on the step count
    for name in ("sd15", "sdxl"):
        _, summary = run(tmp_path, name, True, monkeypatch, steps=[1, 2], seeds=[0])
        assert summary.shared_first_steps == 0
    _, probed = run(tmp_path, "flux-schnell", True, monkeypatch, steps=[1, 2], seeds=[0],
                    probes=True)
    assert probed.shared_first_steps == 0  # probes record every row's forward
