"""Hook specifications: the whole contract between adapterswap and its plugins.

A plugin is a module (or object) with functions decorated by ``adapterswap.hookimpl`` whose names
match the specs below, made known through the ``adapterswap`` entry-point group::

    [project.entry-points.adapterswap]
    myplugin = "my_package.plugin"

Each ``register_*`` hook of a class kind receives a ``register`` callback; call it once per
class you provide. The host validates the class and refuses a name another plugin already took.
``register_commands`` receives the command group instead and adds click commands to it. Import heavy
libraries (torch, diffusers) inside your classes' methods, never at the top of the plugin module:
``adapterswap plugins`` and ``adapterswap list`` load every plugin and must stay fast.

New arguments may be added to these hooks in later versions; pluggy passes an implementation only
the arguments it names, so existing plugins keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

hookspec = pluggy.HookspecMarker("adapterswap")


@hookspec
def register_backbones(register: Callable[[type], None]) -> None:
    """Register backbone classes (diffusion model variants such as ``flux-schnell``).

    :param register: call ``register(BackboneSubclass)`` once per backbone. The class must
        subclass :class:`adapterswap.backbone.Backbone` and set its class attributes (``name``,
        ``family``, ``default_source``, ``default_steps``, ``guidance_mode``).
    :returns: nothing; the return value is ignored. Not ``firstresult``: every plugin's
        implementation is called.
    """


@hookspec
def register_adapters(register: Callable[[type], None]) -> None:
    """Register adapter classes (identity, style or object conditioning modules).

    :param register: call ``register(AdapterSubclass)`` once per adapter. The class must subclass
        :class:`adapterswap.adapter.Adapter` and set ``name``, ``kind`` and ``families``.
    :returns: nothing; the return value is ignored. Not ``firstresult``: every plugin's
        implementation is called.
    """


@hookspec
def register_metrics(register: Callable[[type], None]) -> None:
    """Register metric classes that score generated images (identity similarity, LPIPS, ...).

    :param register: call ``register(MetricSubclass)`` once per metric. The class must subclass
        :class:`adapterswap.metrics.Metric` and set ``name`` and ``needs``.
    :returns: nothing; the return value is ignored. Not ``firstresult``: every plugin's
        implementation is called.
    """


@hookspec
def register_enhancers(register: Callable[[type], None]) -> None:
    """Register enhancer classes: training-free tricks on a step while an adapter acts
    (guidance schemes that combine several predictions, attention patches).

    :param register: call ``register(EnhancerSubclass)`` once per enhancer. The class must
        subclass :class:`adapterswap.enhancer.Enhancer` and set ``name`` and ``option_docs``.
    :returns: nothing; the return value is ignored. Not ``firstresult``: every plugin's
        implementation is called.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add click commands to the ``adapterswap`` command line.

    :param cli: a :class:`click.Group` standing in for the ``adapterswap`` group: add commands
        with ``@cli.command()`` (or ``cli.add_command(...)``; sub-groups with ``@cli.group()``).
        The host moves them into the real group once the hook returns, so they appear in
        ``adapterswap --help`` and run as ``adapterswap NAME``. A name a built-in command or an
        earlier plugin already has is refused with a warning naming the plugin; when the hook
        raises, none of its commands is added, one warning names the plugin and the rest of
        the command line works. Import heavy libraries inside the commands, not in the hook:
        it runs for ``adapterswap --help``.
    :returns: nothing; the return value is ignored. Not ``firstresult``: every plugin's
        implementation is called.
    """
