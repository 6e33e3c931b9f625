"""What every command shares: the group class that turns errors into one stderr line and adds
the plugins' commands, plugin warnings, and the ``KEY=VALUE`` option parsers.

Nothing here imports torch: ``adapterswap --help`` and the listing commands stay fast.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import click

from adapterswap.errors import AdapterswapError

#: ``ctx.meta`` key set once the plugin-command warnings of an invocation were printed.
_WARNED = "adapterswap.plugin_command_warnings"


class AdapterswapGroup(click.Group):
    """The ``adapterswap`` group: turns adapterswap errors into one stderr line and the right
    exit code, and lists and runs the commands plugins add through ``register_commands`` beside
    the built-in ones (a built-in command always wins its name)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except AdapterswapError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                       err=True)
            ctx.exit(1)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._plugin_commands(ctx)))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        # a built-in command runs without calling any plugin's register_commands
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        return self._plugin_commands(ctx).get(cmd_name)

    def _plugin_commands(self, ctx: click.Context) -> dict[str, click.Command]:
        """The plugins' commands; their warnings are printed once per invocation."""
        commands, warnings = plugin_commands(self.commands)
        if not ctx.meta.get(_WARNED):
            ctx.meta[_WARNED] = True
            for line in warnings:
                click.echo(f"warning: {line}", err=True)
        return commands


class _CommandCollector(click.Group):
    """What one plugin's ``register_commands`` receives as ``cli``: a group that only collects
    the commands added to it, so that a plugin whose hook raises halfway adds nothing and a
    clash can be refused before anything reaches the real group. Its text names the plugin,
    which is what a hook trace shows."""

    def __init__(self, plugin: str) -> None:
        super().__init__(name="adapterswap")
        self.plugin = plugin

    def __repr__(self) -> str:
        return f"<adapterswap command group for plugin {self.plugin!r}>"


_commands_cache: dict[str, Any] = {"key": None}


def plugin_commands(builtin: Mapping[str, click.Command]
                    ) -> tuple[dict[str, click.Command], list[str]]:
    """The commands the plugins add through ``register_commands`` (name -> command) and one
    warning per problem: a hook that raised (none of that plugin's commands is kept) or a
    name a built-in command or an earlier plugin has (refused). Computed once per set of
    plugins and built-in command names."""
    from adapterswap import plugins

    key = (plugins.plugin_set_key(), tuple(sorted(builtin)))
    if _commands_cache["key"] == key:
        return _commands_cache["commands"], _commands_cache["warnings"]
    commands: dict[str, click.Command] = {}
    owners: dict[str, str] = {}
    warnings: list[str] = []
    calls = plugins.call_each_plugin("register_commands",
                                     lambda plugin: {"cli": _CommandCollector(plugin)})
    for call in calls:
        if call.error is not None:
            error = call.error if isinstance(call.error, AdapterswapError) else \
                f"hook register_commands raised {type(call.error).__name__}: {call.error}"
            warnings.append(f'Error loading plugin "{call.plugin}": {error} '
                            "(its commands are not available)")
            continue
        for name, command in call.kwargs["cli"].commands.items():
            if name in builtin:
                warnings.append(f'plugin "{call.plugin}" adds a command {name!r}, the name of '
                                "a built-in command: refused")
            elif name in owners:
                warnings.append(f'plugin "{call.plugin}" adds a command {name!r}, which plugin '
                                f'"{owners[name]}" added first: refused')
            else:
                commands[name] = command
                owners[name] = call.plugin
    _commands_cache.update(key=key, commands=commands, warnings=warnings)
    return commands, warnings


def warn_plugin_failures() -> None:
    """One stderr warning per plugin that failed to load or register, and per name in
    ``ADAPTERSWAP_LOAD_PLUGINS`` that no installed plugin has."""
    from adapterswap.plugins import plugin_failures, selection_warnings

    for line in selection_warnings():
        click.echo(f"warning: {line}", err=True)
    for failure in plugin_failures():
        click.echo(f"warning: {failure.message()}", err=True)


def parse_options(pairs: tuple[str, ...], argument: str) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, true, lists)."""
    from adapterswap.errors import InvalidArgumentError

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidArgumentError(argument, pair, "expected key=value")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.strip().replace("-", "_")] = value
    return options


def parse_backbone_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``timestep_spacing=trailing`` (every backbone) or ``BACKBONE.timestep_spacing=trailing``
    (one backbone's table)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key = pair.partition("=")[0]
        name, dot, _ = key.partition(".")
        if dot:
            options.setdefault(name.strip(), {}).update(
                parse_options((pair[len(name) + 1:],), "--backbone-option"))
        else:
            options.update(parse_options((pair,), "--backbone-option"))
    return options


def parse_metric_options(pairs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``identity.recognizer=ir-se50`` -> ``{"identity": {"recognizer": "ir-se50"}}``."""
    from adapterswap.errors import InvalidArgumentError

    options: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name, dot, rest = pair.partition(".")
        if not dot or "=" not in rest or not name:
            raise InvalidArgumentError("--metric-option", pair, "expected METRIC.KEY=VALUE")
        options.setdefault(name, {}).update(parse_options((rest,), "--metric-option"))
    return options
