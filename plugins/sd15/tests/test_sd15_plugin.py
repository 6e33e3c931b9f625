"""SD 1.5 backbones and the object IP-Adapter (Plus) on tiny random weights: parity with
diffusers' StableDiffusionPipeline and with the original IP-Adapter implementation, LCM-LoRA
and LCM-distilled loading, h94 file layouts, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from adapterswap_sd15.adapters import ObjectIPAdapter
from adapterswap_sd15.backbones import LCM_LORA_FILE, SD15Backbone, SD15LCMBackbone

from adapterswap.denoise import denoise
from adapterswap.errors import InvalidArgumentError, WeightsNotFoundError

PROMPT = "a photo of a red teapot on a table"


@pytest.fixture(scope="module")
def sd15() -> SD15Backbone:
    return SD15Backbone.tiny(0)


@pytest.fixture(scope="module")
def lcm() -> SD15LCMBackbone:
    return SD15LCMBackbone.tiny(0)


@pytest.fixture()
def plus(sd15: SD15Backbone) -> ObjectIPAdapter:
    adapter = ObjectIPAdapter.tiny(sd15, 0)
    yield adapter
    adapter.detach()


@pytest.fixture(scope="module")
def reference():
    return ObjectIPAdapter.tiny_reference(0)


def run(backbone, steps, adapter=None, reference=None, **kwargs):
    result = denoise(backbone, PROMPT, num_inference_steps=steps, seeds=[0], adapter=adapter,
                     reference=reference, output_type="np", **kwargs)
    return np.asarray(result.images)


def reference_pipeline(source, *, scheduler="ddim", lora_dir=None, device="cpu",
                       dtype=torch.float32):
    """The plain diffusers pipeline from the same files, set up as the model cards say."""
    from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None,
                                                   requires_safety_checker=False,
                                                   local_files_only=True,
                                                   dtype=dtype).to(device)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    else:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, weight_name=LCM_LORA_FILE, adapter_name="lcm")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_images(pipe, steps, guidance_scale, **kwargs):
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale, height=64,
                width=64, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


def load_plus(pipe, adapter):
    pipe.load_ip_adapter(adapter.source, subfolder="models",
                         weight_name="ip-adapter-plus_sd15.safetensors",
                         image_encoder_folder="image_encoder", local_files_only=True)


# ------------------------------------------------------------------------------------- parity
def test_sd15_matches_pipeline_with_and_without_ip_adapter_plus(sd15, plus, reference):
    pipe = reference_pipeline(sd15.source)
    plain = run(sd15, 3)
    np.testing.assert_allclose(plain, pipeline_images(pipe, 3, 7.5), atol=1e-6, rtol=0)
    ours = run(sd15, 3, plus, reference)
    load_plus(pipe, plus)
    expected = pipeline_images(pipe, 3, 7.5, ip_adapter_image=reference)
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)
    assert np.abs(ours - plain).max() > 1e-3


@pytest.mark.parametrize("steps", [1, 3])
def test_timestep_spacing_option_matches_pipeline_with_that_scheduler_config(sd15, steps):
    """``timestep_spacing="trailing"`` gives the images of the pipeline whose DDIM scheduler is
    ``DDIMScheduler.from_config(config, timestep_spacing="trailing")``; at one step the repo's
    "leading" spacing would run t = 1 on pure noise, "trailing" runs t = 999."""
    from diffusers import DDIMScheduler

    trailing = SD15Backbone.tiny(0, timestep_spacing="trailing")
    pipe = reference_pipeline(trailing.source)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config,
                                               timestep_spacing="trailing")
    ours = run(trailing, steps)
    np.testing.assert_allclose(ours, pipeline_images(pipe, steps, 7.5), atol=1e-6, rtol=0)
    assert np.abs(ours - run(sd15, steps)).max() > 1e-3  # the option does change the images


def test_lcm_matches_pipeline_with_lora_and_ip_adapter_plus(sd15, lcm, plus, reference):
    """LCM draws fresh noise at every step from the seed's generator, as the pipeline does.
    The reference keeps the LoRA unfused (fusing reorders float additions)."""
    pipe = reference_pipeline(sd15.source, scheduler="lcm", lora_dir=lcm.options["lora"])
    plain = run(lcm, 4)
    np.testing.assert_allclose(plain, pipeline_images(pipe, 4, 1.0), atol=1e-5, rtol=0)
    without_lora = pipeline_images(pipe, 4, 1.0, cross_attention_kwargs={"scale": 0.0})
    assert np.abs(plain - without_lora).max() > 1e-2  # the LoRA was fused in
    ours = run(lcm, 4, plus, reference)
    load_plus(pipe, plus)
    expected = pipeline_images(pipe, 4, 1.0, ip_adapter_image=reference)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    # guidance within the authors' 1.0-2.0 turns CFG on, as in the pipeline
    np.testing.assert_allclose(run(lcm, 2, plus, reference, guidance_scale=1.5),
                               pipeline_images(pipe, 2, 1.5, ip_adapter_image=reference),
                               atol=1e-5, rtol=0)


def test_lcm_step_parallel_rows_keep_their_own_noise(lcm):
    """The sweep engine steps the rows of one schedule at a time; LCM's per-step noise still
    comes from each sample's own generator, so a 2-step and a 4-step run advanced together in
    one batch give what each gives alone."""
    from adapterswap.denoise import StepContext

    prompt = lcm.encode_prompt([PROMPT], guidance_scale=1.0)
    runs = {1: 2, 2: 4}  # seed -> steps
    latents = lcm.prepare_latents([torch.Generator().manual_seed(s) for s in runs],
                                  height=64, width=64)
    schedules = {n: lcm.schedule(n, height=64, width=64) for n in runs.values()}
    rows, finished = list(runs.items()), {}
    for tick in range(max(runs.values())):
        steps = [n for _, n in rows]
        ctx = StepContext(torch.stack([schedules[n].timesteps[tick] for n in steps]),
                          (tick,) * len(rows), tuple(steps), 64, 64)
        output = lcm.predict(latents, ctx, prompt.repeat(len(rows)), guidance_scale=1.0)
        for r, n in reversed(list(enumerate(steps))):  # one schedule at a time, last row first
            latents[r:r + 1] = lcm.step(output[r:r + 1], latents[r:r + 1], schedules[n], tick)
        keep = [r for r, (_, n) in enumerate(rows) if n > tick + 1]
        finished.update({seed: latents[r:r + 1] for r, (seed, n) in enumerate(rows)
                         if n == tick + 1})
        rows, latents = [rows[r] for r in keep], latents[keep]
    for seed, n in runs.items():
        alone = denoise(lcm, PROMPT, num_inference_steps=n, seeds=[seed], output_type="pt")
        # equal up to batched-vs-single float reordering; another generator's noise would be
        # off by the noise itself
        torch.testing.assert_close(finished[seed], alone.latents, atol=1e-4, rtol=1e-5)


def test_step_noise_follows_from_the_scheduler(sd15, lcm):
    """Only the LCM backbone hands generators to ``scheduler.step``: its LCMScheduler draws
    fresh noise every step, DDIM (eta 0) does not. Nothing declares it; the scheduler does."""
    assert lcm.injects_noise and type(lcm.pipe.scheduler).__name__ == "LCMScheduler"
    assert not sd15.injects_noise
    latents = sd15.prepare_latents([torch.Generator().manual_seed(0)], height=64, width=64)
    assert not sd15._sample_generators._rows  # no generator kept for a deterministic step
    assert latents.shape == (1, 4, 8, 8)


def _shim_for_original_ip_adapter(monkeypatch):
    """ip-adapter 0.1.0 imports MultiControlNetModel from diffusers.pipelines.controlnet,
    where diffusers 0.42 no longer exports it: put the name back before importing."""
    import diffusers.pipelines.controlnet as controlnet
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    monkeypatch.setattr(controlnet, "MultiControlNetModel", MultiControlNetModel,
                        raising=False)
    pytest.importorskip("einops")
    return pytest.importorskip("ip_adapter")


def test_ip_adapter_plus_matches_the_original_implementation(sd15, plus, reference,
                                                            monkeypatch):
    """Same weights, seed and sampler: tencent-ailab's IPAdapterPlus (pip ``ip-adapter``), which
    builds its own Resampler and attention processors and concatenates the image tokens to the
    prompt, gives our image."""
    ip_adapter = _shim_for_original_ip_adapter(monkeypatch)

    class IPAdapterPlusFloat32(ip_adapter.IPAdapterPlus):
        """The original class builds everything in float16; the files are float16 too, so
        casting its modules up to float32 loses nothing. Only its reference encoding, which
        casts the pixels to float16, is restated here in float32."""

        def get_image_embeds(self, pil_image=None, clip_image_embeds=None):
            pixels = self.clip_image_processor(images=[pil_image], return_tensors="pt")
            pixels = pixels.pixel_values.to(self.device, dtype=torch.float32)
            with torch.no_grad():
                cond = self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
                uncond = self.image_encoder(torch.zeros_like(pixels),
                                            output_hidden_states=True).hidden_states[-2]
                return self.image_proj_model(cond), self.image_proj_model(uncond)

    pipe = reference_pipeline(sd15.source)
    folder = Path(plus.source) / "models"
    original = IPAdapterPlusFloat32(pipe, str(folder / "image_encoder"),
                                    str(folder / "ip-adapter-plus_sd15.safetensors"), "cpu",
                                    num_tokens=16)
    original.image_encoder.float()
    original.image_proj_model.float()
    pipe.unet.float()
    theirs = original.generate(pil_image=reference, prompt=PROMPT, negative_prompt="",
                               scale=1.0, num_samples=1, seed=0, guidance_scale=7.5,
                               num_inference_steps=3, height=64, width=64, output_type="np")
    plain = run(sd15, 3)
    ours = run(sd15, 3, plus, reference)
    assert np.abs(ours - plain).max() > 1e-3
    np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-5, rtol=0)


def test_lcm_distilled_checkpoint_takes_guidance_as_embedding(sd15, tmp_path):
    """``lora=None``: the source is itself LCM-distilled; a UNet with ``time_cond_proj_dim``
    gets the w-embedding of the guidance scale instead of CFG, as in the pipeline."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(sd15.source, local_files_only=True)
    config = dict(pipe.unet.config, time_cond_proj_dim=16)
    torch.manual_seed(3)
    pipe.unet = UNet2DConditionModel.from_config(config)
    pipe.register_modules(unet=pipe.unet)
    pipe.save_pretrained(tmp_path / "lcm-distilled")
    backbone = SD15LCMBackbone(str(tmp_path / "lcm-distilled"), device="cpu", dtype="fp32",
                               lora=None).load()
    backbone.default_height = backbone.default_width = 64
    assert not backbone.uses_cfg(8.0)
    prompt = backbone.encode_prompt([PROMPT], guidance_scale=8.0)
    assert prompt["negative_prompt_embeds"] is None
    reference = reference_pipeline(str(tmp_path / "lcm-distilled"), scheduler="lcm")
    for guidance in (1.0, 8.0):
        np.testing.assert_allclose(run(backbone, 2, guidance_scale=guidance),
                                   pipeline_images(reference, 2, guidance), atol=1e-6, rtol=0)
    assert not np.allclose(run(backbone, 2, guidance_scale=1.0),
                           run(backbone, 2, guidance_scale=8.0), atol=1e-4)


# --------------------------------------------------------------------------- file layouts
def test_plus_weights_are_in_h94_layout_and_legacy_bin_loads_the_same(sd15, plus, reference):
    proj = plus.state_dict["image_proj"]
    assert proj["latents"].shape == (1, 16, sd15.pipe.unet.config.cross_attention_dim)
    assert proj["layers.0.0.to_kv.weight"].shape[0] == 2 * 12 * 64  # 12 heads of 64
    assert proj["proj_in.weight"].dtype == torch.float16
    legacy = ObjectIPAdapter(plus.source, weight_name="models/ip-adapter-plus_sd15.bin",
                             device="cpu", dtype="fp32").load()
    for part in ("image_proj", "ip_adapter"):
        assert legacy.state_dict[part].keys() == plus.state_dict[part].keys()
        for key, value in plus.state_dict[part].items():
            assert torch.equal(value, legacy.state_dict[part][key]), key
    with_safetensors = run(sd15, 2, plus, reference)
    plus.detach()
    assert np.array_equal(with_safetensors, run(sd15, 2, legacy, reference))
    legacy.detach()


def test_not_an_ip_adapter_file_is_named(tmp_path, plus):
    from safetensors.torch import save_file

    models = tmp_path / "models"
    models.mkdir()
    save_file({"something.weight": torch.zeros(2)},
              str(models / "ip-adapter-plus_sd15.safetensors"))
    (models / "image_encoder").symlink_to(Path(plus.source) / "models" / "image_encoder")
    with pytest.raises(InvalidArgumentError, match="ip-adapter-plus_sd15.safetensors.*not an "
                                                   "IP-Adapter file"):
        ObjectIPAdapter(str(tmp_path), device="cpu").load()


def test_missing_weights_are_named(sd15, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="ip-adapter-plus_sd15.safetensors"):
        ObjectIPAdapter(str(tmp_path), device="cpu").load()
    with pytest.raises(WeightsNotFoundError,
                       match=f"{tmp_path.name}.*incomplete.*{LCM_LORA_FILE}"):
        SD15LCMBackbone(sd15.source, device="cpu", lora=str(tmp_path)).load()
    with pytest.raises(InvalidArgumentError, match="unknown option 'lora_fille'"):
        SD15LCMBackbone(lora_fille="x")
    with pytest.raises(InvalidArgumentError, match="invalid target="):
        ObjectIPAdapter(target="style")


@pytest.mark.parametrize("backbone", ["sd15", "sd15-lcm"])
def test_generate_cli_with_tiny_preset(tmp_path, backbone):
    from click.testing import CliRunner
    from PIL import Image

    from adapterswap.cli import main

    out = tmp_path / "tiny.png"
    result = CliRunner().invoke(main, ["generate", "--preset", "tiny", "--backbone", backbone,
                                       "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (64, 64)
    assert "object-ip-adapter" in result.output
