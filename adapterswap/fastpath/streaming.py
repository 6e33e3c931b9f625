"""Weights that live in host memory and visit the device only while they run.

Two mechanics of a memory budget (:mod:`adapterswap.fastpath.memory`), family-independent:

- :class:`BlockStreamer`: blocks of a module (a denoiser's transformer blocks) whose weights are
  kept in pinned host memory. When block ``i`` starts, its weights are on the device (copied
  ahead of time, else now) and the copy of the next block starts on a side CUDA stream, so it
  overlaps block ``i``'s kernels; when block ``i`` returns, its device copy is dropped. At most
  two blocks are on the device at once: the one running and the one arriving.
- :class:`HostResident`: a whole module (a text encoder) kept in host memory between its runs;
  inside :meth:`HostResident.visiting` its blocks stream through the device as above and the
  rest of its weights (embeddings, final norms) are copied there for the call.

Both swap the tensors a module's parameters and buffers point at, never the module objects, so
hooks, probes, the block cache and compiled code that hold the modules keep working; the copies
are exact, so outputs are bit for bit those of the module left on the device.

Ordering on CUDA: a block's device tensors are allocated on the compute stream (so the
allocator reuses them only after the kernels queued before their release); the side stream
first waits for the compute stream (the memory may be a released block's, still being read),
then copies; the compute stream waits for the copy's event before the block runs.

Testing: ``device="cpu"`` with a ``copy`` function of your own (``copy(dst, src)``) runs the
same hooks synchronously, without streams, so their order and the outputs can be checked on a
machine without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from adapterswap.devices import indexed_device

if TYPE_CHECKING:
    import torch

#: ``copy(dst, src)``: fill the device tensor ``dst`` from the host tensor ``src``.
CopyFn = Callable[[Any, Any], Any]


def copy_tensor(dst: torch.Tensor, src: torch.Tensor) -> None:
    """The default copy: asynchronous from pinned host memory (synchronous otherwise)."""
    dst.copy_(src, non_blocking=True)


class Slot:
    """One parameter or buffer of a module: where it lives between runs (``home``, host
    memory) and how to point the module at another tensor."""

    __slots__ = ("owner", "key", "is_parameter", "home")

    def __init__(self, owner: Any, key: str, is_parameter: bool, home: Any) -> None:
        self.owner, self.key, self.is_parameter, self.home = owner, key, is_parameter, home

    @property
    def current(self) -> Any:
        table = self.owner._parameters if self.is_parameter else self.owner._buffers
        return table[self.key]

    def point_to(self, tensor: Any) -> None:
        """Make the module use ``tensor`` (a parameter keeps its object, only its data moves)."""
        if self.is_parameter:
            self.owner._parameters[self.key].data = tensor
        else:
            self.owner._buffers[self.key] = tensor


def host_slots(module: Any, *, exclude: Sequence[Any] = (), pin: bool = False) -> list[Slot]:
    """The parameters and buffers of ``module`` (each once, also when tied), outside the
    submodules in ``exclude``, moved to host memory (pinned with ``pin``) and pointed at it."""
    import torch

    excluded = {id(sub) for part in exclude for sub in part.modules()}
    seen: set[int] = set()
    slots = []
    for sub in module.modules():
        if id(sub) in excluded:
            continue
        for is_parameter, table in ((True, sub._parameters), (False, sub._buffers)):
            for key, value in table.items():
                if value is None or id(value) in seen:
                    continue
                seen.add(id(value))
                data = value.detach()
                if data.device.type != "cpu" or (pin and not data.is_pinned()):
                    home = torch.empty_like(data, device="cpu", pin_memory=pin)
                    home.copy_(data)
                else:
                    home = data
                slot = Slot(sub, key, is_parameter, home)
                slot.point_to(home)
                slots.append(slot)
    return slots


def outer_blocks(module: Any) -> list[str]:
    """Names of the blocks of ``module``'s outermost lists of more than one block of one class
    (a text encoder's layers: ``encoder.block.0``, ...), in the order they run."""
    from adapterswap.fastpath.compiling import outer_block_lists

    return [f"{name}.{index}" for name, blocks in outer_block_lists(module)
            for index in range(len(blocks))]


def _slots_nbytes(slots: Sequence[Slot]) -> int:
    return sum(s.home.numel() * s.home.element_size() for s in slots)


class BlockStreamer:
    """Stream ``blocks`` (in the order they run) through ``device`` (see the module docstring).

    :param blocks: the modules whose weights stream; each is called at most once per pass, in
        this order (a block skipped by a cache is simply loaded when it next runs).
    :param device: where the blocks run.
    :param copy: ``copy(dst, src)`` (default :func:`copy_tensor`); tests pass their own.
    :param pin: keep the host copies in pinned memory (default: on CUDA), which asynchronous
        copies need.
    :param cyclic: after the last block, prefetch the first for the next call (a denoiser
        runs once per step); ``False`` for a module that runs once in a while (a text
        encoder), so nothing of it stays on the device after its call.

    :ivar loads: how many block copies were made; :ivar waits: how many of them were made
        when the block was already due (no prefetch hid them); :ivar max_loaded: the most
        blocks that were on the device at once.
    """

    def __init__(self, blocks: Sequence[Any], device: Any, *, copy: CopyFn | None = None,
                 pin: bool | None = None, cyclic: bool = True) -> None:

        self.blocks = list(blocks)
        self.device = indexed_device(device)
        self.cyclic = cyclic
        self._copy = copy or copy_tensor
        self._cuda = self.device.type == "cuda"
        self._pin = self._cuda if pin is None else pin
        self._stream: Any = None
        self._slots: list[list[Slot]] = [[] for _ in self.blocks]
        self._loaded: dict[int, Any] = {}  # block index -> copy event (None: synchronous)
        self._handles: list[Any] = []
        self.loads = self.waits = self.max_loaded = 0

    @property
    def block_nbytes(self) -> list[int]:
        """Bytes of each block's weights (what one load copies)."""
        return [_slots_nbytes(slots) for slots in self._slots]

    def install(self) -> BlockStreamer:
        """Move the blocks' weights to host memory and hook the blocks."""
        import torch

        if self._cuda and self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        for index, block in enumerate(self.blocks):
            self._slots[index] = host_slots(block, pin=self._pin)
            enter = torch.compiler.disable(self._enter_hook(index))
            leave = torch.compiler.disable(self._leave_hook(index))
            self._handles.append(block.register_forward_pre_hook(enter))
            self._handles.append(block.register_forward_hook(leave))
        return self

    def remove(self) -> None:
        """Drop every device copy and the hooks; the weights stay in host memory."""
        self.release_all()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def release_all(self) -> None:
        """Drop the device copies (a prefetched block included)."""
        for index in list(self._loaded):
            self._release(index)

    def stats(self) -> dict[str, Any]:
        """Blocks, bytes copied per pass, loads and unhidden loads so far, most on the device."""
        return {"blocks": len(self.blocks), "bytes_per_pass": sum(self.block_nbytes),
                "loads": self.loads, "waits": self.waits, "max_loaded": self.max_loaded}

    # ------------------------------------------------------------------ hooks
    def _enter_hook(self, index: int) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            self.enter(index)
        return hook

    def _leave_hook(self, index: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            self._release(index)
        return hook

    def enter(self, index: int) -> None:
        """Block ``index`` is about to run: its weights on the device (waiting for their copy),
        anything else dropped, and the next block's copy started."""
        for other in [i for i in self._loaded if i != index]:
            self._release(other)  # a stale prefetch (a block was skipped)
        if index not in self._loaded:
            self.waits += 1
            self._load(index)
        event = self._loaded[index]
        if event is not None:
            import torch

            torch.cuda.current_stream(self.device).wait_event(event)
        following = index + 1
        if following == len(self.blocks) and self.cyclic:
            following = 0
        if following < len(self.blocks) and following != index:
            self._load(following)

    def _load(self, index: int) -> None:
        import torch

        slots = self._slots[index]
        targets = [torch.empty_like(slot.home, device=self.device) for slot in slots]
        event = None
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for slot, target in zip(slots, targets):
                    self._copy(target, slot.home)
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            for slot, target in zip(slots, targets):
                self._copy(target, slot.home)
        for slot, target in zip(slots, targets):
            slot.point_to(target)
        self._loaded[index] = event
        self.loads += 1
        self.max_loaded = max(self.max_loaded, len(self._loaded))

    def _release(self, index: int) -> None:
        event = self._loaded.pop(index, None)
        if event is not None:  # a prefetch that never ran: its memory returns to the compute
            import torch  # stream's allocator only after the copy into it has finished

            torch.cuda.current_stream(self.device).wait_event(event)
        for slot in self._slots[index]:
            slot.point_to(slot.home)


class HostResident:
    """``module`` kept in host memory between runs: inside :meth:`visiting` its ``blocks``
    stream through ``device`` (:class:`BlockStreamer`, not cyclic) and its other weights are
    copied there for the call; after it, nothing of it is on the device.

    :param copy: ``copy(dst, src)`` as :class:`BlockStreamer` takes it.
    :param on_visit: called with ``"arrive"`` and ``"leave"`` (logs, tests).
    """

    def __init__(self, module: Any, device: Any, *, blocks: Sequence[Any] = (),
                 copy: CopyFn | None = None, pin: bool | None = None,
                 on_visit: Callable[[str], None] | None = None) -> None:

        self.module = module
        self.device = indexed_device(device)
        self._copy = copy or copy_tensor
        pin = self.device.type == "cuda" if pin is None else pin
        self.streamer = BlockStreamer(blocks, device, copy=copy, pin=pin, cyclic=False)
        self._rest = host_slots(module, exclude=list(blocks), pin=pin)
        self._on_visit = on_visit or (lambda event: None)
        self.streamer.install()
        self.visits = 0

    @property
    def rest_nbytes(self) -> int:
        """Bytes of the weights outside the blocks (on the device for a whole visit)."""
        return _slots_nbytes(self._rest)

    @contextlib.contextmanager
    def visiting(self) -> Iterator[None]:
        """The module runs on the device inside this block and leaves it after."""
        import torch

        targets = [torch.empty_like(slot.home, device=self.device) for slot in self._rest]
        for slot, target in zip(self._rest, targets):
            self._copy(target, slot.home)
            slot.point_to(target)
        del targets
        self.visits += 1
        self._on_visit("arrive")
        try:
            yield
        finally:
            for slot in self._rest:
                slot.point_to(slot.home)
            self.streamer.release_all()
            self._on_visit("leave")

    def remove(self) -> None:
        """Unhook the blocks (the weights stay in host memory)."""
        self.streamer.remove()
