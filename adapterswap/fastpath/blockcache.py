"""Caching of slowly changing blocks: an opt-in approximation of the fast path.

Between neighbouring denoising steps most transformer blocks change their residual little. A
block cache runs the first ("head") block at every step and, on a *cached* step, stands the
stored residual of all the other blocks in for running them: the output of the last block
becomes ``head output + stored residual``. Two policies decide which steps are cached:

- ``threshold:T`` (first-block cache, after ParaAttention's FBCache and TeaCache): cache a step
  when the head block's residual moved less than ``T`` (mean absolute change relative to its
  mean absolute value) since the last computed step. Reading that number costs one host
  synchronisation per step, so it does not combine with CUDA graphs.
- ``interval:N``: compute every ``N``-th step (the first always) and cache the others; decided
  on the host from the step index, so it costs no synchronisation.

Adapters that add ControlNet residuals between blocks (InfuseNet) stay live on cached steps:
at a computed step the cache keeps the blocks' residual *without* the adapter's additions,
and on a cached step the transformer adds the adapter's current additions as usual, so the
identity signal is never replayed from an earlier step. (diffusers' own ``FirstBlockCache``
keeps the additions inside the residual and the transformer adds them a second time.)

Outputs change: cells run with a cache get keys of their own, and the fidelity cost must be
measured against the uncached cells on the same inputs (``sweep`` with and without
``--cache``). Supported: denoisers whose backbone declares ``block_cache_layout`` (the names of
a double-stream and a single-stream block list, e.g. the FLUX plugin's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from adapterswap.errors import InvalidArgumentError
from adapterswap.tensors import device_tensor

#: Accepted cache policies (``kind:value``).
POLICIES = ("threshold", "interval")

_HELP = ("write threshold:T (first-block cache: reuse the other blocks while the first block's "
         "residual moved less than T, e.g. threshold:0.1) or interval:N (compute every N-th "
         "step, N >= 2, e.g. interval:2)")

#: The block lists of a joint-attention transformer in diffusers' naming: double-stream blocks
#: take ``hidden_states`` / ``encoder_hidden_states`` and return ``(encoder_hidden_states,
#: hidden_states)``, single-stream blocks follow them, and ControlNet residuals are added
#: between blocks. A backbone declares the names (``Backbone.block_cache_layout``).
JOINT_TRANSFORMER_LAYOUT = ("transformer_blocks", "single_transformer_blocks")


@dataclass(frozen=True)
class CachePolicy:
    """Which steps a :class:`BlockCache` serves from the cache (see the module docstring)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: Any) -> CachePolicy:
        """``"threshold:0.1"`` or ``"interval:2"``; a clear error naming ``cache`` otherwise."""
        if isinstance(text, CachePolicy):
            return text
        if not isinstance(text, str) or text.count(":") != 1:
            raise InvalidArgumentError("cache", text, _HELP)
        kind, raw = (part.strip() for part in text.split(":"))
        if kind not in POLICIES:
            raise InvalidArgumentError("cache", text, _HELP)
        try:
            value = float(raw)
        except ValueError:
            raise InvalidArgumentError("cache", text, _HELP) from None
        if kind == "threshold" and not (math.isfinite(value) and value > 0):
            raise InvalidArgumentError("cache", text, "the threshold must be a number > 0")
        if kind == "interval" and not (value.is_integer() and value >= 2):
            raise InvalidArgumentError("cache", text, "the interval must be an integer >= 2")
        return cls(kind, int(value) if kind == "interval" else value)

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


class BlockCache:
    """A residual cache over a joint-attention transformer's blocks (see the module docstring).

    :meth:`install` wraps each block's ``forward`` (the module tree, its state dict and hooks
    are unchanged); :meth:`remove` restores them. :meth:`reset` starts a new denoising run
    (the loop calls it through ``Accelerator.begin_run``). ``computed`` / ``cached`` count
    the steps of each kind since the cache was made."""

    def __init__(self, denoiser: Any, policy: CachePolicy | str,
                 layout: tuple[str, str] | None = JOINT_TRANSFORMER_LAYOUT) -> None:
        import torch

        self.policy = CachePolicy.parse(policy)
        name = type(denoiser).__name__
        if layout is None:
            raise InvalidArgumentError("cache", str(self.policy),
                                       f"no block cache for a {name}: its backbone declares no "
                                       "block_cache_layout")
        lists = [getattr(denoiser, n, None) for n in layout]
        if not all(isinstance(x, torch.nn.ModuleList) for x in lists):
            raise InvalidArgumentError("cache", str(self.policy),
                                       f"no block cache for a {name}: it has no block lists "
                                       f"{' and '.join(layout)}")
        self.denoiser = denoiser
        self.double, self.single = lists
        self.blocks = list(self.double) + list(self.single)
        if len(self.blocks) < 2:
            raise InvalidArgumentError("cache", str(self.policy),
                                       "the denoiser needs at least two blocks")
        self.computed = self.cached = 0
        self._handle: Any = None
        # the decision runs eagerly inside compiled blocks (its host read would break graphs)
        self._reuse = torch.compiler.disable(self._reuse)  # type: ignore[method-assign]
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the stored residuals: the next call computes every block."""
        self._tick = -1
        self._shape: tuple[int, ...] | None = None
        self._head_residual: Any = None
        self._head_output: Any = None
        self._rest: Any = None  # (hidden residual without adapter additions, encoder residual)
        self._skip = False
        self._samples: tuple[Any, Any, bool] = (None, None, False)

    def keep_rows(self, rows: list[int]) -> None:
        """Rows of the batch finished: keep the stored residuals of the ``rows`` that go on
        (positions in the previous batch), so the next step can still be served from them."""
        if self._shape is None:
            return
        if self._rest is None:
            self._shape = (len(rows), *self._shape[1:])
            return
        index = device_tensor(rows, self._rest[0].device)
        self._rest = tuple(t.index_select(0, index) for t in self._rest)
        if self._head_residual is not None:
            self._head_residual = self._head_residual.index_select(0, index)
        self._shape = (len(rows), *self._shape[1:])

    def stats(self) -> dict[str, Any]:
        return {"policy": str(self.policy), "computed_steps": self.computed,
                "cached_steps": self.cached}

    # ------------------------------------------------------------------ install
    def install(self) -> BlockCache:
        if self._handle is not None:
            return self
        self._handle = self.denoiser.register_forward_pre_hook(self._begin_call,
                                                                with_kwargs=True)
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            block.forward = self._wrap(block.forward, index == 0, index == last)
        return self

    def remove(self) -> None:
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        for block in self.blocks:
            vars(block).pop("forward", None)  # back to the class's forward
        self.reset()

    # ------------------------------------------------------------------ the hooks
    def _begin_call(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Each denoiser call is one step: note the adapter's residuals; a batch shape the
        stored residuals do not fit (other than through :meth:`keep_rows`) drops them."""
        self._tick += 1
        self._samples = (kwargs.get("controlnet_block_samples"),
                         kwargs.get("controlnet_single_block_samples"),
                         bool(kwargs.get("controlnet_blocks_repeat", False)))
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        shape = tuple(hidden.shape) if hidden is not None else None
        if shape != self._shape:
            self._shape = shape
            self._head_residual = self._rest = None

    def _wrap(self, original: Any, is_head: bool, is_tail: bool) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs \
                else args[1]
            if is_head:
                return self._head(original(*args, **kwargs), hidden)
            if self._skip:
                return encoder, hidden
            encoder_out, hidden_out = original(*args, **kwargs)
            if is_tail:
                head_encoder, head_hidden = self._head_output
                self._rest = (hidden_out - head_hidden - self._adapter_additions(),
                              encoder_out - head_encoder)
                self._head_output = None
            return encoder_out, hidden_out

        return forward

    def _head(self, output: tuple[Any, Any], hidden_in: Any) -> tuple[Any, Any]:
        encoder_out, hidden_out = output
        residual = hidden_out - hidden_in
        self._skip = self._rest is not None and self._reuse(residual)
        if self._skip:
            self.cached += 1
            rest_hidden, rest_encoder = self._rest
            return encoder_out + rest_encoder, hidden_out + rest_hidden
        self.computed += 1
        self._head_residual = residual
        self._head_output = (encoder_out, hidden_out)
        return encoder_out, hidden_out

    def _reuse(self, residual: Any) -> bool:
        if self.policy.kind == "interval":
            return self._tick % int(self.policy.value) != 0
        previous = self._head_residual
        change = (residual - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)
        return float(change) < self.policy.value  # the one host sync of this policy

    def _adapter_additions(self) -> Any:
        """What the transformer added between the blocks this step (ControlNet residuals after
        every block but the last, whose addition comes after the tail's output), or 0."""
        double, single, repeat = self._samples
        total: Any = 0
        n_double, n_single = len(self.double), len(self.single)
        for samples, count, is_double in ((double, n_double, True), (single, n_single, False)):
            if not samples:
                continue
            interval = int(math.ceil(count / len(samples)))
            holds_last = not is_double or n_single == 0
            for i in range(count - 1 if holds_last else count):
                index = i % len(samples) if (repeat and is_double) else i // interval
                total = total + samples[index]
        return total
