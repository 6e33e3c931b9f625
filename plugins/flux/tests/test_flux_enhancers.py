"""Enhancers on FLUX + InfuseNet: ``dcg``'s identity branch is "with vs without InfuseNet's
residuals", its text branch the empty prompt, FLUX.1-dev's embedded guidance is kept in every
branch, and the enhancer contract holds on flux-schnell and on a distilled dev LoRA."""

from __future__ import annotations

import torch

from adapterswap.denoise import StepContext
from adapterswap.enhancer import PredictCall
from adapterswap.testing import EnhancerContract

PROMPT = "a portrait photo of a person"


def test_dcg_branches_on_infusenet(flux_dev, flux_infusenet):
    adapter = flux_infusenet
    adapter.attach(flux_dev)
    conditioning = adapter.encode_reference(adapter.tiny_reference(0), flux_dev)
    latents = flux_dev.prepare_latents([torch.Generator().manual_seed(0)], height=64, width=64)
    prompt = flux_dev.encode_prompt([PROMPT])
    schedule = flux_dev.schedule(2, height=64, width=64)
    ctx = StepContext(timesteps=schedule.timesteps[:1], step_indices=(0,), num_steps=(2,),
                      height=64, width=64, sigmas=schedule.sigmas[:1])
    call = PredictCall(flux_dev, adapter, conditioning, latents, ctx, prompt, 3.5)
    e0 = call.forward(text=False, identity=False, guided=False)
    e_id = call.forward(text=False, identity=True, guided=False)
    e_full = call.forward(text=True, identity=True, guided=False)
    null = flux_dev.null_prompt(prompt)
    # no identity: the transformer without residuals, the empty prompt, guidance 3.5 kept
    assert torch.equal(e0, flux_dev.predict(latents, ctx, null, guidance_scale=3.5))
    with_residuals = adapter.denoiser_inputs(flux_dev, conditioning, latents, ctx, null)
    assert torch.equal(e_id, flux_dev.predict(latents, ctx, null, guidance_scale=3.5,
                                              adapter_inputs=with_residuals))
    plain = adapter.denoiser_inputs(flux_dev, conditioning, latents, ctx, prompt)
    assert torch.equal(e_full, flux_dev.predict(latents, ctx, prompt, guidance_scale=3.5,
                                                adapter_inputs=plain))
    assert not torch.equal(e0, e_id) and not torch.equal(e_id, e_full)
    assert call.forwards == 3  # embedded guidance: one forward each


class TestDCGOnInfuseNetSchnell(EnhancerContract):
    enhancer_name = "dcg"
    options = {"a": 1.5, "b": [1.0, 2.0], "rescale": 0.75}
    neutral_options = {"a": 1.0, "b": 1.0, "rescale": 0.0}
    backbone_name, adapter_name = "flux-schnell", "infusenet"


class TestDCGOnInfuseNetTurbo(EnhancerContract):
    enhancer_name = "dcg"
    options = {"a": 2.0, "b": 1.0, "rescale": 0.0}
    neutral_options = None
    backbone_name, adapter_name = "flux-dev-turbo", "infusenet"
