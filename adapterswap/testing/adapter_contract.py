"""The :class:`AdapterContract` mixin: checks every adapter plugin must pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from adapterswap.adapter import Adapter
from adapterswap.backbone import Backbone
from adapterswap.denoise import denoise
from adapterswap.errors import IncompatibleAdapterError, InvalidArgumentError
from adapterswap.plugins import backbones as installed_backbones
from adapterswap.plugins import get_adapter, get_backbone
from adapterswap.testing.tiny_sweep import run_tiny_sweep


class _OtherFamilyBackbone(Backbone):
    """A declaration-only backbone of a family no adapter supports (for compatibility tests)."""

    name = "contract-other-family"
    family = "contract-other"
    default_source = "nobody/none"
    default_steps = 1
    guidance_mode = "none"

    def load_pipeline(self, source: str, *, local_files_only: bool) -> Any:
        raise NotImplementedError

    encode_prompt = prepare_latents = schedule = predict = load_pipeline  # type: ignore
    step = predict_x0 = decode = load_pipeline  # type: ignore


class AdapterContract:
    """Checks every :class:`~adapterswap.adapter.Adapter` must pass."""

    adapter_name: ClassVar[str]
    #: tiny backbones the adapter must attach to; the first is the one it was trained for.
    backbone_names: ClassVar[tuple[str, ...]]
    seed: ClassVar[int] = 0
    steps: ClassVar[int] = 2
    prompt: ClassVar[str] = "a portrait photo of a person"
    atol: ClassVar[float] = 1e-5

    # -- builders ---------------------------------------------------------------------------
    def make_backbone(self, name: str) -> Backbone:
        return get_backbone(name).tiny(self.seed)

    def make_adapter(self, backbone: Backbone, **kwargs: Any) -> Adapter:
        """A loaded (not attached) adapter whose weights fit ``backbone``."""
        return get_adapter(self.adapter_name).tiny(backbone, self.seed, **kwargs)

    def make_reference(self) -> Any:
        return get_adapter(self.adapter_name).tiny_reference(self.seed)

    @pytest.fixture(scope="class")
    @classmethod
    def backbones(cls) -> dict[str, Backbone]:
        """The tiny backbones, built once per test class (``make_backbone``)."""
        maker = cls()
        return {name: maker.make_backbone(name) for name in cls.backbone_names}

    @pytest.fixture()
    def adapter(self, backbones: dict[str, Backbone]) -> Any:
        adapter = self.make_adapter(backbones[self.backbone_names[0]])
        yield adapter
        adapter.detach()

    def _run(self, backbone: Backbone, adapter: Adapter | None = None, **kwargs: Any) -> Any:
        import numpy as np

        reference = self.make_reference() if adapter is not None else None
        result = denoise(backbone, self.prompt, num_inference_steps=self.steps,
                         seeds=[self.seed], adapter=adapter, reference=reference,
                         output_type="np", **kwargs)
        return np.asarray(result.images)

    # -- declaration ------------------------------------------------------------------------
    def test_registered_and_declared(self, backbones: dict[str, Backbone]) -> None:
        cls = get_adapter(self.adapter_name)
        assert cls.name == self.adapter_name
        assert Adapter.class_problems(cls) == []
        assert isinstance(cls.kind, str) and cls.kind != "none"  # open kinds, one name
        for backbone in backbones.values():
            assert backbone.family in cls.families

    def test_tiny_cli_sweep_with_the_adapter(self, tmp_path: Path) -> None:
        """One adapter cell through ``adapterswap sweep --preset tiny`` (synthetic reference,
        no size flags) on the backbone it was trained for, at that backbone's tiny size."""
        name = self.backbone_names[0]
        sweep = run_tiny_sweep(tmp_path / "sweep", name, adapter=self.adapter_name)
        assert sweep.exit_code == 0, sweep.output
        assert [(c["adapter"], c["status"]) for c in sweep.cells] == \
            [(self.adapter_name, "done")], sweep.cells
        assert sweep.sizes == {tuple(get_backbone(name).tiny_size)}

    def test_other_family_is_refused_naming_both(self, adapter: Adapter) -> None:
        other = _OtherFamilyBackbone()
        with pytest.raises(IncompatibleAdapterError) as info:
            adapter.check_backbone(other,
                                   installed=[e.cls for e in installed_backbones().entries()])
        message = str(info.value)
        assert self.adapter_name in message and other.name in message
        for name in self.backbone_names:
            assert name in message  # lists the backbones it does support

    def test_bad_scale_and_window_are_named(self) -> None:
        cls = get_adapter(self.adapter_name)
        with pytest.raises(InvalidArgumentError, match="scale=-1"):
            cls(scale=-1)
        with pytest.raises(InvalidArgumentError, match="start=0.8"):
            cls(start=0.8, end=0.2)
        with pytest.raises(InvalidArgumentError, match="end=1.5"):
            cls(end=1.5)

    # -- reference --------------------------------------------------------------------------
    def test_encode_reference_is_cacheable(self, adapter: Adapter,
                                           backbones: dict[str, Backbone]) -> None:
        import torch

        backbone = backbones[self.backbone_names[0]]
        adapter.attach(backbone)
        first = adapter.encode_reference(self.make_reference(), backbone)
        second = adapter.encode_reference(self.make_reference(), backbone)
        assert first.batch_size == 1
        for key, value in first.batched.items():
            if value is not None:
                assert torch.equal(value, second.batched[key]), key

    def test_unreadable_reference_is_named(self, adapter: Adapter, tmp_path: Path,
                                           backbones: dict[str, Backbone]) -> None:
        backbone = backbones[self.backbone_names[0]]
        adapter.attach(backbone)
        bad = tmp_path / "not-an-image.png"
        bad.write_bytes(b"this is not a png")
        with pytest.raises(InvalidArgumentError, match="not-an-image.png"):
            adapter.encode_reference(str(bad), backbone)
        with pytest.raises(InvalidArgumentError, match="missing.png"):
            adapter.encode_reference(str(tmp_path / "missing.png"), backbone)

    # -- behaviour on every backbone ----------------------------------------------------------
    def test_adapter_changes_output_and_detach_restores_exactly(
            self, adapter: Adapter, backbones: dict[str, Backbone]) -> None:
        import numpy as np

        for name, backbone in backbones.items():
            before = self._run(backbone)
            with_adapter = self._run(backbone, adapter)
            assert adapter.attached_to is backbone
            adapter.detach()
            after = self._run(backbone)
            assert np.array_equal(before, after), f"detach did not restore {name}"
            assert not np.allclose(before, with_adapter, atol=1e-4), \
                f"{self.adapter_name} has no effect on {name}"

    def test_scale_zero_and_empty_window_equal_no_adapter(
            self, adapter: Adapter, backbones: dict[str, Backbone]) -> None:
        import numpy as np

        backbone = backbones[self.backbone_names[0]]
        base = self._run(backbone)
        adapter.set_scale(0.0)
        np.testing.assert_allclose(self._run(backbone, adapter), base, atol=self.atol)
        adapter.set_scale(type(adapter).default_scale)
        # with 2 steps a window [0.9, 1.0] contains no step: 0/2 < 0.9 and 1/2 < 0.9
        adapter.set_window(0.9, 1.0)
        np.testing.assert_allclose(self._run(backbone, adapter), base, atol=self.atol)
        adapter.set_window(0.0, 1.0)

    def test_probes_record_per_sample_and_do_not_change_outputs(
            self, adapter: Adapter, backbones: dict[str, Backbone]) -> None:
        import numpy as np

        from adapterswap.probes import ProbeRecorder

        if not type(adapter).supports_probes:
            pytest.skip(f"{self.adapter_name} has no probes")
        backbone = backbones[self.backbone_names[0]]
        plain = self._run(backbone, adapter)
        recorder = ProbeRecorder()
        adapter.set_probe(recorder)
        try:
            probed = self._run(backbone, adapter)
        finally:
            adapter.set_probe(None)
        records = recorder.drain()
        assert np.array_equal(plain, probed), "probes changed the output"
        assert records, "probes recorded nothing"
        assert all(len(values) == 1 for _, _, values in records)  # one value per sample
        assert all(np.isfinite(values).all() for _, _, values in records)

    def test_swap_between_backbones_without_reload(self, adapter: Adapter,
                                                    backbones: dict[str, Backbone]) -> None:
        calls: list[int] = []
        original = adapter.load_weights

        def counting_load_weights() -> None:
            calls.append(1)
            return original()

        adapter.load_weights = counting_load_weights  # type: ignore[method-assign]
        try:
            outputs = []
            for backbone in backbones.values():
                adapter.attach(backbone)
                assert adapter.attached_to is backbone
                outputs.append(self._run(backbone, adapter))
            assert calls == [], "the adapter reloaded its weights when it moved"
        finally:
            adapter.load_weights = original  # type: ignore[method-assign]
        assert all(o.shape[-1] == 3 for o in outputs)
