"""Independent references for the flux plugin's tests, written from InfiniteYou's published logic.

Nothing here calls the plugin's own denoising code: the InfuseNet reference is a hand-written
loop over diffusers' ``FluxControlNetPipeline`` pieces, the way InfiniteYou's
``FluxInfuseNetPipeline.__call__`` drives them (ID tokens as InfuseNet's
``encoder_hidden_states`` with zero ``txt_ids``, InfuseNet guidance 1.0, ``controlnet_keep``
window, conditioning scale, residuals into the transformer), and the face path uses insightface's
``FaceAnalysis`` as ``InfUFluxPipeline`` does.

:func:`infiniteyou_generate` has two seedings. ``seeding="generator"`` (default) has the two
documented differences from InfiniteYou's code that the plugin's default path has: the initial
noise comes from ``torch.Generator(cpu).manual_seed(seed)`` (InfiniteYou seeds the global RNG)
and the control image is encoded with the VAE posterior's mean (InfiniteYou draws
``latent_dist.sample()`` from the global RNG). ``seeding="global"`` is InfiniteYou's own:
``seed_everything(seed)`` (Python's, NumPy's and torch's global RNGs), then, from torch's global
RNG, the control posterior's sample first and the initial latents second (``generator=None``
everywhere, as ``InfUFluxPipeline.__call__`` calls ``FluxInfuseNetPipeline``); InfiniteYou's
T5 length is 512 tokens, the ``max_sequence_length`` default. The plugin's
``reproduce="infiniteyou"`` is held to it. The global RNGs are restored afterwards.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def resampler_forward(state: dict[str, torch.Tensor], x: torch.Tensor, *,
                      heads: int) -> torch.Tensor:
    """InfiniteYou's ``Resampler.forward`` written out functionally over a state dict."""
    import torch.nn.functional as F

    def layer_norm(t: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"])

    depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    latents = state["latents"].repeat(x.shape[0], 1, 1)
    x = F.linear(x, state["proj_in.weight"], state["proj_in.bias"])
    for i in range(depth):
        p = f"layers.{i}.0"
        xn, ln = layer_norm(x, f"{p}.norm1"), layer_norm(latents, f"{p}.norm2")
        b, length, _ = ln.shape
        q = F.linear(ln, state[f"{p}.to_q.weight"])
        k, v = F.linear(torch.cat((xn, ln), dim=-2), state[f"{p}.to_kv.weight"]).chunk(2, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            bs, n, _ = t.shape
            return t.view(bs, n, heads, -1).transpose(1, 2).reshape(bs, heads, n, -1)

        q, k, v = split(q), split(k), split(v)
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(b, length, -1)
        latents = F.linear(out, state[f"{p}.to_out.weight"]) + latents
        f = f"layers.{i}.1"
        h = layer_norm(latents, f"{f}.0")
        h = F.linear(F.gelu(F.linear(h, state[f"{f}.1.weight"])), state[f"{f}.3.weight"])
        latents = h + latents
    latents = F.linear(latents, state["proj_out.weight"], state["proj_out.bias"])
    return layer_norm(latents, "norm_out")


def infiniteyou_id_embed(image_rgb: Any, pack_dir: Path, arcface: torch.nn.Module,
                         image_proj_state: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """InfUFluxPipeline's ID path: FaceAnalysis at 640/320/160, the largest face, norm_crop 112,
    [-1, 1] BGR crop through ArcFace, reshape to (1, -1, E), resampler."""
    import cv2
    from insightface.app import FaceAnalysis
    from insightface.utils import face_align

    image_bgr = cv2.cvtColor(np.array(image_rgb), cv2.COLOR_RGB2BGR)
    face_info: list = []
    for size in (640, 320, 160):
        app = FaceAnalysis(name=str(pack_dir), providers=["CPUExecutionProvider"])
        app.prepare(ctx_id=0, det_size=(size, size))
        face_info = app.get(image_bgr)
        if face_info:
            break
    assert face_info, "reference: no face"
    face = sorted(face_info, key=lambda f: (f["bbox"][2] - f["bbox"][0])
                  * (f["bbox"][3] - f["bbox"][1]))[-1]
    crop = face_align.norm_crop(image_bgr, landmark=np.array(face["kps"]), image_size=112)
    pixels = torch.from_numpy(crop).unsqueeze(0).permute(0, 3, 1, 2) / 255.0
    pixels = (2 * pixels - 1).contiguous()
    with torch.no_grad():
        embedding = arcface(pixels)[0]
    embedding = embedding.clone().unsqueeze(0).float()
    embedding = embedding.reshape([1, -1, embedding.shape[-1]])
    with torch.no_grad():
        return resampler_forward(image_proj_state, embedding, heads=heads)


def infiniteyou_root_id_embed(root: Path, image_rgb: Any, arcface: torch.nn.Module, *,
                              heads: int, model_version: str = "aes_stage2") -> torch.Tensor:
    """:func:`infiniteyou_id_embed` with the face pack and image projection of the
    InfiniteYou repository at ``root``."""
    from adapterswap_flux.face import FACE_PACK

    model_dir = Path(root) / "infu_flux_v1.0" / model_version
    state = torch.load(model_dir / "image_proj_model.bin", weights_only=True)["image_proj"]
    return infiniteyou_id_embed(image_rgb, Path(root) / "supports" / "insightface" / "models"
                                / FACE_PACK, arcface, state, heads=heads)


def pipeline_components(pipe: Any) -> dict[str, Any]:
    """A FLUX pipeline's components for ``FluxControlNetPipeline``: without the image encoder
    parts it does not take, and with a fresh scheduler of the same config (the reference
    must not share the scheduler's step state with the code under test)."""
    components = dict(pipe.components)
    components.pop("image_encoder", None)
    components.pop("feature_extractor", None)
    components["scheduler"] = type(components["scheduler"]).from_config(
        components["scheduler"].config)
    return components


def infiniteyou_generate(components: dict[str, Any], infusenet: Any, id_embed: torch.Tensor, *,
                         prompt: str, seed: int, num_steps: int, height: int, width: int,
                         guidance_scale: float, conditioning_scale: float = 1.0,
                         guidance_start: float = 0.0, guidance_end: float = 1.0,
                         max_sequence_length: int = 512,
                         seeding: str = "generator") -> np.ndarray:
    """FluxInfuseNetPipeline.__call__ for one image with a black control canvas, written out;
    ``seeding``: ``"generator"`` (the documented differences) or ``"global"`` (InfiniteYou's
    global seeding and draw order; see the module docstring)."""
    assert seeding in ("generator", "global"), seeding
    with torch.random.fork_rng(devices=[]):  # the global RNGs come back as they were
        state = random.getstate(), np.random.get_state()
        try:
            if seeding == "global":  # InfiniteYou's seed_everything (CUDA: lazily, no GPU)
                random.seed(seed)
                np.random.seed(seed)
                torch.manual_seed(seed)
            return _generate(components, infusenet, id_embed, prompt=prompt, seed=seed,
                             num_steps=num_steps, height=height, width=width,
                             guidance_scale=guidance_scale,
                             conditioning_scale=conditioning_scale,
                             guidance_start=guidance_start, guidance_end=guidance_end,
                             max_sequence_length=max_sequence_length,
                             global_rng=seeding == "global")
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


def _generate(components: dict[str, Any], infusenet: Any, id_embed: torch.Tensor, *,
              prompt: str, seed: int, num_steps: int, height: int, width: int,
              guidance_scale: float, conditioning_scale: float, guidance_start: float,
              guidance_end: float, max_sequence_length: int, global_rng: bool) -> np.ndarray:
    from diffusers import FluxControlNetPipeline
    from diffusers.pipelines.flux.pipeline_flux_controlnet import (
        calculate_shift,
        retrieve_timesteps,
    )
    from PIL import Image

    pipe = FluxControlNetPipeline(**components, controlnet=infusenet)
    pipe.set_progress_bar_config(disable=True)
    device = torch.device("cpu")
    with torch.no_grad():
        prompt_embeds, pooled_prompt_embeds, text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1,
            max_sequence_length=max_sequence_length)
        # ID tokens take the prompt's place for InfuseNet: encode_prompt with them as the
        # "prompt_embeds" gives zero text ids of their length.
        controlnet_prompt_embeds, pooled_prompt_embeds, controlnet_text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_embeds=id_embed,
            pooled_prompt_embeds=pooled_prompt_embeds, device=device, num_images_per_prompt=1,
            max_sequence_length=max_sequence_length)

        control_image = Image.fromarray(np.zeros([height, width, 3]).astype(np.uint8))
        control_image = pipe.prepare_image(image=control_image, width=width, height=height,
                                           batch_size=1, num_images_per_prompt=1,
                                           device=device, dtype=pipe.vae.dtype)
        height, width = control_image.shape[-2:]
        posterior = pipe.vae.encode(control_image).latent_dist
        # InfiniteYou: a sample from the global RNG, drawn before the latents
        control_image = posterior.sample() if global_rng else posterior.mode()
        control_image = (control_image - pipe.vae.config.shift_factor) \
            * pipe.vae.config.scaling_factor
        num_channels_latents = pipe.transformer.config.in_channels // 4
        hc, wc = control_image.shape[2:]
        control_image = pipe._pack_latents(control_image, 1, num_channels_latents, hc, wc)

        latents, latent_image_ids = pipe.prepare_latents(
            1, num_channels_latents, height, width, prompt_embeds.dtype, device,
            None if global_rng else torch.Generator("cpu").manual_seed(seed))

        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift(latents.shape[1], pipe.scheduler.config.base_image_seq_len,
                             pipe.scheduler.config.max_image_seq_len,
                             pipe.scheduler.config.base_shift, pipe.scheduler.config.max_shift)
        timesteps, num_steps = retrieve_timesteps(pipe.scheduler, num_steps, device, None,
                                                  sigmas, mu=mu)
        controlnet_keep = [
            1.0 - float(i / len(timesteps) < guidance_start
                        or (i + 1) / len(timesteps) > guidance_end)
            for i in range(len(timesteps))
        ]
        for i, t in enumerate(timesteps):
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            guidance = (torch.tensor([1.0], device=device)
                        if infusenet.config.guidance_embeds else None)
            guidance = guidance.expand(latents.shape[0]) if guidance is not None else None
            cond_scale = conditioning_scale * controlnet_keep[i]
            block_samples, single_block_samples = infusenet(
                hidden_states=latents, controlnet_cond=control_image, controlnet_mode=None,
                conditioning_scale=cond_scale, timestep=timestep / 1000, guidance=guidance,
                pooled_projections=pooled_prompt_embeds,
                encoder_hidden_states=controlnet_prompt_embeds, txt_ids=controlnet_text_ids,
                img_ids=latent_image_ids, joint_attention_kwargs=None, return_dict=False)
            guidance = (torch.tensor([guidance_scale], device=device)
                        if pipe.transformer.config.guidance_embeds else None)
            guidance = guidance.expand(latents.shape[0]) if guidance is not None else None
            noise_pred = pipe.transformer(
                hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                controlnet_block_samples=block_samples,
                controlnet_single_block_samples=single_block_samples, txt_ids=text_ids,
                img_ids=latent_image_ids, joint_attention_kwargs=None, return_dict=False,
                controlnet_blocks_repeat=False)[0]
            latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")
