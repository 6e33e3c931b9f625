"""Bad input a new user tried (issue: 80+ bad inputs), one table row each.

Refused input exits 2 with ONE line on stderr, ``error: invalid <argument>=<value>: <why>``,
before any model loads, and leaves nothing behind (no ``--out`` folder, store, lock or image).
A fault after the start exits 1 with one line per reason, and what was written stays.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from adapterswap import plugins
from adapterswap.cli import main
from adapterswap.errors import InvalidArgumentError, WeightsNotFoundError
from adapterswap.sweep import checks as checks_module
from adapterswap.sweep.spec import MAX_SEED, SweepSpec
from adapterswap.sweep.store import RunStore

SWEEP = ["sweep", "--preset", "tiny", "--backbone", "toy-fast", "--metrics", "sharpness",
         "--out", "{out}"]
GENERATE = ["generate", "--preset", "tiny", "--backbone", "toy-fast", "--out", "{image}"]
CUDA = torch.cuda.is_available()
no_cuda_only = pytest.mark.skipif(CUDA, reason="this machine has CUDA")


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (a few bytes on disk: what a
    decompression bomb looks like to the reader)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def paths(tmp_path):
    """Inputs of every kind, and where outputs would go (none of which may appear)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = inputs / "good.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(good)
    truncated = inputs / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    (inputs / "garbage.png").write_bytes(b"not an image at all")
    (inputs / "a-folder").mkdir()
    (inputs / "a-file").write_text("not a directory")
    (inputs / "read-only").mkdir()
    return {
        "tmp": str(tmp_path), "out": str(tmp_path / "out"),
        "image": str(tmp_path / "gen" / "img.png"), "good": str(good),
        "truncated": str(truncated), "garbage": str(inputs / "garbage.png"),
        "bomb": str(png_claiming(inputs / "bomb.png", 15000, 15000)),
        "big": str(png_claiming(inputs / "big.png", 10000, 10000)),
        "folder": str(inputs / "a-folder"), "file": str(inputs / "a-file"),
        "read_only": str(inputs / "read-only"),
    }


def row(name, argv, words, *, code=2, prefix="error: invalid ", env=None, marks=()):
    return pytest.param(argv, words, code, prefix, env or {}, id=name, marks=marks)


ROWS = [
    # --dtype fp13: was ignored (exit 0)
    row("dtype-sweep", [*SWEEP, "--dtype", "fp13"], ["dtype='fp13'", "bf16"]),
    row("dtype-generate", [*GENERATE, "--dtype", "fp13"], ["--dtype='fp13'"]),
    # negative seeds: generate ran (sweep refused)
    row("negative-seed-generate", [*GENERATE, "--seed", "-1"], ["--seed=-1", "2**63 - 1"]),
    row("negative-seed-sweep", [*SWEEP, "--seeds", "-1"], ["seeds=-1"]),
    # report --latency-budget -1 (fixed by the lead; kept)
    row("latency-budget", ["report", "{out}", "--latency-budget", "-1"],
        ["--latency-budget=-1.0"]),
    # an unknown metric option (already refused; kept)
    row("metric-option", [*SWEEP, "--metric-option", "sharpness.foo=1"],
        ["metric_options=", "'foo'"]),
    # --seeds 0,0: the summary counted 2 cells, the store held 1
    row("repeated-seed", [*SWEEP, "--seeds", "0,0"], ["seeds=0", "repeated seed"]),
    row("repeated-prompt", [*SWEEP, "--prompt", "a cat", "--prompt", "a cat"],
        ["prompts='a cat'", "repeated prompt"]),
    row("repeated-reference", [*SWEEP, "--ref", "{good}", "--ref", "{good}"],
        ["references=", "good.png", "repeated reference"]),
    row("repeated-scale", ["ablate", *SWEEP[1:], "--scales", "0.5,0.5"],
        ["scales=0.5", "repeated scale"]),
    # --device cuda without CUDA: a raw RuntimeError after the models loaded
    row("device-cuda-sweep", [*SWEEP, "--device", "cuda"], ["device='cuda'", "CUDA"],
        marks=no_cuda_only),
    row("device-cuda-generate", [*GENERATE, "--device", "cuda"], ["--device='cuda'", "CUDA"],
        marks=no_cuda_only),
    row("device-index", [*SWEEP, "--device", "cuda:99"], ["device='cuda:99'", "CUDA"]),
    row("device-unknown", [*GENERATE, "--device", "gpu"], ["--device='gpu'", "cpu, cuda"]),
    # --steps 10000: diffusers' raw ValueError (sd15) or 10,000 steps run (flow matching)
    row("steps-sd15", ["sweep", "--preset", "tiny", "--backbone", "sd15", "--steps", "10000",
                       "--out", "{out}"], ["steps=10000", "'sd15'", "1000"]),
    row("steps-sd15-lcm", ["sweep", "--preset", "tiny", "--backbone", "sd15-lcm", "--steps",
                           "51", "--out", "{out}"], ["steps=51", "'sd15-lcm'", "50"]),
    row("steps-flow-matching", [*SWEEP, "--steps", "1,10000"], ["steps=10000", "1000"]),
    row("steps-generate", [*GENERATE, "--steps", "10000"], ["--steps=10000", "1000"]),
    # --seeds 99999999999999999999: a raw "Overflow when unpacking long long"
    row("huge-seed-sweep", [*SWEEP, "--seeds", "99999999999999999999"],
        ["seeds=99999999999999999999", "2**63 - 1"]),
    row("huge-seed-generate", [*GENERATE, "--seed", "99999999999999999999"],
        ["--seed=99999999999999999999"]),
    # --height 100000 --width 100000: --dry-run said OK, the run died in the allocator
    row("huge-size-sweep", [*SWEEP, "--height", "100000", "--width", "100000"],
        ["height=100000", "10000.0 MP", "max_pixels"]),
    row("huge-size-generate", [*GENERATE, "--height", "100000", "--width", "100000"],
        ["--height=100000", "max_pixels"]),
    # a 15000x15000 reference: a raw DecompressionBombError after the models loaded
    row("bomb-reference-sweep", [*SWEEP, "--ref", "{bomb}"],
        ["references=", "bomb.png", "225.0 MP", "MAX_IMAGE_PIXELS"]),
    row("bomb-reference-generate", [*GENERATE, "--ref", "{bomb}"], ["--ref=", "bomb.png"]),
    row("large-reference", [*SWEEP, "--ref", "{big}"], ["references=", "10000x10000"]),
    row("truncated-reference", [*SWEEP, "--ref", "{truncated}"],
        ["references=", "truncated.png", "cannot be read as an image"]),
    row("not-an-image-reference", [*GENERATE, "--ref", "{garbage}"],
        ["--ref=", "garbage.png", "cannot be read as an image"]),
    # a directory as --ref: said "no such file"
    row("folder-reference-sweep", [*SWEEP, "--ref", "{folder}"],
        ["references=", "a-folder", "is a directory, not an image file"]),
    row("folder-reference-generate", [*GENERATE, "--ref", "{folder}"],
        ["--ref=", "a-folder", "is a directory, not an image file"]),
    row("missing-reference", [*SWEEP, "--ref", "{tmp}/nope.png"], ["nope.png", "no such file"]),
    # guidance on a guidance-free backbone (refused at run time, so refused up front too)
    row("guidance-on-guidance-free", [*SWEEP, "--guidance-scale", "4"],
        ["guidance_scale=4.0", "guidance_mode='none'"]),
    # generate --out /read-only/x.png: a raw OSError after the image was generated
    row("generate-out-read-only", [*GENERATE[:-1], "{read_only}/x.png"],
        ["--out=", "read-only", "not writable"]),
    row("generate-out-under-a-file", [*GENERATE[:-1], "{file}/x.png"],
        ["--out=", "a-file", "not a directory"]),
    row("generate-out-unknown-format", [*GENERATE[:-1], "{tmp}/gen/img.xyz"],
        ["--out=", "'.xyz'"]),
    row("sweep-out-read-only", [*SWEEP[:-1], "{read_only}/run"],
        ["--out=", "read-only", "not writable"]),
    row("sweep-out-under-a-file", [*SWEEP[:-1], "{file}/run"], ["--out=", "a-file"]),
    row("probe-exit", [*SWEEP, "--probe-exit", "-1", "--dry-run"], ["--probe-exit=-1.0"]),
    # --scale 1e39 (inf in float32): "1 failed", the reason only in the store
    row("non-finite-cells", [*SWEEP, "--scale", "1e39"],
        ["2 cell(s) failed", "non-finite values (NaN/inf)"], code=1, prefix="error: "),
    # ADAPTERSWAP_LOAD_PLUGINS=sdxll: loaded nothing, silently
    row("plugin-typo", ["list", "backbones"],
        ["ADAPTERSWAP_LOAD_PLUGINS", "'sdxll'", "Did you mean 'sdxl'?", "adapterswap-sdxl"],
        code=0, prefix="warning: ", env={"ADAPTERSWAP_LOAD_PLUGINS": "sdxll"}),
]


def read_only(monkeypatch, folder: str) -> None:
    """Make ``folder`` read-only, also for root (which os.access lets write anywhere)."""
    os.chmod(folder, 0o555)
    real = os.access

    def access(path, mode, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if Path(path) == Path(folder) and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(checks_module.os, "access", access)


def invoke(argv, paths, monkeypatch, env=None):
    argv = [arg.format(**paths) for arg in argv]
    read_only(monkeypatch, paths["read_only"])
    if not env:
        return CliRunner().invoke(main, argv)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plugins.reset()
    try:
        return CliRunner().invoke(main, argv)
    finally:
        for name in env:
            monkeypatch.delenv(name)
        plugins.reset()
        _register_toy_plugin()


def _register_toy_plugin() -> None:
    """What tests/conftest.py does (importing ``conftest`` by name would find another
    folder's conftest in a whole-suite run)."""
    from toy_plugin import ToyPlugin

    if plugins.pm.get_plugin("toy-plugin") is None:
        plugins.register_plugin(ToyPlugin(), name="toy-plugin")


def files_under(folder: str) -> set[Path]:
    return set(Path(folder).rglob("*"))


@pytest.mark.parametrize(("argv", "words", "code", "prefix", "env"), ROWS)
def test_bad_input(argv, words, code, prefix, env, paths, monkeypatch):
    before = files_under(paths["tmp"])
    result = invoke(argv, paths, monkeypatch, env)
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    flagged = [line for line in lines if line.startswith(("error:", "warning:"))]
    assert len(flagged) == 1 and flagged[0].startswith(prefix), result.stderr
    for word in words:
        assert word in flagged[0], (word, flagged[0])
    if code == 2:  # refused before anything was written
        assert lines == flagged, result.stderr
        assert files_under(paths["tmp"]) == before
        assert not Path(paths["out"]).exists() and not Path(paths["image"]).parent.exists()
    if code == 1:  # failed after the start: every cell and its reason is in the store
        with RunStore(paths["out"], lock=False) as store:
            rows = store.rows()
        assert len(rows) == 2 and {r["status"] for r in rows} == {"failed"}
        assert all("non-finite" in r["error"] for r in rows)


DRY_RUN_ROWS = [
    pytest.param(["--ref", "{truncated}"], "references=", id="corrupt-reference"),
    pytest.param(["--ref", "{bomb}"], "references=", id="bomb-reference"),
    pytest.param(["--ref", "{folder}"], "references=", id="folder-reference"),
    pytest.param(["--guidance-scale", "4"], "guidance_scale=4.0", id="guidance-on-none"),
    pytest.param(["--backbone", "sd15", "--steps", "10000"], "steps=10000", id="sd15-steps"),
    pytest.param(["--device", "cuda"], "device='cuda'", id="device-cuda",
                 marks=no_cuda_only),
    pytest.param(["--dtype", "fp13"], "dtype='fp13'", id="dtype"),
    pytest.param(["--seeds", "99999999999999999999"], "seeds=99999999999999999999",
                 id="huge-seed"),
    pytest.param(["--height", "100000", "--width", "100000"], "height=100000", id="huge-size"),
    pytest.param(["--seeds", "0,0"], "seeds=0", id="repeated-seed"),
]


@pytest.mark.parametrize(("extra", "named"), DRY_RUN_ROWS)
def test_dry_run_fails_where_the_run_would(extra, named, paths, monkeypatch):
    argv = ["sweep", "--preset", "tiny", "--out", "{out}", "--dry-run", *extra]
    if "--backbone" not in extra:
        argv += ["--backbone", "toy-fast"]
    result = invoke(argv, paths, monkeypatch)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: invalid ") and named in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not Path(paths["out"]).exists()


def test_a_valid_dry_run_passes_and_writes_nothing(paths, monkeypatch):
    result = invoke([*SWEEP, "--ref", "{good}", "--seeds", "0,1", "--dry-run"], paths,
                    monkeypatch)
    assert result.exit_code == 0, result.output
    assert "4 cells" in result.stdout and not Path(paths["out"]).exists()


def test_references_are_read_before_any_model_loads(paths, monkeypatch):
    from adapterswap.sweep.models import ModelFactory

    def no_loading(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("a model loaded before the references were read")

    monkeypatch.setattr(ModelFactory, "backbone", no_loading)
    monkeypatch.setattr(ModelFactory, "adapter", no_loading)
    for argv in ([*SWEEP, "--ref", "{truncated}"], [*GENERATE, "--ref", "{truncated}"]):
        result = invoke(argv, paths, monkeypatch)
        assert result.exit_code == 2 and "truncated.png" in result.stderr, result.output


def test_metrics_load_after_the_first_backbone(paths, monkeypatch):
    from adapterswap.metrics.basic import Sharpness
    from adapterswap.sweep.models import ModelFactory

    events = []
    backbone, load = ModelFactory.backbone, Sharpness.load

    def record_backbone(self, name):  # noqa: ANN001
        events.append(f"backbone {name}")
        return backbone(self, name)

    def record_metric(self):  # noqa: ANN001
        events.append("metric")
        return load(self)

    monkeypatch.setattr(ModelFactory, "backbone", record_backbone)
    monkeypatch.setattr(Sharpness, "load", record_metric)
    result = invoke(["sweep", "--preset", "tiny", "--backbone", "toy-fast", "--backbone",
                     "toy-dev", "--metrics", "sharpness", "--steps", "1", "--out", "{out}"],
                    paths, monkeypatch)
    assert result.exit_code == 0, result.output
    assert events == ["backbone toy-fast", "metric", "backbone toy-dev"]


def test_missing_weights_fail_before_the_store_and_the_metrics(paths, monkeypatch):
    """HF_HUB_OFFLINE is set (conftest) and the toy's Hub repo is not cached."""
    from adapterswap.metrics.basic import Sharpness
    from adapterswap.sweep.engine import SweepEngine

    loaded = []
    monkeypatch.setattr(Sharpness, "load", lambda self: loaded.append(self) or self)
    result = invoke(["sweep", "--backbone", "toy-dev", "--metrics", "sharpness", "--out",
                     "{out}"], paths, monkeypatch)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and "--preset tiny" in result.stderr
    assert not Path(paths["out"]).exists()
    # the engine itself (the Python API): the backbone loads first, then the metrics
    spec = SweepSpec(backbones=["toy-dev"], metrics=["sharpness"], out=paths["out"])
    spec.validate()
    with RunStore(paths["out"]) as store, pytest.raises(WeightsNotFoundError):
        SweepEngine(spec, store).run()
    assert loaded == []  # the metric was never loaded


def test_python_api_refuses_steps_and_sizes_over_the_limits():
    from adapterswap.plugins import get_backbone

    backbone = get_backbone("toy-fast").tiny()
    assert backbone.max_steps == 1000 and backbone.max_pixels == 4096 * 4096
    backbone.check_inputs(num_inference_steps=1000, height=16, width=16)
    with pytest.raises(InvalidArgumentError, match="num_inference_steps=1001"):
        backbone.check_inputs(num_inference_steps=1001, height=16, width=16)
    with pytest.raises(InvalidArgumentError, match="height=8192.*max_pixels"):
        backbone.check_inputs(num_inference_steps=2, height=8192, width=4096)


def test_the_largest_seed_runs_and_is_stored_exactly(tmp_path):
    from adapterswap.sweep.engine import run_sweep

    spec = SweepSpec(backbones=["toy-fast"], preset="tiny", seeds=[0, MAX_SEED], steps=[1],
                     metrics=["sharpness"], out=str(tmp_path))
    assert run_sweep(spec).done == 2
    with RunStore(tmp_path, lock=False) as store:
        assert sorted(r["seed"] for r in store.rows()) == [0, MAX_SEED]


@pytest.mark.parametrize(("field", "value", "named"), [
    ("windows", [[0, 0.5], [0, 0.5]], "windows=[0.0, 0.5]"),
    ("scales", [1, 1], "scales=1.0"),
    ("references", ["synthetic:0", "synthetic:0"], "references='synthetic:0'"),
    ("references", ["synthetic:x"], "references='synthetic:x'"),
    ("out", 3, "--out=3"),
])
def test_spec_fields_refused_by_name(field, value, named, tmp_path):
    spec = SweepSpec(**{"backbones": ["toy-dev"], "preset": "tiny",
                        "out": str(tmp_path / "o"), field: value})
    with pytest.raises(InvalidArgumentError) as caught:
        spec.validate()
    assert str(caught.value).startswith(f"invalid {named}"), str(caught.value)
