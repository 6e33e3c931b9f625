"""Quiet by default (--verbose), the summary's time accounting, doctor's truth about weights,
and the README's Quickstart commands being the ones CI runs."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from adapterswap import quiet
from adapterswap.cli import main, time_accounting
from adapterswap.sweep.engine import SweepSummary

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture()
def runner():
    return CliRunner()


# -- the README's two commands are CI's ----------------------------------------------------------

def readme_quickstart_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("\n## Quickstart\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```$", section, re.S | re.M)][:2]


def test_ci_runs_the_readme_quickstart_commands_as_written():
    printed = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-commands"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    assert printed == readme_quickstart_commands()
    script = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script and "ADAPTERSWAP_REQUIRE_BROWSER=1" in script
    assert 'bash -euo pipefail -c "${COMMANDS[0]}"' in script
    assert 'bash -euo pipefail -c "${COMMANDS[1]}"' in script
    # nothing else installs the project: the README's command is the whole install
    assert "pip install" not in script


def test_quickstart_install_has_every_extra_and_tests_run_from_a_new_shell():
    install, tests = readme_quickstart_commands()
    assert "torch==2.14.1 torchvision==0.29.1" in install  # what CI tests
    assert '-e ".[dev]"' in install
    installed = {name: set(extras.split(","))
                 for name, extras in re.findall(r'-e "plugins/(\w+)\[([\w,]*)\]"', install)}
    declared = {p.parent.name: set(tomllib.loads(p.read_text())["project"].get(
        "optional-dependencies", {})) for p in ROOT.glob("plugins/*/pyproject.toml")}
    assert installed == declared
    # no `. .venv/bin/activate` needed: a new shell has the system Python on its PATH
    assert tests.startswith(".venv/bin/python -m pytest")
    readme = (ROOT / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme


# -- quiet by default ----------------------------------------------------------------------------

def test_silenced_switches_imported_libraries_and_restores_them():
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    before = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity(),
              diffusers_logging.is_progress_bar_enabled(),
              transformers_logging.is_progress_bar_enabled(),
              hub_utils.are_progress_bars_disabled())
    with quiet.silenced():
        assert quiet.is_quiet()
        assert diffusers_logging.get_verbosity() == logging.ERROR
        assert transformers_logging.get_verbosity() == logging.ERROR
        assert not diffusers_logging.is_progress_bar_enabled()
        assert not transformers_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled()
    assert not quiet.is_quiet()
    assert (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity(),
            diffusers_logging.is_progress_bar_enabled(),
            transformers_logging.is_progress_bar_enabled(),
            hub_utils.are_progress_bars_disabled()) == before


FAKE_LOGGING = '''
level = 30
def get_verbosity():
    return level
def set_verbosity(value):
    global level
    level = value
def set_verbosity_error():
    set_verbosity(40)
'''


def test_a_library_imported_later_is_switched_on_import(tmp_path, monkeypatch):
    """The libraries are not imported to switch them (``list`` stays fast): a library
    imported inside the block is switched right after its import."""
    package = tmp_path / "fakelib"
    (package / "utils").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "utils" / "__init__.py").write_text("")
    (package / "utils" / "logging.py").write_text(FAKE_LOGGING)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(quiet, "SWITCHES", (quiet._verbosity("fakelib.utils.logging",
                                                              "FAKELIB_VERBOSITY"),))
    for name in ("fakelib", "fakelib.utils", "fakelib.utils.logging"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with quiet.silenced():
        assert "fakelib.utils.logging" not in sys.modules  # nothing imported for the switch
        import fakelib.utils.logging as fake

        assert fake.get_verbosity() == 40
    assert fake.get_verbosity() == 30  # restored
    # set by the user, the library's own environment variable wins
    monkeypatch.setenv("FAKELIB_VERBOSITY", "info")
    with quiet.silenced():
        assert fake.get_verbosity() == 30


def test_silenced_ignores_third_party_warnings_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet.silenced():
            warnings.warn_explicit("old API", FutureWarning, "embeddings.py", 1,
                                   module="diffusers.models.embeddings")
            warnings.warn_explicit("ours", UserWarning, "engine.py", 1,
                                   module="adapterswap.sweep.engine")
        warnings.warn_explicit("after", FutureWarning, "embeddings.py", 2,
                               module="diffusers.models.embeddings")
    assert [str(w.message) for w in caught] == ["ours", "after"]


@pytest.fixture()
def quiet_probe():
    """A throwaway subcommand that reports the quiet state while a command runs."""
    @click.command("quiet-probe")
    def probe() -> None:
        import diffusers.utils.logging as diffusers_logging

        click.echo(json.dumps({"quiet": quiet.is_quiet(),
                               "diffusers": diffusers_logging.get_verbosity(),
                               "bars": diffusers_logging.is_progress_bar_enabled()}))

    main.add_command(probe)
    try:
        yield
    finally:
        main.commands.pop("quiet-probe", None)


def test_cli_is_quiet_unless_verbose(runner, quiet_probe):
    import diffusers.utils.logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    state = json.loads(runner.invoke(main, ["quiet-probe"]).stdout)
    assert state == {"quiet": True, "diffusers": logging.ERROR, "bars": False}
    state = json.loads(runner.invoke(main, ["--verbose", "quiet-probe"]).stdout)
    assert state == {"quiet": False, "diffusers": before, "bars": True}
    assert diffusers_logging.get_verbosity() == before  # the run's switches are undone


def test_list_stays_free_of_torch_and_the_libraries():
    code = ("import sys; from adapterswap.cli import main\n"
            "try:\n    main(['list', 'backbones'], standalone_mode=False)\n"
            "finally:\n    print(sorted({'torch', 'diffusers', 'transformers', "
            "'huggingface_hub'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_tiny_sweep_prints_no_third_party_chatter(runner, tmp_path, monkeypatch):
    """SDXL's tiny sweep logs the float32 warning (IP-Adapter loading) and writes model
    shards; FLUX's raises a FutureWarning (FluxPosEmbed): none of it reaches the user."""
    monkeypatch.setenv("ADAPTERSWAP_TINY_DIR", str(tmp_path / "tiny"))  # built, not reused
    records = Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = runner.invoke(main, [
                "sweep", "--backbone", "sdxl", "--backbone", "flux-schnell", "--preset", "tiny",
                "--steps", "1,2", "--timing-repeats", "0", "--out", str(tmp_path / "out")])
    finally:
        logger.removeHandler(records)
    assert result.exit_code == 0, result.stderr
    for chatter in ("Writing model shards", "should be kept in float32", "FutureWarning"):
        assert chatter not in result.stderr
    assert not [m for m in records.messages if "should be kept in float32" in m]
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    assert "cells done" in result.stdout


# -- the summary accounts for all the wall time ----------------------------------------------

def test_time_accounting_parts_add_up_to_the_total():
    summary = SweepSummary(total=4, skipped=0, done=4, seconds=12.34, load_seconds=8.06,
                           latency_seconds=2.04, forward_seconds=1.44, forwards=30,
                           finish_seconds=0.14)
    text = time_accounting(summary)
    numbers = [float(n) for n in re.findall(r"(\d+\.\d) s", text)]
    assert len(numbers) == 5 and round(sum(numbers), 1) == 12.3, text
    assert summary.other_seconds == pytest.approx(12.34 - 8.06 - 2.04 - 1.44 - 0.14)
    summary.finish_overlapped = True  # finishing ran beside the forwards: not in the sum
    text = time_accounting(summary)
    head, beside = text.split("; ")
    assert round(sum(float(n) for n in re.findall(r"(\d+\.\d) s", head)), 1) == 12.3
    assert "decoding, scoring, storing 0.1 s" in beside


def test_engine_measures_loading_and_latency(runner, tmp_path):
    result = runner.invoke(main, ["sweep", "--backbone", "toy-dev", "--preset", "tiny",
                                  "--steps", "1,2", "--metrics", "sharpness,latency",
                                  "--timing-repeats", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if "cells done" in x)
    total = float(re.search(r"in (\d+\.\d) s", line).group(1))
    parts = re.search(r"\((.*)\)\. Results", line).group(1).split("; ")[0]
    assert "loading models and metrics" in parts and "latency timing" in parts
    assert round(sum(float(n) for n in re.findall(r"(\d+\.\d) s", parts)), 1) == total

    from adapterswap.sweep.engine import SweepEngine
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    spec = SweepSpec(backbones=["toy-dev"], preset="tiny", steps=[1, 2], timing_repeats=1,
                     metrics=["sharpness", "latency"], out=str(tmp_path / "engine")).validate()
    with RunStore(spec.out) as store:
        summary = SweepEngine(spec, store).run()
    assert summary.load_seconds > 0 and summary.latency_seconds > 0
    assert summary.load_seconds + summary.latency_seconds + summary.forward_seconds \
        <= summary.seconds
    # the run's row keeps the same accounting (what a benchmark or a reader looks up later)
    with RunStore(spec.out, lock=False) as store:
        stored = store.latest_run()["summary"]
    assert stored["seconds"] == pytest.approx(summary.seconds)
    assert stored["done"] == summary.done == 2 and stored["decode_seconds"] > 0
    finish = 0.0 if stored["finish_overlapped"] else stored["finish_seconds"]
    assert stored["load_seconds"] + stored["latency_seconds"] + stored["forward_seconds"] \
        + finish + stored["other_seconds"] == pytest.approx(stored["seconds"])
    with RunStore(tmp_path, lock=False) as store:  # the CLI's run too
        assert store.latest_run()["summary"]["seconds"] == pytest.approx(total, abs=0.05)


def test_an_interrupted_run_stores_the_forwards_it_made(tmp_path):
    """Ctrl-C mid-sweep: the run's row says ``interrupted`` and its summary keeps the
    forwards and finishing done so far (not zeros, with every second called "other")."""
    from adapterswap.sweep.engine import SweepEngine
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    spec = SweepSpec(backbones=["toy-dev"], preset="tiny", steps=[1, 2, 4], seeds=[0, 1],
                     metrics=["sharpness"], timing_repeats=0,
                     out=str(tmp_path / "run")).validate()
    seen = []

    def on_cell(cell, status):
        seen.append(status)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with RunStore(spec.out) as store, pytest.raises(KeyboardInterrupt):
        SweepEngine(spec, store, on_cell=on_cell).run()
    with RunStore(spec.out, lock=False) as store:
        run = store.latest_run()
        stored = len(store.finished_keys())
    assert run["status"] == "interrupted" and stored >= 2
    assert run["summary"]["forwards"] > 0 and run["summary"]["forward_seconds"] > 0
    assert run["summary"]["seconds"] > 0


# -- doctor tells the truth ----------------------------------------------------------------------

@pytest.mark.parametrize("offline", [True, False])
def test_doctor_calls_model_metrics_missing_without_weights(runner, tmp_path, monkeypatch,
                                                            offline):
    """Online, weights that could be downloaded are still not present."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached AlexNet
    monkeypatch.setenv("ADAPTERSWAP_CONFIG", str(tmp_path / "nowhere" / "config.toml"))
    if not offline:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    result = runner.invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    metrics = {m["name"]: m for m in report["metrics"]}
    for name in ("clip-i", "clip-t", "dino", "lpips", "style"):
        assert metrics[name]["present"] is False, metrics[name]
        assert metrics[name]["status"].startswith("missing:"), metrics[name]
    assert "openai/clip-vit-large-patch14" in metrics["clip-i"]["status"]
    assert "alexnet" in metrics["lpips"]["status"].lower()
    assert metrics["sharpness"]["present"] is True
    assert metrics["sharpness"]["status"] == "available (needs no weights)"
    env = report["environment"]
    assert env["config"] == str(tmp_path / "nowhere" / "config.toml")
    assert env["config_present"] is False
    text = runner.invoke(main, ["doctor"]).stdout
    assert f"config: {tmp_path / 'nowhere' / 'config.toml'} (missing" in text
    assert "  clip-i: missing: " in text and "  sharpness: available" in text


def test_doctor_finds_model_weights_in_the_cache(runner, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    snapshot = tmp_path / "hub" / "models--facebook--dino-vits16" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_text("{}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = tmp_path / "config.toml"
    config.write_text("[sources]\n")
    monkeypatch.setenv("ADAPTERSWAP_CONFIG", str(config))
    report = json.loads(runner.invoke(main, ["doctor", "--json"]).stdout)
    dino = next(m for m in report["metrics"] if m["name"] == "dino")
    assert dino["present"] is True and str(snapshot) in dino["status"], dino
    assert report["environment"]["config_present"] is True


def test_identity_weights_status_reuses_its_availability(tmp_path):
    from adapterswap_flux.identity import IdentityMetric

    present, detail = IdentityMetric.weights_status({"insightface_root": str(tmp_path)})
    assert present is False
    assert detail == IdentityMetric(insightface_root=str(tmp_path)).availability()


def test_lpips_and_csd_weights_status(tmp_path, monkeypatch):
    from adapterswap_metrics.clip_metrics import StyleSimilarity
    from adapterswap_metrics.perceptual import ALEXNET_FILE, LPIPSMetric

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert LPIPSMetric.weights_status()[0] is False
    assert LPIPSMetric.weights_status({"random_backbone": True})[0] is True  # tests only
    checkpoint = tmp_path / "torch" / "hub" / "checkpoints" / ALEXNET_FILE
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    present, detail = LPIPSMetric.weights_status()
    assert present is True and str(checkpoint) in detail
    csd = tmp_path / "csd" / "checkpoint.pth"
    assert StyleSimilarity.weights_status({"csd_weights": str(csd)})[0] is False
    csd.parent.mkdir()
    csd.write_bytes(b"weights")
    assert StyleSimilarity.weights_status({"csd_weights": str(csd.parent)}) == (
        True, f"CSD weights {csd}")


def test_doctor_says_whether_the_optional_kernels_and_ray_can_run():
    from adapterswap.doctor import environment

    env = environment()
    import torch

    if not torch.cuda.is_available():  # this machine: both kernels unavailable, with why
        assert env["fp8"].startswith("unavailable: needs a CUDA GPU")
        assert env["attention_fa3"].startswith("unavailable: needs FlashAttention-3")
    from importlib import metadata

    try:
        assert env["ray"] == metadata.version("ray")
    except metadata.PackageNotFoundError:
        assert env["ray"].startswith("not installed (pip install")
