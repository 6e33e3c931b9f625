"""Memory budgets: run a pipeline within a card's memory, and say what that costs.

A backbone option ``memory_budget`` (GiB) asks that a pipeline run in that much device memory
without moving weights on and off the device for every image. :func:`plan_memory` meets it with
the first of these that fits, exact ones first:

1. **everything resident** (exact);
2. **encoders evicted** (exact): the text encoders live in pinned host memory and visit the
   device only while they encode, block by block (:class:`~.streaming.HostResident`); prompts
   are encoded once per sweep or ``generate``, so they are gone before the denoiser runs;
3. **float8** (an approximation): besides 2, the large linear layers of the denoiser and of the
   adapters in float8 e4m3 with per-channel weight and per-token activation scales
   (:func:`~.kernels.to_float8`, the fast path's ``fp8``);
4. **streaming** (exact beyond 3): besides 3, some denoiser blocks in pinned host memory,
   each copied on a side CUDA stream while the one before runs (:class:`~.streaming.
   BlockStreamer`). Float8 comes first: it halves the bytes a step copies; on a GPU without
   float8 (compute capability < 8.9) step 3 is skipped and 4 streams 16-bit blocks.

A plan fits when each phase's planned peak (weights on the device + blocks in flight + the
backbone's estimate of the phase's activations: ``encode``, ``denoise``, ``decode``) stays under
the budget less :data:`HEADROOM_SHARE`. No plan fitting is refused before any weight is read,
naming the smallest budget that would do.

**Enforcement.** :class:`Placement` caps the process (``torch.cuda.
set_per_process_memory_fraction``: past it is an out-of-memory error).

**Fidelity.** Steps 1, 2 and 4 change no pixel. Float8 is an approximation (``fp8``, keyed
apart): 47 dB PSNR from bf16 on random FLUX + InfuseNet weights on an H200 (one run each);
measure it on real weights with ``adapterswap compare``.

The backbone plugin supplies its modules as :class:`Part` (:func:`measure`: modules, or their
configs on the meta device), its blocks' stream order, :class:`Activations` and the placing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapterswap.devices import indexed_device
from adapterswap.errors import InvalidArgumentError, UsageError

GIB = 1 << 30
#: Share of the budget left out of the plan: the CUDA context (~0.5 GiB, outside the
#: allocator), cuBLAS/cuDNN workspaces and fragmentation of the caching allocator.
HEADROOM_SHARE = 0.10
#: A linear layer goes float8 when both its sides are at least this and multiples of 16
#: (:func:`~adapterswap.fastpath.kernels.to_float8`'s rule, passed to it explicitly).
FLOAT8_MIN_FEATURES = 1024
#: What a part may be: the denoiser and adapters may go float8, the denoiser's blocks may
#: stream, encoders may be evicted, other parts (a VAE) stay resident as they are.
ROLES = ("denoiser", "adapter", "encoder", "other")
FLOAT8_ROLES = ("denoiser", "adapter")
PHASES = ("encode", "denoise", "decode")


@dataclass(frozen=True)
class Block:
    """A block of a part (``name`` relative to it): bytes as it is and in float8."""

    name: str
    nbytes: int
    float8_nbytes: int

    def size(self, float8: bool) -> int:
        return self.float8_nbytes if float8 else self.nbytes


@dataclass(frozen=True)
class Part:
    """A module of the pipeline as the planner sees it. ``blocks``: the denoiser's streamable
    blocks, first to stream first, or an encoder's (streamed through while it encodes)."""

    name: str
    role: str
    nbytes: int
    float8_nbytes: int
    blocks: tuple[Block, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidArgumentError("role", self.role, f"choose one of {', '.join(ROLES)}")

    def size(self, float8: bool) -> int:
        return self.float8_nbytes if float8 and self.role in FLOAT8_ROLES else self.nbytes

    def rest_nbytes(self) -> int:  # an evicted encoder's bytes present for a whole visit
        """Bytes outside its blocks."""
        return self.nbytes - sum(b.nbytes for b in self.blocks)


def float8_eligible(module: Any) -> bool:
    """Whether :func:`~adapterswap.fastpath.kernels.to_float8` casts ``module`` (at
    :data:`FLOAT8_MIN_FEATURES`)."""
    from adapterswap.fastpath.kernels import float8_eligible as eligible

    return eligible(module, FLOAT8_MIN_FEATURES)


def module_bytes(module: Any, *, dtype_bytes: int | None = None) -> tuple[int, int]:
    """``(bytes, bytes with float8 linears)`` of a module's parameters and buffers; floating
    tensors counted at ``dtype_bytes`` each when given (the run's dtype: sizes of a model built
    on the meta device in float32), others as they are. A float8 linear keeps one byte per
    weight, a float32 scale per output row and its bias."""
    def nbytes(tensor: Any) -> int:
        if dtype_bytes is not None and tensor.is_floating_point() and tensor.element_size() > 1:
            return tensor.numel() * dtype_bytes
        return tensor.numel() * tensor.element_size()

    total = saved = 0
    seen: set[int] = set()
    for sub in module.modules():
        for tensor in (*sub._parameters.values(), *sub._buffers.values()):
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                total += nbytes(tensor)
        if float8_eligible(sub):
            weight = sub.weight
            saved += nbytes(weight) - weight.numel() - 4 * sub.out_features
    return total, total - saved


def measure(name: str, role: str, module: Any, *, blocks: Sequence[str] = (),
            dtype_bytes: int | None = None) -> Part:
    """A :class:`Part` from a module (real or on the meta device); ``blocks``: names of its
    submodules (``"single_transformer_blocks.37"``) in stream order."""
    nbytes, float8 = module_bytes(module, dtype_bytes=dtype_bytes)
    measured = []
    for block in blocks:
        b, f = module_bytes(module.get_submodule(block), dtype_bytes=dtype_bytes)
        measured.append(Block(block, b, f))
    return Part(name, role, nbytes, float8, tuple(measured))


@dataclass(frozen=True)
class Activations:
    """The backbone's estimate of the memory each phase needs beyond the weights, in bytes, at
    the size the plan is made for."""

    encode: int
    denoise: int
    decode: int


@dataclass(frozen=True)
class MemoryPlan:
    """What goes where under a budget (see the module docstring)."""

    budget_gib: float
    limit_bytes: int
    float8: tuple[str, ...]
    streamed: tuple[str, ...]  # "part.block", e.g. "denoiser.single_transformer_blocks.37"
    evicted: tuple[str, ...]
    resident_bytes: int
    window_bytes: int
    peaks: Mapping[str, int]
    parts: tuple[Part, ...] = field(repr=False, default=())

    @property
    def exact(self) -> bool:
        return not self.float8

    def approximations(self) -> list[str]:
        """The approximations this plan switches on, as cell keys name them (``fp8``)."""
        return ["fp8"] if self.float8 else []

    def part(self, name: str) -> Part | None:
        return next((p for p in self.parts if p.name == name), None)

    def streamed_in(self, part: str) -> list[str]:
        """Names (relative to ``part``'s module) of its blocks that stream."""
        return [s[len(part) + 1:] for s in self.streamed if s.startswith(f"{part}.")]

    def to_dict(self) -> dict[str, Any]:
        """The plan for records (JSON): sizes in GiB."""
        return {"budget_gib": self.budget_gib, "limit_gib": _gib(self.limit_bytes),
                "float8": list(self.float8), "streamed": list(self.streamed),
                "evicted": list(self.evicted), "resident_gib": _gib(self.resident_bytes),
                "window_gib": _gib(self.window_bytes), "approximations": self.approximations(),
                "planned_peaks_gib": {k: _gib(v) for k, v in self.peaks.items()}}

    def describe(self) -> str:
        """One line: what the plan does."""
        doing = []
        if self.evicted:
            doing.append(f"{' and '.join(self.evicted)} off the GPU after encoding")
        if self.float8:
            doing.append(f"float8 linears in {' and '.join(self.float8)} (approximation)")
        if self.streamed:
            doing.append(f"{len(self.streamed)} blocks streamed from host memory")
        peak = max(self.peaks.values(), default=0)
        return (f"memory_budget={self.budget_gib:g} GiB: {'; '.join(doing) or 'all resident'}; "
                f"planned peak {_gib(peak):.1f} of {_gib(self.limit_bytes):.1f} GiB")


def _gib(nbytes: int) -> float:
    return round(nbytes / GIB, 3)


def _denoiser_blocks(parts: Sequence[Part]) -> tuple[Part | None, list[Block]]:
    denoiser = next((p for p in parts if p.role == "denoiser"), None)
    return denoiser, list(denoiser.blocks) if denoiser is not None else []


def _peaks(parts: Sequence[Part], act: Activations, *, evict: bool, float8: bool,
           streamed: Sequence[Block]) -> tuple[int, int, dict[str, int]]:
    """Resident bytes, streaming window and each phase's peak of one candidate plan."""
    encoders = [p for p in parts if p.role == "encoder"]
    kept = [p for p in parts if not (evict and p.role == "encoder")]
    largest = max((b.size(float8) for b in streamed), default=0)
    resident = sum(p.size(float8) for p in kept) - sum(b.size(float8) for b in streamed)
    window = 2 * largest  # the block running and the next one arriving
    visiting = 0
    if evict and encoders:  # their other weights for the call, two of their blocks at a time
        visiting = sum(p.rest_nbytes() for p in encoders) + 2 * max(
            (b.nbytes for p in encoders for b in p.blocks), default=0)
    # a cyclic streamer keeps the first block arriving for the next denoiser call
    return resident, window, {"encode": resident + largest + visiting + act.encode,
                              "denoise": resident + window + act.denoise,
                              "decode": resident + largest + act.decode}


def check_budget(value: Any, argument: str = "memory_budget") -> float:
    """A budget is a finite number of GiB > 0; returns it as a float."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(argument, value, "must be a number of GiB > 0, e.g. 24")
    return float(value)


def plan_memory(budget_gib: float, parts: Sequence[Part], activations: Activations, *,
                float8_available: bool = True, headroom: float = HEADROOM_SHARE,
                what: str = "this pipeline") -> MemoryPlan:
    """The first plan of the module docstring's order whose every phase fits; an
    :class:`~adapterswap.errors.InvalidArgumentError` naming the budget and the smallest
    that would do when none fits."""
    budget_gib = check_budget(budget_gib)
    limit = int(budget_gib * GIB * (1 - headroom))
    denoiser, blocks = _denoiser_blocks(parts)
    candidates = [(False, False, 0), (True, False, 0)]  # (evict, float8, blocks streamed)
    if float8_available:
        candidates.append((True, True, 0))
    candidates += [(True, float8_available, k) for k in range(1, len(blocks) + 1)]
    for evict, float8, count in candidates:
        streamed = blocks[:count]
        resident, window, peaks = _peaks(parts, activations, evict=evict, float8=float8,
                                         streamed=streamed)
        if max(peaks.values()) <= limit:
            return MemoryPlan(
                budget_gib, limit,
                tuple(p.name for p in parts if float8 and p.role in FLOAT8_ROLES),
                tuple(f"{denoiser.name}.{b.name}" for b in streamed) if denoiser else (),
                tuple(p.name for p in parts if evict and p.role == "encoder"),
                resident, window, peaks, tuple(parts))
    needed = least_budget_gib(parts, activations, float8_available=float8_available,
                              headroom=headroom)
    how = "float8 linears" if float8_available else \
        "no float8 on this GPU (compute capability < 8.9)"
    raise InvalidArgumentError(
        "memory_budget", budget_gib,
        f"too small for {what}: it needs at least {needed:.3g} GiB with its text encoders off "
        f"the GPU, every block streamed and {how}")


def least_budget_gib(parts: Sequence[Part], activations: Activations, *,
                     float8_available: bool = True, headroom: float = HEADROOM_SHARE) -> float:
    """The smallest budget :func:`plan_memory` meets: encoders evicted, float8 (where
    available) and every denoiser block streamed."""
    blocks = _denoiser_blocks(parts)[1]
    peaks = _peaks(parts, activations, evict=True, float8=float8_available, streamed=blocks)[2]
    return max(peaks.values()) / GIB / (1 - headroom)


# ---------------------------------------------------------------------- enforcement
def cap_process_memory(budget_gib: float, device: Any) -> float:
    """Cap this process's CUDA allocator on ``device`` at the budget
    (``torch.cuda.set_per_process_memory_fraction``), after returning cached blocks, and reset
    the peak counter. Returns the fraction; a budget over the card's memory is refused."""
    import torch

    device = indexed_device(device)
    total = torch.cuda.get_device_properties(device).total_memory
    budget = budget_gib * GIB
    if budget > total:
        raise InvalidArgumentError("memory_budget", budget_gib,
                                   f"is more than the {total / GIB:.1f} GiB of {device}")
    torch.cuda.empty_cache()
    fraction = budget / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    torch.cuda.reset_peak_memory_stats(device)
    return fraction


def move_in_chunks(module: Any, device: Any, *, float8: bool, host: Sequence[Any] = ()) -> int:
    """Move ``module`` to ``device`` one chunk at a time (each block of its block lists, each
    other child), casting large linears to float8 as they arrive, so the device never holds
    more than one chunk in 16 bits beyond what is placed. The blocks in ``host`` go back to
    host memory (pinned on CUDA) right after their cast: they will stream. Returns the layers
    cast."""
    import torch

    from adapterswap.fastpath.kernels import float8_linear_class, to_float8
    from adapterswap.fastpath.streaming import host_slots

    cast = 0
    home = {id(block) for block in host}
    pin = torch.device(device).type == "cuda"

    def visit(parent: Any) -> None:
        nonlocal cast
        for name, child in list(parent.named_children()):
            if id(child) not in home and any(isinstance(m, torch.nn.ModuleList)
                                             for m in child.modules()):
                visit(child)  # a block list, or a module that holds one: block by block
                continue  # (a block that streams is one chunk, whatever it holds)
            child.to(device)
            if float8 and float8_eligible(child):
                setattr(parent, name, float8_linear_class()(child))
                cast += 1
            elif float8:
                cast += to_float8(child, min_features=FLOAT8_MIN_FEATURES)
            if id(child) in home:
                host_slots(child, pin=pin)
        for tensor in parent._parameters.values():
            if tensor is not None:
                tensor.data = tensor.data.to(device)
        for key, tensor in parent._buffers.items():
            if tensor is not None:
                parent._buffers[key] = tensor.to(device)

    visit(module)
    return cast


class Placement:
    """A :class:`MemoryPlan` placed on loaded modules: the resident parts on the device, the
    streamed blocks and the evicted encoders in host memory, the process capped (CUDA).

    :param copy: ``copy(dst, src)`` for streamed and evicted weights (default: asynchronous
        from pinned memory). :param cap: cap the process at the budget (default: on CUDA)."""

    def __init__(self, plan: MemoryPlan, device: Any, *, copy: Any = None,
                 cap: bool | None = None) -> None:
        import torch

        self.plan = plan
        self.device = indexed_device(device)
        self._copy = copy
        self.cuda = self.device.type == "cuda"
        #: what this process already held on the device before placing (the cap counts it)
        self.allocated_before = int(torch.cuda.memory_allocated(self.device)) \
            if self.cuda else None
        self.fraction = cap_process_memory(plan.budget_gib, self.device) \
            if (self.cuda if cap is None else cap) else None
        self.float8_layers: dict[str, int] = {}
        self._encoding = False
        self.streamers: dict[str, Any] = {}
        self.evicted: dict[str, Any] = {}
        #: ``(part, "arrive" | "leave")`` of evicted encoders, in order (logs, tests)
        self.visits: list[tuple[str, str]] = []

    def place(self, name: str, module: Any, *, blocks: Sequence[Any] = ()) -> None:
        """Put part ``name`` where the plan says: evicted (``blocks``: its block list, which
        streams through the device while it runs), or on the device, float8 if planned, its
        planned blocks streaming from host memory."""
        from adapterswap.fastpath.streaming import BlockStreamer, HostResident

        self._reserve(name)  # a part the plan does not know is refused, not placed unplanned
        if name in self.plan.evicted:
            self.evicted[name] = HostResident(
                module, self.device, blocks=blocks, copy=self._copy,
                on_visit=lambda event: self.visits.append((name, event)))
            return
        order = {id(m): i for i, m in enumerate(module.modules())}
        streamed = sorted((module.get_submodule(s) for s in self.plan.streamed_in(name)),
                          key=lambda m: order[id(m)])  # in the order they run
        self.float8_layers[name] = move_in_chunks(module, self.device, host=streamed,
                                                  float8=name in self.plan.float8)
        if streamed:
            self.streamers[name] = BlockStreamer(streamed, self.device,
                                                 copy=self._copy).install()

    def adopt(self, name: str, module: Any) -> int:
        """Place an adapter's module in the room the plan reserved for part ``name`` (float8
        if planned); refused when it is larger than the reserve. Returns the layers cast."""
        reserve, float8 = self._reserve(name), name in self.plan.float8
        actual = module_bytes(module)[1 if float8 else 0]
        if actual > reserve.size(float8) * 1.02:  # 2%: a reserve sized from configs, not it
            raise UsageError(
                f"{name!r} needs {actual / GIB:.2f} GiB on the GPU, more than the "
                f"{reserve.size(float8) / GIB:.2f} GiB memory_budget={self.plan.budget_gib:g} "
                "reserved for it")
        cast = move_in_chunks(module, self.device, float8=float8)
        self.float8_layers[name] = self.float8_layers.get(name, 0) + cast
        return cast

    def _reserve(self, name: str) -> Part:
        if (reserve := self.plan.part(name)) is None:
            raise UsageError(f"the memory plan ({self.plan.describe()}) reserved no room for "
                             f"{name!r}")
        return reserve

    @contextlib.contextmanager
    def encoding(self) -> Iterator[None]:
        """The evicted encoders on the device for the block (they leave at its end); a nested
        block uses the visit in progress."""
        with contextlib.ExitStack() as stack:
            if not self._encoding:
                for resident in self.evicted.values():
                    stack.enter_context(resident.visiting())
                stack.callback(setattr, self, "_encoding", False)
                self._encoding = True
            yield

    def record(self) -> dict[str, Any]:
        """What ran under the budget, for records: the plan, how it was enforced, the float8
        layers, the streaming and the peak ``torch.cuda.max_memory_allocated`` since placing
        (or the caller's last reset; ``None`` off CUDA)."""
        import torch

        peak = int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else None
        before = self.allocated_before
        return {"budget_gib": self.plan.budget_gib, "plan": self.plan.to_dict(),
                "enforced": (f"torch.cuda.set_per_process_memory_fraction({self.fraction:.4f})"
                             if self.fraction is not None else None),
                "float8_layers": dict(self.float8_layers),
                "streaming": {k: s.stats() for k, s in self.streamers.items()},
                "encoder_visits": {k: r.visits for k, r in self.evicted.items()},
                "allocated_before_gib": None if before is None else _gib(before),
                "peak_gib": None if peak is None else _gib(peak)}

    def remove(self) -> None:
        """Unhook streamers and evicted encoders (weights stay put) and lift the cap."""
        import torch

        for streamer in self.streamers.values():
            streamer.remove()
        for resident in self.evicted.values():
            resident.remove()
        self.streamers.clear()
        self.evicted.clear()
        if self.fraction is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            self.fraction = None
