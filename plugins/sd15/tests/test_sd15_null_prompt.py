"""SD 1.5's encoding of no text: the core's default :meth:`Backbone.null_prompt` (the empty
prompt encoded) is exactly the unconditional rows ``StableDiffusionPipeline.encode_prompt``
makes without a negative prompt, so SD 1.5 needs no override."""

from __future__ import annotations

import pytest
import torch
from adapterswap_sd15.backbones import SD15Backbone

PROMPTS = ["a photo of a red teapot on a table", "a lighthouse"]


@pytest.fixture(scope="module")
def sd15() -> SD15Backbone:
    return SD15Backbone.tiny(0)


@pytest.mark.parametrize("guidance_scale", [None, 7.5], ids=["unguided", "cfg"])
def test_default_null_prompt_is_the_pipelines_own_negative(sd15, guidance_scale):
    from diffusers import StableDiffusionPipeline

    assert "null_prompt" not in vars(SD15Backbone)  # the core's default
    pipe = StableDiffusionPipeline.from_pretrained(sd15.source, safety_checker=None,
                                                   requires_safety_checker=False,
                                                   local_files_only=True)
    with torch.no_grad():
        _, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
    prompt = sd15.encode_prompt(PROMPTS, guidance_scale=guidance_scale)
    null = sd15.null_prompt(prompt)
    assert null.batch_size == len(PROMPTS)
    assert torch.equal(null["prompt_embeds"], negative)
    if guidance_scale is not None:  # the guided bundle's own negatives are the same rows
        assert torch.equal(prompt["negative_prompt_embeds"], negative)
