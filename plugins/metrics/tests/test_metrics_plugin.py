"""Registration of the metrics: the hook, the real entry point, and a fast import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
from adapterswap_metrics import plugin

from adapterswap.metrics import Metric

EXPECTED = {
    # name: (needs, higher_is_better, kinds)
    "lpips": ({"reference"}, False, set()),
    "clip-i": ({"reference"}, True, {"object"}),
    "clip-t": ({"prompt"}, True, {"none"}),  # prompt fidelity: judges runs without an adapter
    "dino": ({"reference"}, True, {"object"}),
    "style": ({"reference"}, True, {"style"}),
}


def test_hook_registers_complete_metric_classes():
    registered: list[type] = []
    plugin.register_metrics(registered.append)
    assert {cls.name for cls in registered} == set(EXPECTED)
    for cls in registered:
        assert issubclass(cls, Metric) and Metric.class_problems(cls) == []
        needs, higher_is_better, kinds = EXPECTED[cls.name]
        assert (set(cls.needs), cls.higher_is_better, set(cls.kinds)) == (
            needs, higher_is_better, kinds)
        assert cls.description and "\n" not in cls.description and len(cls.description) < 90


def test_every_metric_builds_without_arguments_and_reports_availability():
    """``adapterswap doctor`` calls ``cls().availability()``: cheap and never raising."""
    for cls in plugin.METRICS:
        reason = cls().availability()
        assert reason is None or (isinstance(reason, str) and reason)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADAPTERSWAP_LOAD_PLUGINS": "adapterswap-metrics",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "adapterswap", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def installed_entry_point():
    for ep in metadata.entry_points(group="adapterswap"):
        if ep.name == "metrics" and ep.dist is not None and ep.dist.name == "adapterswap-metrics":
            return ep
    return None


@pytest.mark.skipif(installed_entry_point() is None,
                    reason="adapterswap-metrics is not installed (pip install -e plugins/metrics)")
def test_real_entry_point_lists_the_metrics():
    assert installed_entry_point().value == "adapterswap_metrics.plugin"
    result = run_cli("list", "metrics", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    for name, (needs, higher_is_better, kinds) in EXPECTED.items():
        row = rows[name]
        assert row["plugin"] == "adapterswap-metrics"
        assert (set(row["needs"]), row["higher_is_better"], set(row["kinds"])) == (
            needs, higher_is_better, kinds)
    table = run_cli("list", "metrics")
    assert table.returncode == 0
    assert all(name in table.stdout for name in EXPECTED)


def test_plugin_import_does_not_import_torch():
    code = ("import sys, adapterswap_metrics.plugin; "
            "print(sorted(m for m in ('torch', 'transformers', 'lpips') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]"
