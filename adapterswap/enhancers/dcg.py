"""``dcg``: FastFace's decoupled classifier-free guidance (Karpukhin et al., arXiv 2505.21144).

Three predictions per step instead of one: ``e0`` with no text and no identity, ``e_id``
with no text and the adapter acting, ``e_full`` with text and the adapter acting, combined as

    e = e0 + a * (e_id - e0) + b * (e_full - e_id)

so that ``a`` weighs the identity direction and ``b`` the text direction separately. ``a`` and
``b`` may be per-step schedules (``a=1/1.5/1.5/1``: see :func:`adapterswap.enhancer.per_step`).
With ``rescale`` > 0 the combination is rescaled towards the spread of the two conditional
predictions (after Lin et al.'s CFG rescale, arXiv 2305.08891, as FastFace does):
``e *= rescale * (std(e_id) + std(e_full)) / (2 std(e)) + (1 - rescale)``, per image.

"No text" is the backbone's unconditional encoding (:meth:`Backbone.null_prompt
<adapterswap.backbone.Backbone.null_prompt>`); "no identity" is the adapter switched off for the
step (for InfuseNet: no residuals; for an IP-Adapter: its image branch at scale 0). On a
backbone with classifier-free guidance the three predictions replace it (each is one
conditional forward). Guidance embedded in the denoiser (FLUX.1-dev's) is kept in all three.

Defaults are FastFace's published DCG setting for 4-step SDXL backbones
(``configs/dcg_only/dcg2_style.json``): ``a = 1/1.5/1.5/1``, ``b = 1/3/3/1``,
``rescale = 0.75``. ``a = 1, b = 1, rescale = 0`` gives ``e_full`` exactly: the neutral
setting, which the engine does not install (the plain run, bit for bit, CFG included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.enhancer import Enhancer, PredictCall, check_number, per_step
from adapterswap.tensors import device_tensor

if TYPE_CHECKING:
    import torch

#: FastFace's DCG defaults (dcg2_style.json: 4-step Hyper-SDXL, decoupled type 3).
DEFAULT_A = [1.0, 1.5, 1.5, 1.0]
DEFAULT_B = [1.0, 3.0, 3.0, 1.0]
DEFAULT_RESCALE = 0.75


class DecoupledGuidance(Enhancer):
    """FastFace's decoupled classifier-free guidance: identity and text directions weighted
    apart, per step, with an optional rescale."""

    name = "dcg"
    description = ("FastFace's decoupled guidance: e0 + a (e_id - e0) + b (e_full - e_id), "
                   "3 forwards a step")
    option_docs: ClassVar[dict[str, str]] = {
        "a": "identity weight, a number or a per-step list a/b/c (default 1/1.5/1.5/1)",
        "b": "text weight, a number or a per-step list (default 1/3/3/1)",
        "rescale": "0-1: how far to rescale towards the conditional predictions' spread "
                   "(default 0.75; 0 = off)",
    }
    forwards_per_step = 3

    @classmethod
    def check_option(cls, name: str, value: Any) -> Any:
        if name in ("a", "b"):
            return check_number(name, value, schedule=True)
        value = check_number(name, value, minimum=0.0)
        if value > 1:
            from adapterswap.errors import InvalidArgumentError

            raise InvalidArgumentError(name, value, "must be between 0 and 1")
        return value

    @property
    def a(self) -> Any:
        return self.options.get("a", DEFAULT_A)

    @property
    def b(self) -> Any:
        return self.options.get("b", DEFAULT_B)

    @property
    def rescale(self) -> float:
        return float(self.options.get("rescale", DEFAULT_RESCALE))

    def _neutral_at(self, step_index: int, num_steps: int) -> bool:
        return (self.rescale == 0 and per_step(self.a, step_index, num_steps) == 1.0
                and per_step(self.b, step_index, num_steps) == 1.0)

    def is_neutral(self) -> bool:
        values = [v for w in (self.a, self.b) for v in (w if isinstance(w, list) else [w])]
        return self.rescale == 0 and all(v == 1.0 for v in values)

    def forwards_at(self, step_index: int, num_steps: int) -> int:
        return 1 if self._neutral_at(step_index, num_steps) else 3

    def predict(self, call: PredictCall) -> torch.Tensor:
        """Per row its own ``a`` and ``b`` (rows of a step-parallel batch may run different
        step counts); a step where every row is neutral costs one unguided forward."""

        ctx = call.ctx
        rows = list(zip(ctx.step_indices, ctx.num_steps))
        if all(self._neutral_at(i, n) for i, n in rows):
            return call.forward(guided=False)
        e0 = call.forward(text=False, identity=False, guided=False)
        e_id = call.forward(text=False, identity=True, guided=False)
        e_full = call.forward(text=True, identity=True, guided=False)
        shape = (-1,) + (1,) * (e_full.ndim - 1)

        def weights(value: Any) -> torch.Tensor:  # made once per schedule: no copy per step
            return device_tensor([per_step(value, i, n) for i, n in rows], e_full.device,
                                 e_full.dtype).reshape(shape)

        pred = e0 + weights(self.a) * (e_id - e0) + weights(self.b) * (e_full - e_id)
        if self.rescale > 0:
            def spread(t: torch.Tensor) -> torch.Tensor:
                return t.flatten(1).std(dim=1).reshape(shape)

            factor = (spread(e_id) + spread(e_full)) / (2 * spread(pred))
            pred = pred * (self.rescale * factor + (1 - self.rescale))
        return pred
