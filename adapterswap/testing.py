"""Contract test mixins every backbone and adapter plugin's tests subclass.

Like diffusers' ``PipelineTesterMixin``: a third-party plugin gets the same checks as the
built-in ones by writing::

    from adapterswap.testing import AdapterContract, BackboneContract

    class TestMyBackbone(BackboneContract):
        backbone_name = "my-backbone"          # built with MyBackbone.tiny(seed)

    class TestMyAdapter(AdapterContract):
        adapter_name = "my-adapter"            # built with MyAdapter.tiny(backbone, seed)
        backbone_names = ("my-backbone", "my-backbone-distilled")

Override ``make_backbone`` / ``make_adapter`` / ``make_reference`` to build them another way.
The mixins need pytest and torch; they run on CPU in a few seconds with tiny components.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from adapterswap.adapter import ADAPTER_KINDS, Adapter
from adapterswap.backbone import GUIDANCE_MODES, Backbone
from adapterswap.denoise import StepContext, denoise
from adapterswap.errors import (
    IncompatibleAdapterError,
    InvalidArgumentError,
    WeightsNotFoundError,
)
from adapterswap.plugins import get_adapter, get_backbone


def _np(images: Any) -> Any:
    import numpy as np

    return np.asarray(images)


def _generators(seeds: list[int]) -> list[Any]:
    import torch

    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


class BackboneContract:
    """Checks every :class:`~adapterswap.backbone.Backbone` must pass."""

    backbone_name: ClassVar[str]
    seed: ClassVar[int] = 0
    steps: ClassVar[int] = 2
    prompt: ClassVar[str] = "a portrait photo of a person"
    other_prompt: ClassVar[str] = "a watercolor painting of a lighthouse"
    #: tolerance for results that should match up to float reordering (batched vs single).
    atol: ClassVar[float] = 1e-4

    # -- builders (override to customise) ---------------------------------------------------
    def make_backbone(self) -> Backbone:
        """A loaded backbone (default: the class's tiny preset)."""
        return get_backbone(self.backbone_name).tiny(self.seed)

    @pytest.fixture(scope="class")
    def backbone(self) -> Backbone:
        return self.make_backbone()

    def _run(self, backbone: Backbone, **kwargs: Any) -> Any:
        kwargs.setdefault("num_inference_steps", self.steps)
        kwargs.setdefault("seeds", [self.seed])
        return denoise(backbone, kwargs.pop("prompt", self.prompt), output_type="np", **kwargs)

    # -- declaration ------------------------------------------------------------------------
    def test_registered_and_declared(self) -> None:
        cls = get_backbone(self.backbone_name)
        assert cls.name == self.backbone_name
        assert Backbone.class_problems(cls) == []
        assert cls.guidance_mode in GUIDANCE_MODES
        assert isinstance(cls.default_source, str) and cls.default_source
        if cls.guidance_mode == "none":
            assert cls.default_guidance_scale is None
        else:
            assert isinstance(cls.default_guidance_scale, (int, float))

    def test_options_are_declared_and_checked_before_loading(self) -> None:
        cls = get_backbone(self.backbone_name)
        assert all(isinstance(doc, str) and doc and "\n" not in doc
                   for doc in cls.option_docs.values()), "one line of doc per option"
        assert cls.check_options({}) == {}
        with pytest.raises(InvalidArgumentError,
                           match=r"backbone_options=.*unknown option 'no_such_option'"):
            cls.check_options({"no_such_option": 1})

    def test_default_step_grid_ends_at_default_steps(self, backbone: Backbone) -> None:
        grid = backbone.default_step_grid()
        assert grid == sorted(set(grid)) and grid[0] >= 1
        assert grid[-1] == type(backbone).default_steps

    # -- pipeline steps ---------------------------------------------------------------------
    def test_encode_prompt_rows_are_independent(self, backbone: Backbone) -> None:
        import torch

        scale = backbone.resolve_guidance_scale(None)
        both = backbone.encode_prompt([self.prompt, self.other_prompt], guidance_scale=scale)
        second = backbone.encode_prompt([self.other_prompt], guidance_scale=scale)
        assert both.batch_size == 2 and second.batch_size == 1
        picked = both.select([1])
        for key, value in second.batched.items():
            if value is not None:
                torch.testing.assert_close(picked.batched[key], value, atol=self.atol, rtol=0)

    def test_prepare_latents_one_generator_per_sample(self, backbone: Backbone) -> None:
        import torch

        h, w = backbone.default_height, backbone.default_width
        pair = backbone.prepare_latents(_generators([3, 4]), height=h, width=w)
        first = backbone.prepare_latents(_generators([3]), height=h, width=w)
        second = backbone.prepare_latents(_generators([4]), height=h, width=w)
        assert pair.shape[0] == 2
        assert torch.equal(pair[:1], first) and torch.equal(pair[1:], second)

    def test_schedule_has_requested_steps_and_own_state(self, backbone: Backbone) -> None:
        h, w = backbone.default_height, backbone.default_width
        short = backbone.schedule(2, height=h, width=w)
        long = backbone.schedule(5, height=h, width=w)
        assert len(short.timesteps) == 2 and len(long.timesteps) == 5
        if short.sigmas is not None:
            assert len(short.sigmas) == 3 and float(short.sigmas[-1]) == 0.0
        assert short.state is None or short.state is not long.state

    def test_schedule_says_where_it_starts(self, backbone: Backbone) -> None:
        """``start_noise``: the noise share the first step assumes, in [0, 1], which the sweep
        reads to flag cells that start far from the noise it feeds."""
        h, w = backbone.default_height, backbone.default_width
        for n in sorted({1, 2, type(backbone).default_steps}):
            start = backbone.schedule(n, height=h, width=w).start_noise
            assert isinstance(start, float) and 0.0 <= start <= 1.0, (n, start)

    def test_denoise_shapes_range_and_determinism(self, backbone: Backbone) -> None:
        import numpy as np

        first = _np(self._run(backbone).images)
        second = _np(self._run(backbone).images)
        assert first.shape == (1, backbone.default_height, backbone.default_width, 3)
        assert np.isfinite(first).all() and first.min() >= 0.0 and first.max() <= 1.0
        assert np.array_equal(first, second)

    def test_batch_of_seeds_matches_single_runs(self, backbone: Backbone) -> None:
        import numpy as np

        batch = _np(self._run(backbone, seeds=[1, 2]).images)
        one = _np(self._run(backbone, seeds=[1]).images)
        two = _np(self._run(backbone, seeds=[2]).images)
        np.testing.assert_allclose(batch[0], one[0], atol=self.atol * 10)
        np.testing.assert_allclose(batch[1], two[0], atol=self.atol * 10)
        assert not np.allclose(one, two)

    def test_predict_accepts_per_sample_timesteps(self, backbone: Backbone) -> None:
        """Step-parallel batching: two samples at different steps in one forward equal the two
        separate forwards."""
        import torch

        h, w = backbone.default_height, backbone.default_width
        scale = backbone.resolve_guidance_scale(None)
        prompt = backbone.encode_prompt([self.prompt], guidance_scale=scale)
        latents = backbone.prepare_latents(_generators([5, 6]), height=h, width=w)
        s2, s4 = backbone.schedule(2, height=h, width=w), backbone.schedule(4, height=h, width=w)

        def ctx(ts: list[Any], idx: tuple[int, ...], n: tuple[int, ...], sig: list[Any]) -> Any:
            sigmas = None if sig[0] is None else torch.stack(sig)
            return StepContext(torch.stack(ts), idx, n, h, w, sigmas)

        def sigma(s: Any, i: int) -> Any:
            return None if s.sigmas is None else s.sigmas[i]

        joint = backbone.predict(
            latents, ctx([s2.timesteps[0], s4.timesteps[2]], (0, 2), (2, 4),
                         [sigma(s2, 0), sigma(s4, 2)]),
            prompt.repeat(2), guidance_scale=scale)
        a = backbone.predict(latents[:1], ctx([s2.timesteps[0]], (0,), (2,), [sigma(s2, 0)]),
                             prompt, guidance_scale=scale)
        b = backbone.predict(latents[1:], ctx([s4.timesteps[2]], (2,), (4,), [sigma(s4, 2)]),
                             prompt, guidance_scale=scale)
        torch.testing.assert_close(joint, torch.cat([a, b]), atol=self.atol, rtol=1e-4)

    def test_predict_x0_and_step_shapes(self, backbone: Backbone) -> None:
        import torch

        h, w = backbone.default_height, backbone.default_width
        scale = backbone.resolve_guidance_scale(None)
        prompt = backbone.encode_prompt([self.prompt], guidance_scale=scale)
        latents = backbone.prepare_latents(_generators([0]), height=h, width=w)
        sched = backbone.schedule(2, height=h, width=w)
        t = sched.timesteps[0]
        ctx = StepContext(t.reshape(1), (0,), (2,), h, w,
                          None if sched.sigmas is None else sched.sigmas[0].reshape(1))
        out = backbone.predict(latents, ctx, prompt, guidance_scale=scale)
        assert out.shape == latents.shape
        x0 = backbone.predict_x0(out, latents, sched, 0)
        nxt = backbone.step(out, latents, sched, 0)
        assert x0.shape == latents.shape and nxt.shape == latents.shape
        assert torch.isfinite(x0).all() and torch.isfinite(nxt).all()

    # -- validation and loading errors -----------------------------------------------------
    def test_backbone_probes_do_not_change_outputs(self, backbone: Backbone) -> None:
        import numpy as np

        from adapterswap.probes import ProbeRecorder

        if not type(backbone).supports_probes:
            pytest.skip(f"{self.backbone_name} has no backbone-level probes")
        plain = _np(self._run(backbone).images)
        recorder = ProbeRecorder()
        backbone.set_probe(recorder)
        try:
            probed = _np(self._run(backbone).images)
        finally:
            backbone.set_probe(None)
        assert np.array_equal(plain, probed)
        records = recorder.drain()
        assert records and all(len(values) == 1 for _, _, values in records)

    def test_bad_inputs_name_argument_and_value(self, backbone: Backbone) -> None:
        h, w = backbone.default_height, backbone.default_width
        with pytest.raises(InvalidArgumentError, match="num_inference_steps=0"):
            backbone.check_inputs(num_inference_steps=0, height=h, width=w)
        with pytest.raises(InvalidArgumentError, match="height=13"):
            backbone.check_inputs(num_inference_steps=2, height=13, width=w)
        if backbone.guidance_mode == "none":
            with pytest.raises(InvalidArgumentError, match="guidance_scale=5.0"):
                backbone.resolve_guidance_scale(5.0)
        else:
            assert backbone.resolve_guidance_scale(None) == backbone.default_guidance_scale
            with pytest.raises(InvalidArgumentError, match="guidance_scale"):
                backbone.resolve_guidance_scale(float("nan"))

    def test_missing_or_incomplete_directory_is_named(self, tmp_path: Path) -> None:
        cls = get_backbone(self.backbone_name)
        absent = tmp_path / "no-such-model"
        with pytest.raises(WeightsNotFoundError, match="no-such-model"):
            cls(str(absent), device="cpu").load()
        empty = tmp_path / "empty-model"
        empty.mkdir()
        with pytest.raises(WeightsNotFoundError, match="empty-model.*incomplete.*missing"):
            cls(str(empty), device="cpu").load()

    def test_offline_cache_miss_is_named(self, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
        cls = get_backbone(self.backbone_name)
        with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE"):
            cls("nobody/absent-model", device="cpu").load()


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
    def backbones(self) -> dict[str, Backbone]:
        return {name: self.make_backbone(name) for name in self.backbone_names}

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
        assert cls.kind in ADAPTER_KINDS
        for backbone in backbones.values():
            assert backbone.family in cls.families

    def test_other_family_is_refused_naming_both(self, adapter: Adapter) -> None:
        other = _OtherFamilyBackbone()
        with pytest.raises(IncompatibleAdapterError) as info:
            adapter.check_backbone(other)
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
