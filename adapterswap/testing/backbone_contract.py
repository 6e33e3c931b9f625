"""The :class:`BackboneContract` mixin: checks every backbone plugin must pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from adapterswap.backbone import GUIDANCE_MODES, Backbone
from adapterswap.denoise import StepContext, denoise
from adapterswap.errors import InvalidArgumentError, WeightsNotFoundError
from adapterswap.plugins import get_backbone
from adapterswap.testing.tiny_sweep import run_tiny_sweep


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
    @classmethod
    def backbone(cls) -> Backbone:
        """The loaded backbone, built once per test class (``make_backbone``)."""
        return cls().make_backbone()

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

    def test_sizes_are_declared_and_the_tiny_preset_keeps_them(self,
                                                               backbone: Backbone) -> None:
        """``size_multiple`` and ``tiny_size`` are what every command reads: the tiny
        instance runs at its class's declared tiny size."""
        cls = get_backbone(self.backbone_name)
        assert isinstance(cls.size_multiple, int) and cls.size_multiple >= 1
        assert cls.tiny_size is not None, "a backbone with a tiny preset declares tiny_size"
        height, width = cls.tiny_size
        assert height % cls.size_multiple == 0 and width % cls.size_multiple == 0
        assert (backbone.default_height, backbone.default_width) == (height, width)

    def test_tiny_cli_sweep_runs_at_the_declared_tiny_size(self, tmp_path: Path) -> None:
        """One cell through ``adapterswap sweep --preset tiny`` with no size flags."""
        from PIL import Image

        cls = get_backbone(self.backbone_name)
        sweep = run_tiny_sweep(tmp_path / "sweep", self.backbone_name)
        assert sweep.exit_code == 0, sweep.output
        assert [c["status"] for c in sweep.cells] == ["done"], sweep.cells
        assert sweep.sizes == {tuple(cls.tiny_size)}
        image = Path(tmp_path / "sweep", sweep.cells[0]["image"])
        with Image.open(image) as opened:
            assert opened.size == (cls.tiny_size[1], cls.tiny_size[0])

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
