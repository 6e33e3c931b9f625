"""Cells confounded by the schedule or the adapter window: the ``timestep_spacing`` backbone
option, where each schedule starts (``Schedule.start_noise``, ``FAR_FROM_NOISE``) and adapter
windows that never open at low step counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from toy_plugin import ToyAdapter

from adapterswap.adapter import active_steps, is_active, window_confounds
from adapterswap.denoise import (
    FAR_FROM_NOISE,
    Schedule,
    schedule_confounds,
    start_noise_from_alpha_cumprod,
    start_noise_from_sigma,
)
from adapterswap.errors import InvalidArgumentError
from adapterswap.kit.schedules import TIMESTEP_SPACINGS
from adapterswap.plugins import backbones, get_backbone

FAR = ["schedule_starts_far_from_noise"]
NEVER = ["window_never_opens"]
SIZE = {"height": 64, "width": 64}


def needs(name: str) -> None:
    if name not in backbones():
        pytest.skip(f"backbone {name!r} is not installed")


def tiny(name: str, **options):
    needs(name)
    return get_backbone(name).tiny(0, **options)


def scheduler_config(name: str) -> dict:
    """The checkpoint's scheduler config that backbone ``name``'s tiny pipeline ships."""
    needs(name)
    if name.startswith("sdxl"):
        from adapterswap_sdxl.tiny import SDXL_SCHEDULER_CONFIG

        return SDXL_SCHEDULER_CONFIG
    from adapterswap_sd15.tiny import SD15_SCHEDULER_CONFIG

    return SD15_SCHEDULER_CONFIG


def sd_alphas_cumprod() -> np.ndarray:
    """SD 1.5 / SDXL training noise, by hand: "scaled_linear" betas from 0.00085 to 0.012."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


# ------------------------------------------------------------------------------ the option
@pytest.mark.parametrize("name, scheduler", [
    ("sd15", "DDIMScheduler"),
    ("sdxl", "EulerDiscreteScheduler"),
    ("sdxl-lightning", "EulerDiscreteScheduler"),
])
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_timestep_spacing_gives_diffusers_timesteps(name, scheduler, spacing):
    """The schedule the sweep runs has the timesteps diffusers' ``set_timesteps`` gives with
    that spacing in the scheduler's config."""
    import diffusers

    backbone = tiny(name, timestep_spacing=spacing)
    assert type(backbone.pipe.scheduler).__name__ == scheduler
    assert backbone.pipe.scheduler.config.timestep_spacing == spacing
    config = scheduler_config(name)
    for n in (1, 2, 4, 7):
        theirs = getattr(diffusers, scheduler).from_config(config, timestep_spacing=spacing)
        theirs.set_timesteps(n)
        ours = backbone.schedule(n, **SIZE)
        np.testing.assert_array_equal(ours.timesteps.cpu().numpy(), theirs.timesteps.numpy())
        if ours.sigmas is not None:
            np.testing.assert_array_equal(ours.sigmas.numpy(), theirs.sigmas.numpy())


@pytest.mark.parametrize("name, default", [("sd15", "leading"), ("sdxl", "leading"),
                                           ("sdxl-lightning", "trailing")])
def test_default_spacing_is_the_model_cards(name, default):
    backbone = tiny(name)
    assert "timestep_spacing" not in backbone.options
    assert backbone.pipe.scheduler.config.timestep_spacing == default


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_trailing_changes_the_schedule_the_sweep_runs(name):
    leading, trailing = tiny(name), tiny(name, timestep_spacing="trailing")
    for n in (1, 2):
        a, b = leading.schedule(n, **SIZE), trailing.schedule(n, **SIZE)
        assert float(a.timesteps[0]) == (1 if n == 1 else 501)
        assert float(b.timesteps[0]) == 999
        assert schedule_confounds(a) == FAR and schedule_confounds(b) == []
        assert a.first_step_key != b.first_step_key
    # trailing starts every step count at t = 999: the sweep may share the first step
    keys = {trailing.schedule(n, **SIZE).first_step_key for n in (1, 2, 4, 8)}
    assert len(keys) == 1 and None not in keys


def test_lightning_spacing_can_be_overridden():
    backbone = tiny("sdxl-lightning", timestep_spacing="leading")
    assert float(backbone.schedule(1, **SIZE).timesteps[0]) == 1


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell", "sd15-lcm"])
def test_backbones_without_spacing_refuse_it_naming_option_value_and_options(name):
    needs(name)
    cls = get_backbone(name)
    pattern = r"backbone_options=\{'timestep_spacing': 'trailing'\}.*known options: "
    with pytest.raises(InvalidArgumentError, match=pattern) as info:
        cls.check_options({"timestep_spacing": "trailing"})
    for option in cls.option_docs:
        assert option in str(info.value)
    with pytest.raises(InvalidArgumentError, match="timestep_spacing"):
        cls(timestep_spacing="trailing")
    with pytest.raises(InvalidArgumentError, match="timestep_spacing"):
        cls.tiny(0, cache_dir="/nonexistent/not-built", timestep_spacing="trailing")


def test_lcm_scheduler_really_ignores_timestep_spacing():
    """Why sd15-lcm refuses the option: LCMScheduler has the config key but never reads it."""
    from diffusers import LCMScheduler

    starts = set()
    for spacing in TIMESTEP_SPACINGS:
        scheduler = LCMScheduler.from_config(
            {k: v for k, v in scheduler_config("sd15").items() if k != "skip_prk_steps"},
            timestep_spacing=spacing)
        scheduler.set_timesteps(2)
        starts.add(tuple(scheduler.timesteps.tolist()))
    assert starts == {(999, 499)}


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sdxl-lightning", "sd15-lcm", "flux-dev"])
def test_unknown_option_and_bad_value_are_refused_by_name_before_loading(name):
    needs(name)
    cls = get_backbone(name)
    known = ", ".join(cls.option_docs)
    with pytest.raises(InvalidArgumentError, match=(
            rf"invalid backbone_options=\{{'spacing': 'trailing'\}}: unknown option 'spacing' "
            rf"of backbone '{name}'; known options: {known}$")):
        cls.check_options({"spacing": "trailing"})
    backbone = None
    with pytest.raises(InvalidArgumentError, match="unknown option 'spacing'"):
        backbone = cls(spacing="trailing")
    assert backbone is None
    if "timestep_spacing" in cls.option_docs:
        with pytest.raises(InvalidArgumentError,
                           match="invalid timestep_spacing='Trailing': choose one of leading, "
                                 "trailing, linspace"):
            cls.check_options({"timestep_spacing": "Trailing"})
        assert cls.check_options({"timestep_spacing": "trailing"}) == {
            "timestep_spacing": "trailing"}


def test_existing_options_keep_working():
    needs("flux-dev")
    needs("sd15-lcm")
    flux = get_backbone("flux-dev")
    assert flux.check_options({"cpu_offload": True, "max_sequence_length": 77}) == {
        "cpu_offload": True, "max_sequence_length": 77}
    with pytest.raises(InvalidArgumentError, match="invalid cpu_offload='yes'"):
        flux.check_options({"cpu_offload": "yes"})
    backbone = flux(max_sequence_length=77)
    assert backbone.max_sequence_length == 77 and backbone.options == {"max_sequence_length": 77}
    lcm = get_backbone("sd15-lcm")
    assert lcm.check_options({"lora": None, "variant": "fp16"}) == {"lora": None,
                                                                     "variant": "fp16"}


def test_random_preset_takes_the_options(monkeypatch):
    """``random`` configures the pipeline with the options as ``load`` does (a tiny pipeline
    stands in for the published-size one)."""
    needs("sd15")
    from adapterswap_sd15.tiny import build_tiny_pipeline

    cls = get_backbone("sd15")
    monkeypatch.setattr(cls, "random_pipeline",
                        staticmethod(lambda device, dtype, seed: build_tiny_pipeline("sd15", seed)))
    backbone = cls.random(device="cpu", dtype="fp32", timestep_spacing="trailing")
    assert backbone.pipe.scheduler.config.timestep_spacing == "trailing"
    assert float(backbone.schedule(1, **SIZE).timesteps[0]) == 999


def test_random_checks_options_before_building(monkeypatch):
    needs("sdxl")
    cls = get_backbone("sdxl")
    monkeypatch.setattr(cls, "random_pipeline",
                        staticmethod(lambda *args: pytest.fail("built before checking")))
    with pytest.raises(InvalidArgumentError, match="invalid timestep_spacing='sideways'"):
        cls.random(device="cpu", timestep_spacing="sideways")


def test_flux_random_refuses_loading_options_before_building():
    needs("flux-dev")
    with pytest.raises(InvalidArgumentError, match="invalid quantize_8bit=True"):
        get_backbone("flux-dev").random(device="cpu", quantize_8bit=True)
    with pytest.raises(InvalidArgumentError, match="unknown option 'timestep_spacing'"):
        get_backbone("flux-dev").random(device="cpu", timestep_spacing="trailing")


# ------------------------------------------------------------------------------ start_noise
def test_start_noise_helpers_agree_with_each_other():
    alphas = sd_alphas_cumprod()
    for t in (0, 1, 501, 999):
        sigma = math.sqrt((1 - alphas[t]) / alphas[t])
        assert start_noise_from_sigma(sigma) == pytest.approx(
            start_noise_from_alpha_cumprod(alphas[t]), abs=1e-12)


@pytest.mark.parametrize("spacing, n, t0", [
    ("leading", 1, 1), ("leading", 2, 501), ("leading", 4, 751), ("leading", 28, 946),
    ("leading", 50, 981), ("trailing", 1, 999), ("linspace", 1, 0),
])
def test_sd15_start_noise_is_sqrt_one_minus_alpha_cumprod(spacing, n, t0):
    backbone = tiny("sd15", timestep_spacing=spacing)
    schedule = backbone.schedule(n, **SIZE)
    assert int(schedule.timesteps[0]) == t0
    expected = math.sqrt(1 - sd_alphas_cumprod()[t0])
    assert schedule.start_noise == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("spacing, n, sigma0", [("leading", 1, 0.0413), ("leading", 2, 1.6237),
                                                ("leading", 30, 11.4769),
                                                ("trailing", 1, 14.6146)])
def test_sdxl_start_noise_is_sigma_over_sqrt_one_plus_sigma_squared(spacing, n, sigma0):
    """SDXL-base's Euler at N = 1 starts at sigma 0.041 of 14.6 with "leading" spacing."""
    schedule = tiny("sdxl", timestep_spacing=spacing).schedule(n, **SIZE)
    sigma = float(schedule.sigmas[0])
    assert sigma == pytest.approx(sigma0, abs=1e-4)
    assert schedule.start_noise == pytest.approx(sigma / math.sqrt(1 + sigma**2), abs=1e-7)
    # the same share as the timestep's alphas_cumprod (linear interpolation in sigma aside)
    t0 = int(schedule.timesteps[0])
    assert schedule.start_noise == pytest.approx(math.sqrt(1 - sd_alphas_cumprod()[t0]),
                                                 abs=1e-5)


@pytest.mark.parametrize("name, n", [("sd15-lcm", 1), ("sd15-lcm", 4), ("sdxl-lightning", 1),
                                     ("flux-dev", 1), ("flux-dev", 28), ("flux-schnell", 1)])
def test_distilled_and_flow_schedules_start_from_noise(name, n):
    schedule = tiny(name).schedule(n, **SIZE)
    if name.startswith("flux"):
        assert schedule.start_noise == float(schedule.sigmas[0]) == 1.0
    else:
        assert int(schedule.timesteps[0]) == 999
        assert schedule.start_noise == pytest.approx(math.sqrt(1 - sd_alphas_cumprod()[999]),
                                                     abs=1e-6)


# ------------------------------------------------------------------------------ the threshold
@pytest.mark.parametrize("spacing, n, flagged", [
    ("leading", 1, True), ("leading", 2, True), ("leading", 3, False), ("leading", 4, False),
    ("leading", 28, False), ("leading", 50, False),
    ("trailing", 1, False), ("trailing", 2, False),
    ("linspace", 1, True), ("linspace", 2, False),
])
def test_threshold_flags_the_broken_low_step_cells_only(spacing, n, flagged):
    schedule = tiny("sd15", timestep_spacing=spacing).schedule(n, **SIZE)
    assert schedule_confounds(schedule) == (FAR if flagged else [])
    assert (schedule.start_noise < FAR_FROM_NOISE) is flagged


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sdxl-lightning", "sd15-lcm", "flux-dev",
                                  "flux-schnell"])
def test_model_card_defaults_are_not_flagged(name):
    backbone = tiny(name)
    schedule = backbone.schedule(type(backbone).default_steps, **SIZE)
    assert schedule_confounds(schedule) == []
    assert schedule.start_noise > 0.99


def test_unknown_start_noise_is_not_flagged():
    assert schedule_confounds(Schedule(1, timesteps=[0])) == []
    assert schedule_confounds(Schedule(1, timesteps=[0], start_noise=0.5)) == FAR


def test_tiny_takes_timestep_spacing():
    for name in ("sd15", "sdxl"):
        backbone = tiny(name, timestep_spacing="trailing")
        assert backbone.options == {"timestep_spacing": "trailing"}
        assert backbone.pipe.scheduler.config.timestep_spacing == "trailing"
        assert backbone.is_loaded and (backbone.default_height, backbone.default_width) == (64, 64)


# ------------------------------------------------------------------------------ windows
@pytest.mark.parametrize("window, counts", [
    ((0.0, 0.25), {1: 0, 2: 0, 3: 0, 4: 1, 8: 2}),
    ((0.5, 1.0), {1: 0, 2: 1, 3: 1, 4: 2, 8: 4}),
    ((0.0, 0.5), {1: 0, 2: 1, 3: 1, 4: 2}),
    ((0.0, 1.0), {1: 1, 2: 2, 8: 8}),
    ((0.3, 0.6), {1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 10: 3}),
])
def test_active_steps_and_window_flags(window, counts):
    adapter = ToyAdapter(start=window[0], end=window[1])  # nothing is loaded
    for n, count in counts.items():
        assert adapter.active_steps(n) == active_steps(n, *window) == count, n
        assert count == sum(adapter.is_active(i, n) for i in range(n))
        assert window_confounds(adapter, n) == window_confounds(window, n) == \
            (NEVER if count == 0 else [])


def test_active_steps_follow_is_active_everywhere():
    for start, end in [(0.0, 0.25), (0.1, 0.9), (0.25, 0.75), (0.75, 1.0)]:
        for n in range(1, 30):
            expected = sum(is_active(i, n, start, end) for i in range(n))
            assert active_steps(n, start, end) == expected
            assert (window_confounds((start, end), n) == NEVER) is (expected == 0)


def test_window_flags_name_a_bad_step_count():
    with pytest.raises(InvalidArgumentError, match="num_steps=0"):
        window_confounds((0.0, 1.0), 0)
