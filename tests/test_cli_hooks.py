"""Hooks go through pluggy (wrappers and tracing see them), plugins add commands with
``register_commands``, and ``generate``'s defaults and family check name no backbone."""

from __future__ import annotations

import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from adapterswap import hookimpl, plugins
from adapterswap.cli import main


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.fixture()
def register():
    """``register(obj, name)`` registers a plugin object for the test; each is unregistered
    afterwards, whatever the test did."""
    names: list[str] = []

    def add(plugin: object, name: str) -> object:
        plugins.register_plugin(plugin, name=name)
        names.append(name)
        return plugin

    try:
        yield add
    finally:
        for name in names:
            plugins.unregister_plugin(name)


class HelloCommands:
    """Adds ``hello`` (and whatever ``extra`` names) through ``register_commands``."""

    def __init__(self, *extra: str) -> None:
        self.extra = extra

    @hookimpl
    def register_commands(self, cli):
        @cli.command()
        @click.option("--name", default="world")
        def hello(name):
            """Say hello."""
            click.echo(f"hello {name}")

        for extra in self.extra:
            cli.command(extra)(lambda: click.echo("from the plugin"))


class RaisingCommands:
    @hookimpl
    def register_commands(self, cli):
        @cli.command()
        def half_added():
            """Added before the hook raised: must not appear."""

        raise RuntimeError("boom in register_commands")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# -- (a) register_commands -----------------------------------------------------------------
def test_plugin_command_is_listed_and_runs(runner, register):
    register(HelloCommands(), "hello-plugin")
    listing = runner.invoke(main, ["--help"])
    assert listing.exit_code == 0, listing.output
    assert "hello" in listing.stdout and "Say hello." in listing.stdout
    assert "sweep" in listing.stdout  # the built-in commands are all still there
    result = runner.invoke(main, ["hello", "--name", "there"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello there\n"


def test_command_clashing_with_a_builtin_is_refused(runner, register):
    register(HelloCommands("sweep"), "clashing-plugin")
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if "clashing-plugin" in line]
    assert len(warnings) == 1 and "'sweep'" in warnings[0] and "refused" in warnings[0]
    sweep_help = runner.invoke(main, ["sweep", "--help"])
    assert "Run a step sweep" in sweep_help.stdout  # still the built-in one
    assert runner.invoke(main, ["hello"]).stdout == "hello world\n"


def test_command_clashing_with_an_earlier_plugin_is_refused(runner, register):
    register(HelloCommands(), "first-hello")
    register(HelloCommands(), "second-hello")
    result = runner.invoke(main, ["hello"])
    assert result.exit_code == 0 and result.stdout == "hello world\n"
    assert 'plugin "second-hello"' in result.stderr and '"first-hello"' in result.stderr


# -- (c) a failing register_commands -------------------------------------------------------
def test_failing_register_commands_is_named_and_the_rest_works(runner, register):
    register(RaisingCommands(), "raising-commands")
    register(HelloCommands(), "hello-plugin")
    listing = runner.invoke(main, ["--help"])
    assert listing.exit_code == 0, listing.output
    named = [line for line in listing.stderr.splitlines() if "raising-commands" in line]
    assert len(named) == 1 and named[0].startswith("warning: ")
    assert "boom in register_commands" in named[0]
    assert "half-added" not in listing.stdout and "hello" in listing.stdout
    assert runner.invoke(main, ["hello"]).stdout == "hello world\n"
    listed = runner.invoke(main, ["list", "backbones"])
    assert listed.exit_code == 0 and "toy-dev" in listed.stdout
    assert runner.invoke(main, ["half-added"]).exit_code == 2  # no such command


# -- (b) hooks are dispatched by pluggy ----------------------------------------------------
class ObservesBackbones:
    """Wraps every plugin's register_backbones call (old-style hookwrapper)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, BaseException | None]] = []

    @hookimpl(hookwrapper=True)
    def register_backbones(self, register):
        outcome = yield
        self.seen.append((repr(register), outcome.exception))


class WrapsAdapters:
    """A new-style wrapper on register_adapters."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl(wrapper=True)
    def register_adapters(self, register):
        self.calls += 1
        return (yield)


class RaisingBackbones:
    @hookimpl
    def register_backbones(self, register):
        raise RuntimeError("boom in register_backbones")


def test_hook_wrappers_see_every_plugins_call(isolated_plugins, register):
    from toy_plugin import ToyPlugin

    observer = register(ObservesBackbones(), "observer")
    wrapper = register(WrapsAdapters(), "adapter-wrapper")
    register(ToyPlugin(), "toy-plugin")
    register(RaisingBackbones(), "raising-backbones")
    assert {"toy-dev", "toy-fast"} <= set(isolated_plugins.backbones())
    assert "toy-adapter" in isolated_plugins.adapters()
    by_plugin = dict(observer.seen)
    assert set(by_plugin) == {"<register backbone for plugin 'toy-plugin'>",
                              "<register backbone for plugin 'raising-backbones'>"}
    assert by_plugin["<register backbone for plugin 'toy-plugin'>"] is None
    assert "boom" in str(by_plugin["<register backbone for plugin 'raising-backbones'>"])
    assert wrapper.calls == 1  # one plugin (toy) registers adapters
    # the failure is the raising plugin's alone
    failures = isolated_plugins.plugin_failures()
    assert [f.plugin for f in failures] == ["raising-backbones"]
    assert "hook register_backbones raised RuntimeError" in failures[0].message()


# -- (d) ADAPTERSWAP_TRACE_PLUGINS ---------------------------------------------------------
def run_module(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "adapterswap", *args], capture_output=True,
                          text=True, env=full)


def test_trace_plugins_writes_hook_calls_to_stderr():
    traced = run_module("list", "metrics", ADAPTERSWAP_LOAD_PLUGINS="",
                        ADAPTERSWAP_TRACE_PLUGINS="1")
    assert traced.returncode == 0, traced.stderr
    assert "register_metrics [hook]" in traced.stderr
    assert "<register metric for plugin 'adapterswap.metrics.basic'>" in traced.stderr
    assert "finish register_metrics" in traced.stderr
    assert "sharpness" in traced.stdout and "[hook]" not in traced.stdout
    quiet = run_module("list", "metrics", ADAPTERSWAP_LOAD_PLUGINS="",
                       ADAPTERSWAP_TRACE_PLUGINS="0")
    assert quiet.returncode == 0 and "[hook]" not in quiet.stderr


# -- (e) generate: the family is checked before anything is built --------------------------
def test_generate_family_error_is_sweeps_one_line(runner, monkeypatch):
    from toy_plugin import ToyBackbone, ToyOtherFamilyAdapter

    def never(*args, **kwargs):
        raise AssertionError("a tiny builder ran before the family check")

    monkeypatch.setattr(ToyBackbone, "tiny", classmethod(never))
    monkeypatch.setattr(ToyOtherFamilyAdapter, "tiny", classmethod(never))
    generated = runner.invoke(main, ["generate", "--preset", "tiny", "--backbone", "toy-dev",
                                     "--adapter", "toy-other-adapter"])
    swept = runner.invoke(main, ["sweep", "--preset", "tiny", "--backbone", "toy-dev",
                                 "--adapter", "toy-other-adapter", "--dry-run"])
    assert generated.exit_code == swept.exit_code == 2
    assert error_lines(generated.stderr) == error_lines(swept.stderr)
    assert len(error_lines(generated.stderr)) == 1
    assert "'toy-other-adapter'" in generated.stderr and "'toy-dev'" in generated.stderr


def test_generate_real_adapter_on_another_family_fails_in_one_line():
    installed = plugins.backbones()
    if "sdxl" not in installed or "infusenet" not in plugins.adapters():
        pytest.skip("needs the sdxl and flux plugins")
    result = run_module("generate", "--preset", "tiny", "--backbone", "sdxl",
                        "--adapter", "infusenet")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "AttributeError" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert "Adapter 'infusenet' supports the flux family, but backbone 'sdxl' is sdxl" in line


# -- generate's default backbone -----------------------------------------------------------
def test_generate_tiny_defaults_to_the_first_backbone_with_a_tiny_preset(runner,
                                                                         isolated_plugins,
                                                                         register):
    from toy_plugin import ToyPlugin

    register(ToyPlugin(), "toy-plugin")
    # --steps 0 stops it right after the choice: the choice is what is tested here
    result = runner.invoke(main, ["generate", "--preset", "tiny", "--steps", "0"])
    assert "using backbone 'toy-dev' (give --backbone to choose)" in result.stderr
    assert result.exit_code == 2 and "--steps" in result.stderr


def test_generate_default_backbone_from_the_config(runner, tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('[defaults]\nbackbone = "toy-fast"\n')
    monkeypatch.setenv("ADAPTERSWAP_CONFIG", str(config))
    result = runner.invoke(main, ["generate", "--preset", "tiny", "--adapter",
                                  "toy-other-adapter"])
    assert result.exit_code == 2 and "backbone 'toy-fast'" in result.stderr
    assert "using backbone" not in result.stderr
    config.write_text('[defaults]\nbackbone = "toy-fats"\n')
    result = runner.invoke(main, ["generate", "--preset", "tiny"])
    assert result.exit_code == 2 and "[defaults] backbone" in result.stderr
    assert "Did you mean 'toy-fast'?" in result.stderr


def test_generate_tiny_without_any_tiny_backbone_is_one_error(runner, isolated_plugins):
    result = runner.invoke(main, ["generate", "--preset", "tiny"])
    assert result.exit_code == 2
    (line,) = error_lines(result.stderr)
    assert "no installed backbone has a tiny preset" in line


# -- (f) default output directories carry the preset's name --------------------------------
@pytest.mark.parametrize(("argv", "out"), [
    (["sweep", "--backbone", "toy-dev", "--preset", "random"], "runs/toy-dev-random"),
    (["sweep", "--backbone", "toy-dev", "--preset", "tiny"], "runs/toy-dev-tiny"),
    (["trajectory", "--backbone", "toy-dev", "--preset", "random"],
     "runs/toy-dev-trajectory-random"),
    (["swap", "--from", "toy-dev", "--to", "toy-fast", "--preset", "random"],
     "runs/swap-toy-dev-to-toy-fast-random"),
])
def test_default_out_dir_names_the_preset(runner, argv, out):
    with runner.isolated_filesystem():
        result = runner.invoke(main, [*argv, "--dry-run"])
        assert result.exit_code == 0, result.output
        assert result.stdout.rstrip().endswith(f"out {out}")
