"""The fidelity metric of an adapter kind comes from the metrics' declarations (the ``kinds``
of their stored records), not from a table in the core: an adapter kind the core has never
heard of is judged by a metric that declares it; a kind no metric declares gets no
recommendation and a reason naming the kind; records written before ``kinds`` was recorded
still match by their ``kind``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adapterswap.metrics import Metric
from adapterswap.sweep.analysis import analyse
from adapterswap.sweep.analysis.fidelity import fidelity_metrics, measures_fidelity_for
from adapterswap.sweep.provenance import metric_record

STEPS = [1, 2, 4, 8, 16, 28]
SHARPNESS = {"higher_is_better": True, "kinds": [], "kind": "diagnostic", "worst": None,
             "available": True}


def row(backbone="b", adapter="ad", reference="r0", prompt="p0", seed=0, steps=1, scores=None):
    """One finished cell, as the store gives it back (test_statistics' rows)."""
    return {"key": f"{backbone}-{adapter}-{reference}-{prompt}-{seed}-{steps}",
            "status": "done", "backbone": backbone, "adapter": adapter, "scale": None,
            "start": 0.0, "end": 1.0, "reference": reference, "prompt": prompt, "seed": seed,
            "steps": steps, "height": 64, "width": 64, "guidance_scale": None,
            "scores": dict(scores or {}), "timings": {}, "confounds": [],
            "adapter_active_steps": None if adapter == "none" else steps}


def sweep(metrics, adapter="ad", seeds=(0, 1, 2), clusters=2):
    """A saturating curve for every metric, two (reference, prompt) clusters, three seeds."""
    rng = np.random.default_rng(20)
    curve = dict(zip(STEPS, [0.20, 0.45, 0.58, 0.61, 0.62, 0.62]))
    return [row(adapter=adapter, reference=f"r{c}", seed=s, steps=n,
                scores={m: curve[n] + rng.normal(0, 0.01) for m in metrics})
            for c in range(clusters) for s in seeds for n in STEPS]


class _ImagePromptSimilarity(Metric):
    """A third-party metric declaring a kind the core has never heard of (and another)."""

    name = "ip-sim"
    higher_is_better = True
    kinds = frozenset({"image-prompt", "identity"})
    needs = frozenset({"reference"})
    worst = -1.0

    def score(self, batch):  # noqa: ANN001 - only its declarations are read here
        raise NotImplementedError


class _PromptFidelity(Metric):
    name = "prompt-sim"
    higher_is_better = True
    kinds = frozenset({"none"})
    needs = frozenset({"prompt"})
    worst = None

    def score(self, batch):  # noqa: ANN001 - only its declarations are read here
        raise NotImplementedError


def test_a_new_adapter_kind_is_judged_by_the_metric_that_declares_it():
    record = metric_record(_ImagePromptSimilarity)
    assert record["kinds"] == ["identity", "image-prompt"]
    assert record["kind"] == "identity"  # its role is another kind: the declaration decides
    rows = sweep(["ip-sim", "sharpness"], adapter="third-party-ip")
    result = analyse(rows, metric_info={"ip-sim": record, "sharpness": SHARPNESS},
                     adapter_kinds={"third-party-ip": "image-prompt"})
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    rec = data["recommendation"]
    assert rec is not None and rec["metric"] == "ip-sim"
    assert rec["adapter_kind"] == "image-prompt" and rec["steps"] is not None
    assert data["fidelity_metric"] == {"b|third-party-ip": "ip-sim"}


def test_no_adapter_is_judged_by_a_metric_declaring_none():
    rows = sweep(["prompt-sim", "sharpness"], adapter="none")
    result = analyse(rows, metric_info={"prompt-sim": metric_record(_PromptFidelity),
                                        "sharpness": SHARPNESS},
                     adapter_kinds={"none": None})
    assert result.recommendation is not None
    assert result.recommendation["metric"] == "prompt-sim"


def test_a_kind_no_metric_declares_gets_no_recommendation_and_a_reason_naming_it():
    info = {"ip-sim": metric_record(_ImagePromptSimilarity), "sharpness": SHARPNESS}
    rows = sweep(["ip-sim", "sharpness"], adapter="depth-ctl")
    result = analyse(rows, metric_info=info, adapter_kinds={"depth-ctl": "depth-map"})
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["recommendation"] is None
    reason = data["recommendation_reason"]
    assert "'depth-map'" in reason and "no depth-map metric was scored" in reason
    assert "adapter 'depth-ctl'" in reason and "ip-sim" in reason and "sharpness" in reason
    assert data["fidelity_metric"] == {} and data["pareto"] == {}
    # no adapter and no metric declaring "none": the reason says prompt fidelity, kind 'none'
    result = analyse(sweep(["ip-sim"], adapter="none"), metric_info=info,
                     adapter_kinds={"none": None})
    assert result.recommendation is None
    assert "no prompt-fidelity metric" in result.recommendation_reason
    assert "'none'" in result.recommendation_reason


def test_an_unavailable_declaring_metric_is_named_in_the_reason():
    record = dict(metric_record(_ImagePromptSimilarity), available=False,
                  reason="no weights")
    rows = sweep(["sharpness"], adapter="third-party-ip")
    result = analyse(rows, metric_info={"ip-sim": record, "sharpness": SHARPNESS},
                     adapter_kinds={"third-party-ip": "image-prompt"})
    assert result.recommendation is None
    assert "ip-sim was unavailable (no weights)" in result.recommendation_reason


@pytest.mark.parametrize(("adapter", "adapter_kind", "old_kind"), [
    ("style-ip", "style", "style"),
    ("custom", "image-prompt", "image-prompt"),
    ("none", None, "text"),
])
def test_an_old_record_without_kinds_still_matches_by_kind(adapter, adapter_kind, old_kind):
    old = {"higher_is_better": True, "kind": old_kind, "worst": None, "available": True}
    rows = sweep(["old-metric", "sharpness"], adapter=adapter)
    result = analyse(rows, metric_info={"old-metric": old, "sharpness": SHARPNESS},
                     adapter_kinds={adapter: adapter_kind, "none": None})
    assert result.recommendation is not None
    assert result.recommendation["metric"] == "old-metric"


def test_a_recorded_kinds_field_wins_over_the_old_kind_rule():
    # declared for identity only, though its role is "style": a style adapter is not judged
    # on it, an identity adapter is
    record = {"higher_is_better": True, "kinds": ["identity"], "kind": "style"}
    assert measures_fidelity_for(record, "identity")
    assert not measures_fidelity_for(record, "style")
    assert not measures_fidelity_for({"kinds": []}, "none")  # a diagnostic judges nothing
    assert not measures_fidelity_for(None, "identity")
    info = {"a": record, "b": {"kind": "identity"}, "c": {"kinds": ["style"]}}
    assert fidelity_metrics("identity", ["c", "b", "a"], info) == ["b", "a"]


def test_a_new_kind_through_a_real_store_and_the_report(tmp_path):
    pytest.importorskip("matplotlib")
    from adapterswap.sweep.report import build_report
    from adapterswap.sweep.store import RunStore

    if not hasattr(RunStore, "begin_run"):
        pytest.skip("this store records no runs")
    rows = sweep(["ip-sim", "sharpness"], adapter="third-party-ip")
    store = RunStore(tmp_path)
    store.begin_run(spec={}, versions={}, code_hash="x", weights={}, reference_hashes={},
                    device="cpu", dtype="float32",
                    metrics={"ip-sim": metric_record(_ImagePromptSimilarity),
                             "sharpness": SHARPNESS},
                    adapters={"third-party-ip": "image-prompt"},
                    cell_keys=[r["key"] for r in rows], argv=["test"])
    for r in rows:
        config = {k: r[k] for k in ("backbone", "adapter", "scale", "start", "end",
                                    "reference", "prompt", "seed", "steps", "height",
                                    "width", "guidance_scale")}
        store.record_cell(r["key"], config, status="done", scores=r["scores"],
                          extra={"adapter_active_steps": r["adapter_active_steps"],
                                 "confounds": r["confounds"]})
    store.close()
    page = build_report(tmp_path).read_text()
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["recommendation"]["metric"] == "ip-sim"
    assert data["fidelity_metric"] == {"b|third-party-ip": "ip-sim"}
    assert "No recommendation" not in page
