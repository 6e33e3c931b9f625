"""Exceptions with messages a user can act on.

Every error adapterswap raises on purpose derives from :class:`AdapterswapError`. The CLI prints
its message as one line on stderr and exits with :attr:`AdapterswapError.exit_code`: 2 for bad
usage (a wrong name, value or path the user gave), 1 when the work itself failed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AdapterswapError(Exception):
    """Base class of adapterswap's errors."""

    exit_code = 1


class UsageError(AdapterswapError):
    """The user asked for something invalid: a bad argument, value, name or path."""

    exit_code = 2


class InvalidArgumentError(UsageError, ValueError):
    """An argument has a value that is not allowed; the message names both."""

    def __init__(self, argument: str, value: object, reason: str) -> None:
        self.argument = argument
        self.value = value
        super().__init__(f"invalid {argument}={value!r}: {reason}")


class UnknownNameError(UsageError, KeyError):
    """A backbone, adapter or metric name that no plugin registered."""

    def __init__(self, kind: str, name: str, available: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.available = sorted(available)
        message = f"Unknown {kind} {name!r}."
        close = difflib.get_close_matches(name, self.available, n=1, cutoff=0.6)
        if close:
            message += f" Did you mean {close[0]!r}?"
        if self.available:
            message += f" Available: {', '.join(self.available)}"
        else:
            message += f" No {kind}s are registered: is the plugin that provides it installed?"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return str(self.args[0])


class DuplicateNameError(AdapterswapError):
    """Two plugins registered the same name in one registry."""


class RegistrationError(AdapterswapError, TypeError):
    """A plugin registered something that is not the right type or is incomplete."""


class IncompatibleAdapterError(UsageError):
    """An adapter was combined with a backbone of a family it does not support."""

    def __init__(self, adapter: str, adapter_families: Iterable[str], backbone: str,
                 backbone_family: str, supported_backbones: Iterable[str]) -> None:
        families = ", ".join(sorted(adapter_families))
        supported = sorted(supported_backbones)
        message = (
            f"Adapter {adapter!r} supports the {families} famil"
            f"{'y' if ',' not in families else 'ies'}, but backbone {backbone!r} is "
            f"{backbone_family}."
        )
        if supported:
            message += f" Backbones it supports: {', '.join(supported)}"
        super().__init__(message)


class WeightsNotFoundError(UsageError, FileNotFoundError):
    """Model weights are missing or incomplete; the message says where and how to get them."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class UnsafeWeightsError(UsageError):
    """A weight file could not be loaded safely (e.g. a pickle that needs code execution); the
    message names the file. Exit code 2: the file the user pointed at is the problem."""


class MetricUnavailableError(AdapterswapError):
    """A metric cannot run here (its model or package is missing); the message says why."""


class PluginLoadError(AdapterswapError):
    """A plugin distribution failed to import or register."""


class StoreWriteError(AdapterswapError):
    """The run store or an image could not be written (disk full, read-only, ...). Cells
    committed before stay; re-running resumes."""
