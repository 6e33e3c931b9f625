"""Quiet by default: the chatter of diffusers, transformers and huggingface_hub off.

On every run those libraries print tqdm progress bars ("Writing model shards"), log warnings
about their own internals ("There are modules in UNet2DConditionModel that should be kept in
float32 ...") and raise FutureWarnings about their own deprecations. None of it is something a
user of adapterswap can act on, and it buries what is: our own progress bar, notes and
warnings, which stay. ``adapterswap --verbose ...`` leaves the libraries as they are.

:func:`silenced` switches each library with its own functions (``set_verbosity_error``,
``disable_progress_bar(s)``) as soon as the library is imported, and not before: a command
that never imports it (``adapterswap list``, ``plugins``) imports nothing for this. Python
warnings are filtered by the module they are attributed to: any from outside ``adapterswap*``
is ignored. An environment variable a library reads itself (``HF_HUB_DISABLE_PROGRESS_BARS``,
``TRANSFORMERS_VERBOSITY``, ``DIFFUSERS_VERBOSITY``) wins where the user has set it.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

#: Warnings attributed to a module whose name does not start with this are ignored.
OWN_MODULES = "adapterswap"


@dataclass(frozen=True)
class Switch:
    """One library setting: where its functions live, how to read, silence and restore it.

    :ivar module: the module that defines the library's own switches.
    :ivar env: the library's environment variable for the same setting; when the user has set
        it, it wins and the switch is left alone.
    """

    module: str
    env: str
    read: Callable[[ModuleType], Any]
    silence: Callable[[ModuleType], None]
    restore: Callable[[ModuleType, Any], None]


def _verbosity(module: str, env: str) -> Switch:
    """Logging below ERROR off (``diffusers.utils.logging`` and the like share one API)."""
    return Switch(module, env, read=lambda m: m.get_verbosity(),
                  silence=lambda m: m.set_verbosity_error(),
                  restore=lambda m, level: m.set_verbosity(level))


def _restore_bar(m: ModuleType, enabled: bool) -> None:
    if enabled:
        m.enable_progress_bar()


def _library_bar(module: str) -> Switch:
    """The tqdm bars of diffusers / transformers (``disable_progress_bar``)."""
    return Switch(module, "HF_HUB_DISABLE_PROGRESS_BARS",
                  read=lambda m: m.is_progress_bar_enabled(),
                  silence=lambda m: m.disable_progress_bar(), restore=_restore_bar)


def _restore_hub_bars(m: ModuleType, disabled: bool) -> None:
    # restored last: transformers' enable_progress_bar() turns the hub's bars on too
    if disabled:
        m.disable_progress_bars()
    else:
        m.enable_progress_bars()


SWITCHES: tuple[Switch, ...] = (
    Switch("huggingface_hub.utils.tqdm", "HF_HUB_DISABLE_PROGRESS_BARS",
           read=lambda m: m.are_progress_bars_disabled(),
           silence=lambda m: m.disable_progress_bars(), restore=_restore_hub_bars),
    _verbosity("huggingface_hub.utils.logging", "HF_HUB_VERBOSITY"),
    _verbosity("transformers.utils.logging", "TRANSFORMERS_VERBOSITY"),
    _library_bar("transformers.utils.logging"),
    _verbosity("diffusers.utils.logging", "DIFFUSERS_VERBOSITY"),
    _library_bar("diffusers.utils.logging"),
)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a named module is imported; the module itself is found and
    loaded by the finders that follow this one, unchanged. Inert for every other module."""

    def __init__(self) -> None:
        self.pending: dict[str, list[Callable[[ModuleType], None]]] = {}

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if not self.pending.get(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_call(module: ModuleType) -> None:
            exec_module(module)
            for callback in self.pending.pop(fullname, []):
                callback(module)

        loader.exec_module = exec_then_call  # type: ignore[method-assign]
        return spec


#: The one import hook (installed by the first :func:`silenced` block, then left in place).
_after_import = _AfterImport()


@dataclass
class QuietState:
    """What a :func:`silenced` block changed, to undo it: switches applied (with the value
    before) and switches still waiting for their library's import."""

    applied: list[tuple[Switch, ModuleType, Any]] = field(default_factory=list)
    waiting: list[tuple[str, Callable[[ModuleType], None]]] = field(default_factory=list)


#: The state of the innermost :func:`silenced` block, ``None`` outside one.
_active: QuietState | None = None


def is_quiet() -> bool:
    """True inside :func:`silenced` (a CLI run without ``--verbose``)."""
    return _active is not None


def _apply(switch: Switch, module: ModuleType, state: QuietState) -> None:
    try:
        before = switch.read(module)
        switch.silence(module)
    except Exception:  # noqa: BLE001 - a library that renamed a switch stays as it is
        return
    state.applied.append((switch, module, before))


@contextlib.contextmanager
def silenced() -> Iterator[QuietState]:
    """Third-party progress bars, logging below ERROR and warnings off inside the block (the
    libraries not imported yet are switched when they are); everything restored after."""
    global _active
    state = QuietState()
    if _after_import not in sys.meta_path:
        sys.meta_path.insert(0, _after_import)
    for switch in SWITCHES:
        if switch.env in os.environ:
            continue
        module = sys.modules.get(switch.module)
        if module is not None:
            _apply(switch, module, state)
        else:
            def later(m: ModuleType, switch: Switch = switch) -> None:
                _apply(switch, m, state)

            _after_import.pending.setdefault(switch.module, []).append(later)
            state.waiting.append((switch.module, later))
    previous = _active
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=rf"(?!{OWN_MODULES})")
        _active = state
        try:
            yield state
        finally:
            _active = previous
            for name, callback in state.waiting:
                with contextlib.suppress(ValueError):
                    _after_import.pending.get(name, []).remove(callback)
            for switch, module, before in reversed(state.applied):
                with contextlib.suppress(Exception):
                    switch.restore(module, before)
