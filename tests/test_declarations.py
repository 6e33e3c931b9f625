"""A family the core has never heard of, declared by a plugin, and every command reading the
same declarations: its tiny size (sweep, dry run, generate, the contract mixins), its size
multiple (refused before anything loads), an adapter kind of its own (open kinds) with the
metrics that declare it as defaults and as the analysis's fidelity metric, and clear refusals
of probes and the block cache where the family declares none."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from toy_plugin import ToyAdapter, ToyBackbone, ToyColourMatch

from adapterswap import hookimpl
from adapterswap.adapter import Adapter
from adapterswap.cli import main
from adapterswap.errors import InvalidArgumentError
from adapterswap.plugins import register_plugin, unregister_plugin
from adapterswap.sweep.spec import SweepSpec
from adapterswap.testing import AdapterContract, BackboneContract

PLUGIN = "wide-family-plugin"


class WideToy(ToyBackbone):
    """A backbone of family ``wide``: sizes are multiples of 32, its tiny preset is 32 x 64."""

    name = "wide-toy"
    family = "wide"
    default_steps = 4
    guidance_mode = "none"
    default_height = 256
    default_width = 256
    size_multiple = 32
    tiny_size = (32, 64)
    default_adapter = "wide-prompt"
    supports_probes = False

    @classmethod
    def tiny(cls, seed: int = 0, *, cache_dir: str | None = None, **options):  # noqa: ANN003
        backbone = super().tiny(seed, cache_dir=cache_dir)
        backbone.default_height, backbone.default_width = cls.tiny_size
        return backbone


class WideToyDistilled(WideToy):
    name = "wide-toy-distilled"
    default_steps = 1


class WidePrompt(ToyAdapter):
    """An image-prompt adapter: a kind no built-in plugin has."""

    name = "wide-prompt"
    kind = "image-prompt"
    families = frozenset({"wide"})
    supports_probes = False


class WideMatch(ToyColourMatch):
    """The fidelity metric of image-prompt adapters (a model-free colour match)."""

    name = "wide-match"
    kinds = frozenset({"image-prompt"})
    model_free = True


class WidePlugin:
    @hookimpl
    def register_backbones(self, register):  # noqa: ANN001
        register(WideToy)
        register(WideToyDistilled)

    @hookimpl
    def register_adapters(self, register):  # noqa: ANN001
        register(WidePrompt)

    @hookimpl
    def register_metrics(self, register):  # noqa: ANN001
        register(WideMatch)


@pytest.fixture(scope="module", autouse=True)
def wide_plugin():
    register_plugin(WidePlugin(), name=PLUGIN)
    yield
    unregister_plugin(PLUGIN)


class TestWideToyContract(BackboneContract):
    backbone_name = "wide-toy"


class TestWidePromptContract(AdapterContract):
    adapter_name = "wide-prompt"
    backbone_names = ("wide-toy", "wide-toy-distilled")


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_every_command_reads_the_declared_tiny_size(tmp_path) -> None:
    spec = SweepSpec(backbones=["wide-toy"], preset="tiny", steps=[1], out=str(tmp_path))
    assert {(c.height, c.width) for c in spec.validate().cells()} == {(32, 64)}
    dry = _cli("sweep", "--backbone", "wide-toy", "--preset", "tiny", "--dry-run",
               "--out", str(tmp_path / "dry"))
    assert dry.exit_code == 0, dry.output
    out = tmp_path / "one.png"
    generated = _cli("generate", "--backbone", "wide-toy", "--preset", "tiny", "--steps", "1",
                     "--out", str(out))
    assert generated.exit_code == 0, generated.output
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (64, 32)


@pytest.mark.parametrize("command", ["sweep", "generate"])
def test_sizes_off_the_declared_multiple_are_refused_before_loading(tmp_path, command) -> None:
    args = [command, "--backbone", "wide-toy", "--preset", "tiny", "--height", "48"]
    args += ["--dry-run", "--out", str(tmp_path / "o")] if command == "sweep" else \
        ["--out", str(tmp_path / "o.png")]
    result = _cli(*args)
    assert result.exit_code == 2
    assert "height=48" in result.output and "multiple of 32" in result.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.png").exists()


def test_default_metrics_come_from_the_metrics_declarations(tmp_path) -> None:
    spec = SweepSpec(backbones=["wide-toy"], preset="tiny", out=str(tmp_path)).validate()
    # the kind-matched metric first, then the model-free defaults of every kind
    assert spec.metrics == ["wide-match", "contrast", "sharpness", "latency"]
    from adapterswap.metrics.base import default_metrics

    classes = [WideMatch, ToyColourMatch]
    assert default_metrics("style", classes) == ["toy-colour-match"]
    assert default_metrics("none", classes) == []


def test_an_open_kind_gets_its_recommendation_from_the_metric_that_declares_it(
        tmp_path) -> None:
    out = tmp_path / "sweep"
    result = _cli("sweep", "--backbone", "wide-toy", "--preset", "tiny", "--steps", "1,2,4",
                  "--seeds", "0,1,2", "--timing-repeats", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    analysis = json.loads((out / "analysis.json").read_text())
    (recommendation,) = analysis["recommendations"]
    assert recommendation["metric"] == "wide-match"
    assert recommendation["adapter_kind"] == "image-prompt"
    # the report names what produced every figure of a metric
    evaluator = WideMatch.evaluator({})
    assert analysis["metrics"]["wide-match"]["evaluator"] == evaluator
    import html

    assert html.escape(evaluator) in (out / "report.html").read_text()


def test_kinds_are_open_names_but_not_none_or_malformed() -> None:
    for kind, ok in (("image-prompt", True), ("pose", True), ("none", False),
                     ("Image Prompt", False), (None, False)):
        klass = type("K", (WidePrompt,), {"kind": kind})
        assert (Adapter.class_problems(klass) == []) is ok, kind


def test_probes_and_cache_are_refused_where_the_family_declares_none(tmp_path) -> None:
    with pytest.raises(InvalidArgumentError, match="probes=True.*supports_probes"):
        SweepSpec(backbones=["wide-toy"], preset="tiny", probes=True,
                  out=str(tmp_path)).validate()
    with pytest.raises(InvalidArgumentError, match="cache=.*block_cache_layout"):
        SweepSpec(backbones=["wide-toy"], preset="tiny", cache="interval:2",
                  out=str(tmp_path)).validate()
