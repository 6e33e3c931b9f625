"""Test setup for the flux plugin: offline, the plugin registered, and shared tiny components.

Fixture names start with ``flux_`` so they cannot clash with other plugins' test fixtures.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A face-model root from the developer's environment must not leak into the tests (the tests that
# need these variables set them with monkeypatch).
for _variable in ("ADAPTERSWAP_INSIGHTFACE_ROOT", "ADAPTERSWAP_ARCFACE_PATH"):
    os.environ.pop(_variable, None)

import pytest  # noqa: E402

from adapterswap import plugins  # noqa: E402

FLUX_PLUGIN = "adapterswap-flux-tests"


def _ensure_flux_plugin() -> None:
    """Use the installed entry point when there is one; otherwise register the module."""
    names = {entry.name for entry in plugins.backbones().entries()}
    if "flux-dev" not in names:
        import adapterswap_flux.plugin as module

        plugins.register_plugin(module, name=FLUX_PLUGIN)


@pytest.fixture(scope="session", autouse=True)
def flux_plugin_registered():
    """Make sure the flux backbones and adapter are registered for these tests."""
    _ensure_flux_plugin()


@pytest.fixture(scope="session")
def flux_dev():
    """The tiny flux-dev backbone (shared; tests must not change its state)."""
    from adapterswap.plugins import get_backbone

    return get_backbone("flux-dev").tiny(0)


@pytest.fixture(scope="session")
def flux_schnell():
    """The tiny flux-schnell backbone (shared)."""
    from adapterswap.plugins import get_backbone

    return get_backbone("flux-schnell").tiny(0)


@pytest.fixture(scope="session")
def flux_infusenet_loaded(flux_dev):
    """The tiny InfuseNet, loaded once for the session (use ``flux_infusenet``)."""
    from adapterswap.plugins import get_adapter

    return get_adapter("infusenet").tiny(flux_dev, 0)


def _reset(adapter) -> None:
    adapter.set_probe(None)
    adapter.detach()
    adapter.set_scale(type(adapter).default_scale)
    adapter.set_window(0.0, 1.0)
    adapter.set_control_image(None)


@pytest.fixture()
def flux_infusenet(flux_infusenet_loaded):
    """The session's tiny InfuseNet, detached and at its default settings before and after
    the test (loading it once keeps the suite fast; the swap test loads its own)."""
    _reset(flux_infusenet_loaded)
    yield flux_infusenet_loaded
    _reset(flux_infusenet_loaded)


@pytest.fixture(scope="session")
def flux_infiniteyou_root(flux_infusenet_loaded):
    """The directory of the tiny InfiniteYou repository the preset wrote."""
    return flux_infusenet_loaded.weights_root
