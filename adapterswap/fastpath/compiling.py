"""``torch.compile`` in place: a denoiser by regions, blocks or whole, a text encoder block by
block, and the step marks CUDA graphs need.

The :class:`~adapterswap.fastpath.accelerator.Accelerator` picks the mode and scope from the
backbone's :class:`~adapterswap.fastpath.profile.CompileProfile`; these functions only apply
them. Compiling in place (``module.compile``) keeps the module objects, so adapters and probes
that hold them keep working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError
from adapterswap.fastpath.switches import COMPILE_SCOPES

if TYPE_CHECKING:
    import torch


#: Block classes ``scope="blocks"`` compiles: the repeated units of diffusers' UNets.
UNET_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def compile_module(module: torch.nn.Module, mode: str, scope: str,
                   blocks: tuple[str, ...] = UNET_BLOCKS) -> list[str]:
    """``torch.compile`` ``module`` in place and return what was compiled.

    ``scope="regions"`` compiles each block of the module's block lists (``nn.ModuleList``
    children, e.g. FLUX's 19 double and 38 single blocks) instead of the whole forward: blocks of
    one class share the compiled code, so compilation takes seconds instead of minutes for
    almost the same speed (what diffusers calls regional compilation). ``scope="blocks"``
    compiles every submodule whose class is named in ``blocks``, wherever it sits (UNets nest
    their repeated transformer and ResNet blocks inside distinct down/up blocks).
    ``scope="model"`` compiles the whole forward, which CUDA graphs need to remove every
    launch."""
    import torch

    if scope not in COMPILE_SCOPES:
        raise InvalidArgumentError("scope", scope, "choose regions, blocks or model")
    if scope == "blocks":
        counts: dict[str, int] = {}
        for sub in module.modules():
            if type(sub).__name__ in blocks:
                sub.compile(mode=mode)
                counts[type(sub).__name__] = counts.get(type(sub).__name__, 0) + 1
        if counts:
            return [f"{name}[{n}]" for name, n in sorted(counts.items())]
    lists = [] if scope != "regions" else [
        (name, child) for name, child in module.named_children()
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1]
    return _compile_lists(module, lists, mode)


def _compile_lists(module: torch.nn.Module, lists: list[tuple[str, Any]],
                   mode: str) -> list[str]:
    """Compile every block of ``lists`` (name, blocks), or ``module`` whole without any."""
    for _, blocks in lists:
        for block in blocks:
            block.compile(mode=mode)
    if not lists:
        module.compile(mode=mode)
        return ["forward"]
    return [f"{name}[{len(blocks)}]" for name, blocks in lists]


def compile_encoder(module: torch.nn.Module, mode: str = "default") -> list[str]:
    """``torch.compile`` a text encoder in place, block by block: the items of the outermost
    lists of blocks of one class wherever they sit (T5's ``encoder.block``, CLIP's
    ``encoder.layers``: their blocks share one shape, so they share the compiled code), or,
    without any, the whole forward. Returns what was compiled."""
    return _compile_lists(module, outer_block_lists(module), mode)


def outer_block_lists(module: torch.nn.Module) -> list[tuple[str, Any]]:
    """The outermost lists of more than one block of one class under ``module`` (T5's
    ``encoder.block``, CLIP's ``encoder.layers``), by name, in the order they run."""
    import torch

    found: list[tuple[str, Any]] = []
    for name, child in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1 and \
                len({type(block) for block in child}) == 1:
            found.append((name, child))
    return found


def mark_step() -> None:
    """Tell CUDA-graph trees a new step begins (outputs of the previous one may be reused)."""
    import torch

    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if mark is not None:
        mark()
