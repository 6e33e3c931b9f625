"""The :class:`EnhancerContract` mixin: checks every enhancer plugin must pass.

An enhancer's tests subclass it, naming the enhancer, settings that act and settings that are
neutral, and a tiny backbone and adapter it acts on::

    class TestMyEnhancer(EnhancerContract):
        enhancer_name = "my-enhancer"
        options = {"strength": 2.0}
        neutral_options = {"strength": 1.0}
        backbone_name, adapter_name = "sdxl-lightning", "style-ip-adapter"

The checks: the declaration registers; the settings print back as a spec that parses to the
same settings; neutral settings give the plain run bit for bit (they are never installed);
acting settings change the image, report their denoiser forwards, and leave the backbone
and adapter exactly as they were (the plain run afterwards is the plain run before); unknown
options are refused by name; and a one-cell CLI sweep with ``--enhancer`` stores the cell
under the canonical spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from adapterswap.denoise import denoise
from adapterswap.enhancer import Enhancer, parse_enhancer
from adapterswap.errors import InvalidArgumentError
from adapterswap.plugins import get_adapter, get_backbone, get_enhancer
from adapterswap.testing.tiny_sweep import run_tiny_sweep


class EnhancerContract:
    """Checks every :class:`~adapterswap.enhancer.Enhancer` must pass."""

    enhancer_name: ClassVar[str]
    #: settings that act (change the image)
    options: ClassVar[dict[str, Any]] = {}
    #: settings that change nothing (:meth:`Enhancer.is_neutral`)
    neutral_options: ClassVar[dict[str, Any] | None] = None
    backbone_name: ClassVar[str]
    adapter_name: ClassVar[str]
    steps: ClassVar[int] = 2
    seeds: ClassVar[tuple[int, ...]] = (0, 1)
    prompt: ClassVar[str] = "a portrait photo of a person"

    # -- builders (override to customise) ---------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def parts(cls) -> Any:
        """``(backbone, adapter, reference)`` on tiny weights, the adapter detached after."""
        backbone = get_backbone(cls.backbone_name).tiny(0)
        adapter = get_adapter(cls.adapter_name).tiny(backbone, 0)
        yield backbone, adapter, adapter.tiny_reference(0)
        adapter.detach()

    def make(self, options: dict[str, Any]) -> Enhancer:
        return get_enhancer(self.enhancer_name)(**options)

    def _run(self, parts: Any, enhancer: Enhancer | None) -> Any:
        backbone, adapter, reference = parts
        return denoise(backbone, self.prompt, num_inference_steps=self.steps,
                       seeds=list(self.seeds), adapter=adapter, reference=reference,
                       output_type="np", enhancer=enhancer)

    # -- declaration ------------------------------------------------------------------------
    def test_registered_and_declared(self) -> None:
        cls = get_enhancer(self.enhancer_name)
        assert cls.name == self.enhancer_name
        assert Enhancer.class_problems(cls) == []

    def test_spec_prints_back(self) -> None:
        enhancer = self.make(self.options)
        name, options = parse_enhancer(enhancer.spec())
        assert name == self.enhancer_name
        assert self.make(options).spec() == enhancer.spec()

    def test_unknown_option_is_refused_by_name(self) -> None:
        with pytest.raises(InvalidArgumentError, match="no_such_option"):
            self.make({"no_such_option": 1})

    # -- runs -------------------------------------------------------------------------------
    def test_neutral_settings_are_the_plain_run(self, parts: Any) -> None:
        import numpy as np

        if self.neutral_options is None:
            pytest.skip("the enhancer declares no neutral settings")
        neutral = self.make(self.neutral_options)
        assert neutral.is_neutral()
        plain, same = self._run(parts, None), self._run(parts, neutral)
        assert np.array_equal(plain.images, same.images)
        assert same.forwards == plain.forwards

    def test_it_acts_counts_its_forwards_and_leaves_no_trace(self, parts: Any) -> None:
        import numpy as np

        enhancer = self.make(self.options)
        assert not enhancer.is_neutral()
        before = self._run(parts, None)
        enhanced = self._run(parts, enhancer)
        after = self._run(parts, None)
        assert np.abs(enhanced.images - before.images).max() > 0
        assert np.array_equal(before.images, after.images)  # detached exactly
        assert enhancer.backbone is None and enhancer.adapter is None
        wanted = sum(enhancer.forwards_at(i, self.steps) for i in range(self.steps))
        assert enhanced.forwards >= wanted >= self.steps

    def test_one_cell_cli_sweep(self, tmp_path: Path) -> None:
        spec = self.make(self.options).spec()
        sweep = run_tiny_sweep(tmp_path / "sweep", self.backbone_name,
                               adapter=self.adapter_name, extra=("--enhancer", spec))
        assert sweep.exit_code == 0, sweep.output
        assert [c["status"] for c in sweep.cells] == ["done"]
        import sqlite3

        with sqlite3.connect(tmp_path / "sweep" / "results.sqlite") as db:
            assert [r[0] for r in db.execute("SELECT enhancer FROM cells")] == [spec]
