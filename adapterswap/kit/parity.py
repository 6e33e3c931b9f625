"""Parity with the plain diffusers pipeline, the check every backbone plugin's tests make.

The engine runs a backbone's steps itself; for the same weights, seed and settings
:func:`adapterswap.denoise.denoise` must give the image the pipeline's own ``__call__`` gives.
:func:`pipeline_parity` runs both for the same seeds and settings and returns both images and
their largest difference; the test decides the tolerance::

    parity = pipeline_parity(backbone, pipe, "a photo", num_inference_steps=3,
                             guidance_scale=5.0, height=64, width=64)
    np.testing.assert_allclose(parity.ours, parity.theirs, atol=1e-6, rtol=0)

The pipeline is called once per seed with ``torch.Generator().manual_seed(seed)``, which is how
the engine draws each sample's noise (:func:`adapterswap.kit.noise.draw_noise`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from adapterswap.adapter import Adapter
    from adapterswap.backbone import Backbone


@dataclass(frozen=True)
class Parity:
    """Both images of a parity run, ``(seeds, height, width, 3)`` floats in [0, 1].

    :ivar ours: :func:`adapterswap.denoise.denoise`'s images.
    :ivar theirs: the diffusers pipeline's images, in the same seed order.
    :ivar max_abs_diff: the largest absolute pixel difference between the two.
    """

    ours: np.ndarray
    theirs: np.ndarray
    max_abs_diff: float


def pipeline_parity(backbone: Backbone, pipe: Any, prompt: str, *, num_inference_steps: int,
                    seeds: Sequence[int] = (0,), guidance_scale: float | None = None,
                    height: int | None = None, width: int | None = None,
                    adapter: Adapter | None = None, reference: Any = None,
                    **pipeline_kwargs: Any) -> Parity:
    """Run :func:`~adapterswap.denoise.denoise` on ``backbone`` and ``pipe(...)`` for the same
    prompt, seeds, step count, guidance and size, both with ``output_type="np"``.

    ``guidance_scale`` ``None`` means the backbone's default; the pipeline then gets that
    default, or 0 (no guidance) for a backbone without guidance. ``height`` / ``width`` default
    to the backbone's. ``adapter`` and ``reference`` go to ``denoise`` only: set the pipeline's
    own adapter up beforehand and pass its inputs (``ip_adapter_image=...``) as
    ``pipeline_kwargs``.
    """
    import numpy as np
    import torch

    from adapterswap.denoise import denoise

    height = backbone.default_height if height is None else height
    width = backbone.default_width if width is None else width
    ours = denoise(backbone, prompt, num_inference_steps=num_inference_steps, seeds=list(seeds),
                   guidance_scale=guidance_scale, height=height, width=width, adapter=adapter,
                   reference=reference, output_type="np")
    pipeline_guidance = guidance_scale
    if pipeline_guidance is None:
        pipeline_guidance = backbone.resolve_guidance_scale(None)
    theirs = [pipe(prompt, num_inference_steps=num_inference_steps,
                   guidance_scale=0.0 if pipeline_guidance is None else pipeline_guidance,
                   height=height, width=width, generator=torch.Generator().manual_seed(seed),
                   output_type="np", **pipeline_kwargs).images
              for seed in seeds]
    ours_images = np.asarray(ours.images)
    theirs_images = np.concatenate(theirs)
    diff = float(np.abs(ours_images.astype(np.float64) - theirs_images).max())
    return Parity(ours=ours_images, theirs=theirs_images, max_abs_diff=diff)
