"""SDXL's encoding of no text (:meth:`SDXLBackbone.null_prompt`), what enhancers use for their
"no text" predictions: exactly the unconditional rows ``StableDiffusionXLPipeline.encode_prompt``
makes without a negative prompt, zeros or the empty prompt encoded as the pipeline's
``force_zeros_for_empty_prompt`` says."""

from __future__ import annotations

import pytest
import torch
from adapterswap_sdxl.backbones import SDXLBackbone

from adapterswap.backbone import Backbone

PROMPTS = ["a watercolor painting of a lighthouse", "a red teapot"]


@pytest.fixture(scope="module", params=[True, False], ids=["zeros", "encoded"])
def case(request):
    """``(backbone, plain pipeline)`` from the tiny SDXL-base files, both with
    ``force_zeros_for_empty_prompt`` set to the parameter (SDXL base's config has it true)."""
    from diffusers import StableDiffusionXLPipeline

    source = SDXLBackbone.tiny(0).source
    backbone = SDXLBackbone(source, device="cpu", dtype="fp32").load()
    backbone.pipe.register_to_config(force_zeros_for_empty_prompt=request.param)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        source, add_watermarker=False, local_files_only=True,
        force_zeros_for_empty_prompt=request.param)
    return backbone, pipe


@pytest.mark.parametrize("guidance_scale", [None, 5.0], ids=["unguided", "cfg"])
def test_null_prompt_is_the_pipelines_own_negative(case, guidance_scale):
    backbone, pipe = case
    prompt = backbone.encode_prompt(PROMPTS, guidance_scale=guidance_scale)
    with torch.no_grad():
        _, negative, _, negative_pooled = pipe.encode_prompt(
            prompt=PROMPTS, device="cpu", num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=None)
    null = backbone.null_prompt(prompt)
    assert set(null.batched) == set(prompt.batched) and null.batch_size == len(PROMPTS)
    assert torch.equal(null["prompt_embeds"], negative)
    assert torch.equal(null["pooled_prompt_embeds"], negative_pooled)
    assert null["prompt_embeds"].dtype == prompt["prompt_embeds"].dtype
    if guidance_scale is None:
        assert null["negative_prompt_embeds"] is None
        assert null["negative_pooled_prompt_embeds"] is None
    else:  # the negatives of a guided bundle without negative prompts are the same rows
        assert torch.equal(null["negative_prompt_embeds"], prompt["negative_prompt_embeds"])
        assert torch.equal(null["negative_pooled_prompt_embeds"],
                           prompt["negative_pooled_prompt_embeds"])
        assert torch.equal(null["negative_prompt_embeds"], negative)


def test_zeros_only_where_the_pipeline_says(case):
    backbone, _ = case
    null = backbone.null_prompt(backbone.encode_prompt(PROMPTS[:1]))
    zeros = backbone.pipe.config.force_zeros_for_empty_prompt
    assert bool((null["prompt_embeds"] == 0).all()) == zeros
    assert bool((null["pooled_prompt_embeds"] == 0).all()) == zeros
    if not zeros:  # the empty prompt encoded: what the core's default gives
        default = Backbone.null_prompt(backbone, backbone.encode_prompt(PROMPTS[:1]))
        torch.testing.assert_close(null["prompt_embeds"], default["prompt_embeds"],
                                   atol=0, rtol=0)
        torch.testing.assert_close(null["pooled_prompt_embeds"],
                                   default["pooled_prompt_embeds"], atol=0, rtol=0)
