"""Step-distilled FLUX.1-dev backbones that ship as a LoRA: ``flux-dev-turbo`` and
``flux-dev-hyper``.

Both are FLUX.1-dev (same base weights, same embedded guidance 3.5, same dynamic-shift flow
matching schedule, T5 at 512 tokens) with a LoRA merged into the transformer, run for 8 steps
as their model cards do:

- ``flux-dev-turbo``: alimama-creative/FLUX.1-Turbo-Alpha, ``diffusion_pytorch_model.safetensors``;
  card: ``load_lora_weights`` + ``fuse_lora()`` (scale 1), ``guidance_scale=3.5``,
  ``num_inference_steps=8``, ``max_sequence_length=512``.
- ``flux-dev-hyper``: ByteDance/Hyper-SD, ``Hyper-FLUX.1-dev-8steps-lora.safetensors`` (or the
  16-step file); card: ``load_lora_weights`` + ``fuse_lora(lora_scale=0.125)``,
  ``guidance_scale=3.5``, ``num_inference_steps=8``.

Both published files use diffusers' own FLUX LoRA keys, ``transformer.<module>.lora_A.weight``
(``rank x in``) and ``.lora_B.weight`` (``out x rank``) with no ``alpha`` entries, on every
linear layer of the transformer: the embedders (``x_embedder``, ``context_embedder``,
``time_text_embed.*``), every projection of the double and single blocks including their
``norm*.linear`` modulations, ``norm_out.linear`` and ``proj_out``. Their sizes match rank 64
on exactly that set: 1.39 GB in float32 (Hyper-FLUX), 694 MB in 16 bits (Turbo-Alpha). The tiny
preset writes files of that layout (rank 4) for the tiny transformer.

The LoRA is fused with :mod:`adapterswap.kit.lora` and its layers dropped, so the transformer is
a plain one with merged weights: adapters that read its shapes (InfuseNet) attach exactly as to
``flux-dev``. With ``quantize_8bit`` the LoRA is merged before optimum-quanto freezes the int8
weights (:meth:`FluxBackbone.prepare_transformer`).

torch and diffusers are imported inside methods so ``adapterswap list`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from adapterswap.kit.lora import FusedLoRA, LoRAStepFiles
from adapterswap_flux.backbones import FluxDev

#: What the FLUX.1-dev base needs, said once for both backbones' ``how_to_get``.
_FLUX_DEV_HOW_TO_GET = (
    "Needs FLUX.1-dev, gated under the FLUX.1 [dev] Non-Commercial License (accept it at "
    "https://huggingface.co/black-forest-labs/FLUX.1-dev, `hf auth login`, then "
    "`hf download black-forest-labs/FLUX.1-dev`)")


class FluxDevLoRABackbone(FusedLoRA, FluxDev):
    """FLUX.1-dev with a step-distillation LoRA fused in (shared part, not registered).

    ``source`` is the FLUX.1-dev pipeline. Options, besides flux-dev's: ``lora`` (a Hub repo
    id, a local directory, the ``.safetensors`` file itself, or ``None`` when ``source``
    already has the LoRA fused), ``lora_file`` (the file inside it), ``lora_scale`` (the
    ``fuse_lora`` scale; default the model card's). The ``random`` preset (latency studies) is
    flux-dev's at the published size: a fused LoRA costs no time.
    """

    default_steps = 8
    step_grid = (1, 2, 4, 8)
    lora_model = "a FLUX.1-dev LoRA"
    #: Scale of the tiny LoRA's weights, so that at ``lora_scale`` they change the transformer
    #: as much as a full-strength LoRA would (Hyper-FLUX's are made for 0.125).
    tiny_lora_magnitude: ClassVar[float] = 0.5
    #: Tensor dtype of the published file (``"float32"`` or ``"bfloat16"``), kept by the tiny one.
    tiny_lora_dtype: ClassVar[str] = "float32"

    def __init__(self, source: str | None = None, *, device: str | None = None,
                 dtype: Any = None, **options: Any) -> None:
        super().__init__(source, device=device, dtype=dtype, **options)
        self.lora_scale = float(self.options.get("lora_scale", type(self).lora_scale))

    @classmethod
    def option_docs_for(cls, *, repo: str, file: str, scale: float) -> dict[str, str]:
        """flux-dev's option docs plus this backbone's LoRA options."""
        return {
            **FluxDev.option_docs,
            "lora": f"where the LoRA comes from: a Hub repo id, a local directory, the "
                    f".safetensors file, or None when the source has it fused (default {repo})",
            "lora_file": f"the LoRA file inside it (default {file})",
            "lora_scale": f"the fuse_lora scale (default {scale:g}, the model card's)",
        }

    def fuses_at_load(self) -> bool:
        """8-bit weights take no merge: the LoRA is fused in :meth:`prepare_transformer`."""
        return not self.quantize_8bit

    def prepare_transformer(self, transformer: Any) -> Any:
        """Merge the LoRA into the transformer the 8-bit path loaded, before quanto freezes
        it (int8 weights take no merge); diffusers' loader needs a pipeline around it."""
        from diffusers import FluxPipeline

        lora = self.lora_location()
        if lora is not None:
            bare = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                text_encoder_2=None, tokenizer_2=None, transformer=transformer)
            self.fuse_lora_into(bare, lora)
        return transformer

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny_lora_files(cls) -> tuple[str, ...]:
        """The LoRA files the tiny preset writes (the default one, and any other choice)."""
        return (cls.lora_file,)

    @classmethod
    def tiny(cls, seed: int = 0, *, cache_dir: str | None = None,
             **options: Any) -> FluxDevLoRABackbone:
        """The tiny flux-dev pipeline plus tiny LoRA files in the published layout
        (:func:`save_tiny_flux_lora`), fused through :meth:`load`; 64 x 64 px by default."""
        options = cls.check_options(options)  # before building anything
        import torch

        from adapterswap.kit.tiny import build_once
        from adapterswap.presets import tiny_dir
        from adapterswap_flux.tiny import save_tiny_pipeline

        # the same base directory as flux-dev's tiny preset: the LoRA is the only difference
        base = build_once(tiny_dir("flux-dev", seed, cache_dir),
                          lambda tmp: save_tiny_pipeline("flux-dev", tmp, seed))

        def build(tmp: Path) -> None:
            for index, filename in enumerate(cls.tiny_lora_files()):
                save_tiny_flux_lora(base, tmp / filename, seed=seed + 1 + index,
                                    magnitude=cls.tiny_lora_magnitude,
                                    dtype=cls.tiny_lora_dtype)

        lora_dir = build_once(tiny_dir(f"{cls.name}-lora", seed, cache_dir), build)
        options.setdefault("lora", str(lora_dir))
        backbone = cls(str(base), device="cpu", dtype=torch.float32, **options).load()
        backbone.default_height, backbone.default_width = cls.tiny_size
        return backbone


class FluxDevTurbo(FluxDevLoRABackbone):
    """FLUX.1-Turbo-Alpha (alimama-creative): an 8-step LoRA on FLUX.1-dev, trained with a
    multi-head discriminator; embedded guidance 3.5 kept, LoRA fused at scale 1."""

    name = "flux-dev-turbo"
    lora_repo = "alimama-creative/FLUX.1-Turbo-Alpha"
    lora_file = "diffusion_pytorch_model.safetensors"
    lora_scale = 1.0
    lora_title = "FLUX.1-Turbo-Alpha LoRA"
    tiny_lora_magnitude = 0.5
    tiny_lora_dtype = "bfloat16"  # the published file is 16-bit (694 MB at rank 64)
    option_docs = FluxDevLoRABackbone.option_docs_for(repo=lora_repo, file=lora_file,
                                                      scale=lora_scale)
    how_to_get = (
        f"{_FLUX_DEV_HOW_TO_GET} and the FLUX.1-Turbo-Alpha LoRA (`hf download "
        f"alimama-creative/FLUX.1-Turbo-Alpha diffusion_pytorch_model.safetensors`, also under "
        f"the FLUX.1 [dev] Non-Commercial License), or local copies.")
    description = "FLUX.1-Turbo-Alpha LoRA on FLUX.1-dev (8 steps, embedded guidance 3.5)"


#: Hyper-FLUX LoRA files in ByteDance/Hyper-SD, by the step count they were distilled for.
HYPER_FLUX_FILES: dict[int, str] = {
    8: "Hyper-FLUX.1-dev-8steps-lora.safetensors",
    16: "Hyper-FLUX.1-dev-16steps-lora.safetensors",
}


class FluxDevHyper(LoRAStepFiles, FluxDevLoRABackbone):
    """Hyper-FLUX (ByteDance Hyper-SD, arXiv 2404.13686): an 8-step (or 16-step) LoRA on
    FLUX.1-dev, fused at scale 0.125 as the card says; embedded guidance 3.5 kept.

    ``lora_steps`` (8 or 16) picks the 8- or 16-step file and the step count this instance
    runs at by default (sweeps keep the class's 8-step grid: pass ``--steps``);
    ``lora_file`` names any other file (not both).
    """

    name = "flux-dev-hyper"
    lora_repo = "ByteDance/Hyper-SD"
    lora_file = HYPER_FLUX_FILES[8]
    lora_step_files = HYPER_FLUX_FILES
    lora_scale = 0.125
    lora_title = "Hyper-FLUX LoRA"
    tiny_lora_magnitude = 4.0  # x 0.125: a change of the size a full-strength LoRA makes
    tiny_lora_dtype = "float32"  # the published file is float32 (1.39 GB at rank 64)
    option_docs = {
        **FluxDevLoRABackbone.option_docs_for(repo=lora_repo, file=lora_file, scale=lora_scale),
        "lora_steps": "8 or 16: the Hyper-FLUX file distilled for that many steps, and this "
                      "instance's default step count (default 8)",
    }
    how_to_get = (
        f"{_FLUX_DEV_HOW_TO_GET} and the Hyper-FLUX LoRA (`hf download ByteDance/Hyper-SD "
        f"{HYPER_FLUX_FILES[8]}`; Hyper-SD's LICENSE.md puts its FLUX.1-dev LoRAs under the "
        f"FLUX.1 [dev] Non-Commercial License), or local copies.")
    description = "Hyper-FLUX 8-step LoRA on FLUX.1-dev (scale 0.125, embedded guidance 3.5)"

    @classmethod
    def tiny_lora_files(cls) -> tuple[str, ...]:
        return tuple(HYPER_FLUX_FILES.values())


# ------------------------------------------------------------------------------ tiny LoRA files
def flux_lora_targets(transformer: Any) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` of every linear layer of a FLUX
    transformer: the modules the published Turbo-Alpha and Hyper-FLUX files adapt."""
    import torch

    return {name: (module.in_features, module.out_features)
            for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear)}


def save_tiny_flux_lora(base: Path, path: Path, *, seed: int, rank: int = 4,
                        magnitude: float = 0.5, dtype: str = "float32") -> None:
    """Random rank-``rank`` LoRA weights for the transformer of the FLUX pipeline at ``base``,
    keyed as the published FLUX.1-Turbo-Alpha and Hyper-FLUX files are
    (``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``, no ``alpha``), in ``dtype``.

    ``magnitude`` sets ``B @ A`` relative to a default-initialised weight of the same layer
    (the product of the two has entries of about ``magnitude / sqrt(in_features)``)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    with torch.device("meta"):  # names and shapes only
        transformer = FluxTransformer2DModel.from_config(
            FluxTransformer2DModel.load_config(str(base), subfolder="transformer"))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (fan_in, fan_out) in flux_lora_targets(transformer).items():
        down = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
        up = magnitude * torch.randn(fan_out, rank, generator=generator) / rank ** 0.5
        state[f"transformer.{name}.lora_A.weight"] = down
        state[f"transformer.{name}.lora_B.weight"] = up
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()}, str(path))
