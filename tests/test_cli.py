"""The CLI: listings, exit codes, one-line errors, --debug, doctor and generate on the toy."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from adapterswap.cli import main


@pytest.fixture()
def runner():
    return CliRunner()


def test_list_backbones_shows_family_compatibility(runner):
    result = runner.invoke(main, ["list", "backbones", "--json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["toy-fast"]["family"] == "toy" and rows["toy-fast"]["guidance_mode"] == "none"
    assert rows["toy-dev"]["adapters"] == ["toy-adapter"]
    table = runner.invoke(main, ["list", "adapters"]).stdout
    assert "toy-adapter" in table and "toy-dev, toy-fast" in table


def test_plugins_lists_toy_registrations(runner):
    data = json.loads(runner.invoke(main, ["plugins", "--json"]).stdout)
    toy = next(p for p in data["plugins"] if p["name"] == "toy-plugin")
    assert toy["backbones"] == ["toy-dev", "toy-fast"]
    assert toy["adapters"] == ["toy-adapter", "toy-other-adapter"]


def test_bad_usage_exits_2_with_one_line(runner):
    result = runner.invoke(main, ["generate", "--backbone", "toy-dve", "--prompt", "x"])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Did you mean 'toy-dev'?" in errors[0]


def test_click_usage_errors_exit_2(runner):
    assert runner.invoke(main, ["list", "gizmos"]).exit_code == 2
    assert runner.invoke(main, ["no-such-command"]).exit_code == 2


def test_debug_shows_the_traceback(runner):
    result = runner.invoke(main, ["--debug", "generate", "--backbone", "toy-dve",
                                  "--prompt", "x"])
    assert result.exit_code != 0 and result.exception is not None
    assert "toy-dve" in str(result.exception)


def test_doctor_reports_missing_weights_and_exits_0(runner, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    result = runner.invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["environment"]["HF_HUB_OFFLINE"] is True
    toy = next(r for r in report["backbones"] if r["name"] == "toy-dev")
    assert toy["present"] is False and toy["where"] == "missing"
    metrics = {m["name"]: m for m in report["metrics"]}
    assert metrics["sharpness"]["present"] is True


def test_doctor_finds_configured_local_weights(runner, tmp_path, monkeypatch):
    from toy_plugin import ToyBackbone

    model = ToyBackbone.save_random(tmp_path / "toy-model")
    config = tmp_path / "config.toml"
    config.write_text(f'[sources]\n"toy-dev" = "{model}"\n')
    monkeypatch.setenv("ADAPTERSWAP_CONFIG", str(config))
    report = json.loads(runner.invoke(main, ["doctor", "--json"]).stdout)
    toy = next(r for r in report["backbones"] if r["name"] == "toy-dev")
    assert toy["present"] is True and toy["where"] == "local"


def test_generate_tiny_preset_writes_an_image(runner, tmp_path):
    out = tmp_path / "sub" / "img.png"
    result = runner.invoke(main, ["generate", "--preset", "tiny", "--backbone", "toy-fast",
                                  "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert Image.open(out).size == (16, 16)
    assert "toy-fast + toy-adapter" in result.stdout


def test_generate_swaps_with_a_local_model(runner, tmp_path):
    from toy_plugin import ToyAdapter, ToyBackbone

    model = ToyBackbone.save_random(tmp_path / "m")
    adapter = ToyAdapter.save_random(tmp_path / "a")
    ref = tmp_path / "ref.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(ref)
    outs = []
    for backbone in ("toy-dev", "toy-fast"):
        out = tmp_path / f"{backbone}.png"
        result = runner.invoke(main, [
            "generate", "--backbone", backbone, "--source", str(model), "--adapter-source",
            str(adapter), "--ref", str(ref), "--prompt", "red", "--out", str(out), "--device",
            "cpu"])
        assert result.exit_code == 0, result.stderr
        outs.append(out)
    assert all(o.is_file() for o in outs)


def test_generate_validates_before_loading(runner, tmp_path):
    result = runner.invoke(main, ["generate", "--backbone", "toy-dev", "--prompt", "x",
                                  "--ref", str(tmp_path / "nope.png")])
    assert result.exit_code == 2 and "--ref=" in result.stderr and "no such file" in result.stderr
    result = runner.invoke(main, ["generate", "--backbone", "toy-fast", "--prompt", "x",
                                  "--adapter", "none", "--guidance-scale", "4",
                                  "--source", str(tmp_path)])
    assert result.exit_code == 2 and "incomplete" in result.stderr
    ref = tmp_path / "r.png"
    Image.new("RGB", (8, 8)).save(ref)
    result = runner.invoke(main, ["generate", "--backbone", "toy-dev", "--prompt", "x",
                                  "--ref", str(ref), "--scale", "-2"])
    assert result.exit_code == 2 and "scale=-2.0" in result.stderr
    result = runner.invoke(main, ["generate", "--backbone", "toy-dev"])
    assert result.exit_code == 2 and "--prompt" in result.stderr


def test_generate_refuses_guidance_on_guidance_free_backbone(runner):
    result = runner.invoke(main, ["generate", "--preset", "tiny", "--backbone", "toy-fast",
                                  "--guidance-scale", "4"])
    assert result.exit_code == 2 and "guidance_scale=4.0" in result.stderr
