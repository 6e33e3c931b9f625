"""InfuseNet's ``reproduce`` option: seed and draw exactly as InfiniteYou's own pipeline does.

By default adapterswap's InfuseNet path differs from InfiniteYou's code in how it seeds and
draws (a per-seed CPU generator, the control image's VAE posterior *mean*) and, on schnell, in
the T5 length (256 tokens). Its images are the same as InfiniteYou's once the starting noise and
the control latents are the same, but not for the same *seed*. ``reproduce="infiniteyou"``
removes those differences, so that a seed gives InfiniteYou's image for that seed:

- **Draw order.** ``InfUFluxPipeline.__call__`` calls ``seed_everything(seed)`` (the global
  RNGs) and then ``FluxInfuseNetPipeline`` draws, from the global RNG, first the control image's
  VAE posterior *sample* (``latent_dist.sample()``: ``mean + std * randn``), then the initial
  latents. InfuseNet does the same from each row's own generator
  (:meth:`InfuseNet.draw_before_latents <adapterswap_flux.infusenet.InfuseNet.draw_before_latents>`,
  called by the engine right before the backbone draws ``x_T`` from the same generator).
  On the CPU, the global RNG after ``torch.manual_seed(s)`` is in the state of a fresh
  ``torch.Generator("cpu").manual_seed(s)``, so the draws are InfiniteYou's, and a batch of seeds
  (a sweep) equals the seeds one at a time.
- **Device and dtype of the draws.** On CUDA InfiniteYou draws both from the global CUDA
  generator, in the VAE's dtype (the posterior sample) and the pipeline's dtype (the latents).
  A fresh ``torch.Generator("cuda").manual_seed(s)`` starts in the state
  ``torch.cuda.manual_seed(s)`` leaves the global one in (Philox seed ``s``, offset 0), so the
  backbone option ``generator_device="execution"`` (declared below) makes the engine's
  generators live on the device the models run on, and the draws are made there in those
  dtypes. The test suite runs on the CPU and cannot check this path; it was checked once on
  an H200 (torch 2.11, diffusers 0.42.1): at 864 x 1152 in bf16 and fp32, four seeds drawn as
  one batch equal, bit for bit, the posterior samples and latents that ``seed_everything``
  and InfiniteYou's global draws give.
- **T5 at 512 tokens** on every FLUX backbone (InfiniteYou never passes
  ``max_sequence_length``, so diffusers' default of 512 applies; schnell's own default here is
  256).

- **Sizes and defaults** (:func:`run_defaults`, read by ``generate`` and ``sweep``):
  InfiniteYou's size where none is given (864 wide x 1152 high; the ``tiny`` preset keeps its
  own), 30 steps on flux-dev where none is given (in a sweep: added to the default grid), and
  sizes that are not multiples of 16 rounded down with a note, as diffusers' FLUX pipelines
  round them (the control canvas is then drawn at the rounded size; InfiniteYou draws a
  keypoint canvas at the requested size and resizes it, which differs only with a control
  image at such a size: the black canvas is black at either).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

#: The values of InfuseNet's ``reproduce`` option (``None``: adapterswap's own seeding).
REPRODUCE_CHOICES: tuple[str, ...] = ("infiniteyou",)

#: Backbone options a reproduction needs (:meth:`Adapter.backbone_options
#: <adapterswap.adapter.Adapter.backbone_options>`): InfiniteYou's T5 length, and generators
#: on the device the models run on (the CPU on the CPU, as by default).
INFINITEYOU_BACKBONE_OPTIONS: dict[str, Any] = {
    "max_sequence_length": 512,
    "generator_device": "execution",
}


def check_reproduce(value: Any) -> str | None:
    """The ``reproduce`` option's value (``None`` when not given), or an
    :class:`~adapterswap.errors.InvalidArgumentError` naming the option and the value."""
    if value is None or value in REPRODUCE_CHOICES:
        return value
    raise InvalidArgumentError(
        "reproduce", value, f"choose {' or '.join(repr(c) for c in REPRODUCE_CHOICES)}, or "
        "leave the option out for adapterswap's own seeding")


def backbone_options(adapter_options: Mapping[str, Any]) -> dict[str, Any]:
    """What InfuseNet's options require of the backbone: InfiniteYou's under
    ``reproduce="infiniteyou"``, else nothing."""
    if check_reproduce(adapter_options.get("reproduce")) == "infiniteyou":
        return dict(INFINITEYOU_BACKBONE_OPTIONS)
    return {}


#: InfiniteYou's defaults (``InfUFluxPipeline.__call__`` and its ``test.py``): width 864,
#: height 1152, 30 steps (on FLUX.1-dev, the backbone it runs).
INFINITEYOU_WIDTH, INFINITEYOU_HEIGHT, INFINITEYOU_STEPS = 864, 1152, 30
#: The backbone InfiniteYou's step default belongs to.
INFINITEYOU_BACKBONE = "flux-dev"


def run_defaults(adapter_options: Mapping[str, Any], backbone_cls: Any) -> Any:
    """InfiniteYou's size and step defaults, and its rounding of sizes down to multiples of
    16, under ``reproduce="infiniteyou"`` (a :class:`~adapterswap.run_defaults.RunDefaults`;
    empty otherwise)."""
    from adapterswap.run_defaults import RunDefaults

    if check_reproduce(adapter_options.get("reproduce")) != "infiniteyou":
        return RunDefaults()
    steps = INFINITEYOU_STEPS if getattr(backbone_cls, "name", None) == INFINITEYOU_BACKBONE \
        else None
    return RunDefaults(height=INFINITEYOU_HEIGHT, width=INFINITEYOU_WIDTH, steps=steps,
                       round_size_to=16, why="reproduce='infiniteyou', as InfiniteYou does")


def sample_posterior(generators: Sequence[torch.Generator], mean: torch.Tensor,
                     std: torch.Tensor) -> torch.Tensor:
    """One sample of a diagonal Gaussian posterior ``(1, C, H, W)`` per generator,
    ``(B, C, H, W)``: row ``i`` is ``mean + std * randn`` drawn from ``generators[i]`` alone,
    as diffusers' ``DiagonalGaussianDistribution.sample`` draws one (on the posterior's
    device and in its dtype, unless the generator lives on the CPU: then on the CPU and
    moved, as ``randn_tensor`` does)."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    rows = []
    for generator in generators:
        noise = randn_tensor(tuple(mean.shape), generator=generator, device=mean.device,
                             dtype=mean.dtype)
        rows.append(mean + std * noise)
    return torch.cat(rows)
