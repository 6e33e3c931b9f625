"""User configuration: where weights live, without passing ``--source`` every time.

``$ADAPTERSWAP_CONFIG`` or ``~/.config/adapterswap/config.toml``::

    [sources]
    flux-dev = "/models/FLUX.1-dev"
    infusenet = "/models/InfiniteYou"

A configured source replaces the plugin's ``default_source``; an explicit source wins over both.

Defaults for arguments left out::

    [defaults]
    backbone = "sdxl"   # what `adapterswap generate` uses without --backbone
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from adapterswap.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def config_path() -> Path:
    """The configuration file's path (it need not exist)."""
    env = os.environ.get("ADAPTERSWAP_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "adapterswap" / "config.toml"


def load_config() -> dict[str, Any]:
    """The parsed configuration, ``{}`` if there is no file."""
    path = config_path()
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise UsageError(f"cannot read the configuration file {str(path)!r}: {exc}") from None
    sources = data.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise UsageError(f"{str(path)!r}: [sources] must map names to path or repo-id strings")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict) or not all(isinstance(v, str) for v in defaults.values()):
        raise UsageError(f"{str(path)!r}: [defaults] must map settings to strings")
    return data


def configured_source(name: str) -> str | None:
    """The source configured for backbone/adapter ``name``, if any."""
    return load_config().get("sources", {}).get(name)


def configured_default(setting: str) -> str | None:
    """The value of ``setting`` in the configuration's ``[defaults]`` table, if any."""
    return load_config().get("defaults", {}).get(setting) or None
