"""What one process, torchrun ranks and Ray workers share: adding up workers' summaries
(:meth:`SweepSummary.add`) and replaying a worker's journal on a store (:func:`replay_journal`)."""

from __future__ import annotations

import pytest
from cell_grid import make_cell
from PIL import Image

from adapterswap.sweep.store import RunStore
from adapterswap.sweep.summary import SweepSummary
from adapterswap.sweep.worker import RelayStore, replay_journal


def test_workers_add_up_and_the_times_are_the_slowest_workers() -> None:
    summary = SweepSummary(total=10, skipped=2, unavailable_metrics={"m": "gone"})
    fast = {"forwards": 3, "shared_first_steps": 1, "fast_path": {"b1": {"attention": "sdpa"}},
            "confounds": {"f": 1}, "busy_seconds": 1.0, "load_seconds": 5.0,
            "forward_seconds": 0.5}
    slow = {"forwards": 4, "fast_path": {"b2": {}}, "confounds": {"f": 2, "g": 1},
            "busy_seconds": 3.0, "load_seconds": 1.0}
    summary.add([fast, slow], slowest_by="busy_seconds")
    assert (summary.forwards, summary.shared_first_steps) == (7, 1)
    assert summary.fast_path == {"b1": {"attention": "sdpa"}, "b2": {}}
    assert summary.confounds == {"f": 3, "g": 1}
    assert summary.load_seconds == 1.0  # the slowest worker's, not a sum
    assert summary.forward_seconds == 0.0  # the slowest worker has none: left as it was
    assert (summary.done, summary.failed) == (0, 0)
    assert summary.unavailable_metrics == {"m": "gone"}

    ranks = [SweepSummary(total=10, skipped=2, done=3, seconds=2.0, load_seconds=1.5,
                          unavailable_metrics={"m": "gone"}),
             SweepSummary(total=10, skipped=2, done=5, failed=1, seconds=4.0, load_seconds=0.5)]
    total = SweepSummary(total=10, skipped=2)
    total.add([vars(rank) for rank in ranks])
    assert (total.done, total.failed, total.seconds, total.load_seconds) == (8, 1, 4.0, 0.5)
    assert total.unavailable_metrics == {"m": "gone"}


def test_a_journal_is_replayed_each_cell_once_with_its_image(tmp_path) -> None:
    relay = RelayStore(tmp_path / "out")
    image = relay.save_image("k1", Image.new("RGB", (8, 8), (10, 20, 30)))
    relay.record_cell("k1", make_cell(seed=0).config(), status="done", scores={"s": 1.0},
                      image=image)
    relay.record_cell("k2", make_cell(seed=1).config(), status="failed", scores={},
                      error="boom")
    relay.record_cell("k3", make_cell(seed=2).config(), status="done", scores={"s": 2.0})
    relay.set_metric_status("s", False, "no weights")
    relay.set_meta("metric_notes", ["s: a note"])
    journal = relay.take()
    summary = SweepSummary(total=3, skipped=0)
    written: list[tuple[str, str]] = []
    notes: list[list[str]] = []
    with RunStore(tmp_path / "out") as store:
        refused = replay_journal(store, journal, summary, accept=lambda key: key != "k3",
                                 on_cell=lambda key, status: written.append((key, status)),
                                 on_notes=notes.append)
        rows = {row["key"]: row for row in store.rows()}
        assert store.metric_status() == {"s": (False, "no weights")}
        assert store.meta("metric_notes") is None  # the caller joins every worker's notes
    assert refused == 1 and set(rows) == {"k1", "k2"}
    assert (tmp_path / "out" / rows["k1"]["image"]).is_file()
    assert (summary.done, summary.failed) == (1, 1)
    assert written == [("k1", "done"), ("k2", "failed")]
    assert notes == [["s: a note"]]
    with RunStore(tmp_path / "shard") as store:  # a torchrun rank's shard: notes stored
        replay_journal(store, [("set_meta", ("metric_notes", ["s: a note"]))], summary)
        assert store.meta("metric_notes") == ["s: a note"]
        with pytest.raises(RuntimeError, match="worker 3 journaled an unknown write"):
            replay_journal(store, [("delete", ())], summary, writer="worker 3")


def test_a_configuration_timed_by_two_workers_keeps_the_first_row_for_every_cell(tmp_path):
    """Two Ray actors that start on one adapter setting together both time it. The row
    replayed first stands; the later worker's row is dropped and its cells get the stored
    row's times and latency score, so every cell's latency is its stored row (as torchrun's
    claim guarantees)."""
    base = {"backbone": "toy-dev", "adapter": "toy", "scale": 1.0, "start": 0.0, "end": 1.0,
            "steps": 2, "batch": 1, "height": 64, "width": 64, "dtype": "float32",
            "fast_path": "eager", "cache": ""}

    def journal(total: float, key: str, seed: int) -> list:
        relay = RelayStore(tmp_path / "out")
        row = {**base, "total_s": total, "denoise_s": total / 2, "repeats": 1,
               "method": "measured", "device": "cpu"}
        relay.record_latency(row)
        timings = {"total_s": total, "denoise_s": total / 2,
                   "latency_key": relay.latency(base)["key"]}
        relay.record_cell(key, make_cell(seed=seed).config(), status="done",
                          scores={"latency": total, "s": 1.0}, timings=timings)
        return relay.take()

    first, second = journal(1.0, "k1", 0), journal(2.0, "k2", 1)
    summary = SweepSummary(total=2, skipped=0)
    with RunStore(tmp_path / "out") as store:
        replay_journal(store, first, summary)
        replay_journal(store, second, summary)
        rows = {row["key"]: row for row in store.rows()}
        stored = store.latency_rows()
    assert len(stored) == 1 and stored[0]["total_s"] == 1.0  # the first timing stands
    for key in ("k1", "k2"):
        assert rows[key]["scores"]["latency"] == 1.0
        assert rows[key]["timings"]["total_s"] == 1.0
        assert rows[key]["timings"]["latency_key"] == stored[0]["key"]
    assert rows["k2"]["scores"]["s"] == 1.0  # other scores untouched
