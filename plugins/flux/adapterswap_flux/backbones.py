"""FLUX.1 backbones: ``flux-dev`` (embedded guidance) and ``flux-schnell`` (no guidance).

Both wrap a diffusers ``FluxPipeline`` and expose its steps to the engine, so that
:func:`adapterswap.denoise.denoise` gives, for the same weights, seed and settings, the image
``FluxPipeline.__call__`` gives:

- ``encode_prompt``: CLIP pooled + T5 sequence (``max_sequence_length`` 512 for dev, 256 for
  schnell), ``text_ids`` zeros;
- ``prepare_latents``: one ``randn`` draw of ``(1, C, H/8, W/8)`` per generator, packed into 2x2
  patches;
- ``schedule``: a scheduler instance of its own per run; sigmas ``linspace(1, 1/N, N)``, then
  FLUX.1-dev's resolution-dependent shift ``mu`` (from the packed image sequence length, as
  ``FluxPipeline`` computes it) or FLUX.1-schnell's plain shift 1.0;
- ``predict``: one transformer call with per-sample timesteps ``(B,)`` / 1000, the guidance
  embedding for dev, and optional ControlNet residuals from an adapter;
- ``step``: flow-matching Euler ``x + (sigma_next - sigma) * v`` in float32;
  ``predict_x0``: ``x - sigma * v``;
- ``decode``: unpack, undo the VAE's scaling and shift, decode, post-process.

Adapter inputs ``predict`` understands: a :class:`~adapterswap_flux.inputs.FluxDenoiserInputs`
(ControlNet residuals per block list, already scaled per row, and ``joint_attention_kwargs``),
which ``Adapter.denoiser_inputs`` returns for a FLUX backbone.

torch and diffusers are imported inside methods so ``adapterswap list`` stays fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.backbone import Backbone
from adapterswap.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

    from adapterswap.denoise import Schedule, StepContext, TensorBundle
    from adapterswap_flux.inputs import FluxDenoiserInputs

#: Files a complete FLUX.1 diffusers directory has (``a|b``: either; sharded weights have an
#: index file). Checked before loading and by ``adapterswap doctor``.
FLUX_REQUIRED_FILES: tuple[str, ...] = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors"
    "|transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors|text_encoder_2/model.safetensors.index.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json",
)

OUTPUT_TYPES = ("pil", "np", "pt")
#: Values of the ``generator_device`` option.
GENERATOR_DEVICES = ("cpu", "execution")


def budget_conflicts(fast: Any, compile_mode: str | None, *, streams: bool,
                     evicts: bool) -> list[str]:
    """The fast-path switches a memory budget's placement cannot run with: CUDA graphs replay
    fixed addresses while streamed blocks arrive in new ones each step (stale weights,
    silently); fusing Q/K/V or casting to float8 makes new weights the streamer never moves;
    compiling the text encoders traces modules that visit the GPU by hooks."""
    from adapterswap.fastpath import CUDAGRAPH_MODES

    refused = []
    if streams and compile_mode in CUDAGRAPH_MODES:
        refused.append(f"compile mode {compile_mode!r} (CUDA graphs)")
    if streams and fast.fuse_qkv:
        refused.append("fuse_qkv")
    if streams and fast.fp8:  # the plan casts before it streams
        refused.append("fp8")
    if evicts and fast.compile and fast.compile_encoders:
        refused.append("compiled text encoders")
    return refused

class FluxBackbone(Backbone):
    """Shared implementation of the FLUX.1 backbones (not registered itself).

    Options (``FluxDev(source, device=..., dtype=..., **options)``):

    :param cpu_offload: diffusers' model CPU offload (each model moves to the GPU only while it
        runs); needs a CUDA device. InfiniteYou's ``--cpu_offload``.
    :param quantize_8bit: quantize the transformer and the T5 encoder to 8-bit weights with
        optimum-quanto (``qint8``), as InfiniteYou's ``--quantize_8bit``; needs
        ``pip install 'adapterswap-flux[quantize]'``.
    :param max_sequence_length: T5 tokens (default 512 for dev, 256 for schnell; at most 512).
    :param generator_device: where the engine's per-seed generators live: ``"cpu"`` (default;
        diffusers' cross-device reproducible choice) or ``"execution"``, the device the models
        run on (the GPU on CUDA, where a pipeline called without a generator draws from the
        global CUDA RNG, as InfiniteYou does; InfuseNet's ``reproduce`` sets it).
    :param memory_budget: GiB of GPU memory the pipeline and its adapter may use (24 or 16 for
        the cards InfiniteYou users have), with no weights moved per image: the text encoders
        leave the GPU after encoding, then (where still needed) the transformer's and the
        adapter's large linears go float8, then transformer blocks stream from pinned host
        memory (:mod:`adapterswap_flux.budget`, :mod:`adapterswap.fastpath.memory`). The
        process is capped at the budget (``torch.cuda.set_per_process_memory_fraction``), so
        going past it is an out-of-memory error. Float8 is an approximation: such a plan's
        cells are approximate (:meth:`option_approximations`). Needs CUDA; not with
        ``cpu_offload`` or ``quantize_8bit``. :meth:`memory_record` says what ran.

    There is no ``timestep_spacing`` option: every flow-matching schedule starts at sigma 1.
    """

    family = "flux"
    required_files = FLUX_REQUIRED_FILES
    default_adapter = "infusenet"
    default_height = 1024
    default_width = 1024
    #: ``(height, width)`` of the tiny preset's images (:mod:`adapterswap_flux.tiny`).
    tiny_size: ClassVar[tuple[int, int]] = (64, 64)
    #: Height and width are multiples of 16: the 8x VAE, then 2x2 latent patches.
    size_multiple: ClassVar[int] = 16
    #: Its transformer's block lists, which the block cache (``--cache``) serves.
    block_cache_layout = ("transformer_blocks", "single_transformer_blocks")
    #: FLUX.1 was trained on 0.1 to 2.0 MP (Black Forest Labs' release notes); 2048 x 2048
    #: (4.2 MP) leaves room to experiment. Beyond it images repeat their subject and the
    #: attention over (height / 16) x (width / 16) image tokens grows quadratically.
    max_pixels = 2048 * 2048
    #: T5 sequence length the checkpoint is run with.
    max_sequence_length: ClassVar[int] = 512
    #: Whether the transformer must have a guidance embedding (dev) or must not (schnell).
    expects_guidance_embeds: ClassVar[bool] = True
    #: The family :func:`adapterswap_flux.tiny.save_tiny_pipeline` builds for ``tiny()``.
    tiny_family: ClassVar[str] = "flux-dev"
    option_docs: ClassVar[dict[str, str]] = {
        "cpu_offload": "diffusers' model CPU offload (each model on the GPU only while it runs; "
                       "needs CUDA), as InfiniteYou's --cpu_offload",
        "quantize_8bit": "8-bit (qint8) transformer and T5 encoder with optimum-quanto, as "
                         "InfiniteYou's --quantize_8bit",
        "max_sequence_length": "T5 tokens, 1 to 512 (default 512 for dev, 256 for schnell)",
        "generator_device": "where the per-seed generators live: cpu (default) or execution "
                            "(the device the models run on)",
        "memory_budget": "GiB of GPU memory to run in, e.g. 24 or 16 (CUDA): text encoders off "
                         "the GPU after encoding, then float8 linears (approximation), then "
                         "transformer blocks streamed from host memory, as needed; the process "
                         "is capped at it",
    }
    unsupported_options: ClassVar[dict[str, str]] = {
        "timestep_spacing": "flow matching starts at sigma 1, pure noise, at every step count",
    }
    #: Probes: the text/image stream RMS ratio after every block (``adapterswap_flux.probes``).
    supports_probes = True

    def __init__(self, source: str | None = None, *, device: str | None = None,
                 dtype: Any = None, **options: Any) -> None:
        super().__init__(source, device=device, dtype=dtype, **options)
        self.max_sequence_length = self.options.get("max_sequence_length",
                                                    type(self).max_sequence_length)
        self.cpu_offload = bool(self.options.get("cpu_offload", False))
        self.quantize_8bit = bool(self.options.get("quantize_8bit", False))
        #: GiB (the ``memory_budget`` option) or ``None``
        self.memory_budget: float | None = self.options.get("memory_budget")
        #: the budget's :class:`~adapterswap.fastpath.memory.Placement` once placed
        self.placement: Any = None
        self._memory_plan: Any = None  # planned from the configs, before the weights load
        self._image_ids: dict[tuple[int, int], Any] = {}

    @classmethod
    def check_option(cls, name: str, value: Any) -> Any:
        if name in ("cpu_offload", "quantize_8bit") and not isinstance(value, bool):
            raise InvalidArgumentError(name, value, "must be True or False")
        if name == "max_sequence_length" and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 512):
            raise InvalidArgumentError(name, value, "must be an integer in [1, 512]")
        if name == "generator_device" and value not in GENERATOR_DEVICES:
            raise InvalidArgumentError(name, value,
                                       f"choose one of {', '.join(GENERATOR_DEVICES)}")
        if name == "memory_budget":
            from adapterswap.fastpath.memory import check_budget

            value = check_budget(value, name)
        return super().check_option(name, value)

    @classmethod
    def check_options(cls, options: Any) -> dict[str, Any]:
        """Each option (:meth:`check_option`), then ``memory_budget`` against the options that
        also decide where and how the weights live."""
        checked = super().check_options(options)
        budget = checked.get("memory_budget")
        if budget is not None:
            for other, why in (("cpu_offload", "moves every model on and off the GPU"),
                               ("quantize_8bit", "stores int8 weights the budget cannot plan")):
                if checked.get(other):
                    raise InvalidArgumentError(
                        "memory_budget", budget,
                        f"cannot be combined with {other} ({why}); the budget places the "
                        "models itself: drop one of them")
        return checked

    @classmethod
    def option_approximations(cls, options: Any) -> list[str]:
        """The approximations ``options`` switch on, as cell keys name them: ``fp8`` when a
        ``memory_budget`` needs float8 linears for FLUX.1 at its published size (the plan on a
        GPU with float8; a GPU without it streams instead, exactly). ``[]`` otherwise."""
        budget = cls.check_options(options).get("memory_budget")
        if budget is None:
            return []
        from adapterswap_flux.budget import published_plan

        return published_plan(budget, cls.max_sequence_length).approximations()

    def encoding_session(self) -> Any:
        """A block in which several prompts are encoded with one visit of the evicted text
        encoders (the engine encodes a backbone's prompts in one); without a budget, nothing."""
        return self.placement.encoding() if self.placement is not None \
            else contextlib.nullcontext()

    def check_fast_path(self, fast: Any, compile_mode: str | None, *,
                        chosen: bool = True) -> str | None:
        """Refuse, in one line, fast-path switches that a ``memory_budget``'s placement cannot
        take (:func:`budget_conflicts`); returns the compile mode to use: a CUDA-graph mode
        the card's compile profile chose (``chosen`` False) becomes ``default`` where blocks
        stream, rather than a refusal of what the user never asked for."""
        from adapterswap.fastpath import CUDAGRAPH_MODES

        placement = self.placement
        if placement is None:
            return compile_mode
        streams, evicts = bool(placement.streamers), bool(placement.evicted)
        if streams and not chosen and compile_mode in CUDAGRAPH_MODES:
            compile_mode = "default"
        refused = budget_conflicts(fast, compile_mode, streams=streams, evicts=evicts)
        if refused:
            raise InvalidArgumentError(
                "memory_budget", self.memory_budget, f"streams or evicts weights, which "
                f"{', '.join(refused)} cannot run with; leave them off")
        return compile_mode

    def memory_record(self) -> dict[str, Any] | None:
        """Under ``memory_budget``: the plan, how it was enforced, the float8 layers, the
        streaming and the peak ``torch.cuda.max_memory_allocated`` since it was placed (GiB);
        ``None`` without a budget."""
        if self.placement is None:
            return None
        record = self.placement.record()
        keyed = getattr(self, "_keyed_approximations", None)
        if keyed is not None and keyed != record["plan"]["approximations"]:
            record["keyed_approximations"] = keyed  # an fp8 label on an exact plan
        return record

    @classmethod
    def check_run_device(cls, options: Any, device: str, fast: Any = None) -> None:
        """Before a store or a model exists: refuse, in one line, options that cannot run on
        ``device`` (a ``memory_budget`` needs CUDA) or with the fast path ``fast`` (what the
        budget's plan at the published size streams or evicts: :func:`budget_conflicts`)."""
        options = cls.check_options(options or {})
        budget = options.get("memory_budget")
        if budget is None:
            return
        cls(device=device, **options)._budget_device()
        if fast is not None and (fast.fp8 or fast.fuse_qkv or fast.compile_encoders
                                 or fast.compile_mode):
            from adapterswap_flux.budget import published_plan

            plan = published_plan(budget, cls.max_sequence_length)
            refused = budget_conflicts(fast, fast.compile_mode if fast.compile else None,
                                       streams=bool(plan.streamed), evicts=bool(plan.evicted))
            if refused:
                raise InvalidArgumentError(
                    "memory_budget", budget, f"streams or evicts weights at the published "
                    f"size, which {', '.join(refused)} cannot run with; leave them off")

    def _budget_device(self, device: Any = None) -> str:
        """The CUDA device a ``memory_budget`` runs on, or the one-line refusal."""
        from adapterswap.backbone import default_device

        device = str(device or self.device or default_device())
        if not device.startswith("cuda"):
            raise InvalidArgumentError(
                "memory_budget", self.memory_budget,
                f"needs a CUDA device (it caps this process's GPU memory), not {device!r}")
        return device

    def plan_memory(self, components: Any) -> Any:
        """The :class:`~adapterswap.fastpath.memory.MemoryPlan` of ``memory_budget`` for these
        components (loaded, or their configs on the meta device), at the default image size,
        this backbone's T5 length and dtype, on its device."""
        from adapterswap.fastpath.kernels import fp8_supported
        from adapterswap_flux.budget import plan_for

        return plan_for(components, self.memory_budget, dtype=self.dtype,
                        height=self.default_height, width=self.default_width,
                        text_tokens=int(self.max_sequence_length),
                        float8_available=fp8_supported(self.device),
                        what=f"backbone {self.name!r}")

    def _check_keyed_approximations(self, plan: Any) -> None:
        """Cells are keyed before any weight is read, by the budget's plan at the published
        size (:meth:`option_approximations`). A plan for these weights (their configs, this
        device) that uses float8 where that plan does not would run an approximation under an
        exact label: refused in one line. The other way round (a GPU without float8, smaller
        weights) runs exactly under an ``fp8`` label, which only overstates the approximation:
        the memory record says so."""
        keyed = type(self).option_approximations({"memory_budget": self.memory_budget})
        actual = plan.approximations()
        if set(actual) - set(keyed):
            raise InvalidArgumentError(
                "memory_budget", self.memory_budget,
                f"these weights need {', '.join(actual)} under it, which the published-size "
                f"plan that keys the cells does not ({', '.join(keyed) or 'exact'}); give a "
                "larger budget")
        self._keyed_approximations = keyed

    def place_under_budget(self, plan: Any = None, *, copy: Any = None,
                           cap: bool | None = None) -> Any:
        """Place the loaded pipeline (on the CPU) under ``plan`` (default: planned from its
        modules) on this backbone's device; ``copy`` and ``cap`` as
        :class:`~adapterswap.fastpath.memory.Placement` takes them (tests run it on the CPU
        with a copy function of their own). Returns the placement."""
        from adapterswap_flux.budget import place

        plan = plan or self._memory_plan or self.plan_memory(self.pipe.components)
        self.placement = place(self.pipe, plan, self.device, copy=copy, cap=cap)
        return self.placement

    def place_adapter_modules(self, modules: Any) -> bool:
        """Under ``memory_budget``: put an attaching adapter's heavy modules (its
        ``fast_modules()``) in the room the plan keeps for an adapter, float8 where the plan is,
        chunk by chunk (returns True; the adapter then leaves them where they are). Without a
        budget, False: the adapter moves them itself. One adapter at a time."""
        if self.placement is None:
            return False
        for module in modules.values():
            self.placement.adopt("adapter", module)
        return True

    @property
    def generator_device(self) -> str:
        """``"cpu"``, or with ``generator_device="execution"`` the device the models run on."""
        if self.options.get("generator_device") == "execution":
            return str(self.execution_device)
        return "cpu"

    # ------------------------------------------------------------------ loading
    def load(self) -> FluxBackbone:
        if self.pipe is None and self.cpu_offload:
            from adapterswap.backbone import default_device

            device = str(self.device or default_device())
            if not device.startswith("cuda"):
                raise InvalidArgumentError("cpu_offload", True,
                                           f"model CPU offload needs a CUDA device, not {device!r}")
        if self.pipe is None and self.memory_budget is not None:
            self.device = self._budget_device()
        super().load()
        if self.memory_budget is not None and self.placement is None:
            self.place_under_budget()  # after load_pipeline: a LoRA backbone fuses first
        return self

    def load_pipeline(self, source: str, *, local_files_only: bool) -> Any:
        from diffusers import FluxPipeline

        from adapterswap.weights import load_pipeline

        if self.memory_budget is not None:  # an impossible budget refused before reading weights
            from adapterswap.weights import pipeline_root
            from adapterswap_flux.budget import meta_components

            root = pipeline_root(FluxPipeline, source, local_files_only=local_files_only)
            self._memory_plan = self.plan_memory(meta_components(str(root)))
            self._check_keyed_approximations(self._memory_plan)
        components = (self._quantized_components(source, local_files_only)
                      if self.quantize_8bit else {})
        # safetensors only; each component checked against its config (adapterswap.weights)
        pipe = load_pipeline(FluxPipeline, source, what=f"backbone {self.name!r}",
                             dtype=self.dtype, local_files_only=local_files_only,
                             components=components)
        has_guidance = bool(pipe.transformer.config.guidance_embeds)
        if has_guidance != self.expects_guidance_embeds:
            other = "flux-dev" if has_guidance else "flux-schnell"
            raise InvalidArgumentError(
                "source", source,
                f"its transformer {'has' if has_guidance else 'has no'} guidance embedding, "
                f"which is a {other} model; use backbone {other!r}")
        if self.cpu_offload:
            pipe.enable_model_cpu_offload(device=self.device)
        elif self.memory_budget is None:  # a budget places the models in load()
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _quantized_components(self, source: str, local_files_only: bool) -> dict[str, Any]:
        """Transformer and T5 encoder with 8-bit weights (optimum-quanto ``qint8``)."""
        quanto = _import_quanto("quantize_8bit")
        from diffusers import FluxPipeline, FluxTransformer2DModel
        from transformers import T5EncoderModel

        from adapterswap.weights import load_model, pipeline_root

        what = f"backbone {self.name!r}"
        root = pipeline_root(FluxPipeline, source, local_files_only=local_files_only)
        transformer = self.prepare_transformer(
            load_model(FluxTransformer2DModel, root, subfolder="transformer", what=what,
                       dtype=self.dtype))
        text_encoder_2 = load_model(T5EncoderModel, root, subfolder="text_encoder_2",
                                    what=what, dtype=self.dtype)
        for model in (transformer, text_encoder_2):
            quanto.quantize(model, weights=quanto.qint8)
            quanto.freeze(model)
        return {"transformer": transformer, "text_encoder_2": text_encoder_2}

    def prepare_transformer(self, transformer: Any) -> Any:
        """The transformer the 8-bit path loaded, before optimum-quanto freezes its weights:
        as loaded here; a LoRA-distilled backbone merges its LoRA in it (int8 weights take no
        merge; :mod:`adapterswap_flux.distilled`)."""
        return transformer

    def unload(self) -> None:
        self.set_probe(None)
        if self.placement is not None:
            self.placement.remove()  # unhooked, the process cap lifted
            self.placement = None
        super().unload()
        self.clear_caches()

    def to(self, device: str) -> FluxBackbone:
        """Move the pipeline (:meth:`Backbone.to`); under ``memory_budget``, placed on its
        device, it stays there (moving to that same device does nothing)."""
        if self.placement is None:
            super().to(device)
            return self
        from adapterswap.devices import indexed_device

        target, placed = self._budget_device(device), self.placement.device
        if placed.type != "cuda" or indexed_device(target) != placed:
            raise InvalidArgumentError(
                "device", str(device), f"backbone {self.name!r} runs under memory_budget="
                f"{self.memory_budget:g} on {self.device}; load it again to run it elsewhere")
        return self

    def clear_caches(self) -> None:
        self._image_ids.clear()

    def set_probe(self, recorder: Any) -> None:
        """Record the text/image stream RMS ratio (``text/image``) after every double and
        single block while ``recorder`` is set; ``None`` removes the hooks."""
        super().set_probe(recorder)
        if recorder is not None:
            self.require_loaded()
        self._install_probe_hooks(self)

    def _make_probe_hooks(self, backbone: Any) -> Any:
        from adapterswap_flux.probes import stream_probe

        return stream_probe(self.pipe.transformer, self._record_probe)

    def _record_probe(self, block: str, quantity: str, values: Any) -> None:
        if self.probe is not None:
            self.probe.record(block, quantity, values)

    # ------------------------------------------------------------------ pipeline steps
    def encode_prompt(self, prompts: Sequence[str], *, guidance_scale: float | None = None,
                      negative_prompts: Sequence[str] | None = None) -> TensorBundle:
        """CLIP pooled (``pooled_prompt_embeds``, batched), T5 (``prompt_embeds``, batched) and
        ``text_ids`` (shared zeros), as ``FluxPipeline.encode_prompt``."""
        import torch

        from adapterswap.denoise import TensorBundle

        self.require_loaded()
        if negative_prompts is not None:
            raise InvalidArgumentError("negative_prompts", list(negative_prompts),
                                       f"backbone {self.name!r} has no classifier-free guidance")
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidArgumentError("prompts", prompts, "need one or more strings")
        with torch.no_grad(), self.encoding_session():  # evicted encoders visit the GPU
            prompt_embeds, pooled, text_ids = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.execution_device,
                num_images_per_prompt=1, max_sequence_length=self.max_sequence_length)
        return TensorBundle({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled},
                            {"text_ids": text_ids})

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.pipe.vae_scale_factor * 2
        return 2 * (int(height) // factor), 2 * (int(width) // factor)

    def prepare_latents(self, generators: Sequence[torch.Generator], *, height: int,
                        width: int) -> torch.Tensor:
        """Packed noise ``(B, H/16 * W/16, 4C)``: row ``i`` is ``FluxPipeline``'s draw for a
        batch of one with ``generators[i]``."""
        from adapterswap.kit.noise import draw_noise

        self.require_loaded()
        h, w = self._latent_size(height, width)
        channels = self.pipe.transformer.config.in_channels // 4
        device = self.execution_device
        latents = draw_noise(generators, (channels, h, w), device=device, dtype=self.dtype)
        return self.pack_latents(latents)

    @staticmethod
    def pack_latents(latents: torch.Tensor) -> torch.Tensor:
        """VAE latents ``(B, C, H, W)`` as the transformer's image tokens ``(B, H/2 * W/2,
        4C)``: each 2x2 patch one token, channels first within it (FLUX's layout; adapters
        that encode images, such as InfuseNet's control image, pack them with this)."""
        batch, channels, height, width = latents.shape
        patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
        return patches.permute(0, 2, 4, 1, 3, 5).reshape(
            batch, (height // 2) * (width // 2), channels * 4)

    def schedule(self, num_inference_steps: int, *, height: int, width: int) -> Schedule:
        """Timesteps and sigmas of one run, from a scheduler instance of its own."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        from adapterswap.denoise import Schedule
        from adapterswap.fastpath import host_to_device

        self.require_loaded()
        self.check_inputs(num_inference_steps=num_inference_steps, height=height, width=width)
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        config = scheduler.config
        n = num_inference_steps
        sigmas = np.linspace(1.0, 1 / n, n)
        if getattr(config, "use_flow_sigmas", False):
            sigmas = None
        h, w = self._latent_size(height, width)
        mu = calculate_shift((h // 2) * (w // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        if sigmas is None:
            scheduler.set_timesteps(n, device=self.execution_device, mu=mu)
            return Schedule(n, scheduler.timesteps, scheduler.sigmas, scheduler,
                            start_noise=float(scheduler.sigmas[0]))
        # on the host, then queued to the device (no wait for the kernels before), as
        # set_timesteps(device=...) would copy them
        scheduler.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)
        # schedules of every step count start at sigma 1: a sweep computes that step once
        key = ("flow", float(scheduler.sigmas[0]), float(scheduler.timesteps[0]))
        # flow matching: x_t = (1 - sigma) x0 + sigma * noise, so the noise share is sigma
        start_noise = float(scheduler.sigmas[0])
        device = self.execution_device
        scheduler.timesteps = host_to_device(scheduler.timesteps, device)
        scheduler.sigmas = host_to_device(scheduler.sigmas, device)
        return Schedule(n, scheduler.timesteps, scheduler.sigmas, scheduler, key, start_noise)

    def latent_image_ids(self, height: int, width: int) -> torch.Tensor:
        """The image tokens' positional ids ``(H/16 * W/16, 3)`` (cached per size)."""
        key = (int(height), int(width))
        if key not in self._image_ids:
            h, w = self._latent_size(height, width)
            self._image_ids[key] = self.pipe._prepare_latent_image_ids(
                1, h // 2, w // 2, self.execution_device, self.dtype)
        return self._image_ids[key]

    def predict(self, latents: torch.Tensor, ctx: StepContext, prompt: TensorBundle, *,
                guidance_scale: float | None,
                adapter_inputs: FluxDenoiserInputs | None = None) -> torch.Tensor:
        """The transformer's velocity for the batch, each sample at its own timestep, with
        the adapter's :class:`~adapterswap_flux.inputs.FluxDenoiserInputs` (or a mapping of
        its fields) if any."""
        import torch

        from adapterswap_flux.inputs import FluxDenoiserInputs

        self.require_loaded()
        batch = latents.shape[0]
        inputs = FluxDenoiserInputs.coerce(adapter_inputs, backbone=self.name)
        extra = inputs.transformer_kwargs() if inputs is not None else {}
        timestep = torch.as_tensor(ctx.timesteps, device=latents.device).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        if timestep.numel() != batch:
            raise InvalidArgumentError("ctx.timesteps", tuple(timestep.shape),
                                       f"need one timestep per sample (batch of {batch})")
        timestep = timestep.to(latents.dtype)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            if guidance_scale is None:
                raise InvalidArgumentError("guidance_scale", None,
                                           f"backbone {self.name!r} needs an embedded guidance")
            guidance = torch.full([1], guidance_scale, device=latents.device,
                                  dtype=torch.float32).expand(batch)
        with torch.no_grad():
            return self.pipe.transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=prompt["pooled_prompt_embeds"],
                encoder_hidden_states=prompt["prompt_embeds"],
                txt_ids=prompt["text_ids"],
                img_ids=self.latent_image_ids(ctx.height, ctx.width),
                joint_attention_kwargs=extra.pop("joint_attention_kwargs", None),
                return_dict=False,
                **extra,
            )[0]

    def step(self, model_output: torch.Tensor, latents: torch.Tensor, schedule: Schedule,
             step_index: int) -> torch.Tensor:
        """Flow-matching Euler step in float32, cast back (``FlowMatchEulerDiscreteScheduler``)."""
        import torch

        sigma = schedule.sigmas[step_index]
        sigma_next = schedule.sigmas[step_index + 1]
        updated = latents.to(torch.float32) + (sigma_next - sigma) * model_output
        return updated.to(model_output.dtype)

    def predict_x0(self, model_output: torch.Tensor, latents: torch.Tensor, schedule: Schedule,
                   step_index: int) -> torch.Tensor:
        """``x0 = x_t - sigma_t * v`` (float32 arithmetic, in the latents' dtype)."""
        import torch

        sigma = schedule.sigmas[step_index]
        x0 = latents.to(torch.float32) - sigma * model_output.to(torch.float32)
        return x0.to(latents.dtype)

    def decode(self, latents: torch.Tensor, *, height: int, width: int,
               output_type: str = "pil") -> Any:
        """Packed latents to images (``pil``, ``np`` in [0, 1] ``(B, H, W, 3)``, or ``pt``)."""
        import torch

        if output_type not in OUTPUT_TYPES:
            raise InvalidArgumentError("output_type", output_type,
                                       f"choose one of {', '.join(OUTPUT_TYPES)}")
        self.require_loaded()
        vae = self.pipe.vae
        unpacked = self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
        with torch.no_grad():
            image = vae.decode(unpacked.to(self.execution_device), return_dict=False)[0]
        images = self.pipe.image_processor.postprocess(image, output_type=output_type)
        if self.cpu_offload:
            self.pipe.maybe_free_model_hooks()
        return images

    # ------------------------------------------------------------------ presets
    @classmethod
    def random(cls, *, device: str | None = None, dtype: Any = None, seed: int = 0,
               **options: Any) -> FluxBackbone:
        """Random weights at FLUX.1's published size (the ``random`` preset), with
        ``options``; ``cpu_offload`` and ``quantize_8bit`` act while loading, so the preset
        refuses them. With ``memory_budget`` the modules are built on the CPU and placed
        under the budget (:meth:`from_pipeline`)."""
        from adapterswap.backbone import default_device, default_dtype, parse_dtype
        from adapterswap_flux.published import random_flux_pipeline

        options = cls.check_options(options)
        for name in ("cpu_offload", "quantize_8bit"):
            if options.get(name):
                raise InvalidArgumentError(name, True, "the random preset builds its modules "
                                           "in memory; this option acts while loading weights")
        device = device or default_device()
        dtype = parse_dtype(dtype) or default_dtype(device)
        budget = options.get("memory_budget")
        if budget is not None:  # refused off CUDA before building anything
            cls(device=device, **options)._budget_device()
        variant = "dev" if cls.guidance_mode == "embedded" else "schnell"
        pipe, _ = random_flux_pipeline(variant, "cpu" if budget else device, dtype, seed)
        backbone = cls.from_pipeline(pipe, source="random", device=device, **options)
        backbone.dtype = dtype
        return backbone

    @classmethod
    def from_pipeline(cls, pipe: Any, *, source: str = "<in-memory>", device: str | None = None,
                      **options: Any) -> FluxBackbone:
        """Wrap a built pipeline (:meth:`Backbone.from_pipeline`); with ``memory_budget`` the
        pipeline, on the CPU, is placed under the budget on ``device`` (CUDA) instead of moved
        there whole."""
        if options.get("memory_budget") is None:
            return super().from_pipeline(pipe, source=source, device=device, **options)
        from adapterswap.devices import default_device

        backbone = super().from_pipeline(pipe, source=source, device="cpu", **options)
        backbone.device = backbone._budget_device(device or default_device())
        backbone.place_under_budget()
        return backbone

    @classmethod
    def tiny(cls, seed: int = 0, *, cache_dir: str | None = None,
             **options: Any) -> FluxBackbone:
        """A loaded backbone of tiny random FLUX components (adapterswap_flux.tiny), saved in the
        diffusers layout and loaded back through :meth:`load`; 64 x 64 px by default."""
        options = cls.check_options(options)  # before building anything
        import torch

        from adapterswap.presets import tiny_dir
        from adapterswap_flux.tiny import save_tiny_pipeline

        # built on the CPU; under memory_budget placed on the CUDA device (refused without one)
        device = cls(device=None, **options)._budget_device() \
            if options.get("memory_budget") is not None else "cpu"
        path = tiny_dir(cls.name, seed, cache_dir)
        if not path.exists():
            _save_atomically(path, lambda tmp: save_tiny_pipeline(cls.tiny_family, tmp, seed))
        backbone = cls(str(path), device=device, dtype=torch.float32, **options)
        backbone.default_height, backbone.default_width = cls.tiny_size  # what a budget plans
        return backbone.load()


class FluxDev(FluxBackbone):
    """FLUX.1-dev: guidance-distilled, guidance as an embedded input (default 3.5), 28 steps."""

    name = "flux-dev"
    default_source = "black-forest-labs/FLUX.1-dev"
    default_steps = 28
    guidance_mode = "embedded"
    default_guidance_scale = 3.5
    step_grid = (1, 2, 4, 8, 16, 28)
    max_sequence_length = 512
    expects_guidance_embeds = True
    tiny_family = "flux-dev"
    how_to_get = (
        "FLUX.1-dev is gated (FLUX.1 [dev] Non-Commercial License): accept it at "
        "https://huggingface.co/black-forest-labs/FLUX.1-dev, log in with `hf auth login`, "
        "then `hf download black-forest-labs/FLUX.1-dev`, or pass a local "
        "diffusers directory as the source."
    )
    description = "FLUX.1-dev (12B, embedded guidance 3.5, 28 steps, dynamic shift)"


class FluxSchnell(FluxBackbone):
    """FLUX.1-schnell: timestep-distilled, no guidance, 4 steps, shift 1.0."""

    name = "flux-schnell"
    default_source = "black-forest-labs/FLUX.1-schnell"
    default_steps = 4
    guidance_mode = "none"
    default_guidance_scale = None
    step_grid = (1, 2, 3, 4)
    max_sequence_length = 256
    expects_guidance_embeds = False
    tiny_family = "flux-schnell"
    how_to_get = (
        "FLUX.1-schnell is Apache-2.0: `hf download black-forest-labs/FLUX.1-schnell`"
        ", or pass a local diffusers directory as the source."
    )
    description = "FLUX.1-schnell (12B, no guidance, 4 steps, shift 1.0)"


def diffusers_dtype(dtype: Any) -> dict[str, Any]:
    """``from_pretrained`` dtype keyword: ``dtype`` where diffusers has it (it deprecates
    ``torch_dtype``), else ``torch_dtype``."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def transformers_dtype(dtype: Any) -> dict[str, Any]:
    """Likewise for transformers (``dtype`` from 4.56 on)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _import_quanto(argument: str) -> Any:
    try:
        import optimum.quanto as quanto
    except ImportError:
        raise InvalidArgumentError(
            argument, True,
            "8-bit weights need optimum-quanto: pip install 'adapterswap-flux[quantize]'"
        ) from None
    return quanto


def _save_atomically(path: Any, write: Any) -> None:
    """Write a directory through a temporary sibling and rename it into place, so a concurrent
    or interrupted build never leaves a half-written preset behind."""
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write(tmp)
        try:
            tmp.rename(path)
        except OSError:  # someone else finished first
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
