"""The base class of backbones that run a diffusers Stable Diffusion-style UNet pipeline.

:class:`UNetBackbone` does what such backbones share: noise drawn as the pipeline draws it,
schedules and scheduler steps one at a time (:mod:`adapterswap.kit.schedules`), classifier-free
guidance batching (:mod:`adapterswap.kit.guidance`), per-sample step noise for schedulers that
inject it (:mod:`adapterswap.kit.noise`) and IP-Adapter inputs
(:class:`~adapterswap.kit.ip_adapter_inputs.IPAdapterInputs`). A subclass loads its pipeline,
encodes prompts, runs the UNet on a group of rows (:meth:`UNetBackbone.denoise_rows`) and
decodes. torch and diffusers are imported lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.backbone import Backbone
from adapterswap.errors import InvalidArgumentError, UsageError
from adapterswap.fastpath import device_tensor
from adapterswap.kit.guidance import check_prompt, uses_cfg
from adapterswap.kit.instantstyle import set_ip_scales
from adapterswap.kit.ip_adapter_inputs import IPAdapterInputs, split_ip_inputs
from adapterswap.kit.noise import SampleGenerators, draw_noise
from adapterswap.kit.rows import merge_rows, select_rows
from adapterswap.kit.schedules import (
    TIMESTEP_SPACINGS,
    StepSchedulers,
    predicted_x0,
    scheduler_step,
)

if TYPE_CHECKING:
    import torch

    from adapterswap.denoise import Schedule, StepContext


class UNetBackbone(Backbone):
    """What UNet backbones share: noise, schedules, guidance batching, scheduler steps and
    IP-Adapter inputs. A subclass loads its pipeline (:meth:`load_pipeline`, ending with
    :meth:`configure_pipeline`), encodes prompts, runs the UNet on a group of rows
    (:meth:`denoise_rows`) and decodes.

    ``predict`` takes an :class:`~adapterswap.kit.ip_adapter_inputs.IPAdapterInputs` as
    ``adapter_inputs``; rows whose adapter window is closed run with every IP scale at 0
    (diffusers then skips the IP branch), so they get exactly the no-adapter output; rows with
    different scales run as separate UNet forwards (:mod:`adapterswap.kit.rows`).

    Whether ``step`` hands each sample's generator to the scheduler follows from the scheduler
    itself (:attr:`injects_noise`), so a subclass that swaps in an LCM or ancestral scheduler
    needs to declare nothing.
    """

    option_docs: ClassVar[dict[str, str]] = {
        "variant": "weights variant to read, e.g. 'fp16' for the repo's half-precision files",
        "timestep_spacing": "where the scheduler's timesteps start: 'leading', 'trailing' "
                            "(from t=999 at every step count) or 'linspace' (default: the "
                            "model card's)",
    }

    def __init__(self, source: str | None = None, *, device: str | None = None,
                 dtype: Any = None, **options: Any) -> None:
        super().__init__(source, device=device, dtype=dtype, **options)
        self._sample_generators = SampleGenerators()
        self._step_schedulers: StepSchedulers | None = None

    @classmethod
    def check_option(cls, name: str, value: Any) -> Any:
        if name == "timestep_spacing" and value not in TIMESTEP_SPACINGS:
            raise InvalidArgumentError(name, value,
                                       f"choose one of {', '.join(TIMESTEP_SPACINGS)}")
        if name == "variant" and value is not None and not isinstance(value, str):
            raise InvalidArgumentError(name, value, "must be a string such as 'fp16'")
        return super().check_option(name, value)

    # -- loading ---------------------------------------------------------------------------
    def pretrained_kwargs(self, local_files_only: bool) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained``: dtype, safetensors only, offline flag."""
        kwargs = {"dtype": self.dtype, "use_safetensors": True,
                  "local_files_only": local_files_only}
        if self.options.get("variant"):
            kwargs["variant"] = self.options["variant"]
        return kwargs

    def from_pretrained(self, pipeline_class: type, source: str, *, local_files_only: bool,
                        **kwargs: Any) -> Any:
        """``pipeline_class`` loaded from ``source`` with :func:`adapterswap.weights.load_pipeline`
        (safetensors only, every model component checked against its config, one clear error
        naming the file when something is broken); ``kwargs`` go to ``from_pretrained``."""
        from adapterswap.weights import load_pipeline

        options = self.pretrained_kwargs(local_files_only)
        options.pop("use_safetensors", None)
        return load_pipeline(pipeline_class, source, what=f"backbone {self.name!r}",
                             **options, **kwargs)

    def configure_pipeline(self, pipe: Any) -> Any:
        """Last touches on a loaded pipeline (a distilled backbone swaps the scheduler first):
        the ``timestep_spacing`` option goes into the scheduler's config, as
        ``pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config,
        timestep_spacing=...)`` would put it."""
        spacing = self.options.get("timestep_spacing")
        if spacing is not None:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                              timestep_spacing=spacing)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def from_pipeline(cls, pipe: Any, *, source: str = "<in-memory>", device: str | None = None,
                      **options: Any) -> Backbone:
        backbone = super().from_pipeline(pipe, source=source, device=device, **options)
        backbone.pipe = backbone.configure_pipeline(pipe)
        return backbone

    def clear_caches(self) -> None:
        self._step_schedulers = None
        self.__dict__.pop("_w_embeddings", None)

    @property
    def injects_noise(self) -> bool:
        """Whether the pipeline's scheduler draws fresh noise at every step
        (:func:`adapterswap.kit.schedules.injects_noise`): then each row's generator is kept
        from ``prepare_latents`` on and passed to ``scheduler.step``, as the pipeline passes
        its generator."""
        return self.step_schedulers.injects_noise

    @property
    def step_schedulers(self) -> StepSchedulers:
        """Reference schedulers of the pipeline's current scheduler, per step count."""
        self.require_loaded()
        cache = self._step_schedulers
        if cache is None or cache.scheduler is not self.pipe.scheduler:
            cache = self._step_schedulers = StepSchedulers(self.pipe.scheduler, self.device)
        return cache

    # -- pipeline steps --------------------------------------------------------------------
    @classmethod
    def random(cls, *, device: str | None = None, dtype: Any = None, seed: int = 0,
               **options: Any) -> UNetBackbone:
        """Random weights at the published size (the ``random`` preset); the subclass
        supplies :meth:`random_pipeline`, this configures it as :meth:`load` would, with
        ``options`` (options that pick weight files, such as ``variant``, have nothing to pick
        here)."""
        from adapterswap.backbone import default_device, default_dtype, parse_dtype

        options = cls.check_options(options)  # before building billions of parameters
        device = device or default_device()
        dtype = parse_dtype(dtype) or default_dtype(device)
        backbone = cls.from_pipeline(cls.random_pipeline(device, dtype, seed), source="random",
                                     device=device, **options)
        backbone.dtype = dtype
        backbone.pipe = backbone.configure_pipeline(backbone.pipe)
        return backbone

    @staticmethod
    def random_pipeline(device: Any, dtype: Any, seed: int) -> Any:
        """The diffusers pipeline at the published size with random weights."""
        raise UsageError("this backbone has no random (published-size) preset")

    def uses_cfg(self, guidance_scale: float | None) -> bool:
        """Whether ``predict`` runs the unconditional branch for this scale."""
        return uses_cfg(guidance_scale)

    def prepare_latents(self, generators: Sequence[torch.Generator], *, height: int,
                        width: int) -> torch.Tensor:
        """Noise drawn as the diffusers pipeline draws it, one row per generator, times
        ``init_noise_sigma``. When that depends on the step count (Euler with
        "leading" spacing) it is applied at the first step instead, where the count is known.

        For schedulers that draw noise at every step (:attr:`injects_noise`: LCM, ancestral
        samplers) each row's generator is kept for its steps (see :class:`SampleGenerators`),
        as the pipeline passes its generator to ``scheduler.step``.
        """
        self.require_loaded()
        factor = self.pipe.vae_scale_factor
        shape = (self.pipe.unet.config.in_channels, height // factor, width // factor)
        latents = draw_noise(generators, shape, device=self.device, dtype=self.dtype)
        steps = self.step_schedulers
        if not steps.noise_sigma_depends_on_steps:
            latents = latents * steps.init_noise_sigma()
        if steps.injects_noise:
            self._sample_generators.add(latents, list(generators))
        return latents

    def schedule(self, num_inference_steps: int, *, height: int, width: int) -> Schedule:
        return self.step_schedulers.schedule(num_inference_steps)

    def predict(self, latents: torch.Tensor, ctx: StepContext, prompt: Any, *,
                guidance_scale: float | None,
                adapter_inputs: IPAdapterInputs | None = None) -> torch.Tensor:
        import torch

        self.require_loaded()
        cfg = self.uses_cfg(guidance_scale)
        check_prompt(prompt, cfg, self.name)
        unet = self.pipe.unet
        batch = latents.shape[0]
        embeds, negative, groups, group_scales = split_ip_inputs(adapter_inputs, unet, batch,
                                                                 self.name)
        if embeds is not None and cfg and negative is None:
            raise UsageError(f"backbone {self.name!r}: classifier-free guidance needs the "
                             "IP-Adapter's negative_image_embeds")
        steps = self.step_schedulers
        latents = steps.first_step_latents(latents, ctx.step_indices, ctx.num_steps)
        model_input = steps.scale_model_input(latents, ctx)
        timesteps = torch.as_tensor(ctx.timesteps).to(self.device)
        parts = []
        with torch.no_grad():
            for rows, scales in zip(groups, group_scales):
                if embeds is not None:
                    set_ip_scales(unet, scales)
                whole = len(rows) == batch
                index = device_tensor(rows, self.device)
                image_embeds = None
                if embeds is not None:
                    image_embeds = select_rows(embeds, rows, batch)
                    if cfg:
                        uncond = select_rows(negative, rows, batch)
                        image_embeds = [torch.cat([u, c]) for u, c in zip(uncond, image_embeds)]
                out = self.denoise_rows(
                    model_input if whole else model_input.index_select(0, index),
                    timesteps if whole else timesteps.index_select(0, index),
                    prompt if whole else prompt.select(rows),
                    cfg=cfg, guidance_scale=guidance_scale, height=ctx.height, width=ctx.width,
                    image_embeds=image_embeds)
                parts.append((rows, out))
        return merge_rows(parts)

    def denoise_rows(self, model_input: torch.Tensor, timesteps: torch.Tensor, prompt: Any, *,
                     cfg: bool, guidance_scale: float | None, height: int, width: int,
                     image_embeds: list[torch.Tensor] | None) -> torch.Tensor:
        """The guided UNet output for these rows (already scaled for the scheduler; with
        ``cfg`` the image embeddings are ``[uncond; cond]`` already)."""
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, latents: torch.Tensor, schedule: Schedule,
             step_index: int) -> torch.Tensor:
        import torch

        batch = latents.shape[0]
        generators = None
        if self.injects_noise:
            generators = self._sample_generators.take(latents, self.name)
        latents = self.step_schedulers.first_step_latents(
            latents, (step_index,) * batch, (len(schedule),) * batch)
        with torch.no_grad():
            out = scheduler_step(schedule, model_output, latents, step_index, generators)
        if generators is not None and step_index + 1 < len(schedule):
            self._sample_generators.add(out.prev_sample, generators)
        return out.prev_sample

    def predict_x0(self, model_output: torch.Tensor, latents: torch.Tensor,
                   schedule: Schedule, step_index: int) -> torch.Tensor:
        import torch

        batch = latents.shape[0]
        latents = self.step_schedulers.first_step_latents(
            latents, (step_index,) * batch, (len(schedule),) * batch)
        with torch.no_grad():
            return predicted_x0(schedule, model_output, latents, step_index)
