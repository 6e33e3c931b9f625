"""Plugin discovery: the real entry-point path, filtering, broken plugins, registry errors."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapterswap import hookimpl, hookspecs, plugins
from adapterswap.errors import (
    DuplicateNameError,
    IncompatibleAdapterError,
    RegistrationError,
    UnknownNameError,
)
from adapterswap.metrics import Metric
from adapterswap.registry import Registry

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The example and broken plugin distributions installed into a private site directory."""
    site = tmp_path_factory.mktemp("site")
    for dist in ("example_plugin", "broken_plugin"):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
             "--no-build-isolation", "--target", str(site), str(HERE / dist)],
            check=True, capture_output=True,
        )
    return site


def run_cli(*args: str, site: Path | None = None, env: dict[str, str] | None = None):
    full_env = dict(os.environ, HF_HUB_OFFLINE="1")
    full_env.pop("ADAPTERSWAP_LOAD_PLUGINS", None)
    if site is not None:
        full_env["PYTHONPATH"] = os.pathsep.join([str(site), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "adapterswap", *args], capture_output=True,
                          text=True, env=full_env)


def test_entry_point_plugin_is_discovered(plugin_site):
    result = run_cli("plugins", "--json", site=plugin_site)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    example = [p for p in data["plugins"] if p["distribution"] == "adapterswap-example"]
    assert example and example[0]["version"] == "0.0.1"
    assert example[0]["metrics"] == ["example-brightness"]
    assert example[0]["hooks"] == ["register_metrics"]
    listed = run_cli("list", "metrics", "--json", site=plugin_site)
    assert "example-brightness" in {m["name"] for m in json.loads(listed.stdout)}


ONLY_TEST_PLUGINS = {"ADAPTERSWAP_LOAD_PLUGINS": "adapterswap-example,adapterswap-broken"}


def test_broken_plugin_is_named_and_the_rest_works(plugin_site):
    result = run_cli("list", "metrics", site=plugin_site, env=ONLY_TEST_PLUGINS)
    assert result.returncode == 0
    assert 'Error loading plugin "adapterswap-broken" (entry point broken)' in result.stderr
    assert "adapterswap_dependency_that_does_not_exist" in result.stderr
    assert "example-brightness" in result.stdout and "sharpness" in result.stdout
    data = json.loads(run_cli("plugins", "--json", site=plugin_site, env=ONLY_TEST_PLUGINS).stdout)
    assert [f["plugin"] for f in data["failures"]] == ["adapterswap-broken"]


@pytest.mark.parametrize(("value", "expect_example", "expect_broken"), [
    ("adapterswap-example", True, False),
    ("example", True, False),
    ("", False, False),
    ("adapterswap-example,adapterswap-broken", True, True),
])
def test_load_plugins_env_filters(plugin_site, value, expect_example, expect_broken):
    result = run_cli("plugins", "--json", site=plugin_site,
                     env={"ADAPTERSWAP_LOAD_PLUGINS": value})
    data = json.loads(result.stdout)
    dists = {p["distribution"] for p in data["plugins"]}
    assert ("adapterswap-example" in dists) is expect_example
    assert bool(data["failures"]) is expect_broken
    assert "adapterswap" in dists  # built-in metrics are always there


def test_list_does_not_import_torch(plugin_site):
    code = ("import sys; from adapterswap.cli import main\n"
            "try:\n    main(['list', 'backbones'], standalone_mode=False)\n"
            "finally:\n    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    env = dict(os.environ, PYTHONPATH=str(plugin_site))
    env.pop("ADAPTERSWAP_LOAD_PLUGINS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip().endswith("NO-TORCH"), out.stdout + out.stderr


# -- plugins registered in-process ---------------------------------------------------------
class Sharp2(Metric):
    name = "sharpness"
    needs = frozenset()

    def score(self, batch):
        return [0.0 for _ in batch.images]


def test_duplicate_name_names_both_plugins(isolated_plugins):
    class Dup:
        @hookimpl
        def register_metrics(self, register):
            register(Sharp2)

    isolated_plugins.register_plugin(Dup(), name="dup-plugin")
    isolated_plugins.metrics()
    failures = isolated_plugins.plugin_failures()
    assert len(failures) == 1 and failures[0].plugin == "dup-plugin"
    assert isinstance(failures[0].error, DuplicateNameError)
    message = str(failures[0].error)
    assert "adapterswap.metrics.basic" in message and "dup-plugin" in message
    # the first registration still works
    assert isolated_plugins.get_metric("sharpness").__module__ == "adapterswap.metrics.basic"


def test_hook_that_raises_is_reported_and_others_work(isolated_plugins):
    class Raises:
        @hookimpl
        def register_backbones(self, register):
            raise RuntimeError("boom in hook")

    isolated_plugins.register_plugin(Raises(), name="raising-plugin")
    assert "sharpness" in isolated_plugins.metrics()
    failures = isolated_plugins.plugin_failures()
    assert [f.plugin for f in failures] == ["raising-plugin"]
    assert "boom in hook" in failures[0].message()


def test_misspelt_hook_fails_loudly(isolated_plugins):
    class Misspelt:
        @hookimpl
        def register_backbone(self, register):  # missing "s"
            pass

    with pytest.raises(Exception, match="register_backbone"):
        isolated_plugins.register_plugin(Misspelt(), name="misspelt")
    isolated_plugins.unregister_plugin("misspelt")


def test_wrong_type_is_refused_by_name(isolated_plugins):
    class WrongType:
        @hookimpl
        def register_metrics(self, register):
            register(object)

    isolated_plugins.register_plugin(WrongType(), name="wrong-type")
    isolated_plugins.metrics()
    (failure,) = isolated_plugins.plugin_failures()
    assert isinstance(failure.error, RegistrationError)
    assert "wrong-type" in str(failure.error) and "not a subclass" in str(failure.error)


def test_registry_rejects_incomplete_class_and_bad_name():
    registry = Registry("metric", Metric)

    class NoScore(Metric):
        name = "no-score"

    class BadName(Metric):
        name = "Bad Name"

        def score(self, batch):
            return []

    with pytest.raises(RegistrationError, match="abstract methods not implemented: score"):
        registry.register(NoScore, "p")
    with pytest.raises(RegistrationError, match="'Bad Name'"):
        registry.register(BadName, "p")


def test_unknown_name_suggests_and_lists():
    from adapterswap.plugins import get_backbone

    with pytest.raises(UnknownNameError) as info:
        get_backbone("toy-dve")
    message = str(info.value)
    assert "Unknown backbone 'toy-dve'. Did you mean 'toy-dev'?" in message
    assert "Available:" in message and "toy-fast" in message


def test_family_mismatch_names_both_and_lists_supported():
    from toy_plugin import ToyAdapter

    from adapterswap.testing.adapter_contract import _OtherFamilyBackbone

    with pytest.raises(IncompatibleAdapterError) as info:
        ToyAdapter().check_backbone(_OtherFamilyBackbone,
                                    installed=[e.cls for e in plugins.backbones().entries()])
    message = str(info.value)
    assert "'toy-adapter'" in message and "'contract-other-family'" in message
    assert "Backbones it supports: toy-dev, toy-fast" in message


def test_every_hook_is_documented():
    readme = (HERE.parent / "README.md").read_text()
    specs = [n for n in dir(hookspecs) if n.startswith("register_")]
    assert specs == ["register_adapters", "register_backbones", "register_commands",
                     "register_enhancers", "register_metrics"]
    for name in specs:
        (argument,) = inspect.signature(getattr(hookspecs, name)).parameters
        doc = getattr(hookspecs, name).__doc__ or ""
        assert f":param {argument}:" in doc and ":returns:" in doc, name
        assert f"`{name}({argument})`" in readme, f"{name} is not documented in README.md"
