"""Unknown options of the model metrics are refused, named, with the known ones listed, in the
constructor and on the command line (exit 2, one line)."""

from __future__ import annotations

import pytest
from adapterswap_metrics.plugin import METRICS
from click.testing import CliRunner

from adapterswap.cli import main
from adapterswap.errors import InvalidArgumentError

KNOWN = {
    "lpips": "against, batch_size, device, random_backbone, resolution",
    "clip-i": "batch_size, device, model",
    "clip-t": "batch_size, device, model",
    "dino": "batch_size, device, model, preprocess",
    "style": "batch_size, csd_weights, device, model",
}


@pytest.mark.parametrize("metric_class", METRICS, ids=lambda cls: cls.name)
def test_unknown_option_is_named_with_the_known_ones(metric_class):
    assert {cls.name for cls in METRICS} == set(KNOWN)
    with pytest.raises(InvalidArgumentError) as info:
        metric_class(modle="x")
    assert str(info.value) == (
        f"invalid metric_options={ {metric_class.name: {'modle': 'x'}}!r}: unknown option "
        f"'modle' of metric {metric_class.name!r}; known options: {KNOWN[metric_class.name]}")
    assert metric_class(batch_size=2).batch_size == 2  # known ones are taken


def test_cli_sweep_refuses_an_lpips_typo(tmp_path):
    result = CliRunner().invoke(main, ["sweep", "--preset", "tiny", "--backbone", "sdxl",
                                       "--steps", "1", "--metrics", "lpips", "--metric-option",
                                       "lpips.resolutoin=256", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: invalid metric_options={'lpips': {'resolutoin': 256}}: unknown option "
        f"'resolutoin' of metric 'lpips'; known options: {KNOWN['lpips']}"]
