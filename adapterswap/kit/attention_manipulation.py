"""``attention-manipulation``: FastFace's attention manipulation (AM) in an IP-Adapter's
decoupled cross-attention (Karpukhin et al., arXiv 2505.21144).

An IP-Adapter adds to every cross-attention a second attention over the reference's image
tokens, ``softmax(Q K_ip^T / sqrt(d)) V_ip``, scaled and added to the text attention. AM
reshapes that branch's attention weights, per query, after the softmax over the image tokens:

    w' = min(scale * w ** power, clamp)        for the chosen image tokens (``tokens``)

and leaves the other tokens' weights as they are (nothing is renormalised). ``power`` > 1
sharpens the weights towards the tokens a query already attends to; ``scale`` > 1
strengthens the branch. Only the IP branch changes; the text branch, the adapter's per-layer
scales and everything after are diffusers' ``IPAdapterAttnProcessor2_0`` computation.

Options (all optional; defaults are FastFace's published AM setting, ``am_patch_kwargs`` of
``configs/am_only/scalepow.json`` with the ``scales_map`` of ``src/custom_dca.py``):

- ``power``, ``scale``: a number for every chosen part, or one per part in ``parts`` order
  (``parts=down/up,scale=1.55/1.45``). Default FastFace's table: power 1.3 (down, up) and
  1 (mid); scale 1.55 (down), 1 (mid), 1.45 (up).
- ``clamp``: upper bound of a transformed weight (default 10, FastFace's ``UPPER_BOUND``).
- ``parts``: UNet parts whose IP attention is changed, of ``down``, ``mid``, ``up`` (default
  ``down/up``).
- ``tokens``: image token indices, or ``all`` (default; FastFace's 4 FaceID tokens are all).
- ``start``, ``end``: the window, as fractions of each run (the rule of
  :func:`adapterswap.adapter.is_active`; default 0-1, every step as FastFace); ``steps``: step
  indices (``0/1``) a step must also be among. Rows of a step-parallel batch outside the window
  run the adapter's own processors, untouched.

``power = 1, scale = 1`` (in every chosen part) with ``clamp >= 1`` changes nothing: the
neutral setting, which the engine does not install. The transformed weights are computed in
float32 (the image-token map is small) and cast back to the query's dtype. FastFace's other
transforms (softmask, AdaIN, negative-token inversion) are not included. It applies to every
row of a forward, so with classifier-free guidance to the unconditional half too (whose image
embeddings are the adapter's negative ones), as FastFace's patched processor does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.adapter import is_active
from adapterswap.enhancer import Enhancer, PredictCall, check_number
from adapterswap.errors import InvalidArgumentError, UsageError
from adapterswap.kit.am_processor import (
    PARTS,
    _Switch,
    processor_class,
    unet_part,
)

if TYPE_CHECKING:
    import torch

#: FastFace's defaults (``src/custom_dca.py`` ``scales_map``; ``scalepow.json``: down and up).
DEFAULT_PARTS = ("down", "up")
DEFAULT_POWER = {"down": 1.3, "mid": 1.0, "up": 1.3}
DEFAULT_SCALE = {"down": 1.55, "mid": 1.0, "up": 1.45}
DEFAULT_CLAMP = 10.0


class AttentionManipulation(Enhancer):
    """FastFace's attention manipulation: the IP-Adapter branch's attention weights raised to
    ``power``, times ``scale``, clamped, in chosen UNet parts and steps."""

    name = "attention-manipulation"
    description = ("FastFace's attention manipulation: IP-Adapter image-token attention "
                   "weights -> min(scale * w^power, clamp), 1 forward a step")
    option_docs: ClassVar[dict[str, str]] = {
        "power": "exponent of the image-token weights, one number or one per part "
                 "(default 1.3 down and up, 1 mid)",
        "scale": "factor on them, one number or one per part (default 1.55 down, 1 mid, "
                 "1.45 up)",
        "clamp": "upper bound of a transformed weight (default 10)",
        "parts": "UNet parts to change, of down/mid/up (default down/up)",
        "tokens": "image token indices a/b/c, or all (default all)",
        "start": "fraction of the run where it starts acting (default 0)",
        "end": "fraction where it stops (default 1)",
        "steps": "step indices a/b/c it may act at, besides the window (default: any)",
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        for name in ("power", "scale"):
            value = self.options.get(name)
            if isinstance(value, list) and len(value) != len(self.parts):
                raise InvalidArgumentError(
                    name, value, f"give one number, or one per part of parts="
                                 f"{'/'.join(self.parts)} ({len(self.parts)})")
        if self.start >= self.end:
            raise InvalidArgumentError("start", self.start, f"must be less than end={self.end}")
        self._switch = _Switch()
        self._installed: list[tuple[Any, Any]] = []

    @classmethod
    def check_option(cls, name: str, value: Any) -> Any:
        if name in ("power", "scale"):
            checked = check_number(name, value, minimum=0.0, schedule=True)
            if name == "power" and 0.0 in (checked if isinstance(checked, list) else [checked]):
                raise InvalidArgumentError(name, value, "must be > 0")
            return checked
        if name == "clamp":
            checked = check_number(name, value, minimum=0.0)
            if checked == 0:
                raise InvalidArgumentError(name, value, "must be > 0")
            return checked
        if name in ("start", "end"):
            checked = check_number(name, value, minimum=0.0)
            if checked > 1:
                raise InvalidArgumentError(name, value, "must be between 0 and 1")
            return checked
        if name == "parts":
            parts = value if isinstance(value, list) else [value]
            if not parts or any(p not in PARTS for p in parts) or len(set(parts)) < len(parts):
                raise InvalidArgumentError(name, value,
                                           f"give distinct parts of {'/'.join(PARTS)}")
            return list(parts)
        if name == "tokens" and value == "all":
            return value
        if name in ("tokens", "steps"):
            numbers = value if isinstance(value, list) else [value]
            if not numbers or any(isinstance(n, (bool, str)) or not float(n).is_integer()
                                  or n < 0 for n in numbers):
                what = "image token indices, or all" if name == "tokens" else "step indices"
                raise InvalidArgumentError(name, value, f"give integers >= 0 a/b/c: {what}")
            return sorted({int(n) for n in numbers})
        return value

    # ------------------------------------------------------------------ settings
    @property
    def parts(self) -> list[str]:
        return list(self.options.get("parts", DEFAULT_PARTS))

    @property
    def clamp(self) -> float:
        return float(self.options.get("clamp", DEFAULT_CLAMP))

    @property
    def tokens(self) -> list[int] | None:
        tokens = self.options.get("tokens", "all")
        return None if tokens == "all" else list(tokens)

    @property
    def start(self) -> float:
        return float(self.options.get("start", 0.0))

    @property
    def end(self) -> float:
        return float(self.options.get("end", 1.0))

    def part_values(self, part: str) -> tuple[float, float]:
        """``(power, scale)`` in UNet part ``part`` (one of :attr:`parts`)."""
        values = []
        for name, table in (("power", DEFAULT_POWER), ("scale", DEFAULT_SCALE)):
            value = self.options.get(name, table[part])
            values.append(float(value[self.parts.index(part)] if isinstance(value, list)
                                else value))
        return values[0], values[1]

    def is_neutral(self) -> bool:
        return self.clamp >= 1 and all(self.part_values(p) == (1.0, 1.0) for p in self.parts)

    def acts_at(self, step_index: int, num_steps: int) -> bool:
        """Whether it manipulates at ``step_index`` of a run of ``num_steps``."""
        steps = self.options.get("steps")
        return is_active(step_index, num_steps, self.start, self.end) \
            and (steps is None or step_index in steps)

    def first_step_key(self, num_steps: int) -> Any:
        """Whether it acts at step 0 of ``num_steps`` (first steps may be shared only between
        runs where this agrees, like :meth:`Adapter.first_step_key
        <adapterswap.adapter.Adapter.first_step_key>`)."""
        return self.acts_at(0, num_steps)

    def check_adapter(self, adapter_cls: type | None) -> None:
        super().check_adapter(adapter_cls)
        from adapterswap.kit.ip_adapter import DiffusersIPAdapter

        if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, DiffusersIPAdapter)):
            raise InvalidArgumentError(
                "--enhancer", self.spec(),
                "reshapes an IP-Adapter's image-token attention; adapter "
                f"{getattr(adapter_cls, 'name', adapter_cls)!r} is not an IP-Adapter")

    # ------------------------------------------------------------------ lifecycle
    def attach(self, backbone: Any, adapter: Any) -> None:
        """Wrap the attached IP-Adapter's processors in the chosen parts (the wrapped ones
        stay where the adapter keeps them, and come back on :meth:`detach`)."""
        from adapterswap.kit.ip_adapter_install import ip_processors

        if self._installed:
            raise UsageError(f"enhancer {self.name!r} is already attached; detach it first")
        self.check_adapter(None if adapter is None else type(adapter))
        unet = backbone.pipe.unet
        processors = ip_processors(unet)
        if not processors:
            raise UsageError(f"enhancer {self.name!r}: backbone {backbone.name!r} has no "
                             "IP-Adapter attached: attach the adapter first")
        tokens = self.tokens
        if tokens is not None:
            have = min(min(p.num_tokens) for p in processors.values())
            if tokens[-1] >= have:
                raise InvalidArgumentError(
                    "tokens", "/".join(map(str, tokens)),
                    f"adapter {adapter.name!r} has {have} image tokens (0-{have - 1})")
        cls = processor_class()
        super().attach(backbone, adapter)
        try:
            for name, original in processors.items():
                part = unet_part(name)
                if part not in self.parts:
                    continue
                module = unet.get_submodule(name.removesuffix(".processor"))
                power, scale = self.part_values(part)
                module.set_processor(cls(original, self._switch, power=power, scale=scale,
                                         clamp=self.clamp, tokens=tokens))
                self._installed.append((module, original))
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        """Put back the very processor objects :meth:`attach` wrapped."""
        for module, original in reversed(self._installed):
            module.set_processor(original)
        self._installed = []
        self._switch.on = False
        super().detach()

    # ------------------------------------------------------------------ per step
    @contextlib.contextmanager
    def manipulating(self, on: bool = True) -> Iterator[None]:
        """Within it the installed processors manipulate (``on``) or run the plain ones."""
        before, self._switch.on = self._switch.on, on
        try:
            yield
        finally:
            self._switch.on = before

    def predict(self, call: PredictCall) -> torch.Tensor:
        """One forward with the manipulation on for the rows inside the window. When the rows
        of a step-parallel batch disagree, the rows inside and outside run as two forwards
        (each row still takes one), merged back in batch order with their probe values."""
        from adapterswap.kit.rows import merge_rows

        ctx = call.ctx
        mask = [self.acts_at(i, n) for i, n in zip(ctx.step_indices, ctx.num_steps)]
        if all(mask) or not any(mask):
            with self.manipulating(all(mask)):
                return call.forward()
        groups = [[r for r, m in enumerate(mask) if m], [r for r, m in enumerate(mask) if not m]]
        parts, forwards = [], 0
        with _merged_probes((call.backbone, call.adapter), len(mask)) as probes:
            for rows, on in zip(groups, (True, False)):
                probes.rows = rows
                sub = _select_rows(call, rows)
                with self.manipulating(on):
                    parts.append((rows, sub.forward()))
                forwards = max(forwards, sub.forwards)
        call.forwards += forwards
        return merge_rows(parts)


def _select_rows(call: PredictCall, rows: list[int]) -> PredictCall:
    """``call`` restricted to the batch rows ``rows``."""
    from adapterswap.tensors import device_tensor

    batch = call.latents.shape[0]

    def pick(value: Any) -> Any:
        if value is None or not hasattr(value, "index_select"):
            return value if value is None else type(value)(value[r] for r in rows)
        return value.index_select(0, device_tensor(rows, value.device))

    def bundle(value: Any) -> Any:
        return value.select(rows) if value is not None and value.batch_size == batch else value

    ctx = dataclasses.replace(
        call.ctx, timesteps=pick(call.ctx.timesteps), sigmas=pick(call.ctx.sigmas),
        step_indices=tuple(call.ctx.step_indices[r] for r in rows),
        num_steps=tuple(call.ctx.num_steps[r] for r in rows))
    return PredictCall(call.backbone, call.adapter, bundle(call.conditioning),
                       pick(call.latents), ctx, bundle(call.prompt), call.guidance_scale)


class _RowProbes:
    """Stands in for the probe recorders of a backbone and an adapter while a batch runs as
    sub-batches: records of each sub-batch (``rows``) are spread over the whole batch and
    handed on once, in the order first recorded (rows with no record get 0, as an adapter
    records rows outside its window)."""

    def __init__(self, batch: int) -> None:
        self.batch, self.rows = batch, list(range(batch))
        #: ``(id(recorder), block, quantity) -> (recorder, values for the whole batch)``
        self.records: dict[tuple[int, str, str], tuple[Any, list[float]]] = {}

    def recorder(self, real: Any) -> Any:
        collect = self

        class Recorder:
            @property
            def enabled(self) -> bool:
                return real.enabled

            def record(self, block: str, quantity: str, values: Any) -> None:
                if hasattr(values, "detach"):
                    values = values.detach().float().cpu().reshape(-1).tolist()
                _, full = collect.records.setdefault((id(real), block, quantity),
                                                     (real, [0.0] * collect.batch))
                for row, value in zip(collect.rows, values):
                    full[row] = float(value)

        return Recorder()


@contextlib.contextmanager
def _merged_probes(parts: Sequence[Any], batch: int) -> Iterator[_RowProbes]:
    probes = _RowProbes(batch)
    swapped = [(part, part.probe) for part in parts
               if part is not None and getattr(part, "probe", None) is not None]
    for part, real in swapped:
        part.probe = probes.recorder(real)
    try:
        yield probes
    finally:
        for part, real in swapped:
            part.probe = real
    for (_, block, quantity), (real, values) in probes.records.items():
        real.record(block, quantity, values)
