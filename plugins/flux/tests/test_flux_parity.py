"""Parity: the engine's loop through the plugin equals the published pipelines.

- Without adapter: ``denoise()`` equals diffusers' ``FluxPipeline.__call__`` on the same tiny
  weights, seed and settings (dev: embedded guidance and dynamic shift; schnell: no guidance).
- With InfuseNet: ``denoise()`` equals a reference loop written in ``flux_reference.py`` from
  InfiniteYou's ``InfUFluxPipeline`` / ``FluxInfuseNetPipeline`` logic, for dev and schnell, at
  the default settings and with a scale and a window.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flux_reference import (
    infiniteyou_generate,
    infiniteyou_root_id_embed,
    pipeline_components,
)

from adapterswap.denoise import denoise

PROMPT = "a portrait photo of a person"
ATOL = 1e-5


def _pipeline_reference(backbone, *, steps, seed, height, width, guidance_scale):
    from diffusers import FluxPipeline

    components = dict(backbone.pipe.components)
    components["scheduler"] = type(components["scheduler"]).from_config(
        components["scheduler"].config)
    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale, height=height,
               width=width, generator=torch.Generator("cpu").manual_seed(seed),
               output_type="np", max_sequence_length=backbone.max_sequence_length)
    return out.images


@pytest.mark.parametrize("name, steps, size, guidance", [
    ("flux-dev", 3, (64, 96), 3.5),
    ("flux-dev", 2, (64, 64), 5.0),
    ("flux-schnell", 2, (96, 64), None),
])
def test_denoise_equals_flux_pipeline(name, steps, size, guidance, flux_dev, flux_schnell):
    backbone = flux_dev if name == "flux-dev" else flux_schnell
    height, width = size
    result = denoise(backbone, PROMPT, num_inference_steps=steps, seeds=[7], height=height,
                     width=width, guidance_scale=guidance, output_type="np")
    expected = _pipeline_reference(backbone, steps=steps, seed=7, height=height, width=width,
                                   guidance_scale=3.5 if guidance is None else guidance)
    assert result.images.shape == (1, height, width, 3)
    np.testing.assert_allclose(result.images, expected, atol=ATOL, rtol=0)


def test_guidance_changes_dev_but_schnell_refuses_it(flux_dev, flux_schnell):
    a = denoise(flux_dev, PROMPT, num_inference_steps=2, guidance_scale=1.0, output_type="np")
    b = denoise(flux_dev, PROMPT, num_inference_steps=2, guidance_scale=6.0, output_type="np")
    assert not np.allclose(a.images, b.images, atol=1e-4)
    from adapterswap.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="guidance_scale=3.5"):
        denoise(flux_schnell, PROMPT, num_inference_steps=2, guidance_scale=3.5)


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
@pytest.mark.parametrize("scale, start, end, steps", [
    (1.0, 0.0, 1.0, 2),
    (0.7, 0.25, 0.75, 4),  # steps 1 and 2 active, 0 and 3 not
])
def test_infusenet_equals_infiniteyou_reference(name, scale, start, end, steps, flux_dev,
                                                flux_schnell, flux_infusenet,
                                                flux_infiniteyou_root):
    backbone = flux_dev if name == "flux-dev" else flux_schnell
    adapter = flux_infusenet
    adapter.set_scale(scale)
    adapter.set_window(start, end)
    reference_image = adapter.tiny_reference(0)
    result = denoise(backbone, PROMPT, num_inference_steps=steps, seeds=[3], adapter=adapter,
                     reference=reference_image, output_type="np")

    id_embed = infiniteyou_root_id_embed(flux_infiniteyou_root, reference_image,
                                         adapter.face.arcface,
                                         heads=adapter.resampler.config.heads)
    components = pipeline_components(backbone.pipe)
    expected = infiniteyou_generate(
        components, adapter.infusenet, id_embed, prompt=PROMPT, seed=3, num_steps=steps,
        height=64, width=64, guidance_scale=3.5, conditioning_scale=scale,
        guidance_start=start, guidance_end=end,
        max_sequence_length=backbone.max_sequence_length)
    np.testing.assert_allclose(result.images, expected, atol=ATOL, rtol=0)
    # and InfuseNet does act here
    plain = denoise(backbone, PROMPT, num_inference_steps=steps, seeds=[3], output_type="np")
    assert not np.allclose(plain.images, expected, atol=1e-3)
