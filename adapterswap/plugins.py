"""The plugin manager: entry-point discovery, lazy loading and the three registries.

Plugins are found through the ``adapterswap`` entry-point group. Loading happens on first use
(``backbones()``, ``adapters()``, ``metrics()``, ``plugin_infos()``) and can be limited with the
environment variable ``ADAPTERSWAP_LOAD_PLUGINS``:

* unset: load every installed plugin;
* a comma-separated list: load only those distributions (``adapterswap-flux``) or entry-point
  names (``flux``);
* empty: load none (adapterswap's own built-in metrics are always there).

A name in the list that no installed plugin has (a typo) loads nothing; it is reported by
:func:`selection_warnings` with a suggestion and the installed names.

A plugin that fails to import, has a misspelt hook, raises inside a hook or registers something
invalid is recorded in :func:`plugin_failures` under its own name; the rest keep working.

Hooks are called through pluggy, one plugin at a time (:func:`call_each_plugin`), so hook
wrappers (``hookwrapper=True`` / ``wrapper=True``) and pluggy's tracing see every call while a
failing implementation is still charged to its own plugin. With ``ADAPTERSWAP_TRACE_PLUGINS=1``
each hook call is written to stderr.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from adapterswap import hookspecs
from adapterswap.errors import AdapterswapError, PluginLoadError
from adapterswap.registry import Registry

ENTRY_POINT_GROUP = "adapterswap"
LOAD_PLUGINS_ENV = "ADAPTERSWAP_LOAD_PLUGINS"
TRACE_PLUGINS_ENV = "ADAPTERSWAP_TRACE_PLUGINS"

#: Modules inside adapterswap that are registered as plugins before any entry point.
DEFAULT_PLUGINS = ("adapterswap.metrics.basic", "adapterswap.enhancers")

#: The hooks that fill the four registries (``register_commands`` is the CLI's:
#: :mod:`adapterswap.cli.common`).
HOOKS = ("register_backbones", "register_adapters", "register_metrics", "register_enhancers")

pm = pluggy.PluginManager("adapterswap")
pm.add_hookspecs(hookspecs)

_loaded = False
_untrace: Callable[[], None] | None = None  # undoes pluggy's tracing while it is on


@dataclass
class PluginFailure:
    """A plugin that could not be loaded or whose hook failed."""

    plugin: str
    entry_point: str | None
    error: BaseException
    traceback: str

    def message(self) -> str:
        where = f" (entry point {self.entry_point})" if self.entry_point else ""
        return f'Error loading plugin "{self.plugin}"{where}: {self.error}'


@dataclass
class PluginInfo:
    """What ``adapterswap plugins`` shows about one plugin."""

    name: str
    distribution: str | None
    version: str | None
    hooks: list[str]
    backbones: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    enhancers: list[str] = field(default_factory=list)


_failures: list[PluginFailure] = []
_selection_warnings: list[str] = []
_dists: dict[str, tuple[str, str, str]] = {}  # plugin name -> (distribution, version, entry point)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _selected(env_value: str | None, dist_name: str, ep_name: str) -> bool:
    if env_value is None:
        return True
    wanted = {_normalise(p) for p in env_value.split(",") if p.strip()}
    return _normalise(dist_name) in wanted or _normalise(ep_name) in wanted


def _register_checked(module: object, name: str, entry_point: str | None) -> bool:
    """Register one plugin; on a validation error undo it and record the failure."""
    try:
        pm.register(module, name=name)
        pm.check_pending()
    except Exception as exc:  # pluggy.PluginValidationError and friends
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
        _record(name, entry_point, exc)
        return False
    return True


def _record(plugin: str, entry_point: str | None, exc: BaseException) -> None:
    failure = PluginFailure(plugin, entry_point, exc, "".join(traceback.format_exception(exc)))
    _failures.append(failure)


def _trace_to_stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _configure_tracing() -> None:
    """Turn pluggy's hook-call tracing on (to stderr) or off, as ``ADAPTERSWAP_TRACE_PLUGINS``
    says: any value but empty, ``0``, ``false`` or ``no`` turns it on."""
    global _untrace
    wanted = os.environ.get(TRACE_PLUGINS_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if wanted and _untrace is None:
        pm.trace.root.setwriter(_trace_to_stderr)
        _untrace = pm.enable_tracing()
    elif not wanted and _untrace is not None:
        _untrace()
        pm.trace.root.setwriter(None)
        _untrace = None


def load_plugins() -> None:
    """Register the built-in plugins and every selected entry point, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    _configure_tracing()
    for module_name in DEFAULT_PLUGINS:
        if pm.get_plugin(module_name) is None:
            _register_checked(importlib.import_module(module_name), module_name, None)
    env_value = os.environ.get(LOAD_PLUGINS_ENV)
    entry_points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    _selection_warnings[:] = _unknown_selection(env_value, entry_points)
    for ep in entry_points:
        dist = ep.dist.name if ep.dist is not None else ep.module
        version = ep.dist.version if ep.dist is not None else "unknown"
        if not _selected(env_value, dist, ep.name):
            continue
        name = dist if pm.get_plugin(dist) is None and dist not in _dists else f"{dist}:{ep.name}"
        if pm.get_plugin(name) is not None:
            continue
        try:
            module = ep.load()
        except Exception as exc:
            _record(name, ep.name, exc)
            continue
        if _register_checked(module, name, ep.name):
            _dists[name] = (dist, version, ep.name)


def _unknown_selection(env_value: str | None, entry_points: list[Any]) -> list[str]:
    """One warning per name in ``ADAPTERSWAP_LOAD_PLUGINS`` that no installed plugin has."""
    if env_value is None:
        return []
    names: list[str] = []  # distribution and entry-point names, as installed
    listed: dict[str, list[str]] = {}  # distribution -> its entry-point names
    for ep in entry_points:
        dist = ep.dist.name if ep.dist is not None else ep.module
        names += [dist, ep.name]
        listed.setdefault(dist, []).append(ep.name)
    known = {_normalise(n) for n in names} | {"adapterswap"}  # the core always loads
    shown = ", ".join(f"{dist} ({', '.join(eps)})" for dist, eps in sorted(listed.items()))
    warnings = []
    for name in (part.strip() for part in env_value.split(",")):
        if not name or _normalise(name) in known:
            continue
        message = (f"{LOAD_PLUGINS_ENV} names {name!r}, which no installed plugin has "
                   "(distribution or entry-point name), so it loads nothing.")
        close = difflib.get_close_matches(name, sorted(set(names)), n=1, cutoff=0.6)
        if close:
            message += f" Did you mean {close[0]!r}?"
        message += f" Installed: {shown}" if shown else " No plugins are installed."
        warnings.append(message)
    return warnings


def selection_warnings() -> list[str]:
    """Warnings about ``ADAPTERSWAP_LOAD_PLUGINS`` naming plugins that are not installed."""
    load_plugins()
    return list(_selection_warnings)


def plugin_failures() -> list[PluginFailure]:
    """Plugins that failed to load or register, in the order they failed."""
    _registries()
    return list(_failures)


@dataclass
class HookCall:
    """One plugin's implementation of a hook, called through pluggy: the arguments it got and
    the exception it raised (``None`` when it returned)."""

    plugin: str
    kwargs: dict[str, Any]
    error: Exception | None = None


def call_each_plugin(hook_name: str,
                     kwargs_for: Callable[[str], dict[str, Any]]) -> list[HookCall]:
    """Call hook ``hook_name`` once per plugin that implements it, in registration order,
    through pluggy, so that one plugin's failure stays its own.

    Each call goes through :meth:`pluggy.PluginManager.subset_hook_caller` with every *other*
    plugin's plain implementation removed: the plugin's implementation runs inside every
    registered wrapper (``hookwrapper=True`` / ``wrapper=True``, from any plugin that has no
    plain implementation of the hook), and pluggy's tracing sees the call. An exception is
    returned in the plugin's :class:`HookCall`, not raised; one raised by a wrapper is charged
    to the plugin being called.

    :param kwargs_for: the hook's arguments for the plugin of a given name (fresh per plugin,
        so a callback can tell who called it).
    """
    load_plugins()
    plain = [impl for impl in getattr(pm.hook, hook_name).get_hookimpls()
             if not (impl.wrapper or impl.hookwrapper)]
    providers = {impl.plugin_name: impl.plugin for impl in plain}
    calls = []
    for name in providers:
        others = [plugin for other, plugin in providers.items() if other != name]
        call = HookCall(name, kwargs_for(name))
        try:
            pm.subset_hook_caller(hook_name, remove_plugins=others)(**call.kwargs)
        except Exception as exc:  # noqa: BLE001 - any plugin bug is recorded, never raised
            call.error = exc
        calls.append(call)
    return calls


def _record_hook_failure(plugin: str, hook_name: str, exc: Exception) -> None:
    """Record that ``plugin``'s ``hook_name`` raised ``exc`` (shown by :func:`plugin_failures`
    until the set of plugins changes)."""
    if not isinstance(exc, AdapterswapError):
        exc = PluginLoadError(f"hook {hook_name} raised {type(exc).__name__}: {exc}")
    exc._from_hook = True  # type: ignore[attr-defined]
    _record(plugin, None, exc)


class _Register:
    """The ``register`` callback of one plugin's ``register_*`` hook: adds classes to one
    registry under that plugin's name and remembers their names (for ``adapterswap plugins``).
    Its text names the registry and the plugin, which is what a hook trace shows."""

    def __init__(self, registry: Registry[Any], plugin: str) -> None:
        self.registry = registry
        self.plugin = plugin
        self.added: list[str] = []

    def __call__(self, cls: object) -> None:
        self.registry.register(cls, self.plugin)
        self.added.append(getattr(cls, "name", "?"))

    def __repr__(self) -> str:
        return f"<register {self.registry.kind} for plugin {self.plugin!r}>"


_cache: dict[str, Any] = {"key": None}
#: Bumped by every (un)registration made through this module, so that a new plugin object
#: reusing a freed one's id never makes a cache look current.
_generation = 0


def plugin_set_key() -> tuple[Any, ...]:
    """A value that changes whenever the set of registered plugins changes (loads them first):
    what caches of hook results are keyed on."""
    load_plugins()
    return (_generation, tuple((name, id(plugin)) for name, plugin in pm.list_name_plugin()))


def _registries() -> dict[str, Registry[Any]]:
    """Build (or reuse) the registries from the currently registered plugins."""
    key = plugin_set_key()
    if _cache["key"] == key:
        return _cache["registries"]
    from adapterswap.adapter import Adapter
    from adapterswap.backbone import Backbone
    from adapterswap.enhancer import Enhancer
    from adapterswap.metrics.base import Metric

    registries: dict[str, Registry[Any]] = {
        "register_backbones": Registry("backbone", Backbone),
        "register_adapters": Registry("adapter", Adapter),
        "register_metrics": Registry("metric", Metric),
        "register_enhancers": Registry("enhancer", Enhancer),
    }
    # Failures from hooks depend on the plugins registered now: drop earlier hook failures.
    _failures[:] = [f for f in _failures if not getattr(f.error, "_from_hook", False)]
    provided: dict[str, dict[str, list[str]]] = {}
    for hook_name, registry in registries.items():
        for call in call_each_plugin(
                hook_name, lambda plugin, r=registry: {"register": _Register(r, plugin)}):
            if call.error is not None:
                _record_hook_failure(call.plugin, hook_name, call.error)
            added = call.kwargs["register"].added
            provided.setdefault(call.plugin, {}).setdefault(hook_name, []).extend(added)
    _cache.update(key=key, registries=registries, provided=provided)
    return registries


def backbones() -> Registry[Any]:
    """The registry of backbone classes."""
    return _registries()["register_backbones"]


def adapters() -> Registry[Any]:
    """The registry of adapter classes."""
    return _registries()["register_adapters"]


def metrics() -> Registry[Any]:
    """The registry of metric classes."""
    return _registries()["register_metrics"]


def enhancers() -> Registry[Any]:
    """The registry of enhancer classes."""
    return _registries()["register_enhancers"]


def get_enhancer(name: str) -> type:
    """The enhancer class registered as ``name`` (with a suggestion if unknown)."""
    return enhancers().get(name)


def get_backbone(name: str) -> type:
    """The backbone class registered as ``name`` (with a suggestion if unknown)."""
    return backbones().get(name)


def get_adapter(name: str) -> type:
    """The adapter class registered as ``name`` (with a suggestion if unknown)."""
    return adapters().get(name)


def get_metric(name: str) -> type:
    """The metric class registered as ``name`` (with a suggestion if unknown)."""
    return metrics().get(name)


def plugin_infos() -> list[PluginInfo]:
    """One :class:`PluginInfo` per registered plugin: distribution, version, hooks, names."""
    _registries()
    provided = _cache["provided"]
    infos = []
    for name, plugin in pm.list_name_plugin():
        dist, version, _ = _dists.get(name, (None, None, None))
        if dist is None and name.startswith("adapterswap."):
            from adapterswap import __version__

            dist, version = "adapterswap", __version__
        hooks = sorted(impl.name for impl in _hookimpls_of(plugin))
        given = provided.get(name, {})
        infos.append(PluginInfo(
            name=name, distribution=dist, version=version, hooks=hooks,
            backbones=sorted(given.get("register_backbones", [])),
            adapters=sorted(given.get("register_adapters", [])),
            metrics=sorted(given.get("register_metrics", [])),
            enhancers=sorted(given.get("register_enhancers", [])),
        ))
    return infos


def _hookimpls_of(plugin: object) -> list[Any]:
    callers = pm.get_hookcallers(plugin) or []
    return list(callers)


def register_plugin(plugin: object, name: str) -> None:
    """Register a plugin object directly (tests, notebooks); raises on a bad hook."""
    global _generation
    load_plugins()
    _generation += 1
    pm.register(plugin, name=name)
    pm.check_pending()


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    global _generation
    _generation += 1
    if pm.get_plugin(name) is not None:
        pm.unregister(name=name)


def reset() -> None:
    """Forget every loaded plugin and failure so the next use loads again (tests)."""
    global _loaded
    for name, _ in list(pm.list_name_plugin()):
        pm.unregister(name=name)
    _failures.clear()
    _selection_warnings.clear()
    _dists.clear()
    _cache.clear()
    _cache["key"] = None
    _loaded = False


def warn_failures(echo: Callable[[str], None] | None = None) -> None:
    """Print one line per failed plugin to stderr (the CLI calls this)."""
    echo = echo or (lambda line: print(line, file=sys.stderr))
    for line in selection_warnings():
        echo(f"warning: {line}")
    for failure in plugin_failures():
        echo(f"warning: {failure.message()}")
