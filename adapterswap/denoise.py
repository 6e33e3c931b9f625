"""Data passed between the engine, backbones and adapters, and the reference denoising loop.

The engine owns the loop (see the README's "Architecture" section): a backbone exposes the
steps of its pipeline and the loop here strings them together exactly as a diffusers pipeline
would. The sweep engine builds on the same pieces (cached encodings, batches of seeds,
per-sample timesteps). The fast path reaches the loop only through the hooks of an
accelerator (:class:`Eager` here, which does nothing;
:class:`adapterswap.fastpath.Accelerator` on a backbone it sped up), so this module does not
import it.

torch is imported lazily so that ``adapterswap --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from adapterswap.adapter import Adapter
    from adapterswap.backbone import Backbone


@dataclass
class TensorBundle:
    """Named tensors for a batch: ``batched`` ones have the batch first, ``shared`` ones do not.

    Prompt encodings and reference conditionings are bundles, so the engine can cache one per
    prompt or reference and combine them into batches without knowing what is inside.
    ``None`` values are allowed in ``batched`` (e.g. an absent negative pooled embedding).
    """

    batched: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Size of the batch dimension (0 if nothing is batched)."""
        for value in self.batched.values():
            if value is not None:
                return int(value.shape[0])
        return 0

    def __getitem__(self, key: str) -> Any:
        if key in self.batched:
            return self.batched[key]
        return self.shared[key]

    def __contains__(self, key: object) -> bool:
        return key in self.batched or key in self.shared

    def get(self, key: str, default: Any = None) -> Any:
        """Like ``dict.get`` over both batched and shared values."""
        return self[key] if key in self else default

    def select(self, indices: Sequence[int]) -> TensorBundle:
        """A bundle with the given batch rows (repeat an index to repeat a row)."""
        from adapterswap.tensors import device_tensor

        def pick(value: Any) -> Any:
            if value is None:
                return None
            return value.index_select(0, device_tensor(indices, value.device))

        return TensorBundle({k: pick(v) for k, v in self.batched.items()}, dict(self.shared))

    def repeat(self, times: int) -> TensorBundle:
        """Each row repeated ``times`` times in place (``[a, b] -> [a, a, b, b]``)."""
        rows = [i for i in range(self.batch_size) for _ in range(times)]
        return self.select(rows)

    @classmethod
    def cat(cls, bundles: Sequence[TensorBundle]) -> TensorBundle:
        """Concatenate bundles along the batch; their shared values must be the same objects
        or equal tensors."""
        import torch

        if not bundles:
            raise ValueError("TensorBundle.cat needs at least one bundle")
        first = bundles[0]
        for other in bundles[1:]:
            if set(other.batched) != set(first.batched) or set(other.shared) != set(first.shared):
                raise ValueError("TensorBundle.cat: bundles have different keys")
            for key, value in first.shared.items():
                theirs = other.shared[key]
                same = value is theirs or (
                    isinstance(value, torch.Tensor) and isinstance(theirs, torch.Tensor)
                    and value.shape == theirs.shape and bool(torch.equal(value, theirs))
                ) or (not isinstance(value, torch.Tensor) and value == theirs)
                if not same:
                    raise ValueError(f"TensorBundle.cat: shared value {key!r} differs")
        batched = {}
        for key in first.batched:
            values = [b.batched[key] for b in bundles]
            if all(v is None for v in values):
                batched[key] = None
            elif any(v is None for v in values):
                raise ValueError(f"TensorBundle.cat: {key!r} is None in some bundles only")
            else:
                batched[key] = torch.cat(values, dim=0)
        return cls(batched, dict(first.shared))

    def merged(self, other: TensorBundle) -> TensorBundle:
        """This bundle's values and ``other``'s side by side (same batch size, no shared key
        names): how per-row draws of :meth:`Adapter.draw_before_latents
        <adapterswap.adapter.Adapter.draw_before_latents>` join the conditioning rows."""
        clash = (set(self.batched) | set(self.shared)) & (set(other.batched) | set(other.shared))
        if clash:
            raise ValueError(f"TensorBundle.merged: both bundles have {sorted(clash)}")
        if self.batched and other.batched and self.batch_size != other.batch_size:
            raise ValueError(f"TensorBundle.merged: {self.batch_size} rows against "
                             f"{other.batch_size}")
        return TensorBundle({**self.batched, **other.batched}, {**self.shared, **other.shared})

    def to(self, device: Any = None, dtype: Any = None) -> TensorBundle:
        """Move floating-point tensors to ``device``/``dtype`` (integer tensors keep dtype)."""
        import torch

        def move(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            if dtype is not None and value.is_floating_point():
                return value.to(device=device, dtype=dtype)
            return value.to(device=device)

        return TensorBundle({k: move(v) for k, v in self.batched.items()},
                            {k: move(v) for k, v in self.shared.items()})


#: A schedule whose first step assumes less noise than this in the denoiser's input
#: (:attr:`Schedule.start_noise`) starts far from the pure noise the engine feeds: its cells
#: measure the schedule, not the step count (:func:`schedule_confounds`).
#:
#: Computed from the published scheduler configs (schedulers need no weights):
#:
#: ===============================  =====================================================
#: schedule                         start_noise at N = 1 / 2 / 3 / 4 / 8 / 28 / 30 / 50
#: ===============================  =====================================================
#: SD1.5 DDIM, leading (card)       0.0413 / 0.8515 / 0.9464 / 0.9717 / 0.9909 / 0.9957 /
#:                                  0.9962 / 0.9971 (t0 = 1, 501, 667, 751, 876, ...)
#: SDXL-base Euler, leading (card)  the same (sigma0 = 0.041 at N = 1 of 14.6)
#: DDIM / Euler, trailing           0.9977 at every N (t0 = 999; SDXL-Lightning's card)
#: DDIM / Euler, linspace           0.0292 at N = 1 (t0 = 0), 0.9977 from N = 2
#: LCM (sd15-lcm)                   0.9977 at every N (t0 = 999)
#: FLUX.1-dev / schnell             1.0 at every N (flow matching starts at sigma 1)
#: ===============================  =====================================================
#:
#: 0.9977 is the most a schedule on SD's training betas can reach (its last timestep keeps
#: ``sqrt(alpha_bar) = 0.068`` of the image); every model-card default starts at 0.996 or
#: more. Below 0.9 (Euler ``sigma0 < 2.06``) the first step assumes the image in its input is
#: at least half as strong as the noise, and at least ~20% of the input's energy: at N = 1 the
#: output is then close to the noise it was given (leading starts at t = 1, linspace at
#: t = 0), at leading N = 2 the run starts mid-schedule (t = 501). 0.9 sits halfway between
#: those (0.03 to 0.85) and the next cell, leading N = 3 (0.946, t = 667), with a margin of
#: about 0.05 on each side; leading N >= 3 skips the top third of the schedule or less and is
#: left unflagged.
FAR_FROM_NOISE = 0.9

#: The confound :func:`schedule_confounds` reports.
SCHEDULE_STARTS_FAR_FROM_NOISE = "schedule_starts_far_from_noise"


@dataclass
class Schedule:
    """The timesteps of one run of ``num_inference_steps`` steps.

    :ivar timesteps: model timesteps, shape ``(N,)``, in the units the denoiser takes.
    :ivar sigmas: noise levels, shape ``(N + 1,)`` ending in 0, where the sampler has them
        (flow matching: ``x_t = (1 - sigma) x0 + sigma * noise``); else ``None``.
    :ivar state: backbone-private per-run state (e.g. a scheduler instance of its own), so that
        runs with different step counts can advance side by side.
    :ivar first_step_key: a hashable host-side value such that two schedules with equal keys
        give the denoiser identical inputs at step 0 from identical latents (same timestep,
        same input scaling), or ``None`` (never assumed). A step-parallel sweep then computes
        the first step once for all step counts of a seed (flow matching: every schedule
        starts at sigma 1).
    :ivar start_noise: the share of noise in the denoiser's input at the first step, as the
        schedule assumes it: 1.0 when it starts from pure noise (the ``x_T`` the engine feeds),
        near 0 when it assumes an almost clean image. Variance-preserving timesteps:
        :func:`start_noise_from_alpha_cumprod`; Euler/Karras sigmas:
        :func:`start_noise_from_sigma`; flow matching: the first sigma. ``None``: unknown.
        See :data:`FAR_FROM_NOISE`.
    """

    num_inference_steps: int
    timesteps: Any
    sigmas: Any = None
    state: Any = None
    first_step_key: Any = None
    start_noise: float | None = None

    def __len__(self) -> int:
        return self.num_inference_steps


def start_noise_from_alpha_cumprod(alpha_cumprod: float) -> float:
    """Noise share of ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` (DDIM, DDPM, LCM at timestep
    ``t``, ``a = alphas_cumprod[t]``): ``sqrt(1 - a)``."""
    return math.sqrt(max(0.0, 1.0 - float(alpha_cumprod)))


def start_noise_from_sigma(sigma: float) -> float:
    """Noise share of the Euler/Karras input ``(x0 + sigma eps) / sqrt(1 + sigma^2)`` (what
    ``scale_model_input`` gives the UNet): ``sigma / sqrt(1 + sigma^2)``, the same number as
    :func:`start_noise_from_alpha_cumprod` at the matching timestep."""
    sigma = float(sigma)
    return sigma / math.sqrt(1.0 + sigma * sigma)


def schedule_confounds(schedule: Schedule) -> list[str]:
    """``["schedule_starts_far_from_noise"]`` when the schedule's first step assumes much
    less noise than the pure noise the engine feeds (``start_noise < FAR_FROM_NOISE``), else
    ``[]`` (also when ``start_noise`` is unknown)."""
    if schedule.start_noise is not None and schedule.start_noise < FAR_FROM_NOISE:
        return [SCHEDULE_STARTS_FAR_FROM_NOISE]
    return []


@dataclass
class StepContext:
    """What a denoiser call needs to know about the step, per sample of the batch.

    Runs with different step counts may share one forward (step-parallel batching), so step
    indices and step counts are per sample.

    :ivar timesteps: model timestep per sample, shape ``(B,)``.
    :ivar step_indices: index of this step in each sample's own schedule.
    :ivar num_steps: each sample's total number of steps.
    :ivar sigmas: noise level per sample ``(B,)`` where the sampler has one, else ``None``.
    :ivar height: image height in pixels.
    :ivar width: image width in pixels.
    """

    timesteps: Any
    step_indices: tuple[int, ...]
    num_steps: tuple[int, ...]
    height: int
    width: int
    sigmas: Any = None

    @property
    def batch_size(self) -> int:
        return len(self.step_indices)


@dataclass
class StepRecord:
    """Passed to ``on_step`` callbacks after each scheduler update."""

    step_index: int
    num_steps: int
    timestep: Any
    latents: Any
    model_output: Any
    x0: Any


@dataclass
class DenoiseResult:
    """Output of :func:`denoise`: final latents, decoded images and per-phase timings."""

    latents: Any
    images: Any
    timings: dict[str, float] = field(default_factory=dict)
    #: denoiser forwards per image (classifier-free guidance's two halves and an enhancer's
    #: extra predictions included)
    forwards: int = 0


class Eager:
    """The loop hooks of plain eager diffusers: each does nothing. :func:`denoise` uses it when
    given no accelerator; :class:`adapterswap.fastpath.Accelerator` has the same hooks (and
    attributes) for a backbone whose fast path it switched on."""

    #: the fast path in force (none) and its block cache (none)
    fast_path: Any = None
    block_cache: Any = None

    def begin_run(self) -> None:
        """Before the first step of new latents."""

    def keep_rows(self, rows: list[int]) -> None:
        """Rows of the batch finished; ``rows`` are the positions of those that go on."""

    def begin_step(self) -> None:
        """Before each step's denoiser calls."""

    def step_context(self) -> Any:
        """Held around the steps: nothing to set up."""
        return contextlib.nullcontext()


#: The accelerator of a backbone run as plain eager diffusers.
EAGER = Eager()


def denoise(
    backbone: Backbone,
    prompt: str | Sequence[str],
    *,
    num_inference_steps: int | None = None,
    seeds: Sequence[int] = (0,),
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    adapter: Adapter | None = None,
    reference: Image.Image | None = None,
    conditioning: TensorBundle | None = None,
    prompt_encoding: TensorBundle | None = None,
    output_type: str = "pil",
    on_step: Callable[[StepRecord], None] | None = None,
    accelerator: Any = None,
    enhancer: Any = None,
) -> DenoiseResult:
    """Generate one image per seed with ``backbone`` (and ``adapter`` if given).

    This is the plain loop: encode once, draw latents from one generator per seed (after the
    adapter's own draws, :meth:`Adapter.draw_before_latents
    <adapterswap.adapter.Adapter.draw_before_latents>`, if it makes any), then for each step
    ask the adapter for its denoiser inputs, predict, and update. It mirrors a diffusers
    pipeline call, and parity tests hold it to one.

    :param prompt: one prompt for every seed, or one prompt per seed.
    :param seeds: one image per seed; seed ``s`` gives the image a diffusers pipeline gives for
        ``generator=torch.Generator(device).manual_seed(s)``.
    :param reference: reference image for the adapter; or pass a cached ``conditioning``.
    :param prompt_encoding: a cached result of ``backbone.encode_prompt`` for these prompts.
    :param on_step: called after every step with a :class:`StepRecord`.
    :param accelerator: the backbone's :class:`~adapterswap.fastpath.Accelerator` (its
        attention kernels, CUDA-graph step marks and block cache act in the loop); ``None``:
        plain eager (:data:`EAGER`). Pass the one that changed the backbone's modules: a block
        cache it installed must be told where runs begin.
    :param enhancer: an :class:`~adapterswap.enhancer.Enhancer` acting on each step (attached
        around the run); neutral settings are not installed (the plain run).
    """
    import time

    import torch

    from adapterswap.errors import InvalidArgumentError

    backbone.require_loaded()
    if num_inference_steps is None:
        num_inference_steps = backbone.default_steps
    height = backbone.default_height if height is None else height
    width = backbone.default_width if width is None else width
    guidance_scale = backbone.resolve_guidance_scale(guidance_scale)
    seeds = list(seeds)
    if not seeds:
        raise InvalidArgumentError("seeds", seeds, "need at least one seed")
    prompts = [prompt] * len(seeds) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(seeds):
        raise InvalidArgumentError(
            "prompt", prompt, f"got {len(prompts)} prompts for {len(seeds)} seeds"
        )
    backbone.check_inputs(num_inference_steps=num_inference_steps, height=height, width=width,
                          guidance_scale=guidance_scale)
    if adapter is not None:
        adapter.check_backbone(backbone)
        if adapter.attached_to is not backbone:
            adapter.attach(backbone)
        if conditioning is None:
            if reference is None:
                raise InvalidArgumentError("reference", None,
                                           f"adapter {adapter.name!r} needs a reference image")
            conditioning = adapter.encode_reference(reference, backbone)
        if conditioning.batch_size == 1 and len(seeds) > 1:
            conditioning = conditioning.repeat(len(seeds))

    from adapterswap.enhancer import predict_step

    if enhancer is not None and enhancer.is_neutral():
        enhancer = None
    if enhancer is not None:
        enhancer.check_adapter(None if adapter is None else type(adapter))
    timings: dict[str, float] = {}
    sync = backbone.synchronize
    sync()
    start = time.perf_counter()
    if prompt_encoding is None:
        unique = list(dict.fromkeys(prompts))
        encoded = backbone.encode_prompt(unique, guidance_scale=guidance_scale)
        prompt_encoding = encoded.select([unique.index(p) for p in prompts])
    elif prompt_encoding.batch_size == 1 and len(seeds) > 1:
        prompt_encoding = prompt_encoding.repeat(len(seeds))
    sync()
    timings["encode_s"] = time.perf_counter() - start

    generators = [torch.Generator(device=backbone.generator_device).manual_seed(int(s))
                  for s in seeds]
    if adapter is not None and conditioning is not None:
        # the adapter's own draws come first where its reference pipeline makes them first
        drawn = adapter.draw_before_latents(generators, backbone, height=height, width=width)
        if drawn is not None:
            conditioning = conditioning.merged(drawn)
    latents = backbone.prepare_latents(generators, height=height, width=width)
    schedule = backbone.schedule(num_inference_steps, height=height, width=width)
    batch = len(seeds)
    start = time.perf_counter()
    hooks = EAGER if accelerator is None else accelerator
    hooks.begin_run()
    forwards = 0
    if enhancer is not None:
        enhancer.attach(backbone, adapter)
    with hooks.step_context(), _detaching(enhancer):
        for i in range(num_inference_steps):
            t = schedule.timesteps[i]
            ctx = StepContext(
                timesteps=t.expand(batch) if t.ndim == 0 else t.repeat(batch),
                step_indices=(i,) * batch,
                num_steps=(num_inference_steps,) * batch,
                height=height,
                width=width,
                sigmas=None if schedule.sigmas is None else schedule.sigmas[i].expand(batch),
            )
            hooks.begin_step()
            model_output, step_forwards = predict_step(
                backbone, adapter, conditioning, latents, ctx, prompt_encoding, guidance_scale,
                enhancer)
            forwards += step_forwards
            x0 = backbone.predict_x0(model_output, latents, schedule, i) if on_step else None
            latents = backbone.step(model_output, latents, schedule, i)
            if on_step is not None:
                on_step(StepRecord(i, num_inference_steps, t, latents, model_output, x0))
    sync()
    timings["denoise_s"] = time.perf_counter() - start
    start = time.perf_counter()
    images = backbone.decode(latents, height=height, width=width, output_type=output_type)
    sync()
    timings["decode_s"] = time.perf_counter() - start
    timings["total_s"] = timings["encode_s"] + timings["denoise_s"] + timings["decode_s"]
    return DenoiseResult(latents=latents, images=images, timings=timings, forwards=forwards)


@contextlib.contextmanager
def _detaching(enhancer: Any) -> Any:
    """Detach ``enhancer`` (if any) when the steps end, also on an error."""
    try:
        yield
    finally:
        if enhancer is not None:
            enhancer.detach()
