"""Core test configuration: no network, and a toy plugin family registered for the core tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from adapterswap import plugins  # noqa: E402

TOY_PLUGIN = "toy-plugin"


def ensure_toy_plugin() -> None:
    """Register the toy backbones and adapter unless they already are."""
    from toy_plugin import ToyPlugin

    if plugins.pm.get_plugin(TOY_PLUGIN) is None:
        plugins.register_plugin(ToyPlugin(), name=TOY_PLUGIN)


@pytest.fixture(scope="session", autouse=True)
def toy_plugin():
    """The toy family is registered for every core test (before class-scoped fixtures)."""
    ensure_toy_plugin()
    yield
    plugins.unregister_plugin(TOY_PLUGIN)


@pytest.fixture()
def isolated_plugins(monkeypatch):
    """No entry-point plugins and no toy plugin: only adapterswap's built-ins plus what the test
    registers. Restores the toy plugin afterwards."""
    monkeypatch.setenv("ADAPTERSWAP_LOAD_PLUGINS", "")
    plugins.reset()
    try:
        yield plugins
    finally:
        monkeypatch.delenv("ADAPTERSWAP_LOAD_PLUGINS")
        plugins.reset()
        ensure_toy_plugin()
