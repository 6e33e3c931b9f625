"""Metric options: every metric refuses an option it does not know, naming it and the known ones,
in the constructor, in a sweep's validation and on the command line (exit 2, one line)."""

from __future__ import annotations

from typing import ClassVar

import pytest
from click.testing import CliRunner

from adapterswap.cli import main
from adapterswap.errors import InvalidArgumentError
from adapterswap.metrics import Metric, MetricBatch
from adapterswap.plugins import get_metric, metrics
from adapterswap.sweep.spec import SweepSpec

BUILT_IN = ("sharpness", "contrast", "latency")


def unknown_option_message(name: str, options: dict, unknown: str, known: str) -> str:
    """The one-line error; ``unknown`` is e.g. ``option 'foo'`` or ``options 'a', 'b'``."""
    given = {name: options}
    return (f"invalid metric_options={given!r}: unknown {unknown} of metric {name!r}; "
            f"known options: {known}")


#: What ``--metric-option sharpness.foo=1`` is refused with, in the spec and on the CLI.
SHARPNESS_FOO_REFUSED = unknown_option_message("sharpness", {"foo": 1}, "option 'foo'", "device")


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_metrics_refuse_an_unknown_option(name: str) -> None:
    cls = get_metric(name)
    assert cls.known_options() == ["device"]
    with pytest.raises(InvalidArgumentError) as info:
        cls(foo=1)
    assert str(info.value) == unknown_option_message(name, {"foo": 1}, "option 'foo'", "device")
    assert cls(device="cpu").device == "cpu"  # the known one is taken


def test_several_unknown_options_are_all_named() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        get_metric("sharpness")(mode=3, foo=1)
    assert str(info.value) == unknown_option_message(
        "sharpness", {"mode": 3, "foo": 1}, "options 'foo', 'mode'", "device")


class Tinted(Metric):
    """A metric that declares an option, as a third-party plugin would."""

    name = "tinted"
    options_spec: ClassVar[dict[str, object]] = {"channel": "red"}

    def score(self, batch: MetricBatch) -> list[float | None]:
        return [0.0 for _ in batch.images]


def test_declared_options_are_taken_and_listed() -> None:
    assert Tinted(channel="blue").options == {"channel": "blue"}
    with pytest.raises(InvalidArgumentError) as info:
        Tinted(chanel="blue")
    assert str(info.value) == unknown_option_message(
        "tinted", {"chanel": "blue"}, "option 'chanel'", "channel, device")


def test_every_registered_metric_refuses_an_unknown_option() -> None:
    """Built-ins, the installed plugins' metrics (lpips, clip, identity, ...) and the toy one."""
    names = metrics().names()
    assert set(BUILT_IN) <= set(names)
    for name in names:
        cls = get_metric(name)
        with pytest.raises(InvalidArgumentError) as info:
            cls(no_such_option=1)
        message = str(info.value)
        assert "unknown option 'no_such_option'" in message, name
        assert message.endswith(f"known options: {', '.join(cls.known_options())}"), name
        assert "device" in cls.known_options(), name


def test_sweep_validation_refuses_an_unknown_option(tmp_path) -> None:  # noqa: ANN001
    spec = SweepSpec(backbones=["sdxl"], preset="tiny", metrics=["sharpness"], steps=[1],
                     metric_options={"sharpness": {"foo": 1}}, out=str(tmp_path))
    with pytest.raises(InvalidArgumentError) as info:
        spec.validate()
    assert str(info.value) == SHARPNESS_FOO_REFUSED


def test_cli_sweep_exits_2_with_one_line_naming_the_option(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["sweep", "--preset", "tiny", "--backbone", "sdxl",
                                       "--steps", "1", "--metric-option", "sharpness.foo=1",
                                       "--out", str(out)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {SHARPNESS_FOO_REFUSED}"]
    assert not (out / "results.sqlite").exists()  # refused before anything ran
