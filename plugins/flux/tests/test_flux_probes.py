"""Stream-norm probes: InfuseNet's residual against the hidden state, and FLUX's text against
image stream, checked against the quantities computed by hand after the first double block."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from adapterswap_flux.infusenet import InfuseNet

from adapterswap.denoise import StepContext, denoise
from adapterswap.probes import ProbeRecorder

PROMPT = "a portrait photo of a person"


def _step_inputs(backbone, adapter, seeds=(0,), steps=(2,), indices=(0,)):
    prompt = backbone.encode_prompt([PROMPT] * len(seeds),
                                    guidance_scale=backbone.resolve_guidance_scale(None))
    latents = backbone.prepare_latents([torch.Generator().manual_seed(s) for s in seeds],
                                       height=64, width=64)
    timesteps = torch.stack([backbone.schedule(n, height=64, width=64).timesteps[i]
                             for n, i in zip(steps, indices)])
    ctx = StepContext(timesteps, tuple(indices), tuple(steps), 64, 64)
    conditioning = adapter.encode_reference(InfuseNet.tiny_reference(0), backbone)
    conditioning = conditioning.repeat(len(seeds))
    inputs = adapter.denoiser_inputs(backbone, conditioning, latents, ctx, prompt)
    return prompt, latents, ctx, inputs


def _first_double_block(backbone, prompt, latents, ctx, guidance):
    """Text and image streams after transformer block 0, computed outside the transformer."""
    t = backbone.pipe.transformer
    timestep = ctx.timesteps.to(latents.dtype) / 1000
    hidden = t.x_embedder(latents)
    pooled = prompt["pooled_prompt_embeds"]
    if guidance is None:
        temb = t.time_text_embed(timestep * 1000, pooled)
    else:
        g = torch.full([latents.shape[0]], guidance) * 1000
        temb = t.time_text_embed(timestep * 1000, g, pooled)
    text = t.context_embedder(prompt["prompt_embeds"])
    ids = torch.cat([prompt["text_ids"], backbone.latent_image_ids(64, 64)], dim=0)
    text, image = t.transformer_blocks[0](hidden_states=hidden, encoder_hidden_states=text,
                                          temb=temb, image_rotary_emb=t.pos_embed(ids))
    return text, image


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_infusenet_probe_is_residual_over_hidden(name, flux_dev, flux_schnell, flux_infusenet):
    backbone = flux_dev if name == "flux-dev" else flux_schnell
    adapter = flux_infusenet
    adapter.attach(backbone)
    guidance = backbone.resolve_guidance_scale(None)
    prompt, latents, ctx, inputs = _step_inputs(backbone, adapter)
    recorder = ProbeRecorder()
    adapter.set_probe(recorder)
    with torch.no_grad():
        out = backbone.predict(latents, ctx, prompt, guidance_scale=guidance,
                               adapter_inputs=inputs)
        _, image = _first_double_block(backbone, prompt, latents, ctx, guidance)
    records = {block: (quantity, values) for block, quantity, values in recorder.drain()}
    assert sorted(records) == ["double.0", "double.1", "single.0", "single.1", "single.2",
                               "single.3"]
    assert {q for q, _ in records.values()} == {"residual/hidden"}
    residual = inputs.controlnet_block_samples[0]
    expected = float(residual.norm() / image.norm())
    assert records["double.0"][1] == pytest.approx([expected], rel=1e-4)
    # probes only read: the prediction is the one without them
    adapter.set_probe(None)
    with torch.no_grad():
        again = backbone.predict(latents, ctx, prompt, guidance_scale=guidance,
                                 adapter_inputs=inputs)
    assert torch.equal(out, again)
    assert recorder.drain() == []  # hooks are gone


def test_infusenet_probe_is_per_sample_and_silent_without_residuals(flux_dev, flux_infusenet):
    adapter = flux_infusenet
    adapter.attach(flux_dev)
    adapter.set_window(0.0, 0.5)
    # sample 0 at step 0 of 2 (active), sample 1 at step 3 of 4 (outside the window)
    prompt, latents, ctx, inputs = _step_inputs(flux_dev, adapter, seeds=(1, 2), steps=(2, 4),
                                                indices=(0, 3))
    recorder = ProbeRecorder()
    adapter.set_probe(recorder)
    flux_dev.predict(latents, ctx, prompt, guidance_scale=3.5, adapter_inputs=inputs)
    records = recorder.drain()
    assert records and all(len(values) == 2 for _, _, values in records)
    assert all(values[0] > 0 and values[1] == 0.0 for _, _, values in records)
    flux_dev.predict(latents, ctx, prompt, guidance_scale=3.5, adapter_inputs=None)
    assert recorder.drain() == []  # a call without InfuseNet's residuals records nothing
    adapter.detach()
    assert adapter._probe_hooks is None


def test_backbone_probe_is_text_over_image_rms(flux_dev):
    prompt = flux_dev.encode_prompt([PROMPT], guidance_scale=3.5)
    latents = flux_dev.prepare_latents([torch.Generator().manual_seed(0)], height=64, width=64)
    timesteps = flux_dev.schedule(2, height=64, width=64).timesteps[:1]
    ctx = StepContext(timesteps, (0,), (2,), 64, 64)
    recorder = ProbeRecorder()
    flux_dev.set_probe(recorder)
    try:
        with torch.no_grad():
            flux_dev.predict(latents, ctx, prompt, guidance_scale=3.5)
            text, image = _first_double_block(flux_dev, prompt, latents, ctx, 3.5)
    finally:
        flux_dev.set_probe(None)
    records = {block: (quantity, values) for block, quantity, values in recorder.drain()}
    assert len(records) == 6 and {q for q, _ in records.values()} == {"text/image"}
    expected = (text.norm() / math.sqrt(text.numel())) / (image.norm() / math.sqrt(image.numel()))
    assert records["double.0"][1] == pytest.approx([float(expected)], rel=1e-4)


def test_probes_through_denoise_leave_the_image_unchanged(flux_schnell, flux_infusenet):
    adapter = flux_infusenet
    reference = InfuseNet.tiny_reference(0)
    plain = denoise(flux_schnell, PROMPT, num_inference_steps=2, adapter=adapter,
                    reference=reference, output_type="np").images
    recorder = ProbeRecorder()
    adapter.set_probe(recorder)
    flux_schnell.set_probe(recorder)
    try:
        probed = denoise(flux_schnell, PROMPT, num_inference_steps=2, adapter=adapter,
                         reference=reference, output_type="np").images
    finally:
        adapter.set_probe(None)
        flux_schnell.set_probe(None)
    np.testing.assert_array_equal(plain, probed)
    quantities = {q for _, q, _ in recorder.drain()}
    assert quantities == {"residual/hidden", "text/image"}
