"""Noise the way diffusers pipelines draw it: the initial latents and, for schedulers that add
fresh noise at every step, the generator each sample's step noise comes from.

* :func:`draw_noise` draws one row per generator, as a pipeline called once per seed would, so
  a batch of seeds gives the same starting latents as that many single-seed pipeline calls.
* :class:`SampleGenerators` keeps, for samplers whose ``step`` draws noise (LCM, ancestral
  Euler, DDPM; see :func:`adapterswap.kit.schedules.injects_noise`), the generator each latent
  row belongs to, so the step noise is the next draw of the generator that drew that sample's
  initial noise, as in the pipeline.

torch and diffusers are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError, UsageError

if TYPE_CHECKING:
    import torch


def draw_noise(generators: Sequence[torch.Generator], shape: Sequence[int], *, device: Any,
               dtype: Any) -> torch.Tensor:
    """One noise row per generator, as diffusers' ``randn_tensor`` draws a batch of one
    (what a pipeline called once per seed would draw). Generators on the CPU draw on the host
    and the noise is queued to ``device`` (:func:`adapterswap.fastpath.host_to_device`)."""
    from diffusers.utils.torch_utils import randn_tensor

    from adapterswap.fastpath import host_to_device

    generators = list(generators)
    if not generators:
        raise InvalidArgumentError("generators", generators, "need at least one generator")
    if all(g.device.type == "cpu" for g in generators):  # drawn on the host either way
        noise = randn_tensor((len(generators), *shape), generator=generators, device="cpu",
                             dtype=dtype)
        return host_to_device(noise, device)
    return randn_tensor((len(generators), *shape), generator=generators, device=device,
                        dtype=dtype)


class SampleGenerators:
    """Which generator each latent row belongs to, for schedulers that draw noise at every
    step (LCM): diffusers passes the pipeline's generator to ``scheduler.step``, so a sample's
    step noise is the next draw of the generator that drew its initial noise.

    ``Backbone.step`` receives rows, not sample ids (the engine steps whichever rows share a
    schedule), so rows are recognised by their exact bytes: ``prepare_latents`` registers each
    noise row with its generator, each ``step`` looks its input rows up and registers its
    output rows. Identical rows (a repeated seed) have generators in identical states, so any
    of them serves. At most ``capacity`` rows are remembered (oldest dropped first).
    """

    def __init__(self, capacity: int = 4096) -> None:
        from collections import OrderedDict

        self.capacity = capacity
        self._rows: OrderedDict[bytes, list[Any]] = OrderedDict()

    @staticmethod
    def key(row: torch.Tensor) -> bytes:
        """A digest of the row's exact bytes (dtype included through the byte view)."""
        import hashlib

        import torch

        data = row.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
        return hashlib.blake2b(data, digest_size=16).digest()

    def add(self, rows: torch.Tensor, generators: Sequence[Any]) -> None:
        """Remember ``generators[i]`` as the source of ``rows[i]``'s next step noise."""
        for row, generator in zip(rows, generators):
            self._rows.setdefault(self.key(row), []).append(generator)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def take(self, rows: torch.Tensor, backbone: str) -> list[Any]:
        """The generator of each row (forgotten once taken: the step's output rows are
        registered anew); :class:`~adapterswap.errors.UsageError` naming ``backbone`` when a
        row did not come from ``prepare_latents`` or ``step``."""
        keys = [self.key(row) for row in rows]
        if any(not self._rows.get(k) for k in keys):
            raise UsageError(
                f"backbone {backbone!r}: its scheduler draws noise at every step from the "
                "generator that drew each sample, but these latents did not come from its "
                "prepare_latents or step; start from prepare_latents")
        generators = []
        for k in keys:
            generators.append(self._rows[k].pop())
            if not self._rows[k]:
                del self._rows[k]
        return generators
