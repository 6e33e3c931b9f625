"""Compile profiles (adapterswap.fastpath.profile), the engine-owned Accelerator, the slim
Backbone's checks, and the layout of the fast-path package (no import cycle, small modules)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from adapterswap.errors import InvalidArgumentError, UsageError
from adapterswap.fastpath import (
    AUTO_COMPILE_FORWARDS,
    Accelerator,
    CompileProfile,
    FastPath,
    find_profile,
    save_profile,
    user_profile_path,
)
from adapterswap.plugins import get_backbone

H100 = "NVIDIA H100 80GB HBM3"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:  # noqa: ANN001
    """Every test reads and writes the user's profile under its own cache directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Fake:
    """A backbone class in a module outside any package: only the user's file applies."""

    __module__ = "fake_module"
    name = "fake-backbone"


def write_user(entries: list[dict[str, Any]]) -> Path:
    path = user_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": 1, "profiles": entries}))
    return path


def entry(device: str, forwards: int, backbones: tuple[str, ...] = ("fake-backbone",),
          **fields: Any) -> dict[str, Any]:
    return {"backbones": list(backbones), "device": device, "compile_mode": "default",
            "compile_scope": "regions", "pays_after_forwards": forwards,
            "measured": "test", **fields}


# ---------------------------------------------------------------------------- profiles
def test_the_plugins_ship_the_measured_h100_figures() -> None:
    flux = find_profile(get_backbone("flux-schnell"), H100)
    assert (flux.compile_mode, flux.compile_scope, flux.pays_after_image_steps) == \
        ("default", "regions", 470)
    assert flux.note is None and flux.source.endswith("adapterswap_flux/fastpath_profile.json")
    sdxl = find_profile(get_backbone("sdxl-lightning"), H100)
    assert (sdxl.compile_mode, sdxl.compile_scope, sdxl.pays_after_forwards) == \
        ("reduce-overhead", "blocks", 3700)
    for name in ("sd15", "sd15-lcm"):
        sd15 = find_profile(get_backbone(name), H100)
        assert (sd15.compile_mode, sd15.compile_scope, sd15.pays_after_forwards) == \
            ("reduce-overhead", "model", 3000)
    assert sd15.device == H100 and "per forward" in sd15.measured


def test_another_card_takes_the_nearest_profile_with_a_note() -> None:
    write_user([entry("NVIDIA A100-SXM4-80GB", 111), entry(H100, 222)])
    exact = find_profile(Fake, H100)
    assert exact.pays_after_forwards == 222 and exact.note is None
    pcie = find_profile(Fake, "NVIDIA H100 PCIe")  # two leading words in common with the H100
    assert pcie.pays_after_forwards == 222
    assert pcie.note == f"measured on {H100}, not this card (NVIDIA H100 PCIe)"
    assert pcie.report()["note"] == pcie.note and pcie.report()["source"].endswith(".json")
    cpu = find_profile(Fake, "cpu")  # nothing in common: the first entry
    assert cpu.pays_after_forwards == 111 and "not this card (cpu)" in cpu.note


def test_without_any_profile_the_general_break_even_applies() -> None:
    profile = find_profile(Fake, H100)
    assert (profile.compile_mode, profile.compile_scope) == ("default", "regions")
    assert profile.device is None and "general break-even" in profile.note
    assert not profile.repays(AUTO_COMPILE_FORWARDS - 1) and profile.repays(AUTO_COMPILE_FORWARDS)
    image_steps = CompileProfile("x", pays_after_forwards=None, pays_after_image_steps=100)
    assert image_steps.repays(25, 4) and not image_steps.repays(25, 3)


def test_the_users_profile_overrides_the_plugins_and_save_merges() -> None:
    sd15 = get_backbone("sd15")
    assert find_profile(sd15, H100).pays_after_forwards == 3000
    measured = CompileProfile("sd15", compile_mode="reduce-overhead", compile_scope="model",
                              pays_after_forwards=1234, device=H100, measured="my run")
    path = save_profile(measured)
    assert path == user_profile_path()
    mine = find_profile(sd15, H100)
    assert (mine.pays_after_forwards, mine.measured, mine.source) == (1234, "my run", str(path))
    assert find_profile(get_backbone("sd15-lcm"), H100).pays_after_forwards == 3000  # shipped
    save_profile(CompileProfile("sd15", pays_after_forwards=99, device=H100))  # replaces
    save_profile(CompileProfile("sd15", pays_after_forwards=7, device="NVIDIA L4"))
    entries = json.loads(path.read_text())["profiles"]
    assert [(e["device"], e["pays_after_forwards"]) for e in entries] == [(H100, 99),
                                                                          ("NVIDIA L4", 7)]
    with pytest.raises(UsageError, match="card"):
        save_profile(CompileProfile("sd15"))  # the general default was measured nowhere


@pytest.mark.parametrize("bad, problem", [
    ("not json", "not JSON"),
    ({"format": 2, "profiles": []}, "format"),
    ({"format": 1, "profiles": [entry(H100, 0)]}, "integer >= 1"),
    ({"format": 1, "profiles": [entry(H100, 5, pays_after_image_steps=5)]}, "exactly one"),
    ({"format": 1, "profiles": [entry(H100, 5, compile_mode="turbo")]}, "compile_mode"),
    ({"format": 1, "profiles": [entry(H100, 5, compile_scope="all")]}, "compile_scope"),
    ({"format": 1, "profiles": [entry(H100, 5, backbones=())]}, "backbones"),
    ({"format": 1, "profiles": [entry(H100, 5, colour="red")]}, "unknown fields"),
])
def test_a_malformed_profile_is_an_error_naming_the_file(bad: Any, problem: str) -> None:
    path = user_profile_path()
    path.parent.mkdir(parents=True)
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(UsageError, match=problem) as info:
        find_profile(Fake, H100)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------- accelerator
def test_the_accelerator_compiles_as_its_profile_says() -> None:
    backbone = get_backbone("sd15").tiny()
    accelerator = Accelerator(backbone)
    assert accelerator.fast_path is None and accelerator.block_cache is None
    assert accelerator.profile.note.endswith("not this card (cpu)")  # the H100 figures
    assert accelerator.compile_repays(3000, 1) and not accelerator.compile_repays(2999, 8)
    blocks = Accelerator(get_backbone("sd15").tiny(),
                         profile=CompileProfile("sd15", compile_scope="blocks"))
    report = blocks.enable(FastPath(compile=True))
    assert report["compiled"][0].startswith("denoiser: BasicTransformerBlock[")
    assert report["compiled"][0].endswith("(default)")


def test_denoise_calls_the_accelerators_hooks() -> None:
    from contextlib import contextmanager

    from adapterswap.denoise import denoise

    calls: list[str] = []

    class Recorder:
        fast_path = block_cache = None

        def begin_run(self) -> None:
            calls.append("run")

        def keep_rows(self, rows: list[int]) -> None:
            calls.append("rows")

        def begin_step(self) -> None:
            calls.append("step")

        @contextmanager
        def step_context(self) -> Any:
            calls.append("enter")
            yield
            calls.append("exit")

    backbone = get_backbone("toy-dev").tiny()
    plain = denoise(backbone, "a cat", num_inference_steps=3, output_type="pt").images
    hooked = denoise(backbone, "a cat", num_inference_steps=3, output_type="pt",
                     accelerator=Recorder()).images
    assert calls == ["run", "enter", "step", "step", "step", "exit"]
    assert (plain == hooked).all()


def test_the_model_factory_keeps_one_accelerator_per_backbone() -> None:
    from adapterswap.sweep.models import ModelFactory

    models = ModelFactory(preset="tiny")
    backbone = models.backbone("toy-dev")
    accelerator = models.accelerator(backbone)
    assert models.accelerator(backbone) is accelerator
    assert models.accelerator(models.backbone("toy-dev")) is not accelerator
    models.forget(backbone)
    assert models.accelerator(backbone) is not accelerator


def test_a_sweep_reports_the_compile_profile(tmp_path) -> None:  # noqa: ANN001
    from adapterswap.sweep.engine import SweepEngine
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    spec = SweepSpec(backbones=["sd15"], preset="tiny", steps=[1], timing_repeats=0,
                     metrics=["sharpness"], out=str(tmp_path / "run")).validate()
    with RunStore(spec.out) as store:
        summary = SweepEngine(spec, store).run()
    report = summary.fast_path["sd15"]
    assert report["compiled"] == []  # a CPU sweep never compiles by itself
    assert report["compile_profile"]["pays_after_forwards"] == 3000
    assert report["compile_profile"]["note"] == f"measured on {H100}, not this card (cpu)"


# ---------------------------------------------------------------------------- backbone
def test_class_problems_check_size_multiple_and_tiny_size() -> None:
    from adapterswap.backbone import Backbone

    base = get_backbone("toy-dev")
    assert Backbone.class_problems(base) == []
    for attrs, problem in (({"size_multiple": 0}, "size_multiple=0"),
                           ({"size_multiple": True}, "size_multiple=True"),
                           ({"tiny_size": (64, 60)}, "tiny_size=(64, 60)"),
                           ({"tiny_size": (64,)}, "tiny_size=(64,)"),
                           ({"size_multiple": 16, "tiny_size": (64, 72)}, "size_multiple=16")):
        klass = type("Bad", (base,), attrs)
        assert any(problem in p for p in Backbone.class_problems(klass)), attrs
    assert Backbone.class_problems(type("Good", (base,), {"size_multiple": 16,
                                                          "tiny_size": (32, 64)})) == []


def test_check_inputs_validates_the_guidance_scale() -> None:
    dev, fast = get_backbone("toy-dev").tiny(), get_backbone("flux-schnell")
    settings = {"num_inference_steps": 2, "height": 16, "width": 16}
    dev.check_inputs(**settings, guidance_scale=3.5)
    dev.check_inputs(**settings, guidance_scale=None)
    for bad in (-1.0, float("nan"), float("inf"), "3"):
        with pytest.raises(InvalidArgumentError, match="guidance_scale"):
            dev.check_inputs(**settings, guidance_scale=bad)
    assert fast.guidance_mode == "none"
    schnell = fast("unused")  # not loaded: check_inputs needs no weights
    for fine in (None, 0, 1.0):
        schnell.check_inputs(**settings, guidance_scale=fine)
    with pytest.raises(InvalidArgumentError, match=r"guidance_scale=3\.5.*without guidance"):
        schnell.check_inputs(**settings, guidance_scale=3.5)


def test_devices_stay_importable_from_the_backbone_module() -> None:
    from adapterswap import backbone, devices

    assert backbone.parse_dtype is devices.parse_dtype
    assert backbone.default_device is devices.default_device
    assert not hasattr(backbone, "KNOWN_FAMILIES")


# ---------------------------------------------------------------------------- layout
def imports_of(path: Path, package: str) -> set[str]:
    """Modules ``path`` imports, at module level or inside functions, leaving out imports
    under ``if TYPE_CHECKING:`` (relative imports resolved against ``package``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_the_fast_path_package_has_no_cycle_and_small_modules() -> None:
    package = ROOT / "adapterswap" / "fastpath"
    modules = {f"adapterswap.fastpath.{p.stem}": p for p in package.glob("*.py")
               if p.stem != "__init__"}
    assert {"accelerator", "blockcache", "profile", "switches"} <= {m.rsplit(".", 1)[1]
                                                                    for m in modules}
    graph = {name: {m for m in imports_of(path, "adapterswap.fastpath") if m in modules}
             for name, path in modules.items()}
    for name, path in modules.items():
        assert len(path.read_text().splitlines()) < 450, name
        # no submodule imports the package itself (its __init__ imports every submodule)
        assert "adapterswap.fastpath" not in imports_of(path, "adapterswap.fastpath"), name

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            if nxt == target or reaches(nxt, target, seen | {nxt}):
                return True
        return False

    assert not [name for name in graph if reaches(name, name, set())]
    assert not (ROOT / "adapterswap" / "fastpath.py").exists()
    assert not (ROOT / "adapterswap" / "blockcache.py").exists()


@pytest.mark.parametrize("module", ["denoise", "backbone", "tensors", "devices",
                                    "backbone_checks"])
def test_the_loop_and_the_backbone_do_not_import_the_fast_path(module: str) -> None:
    path = ROOT / "adapterswap" / f"{module}.py"
    assert not any(m.startswith("adapterswap.fastpath") for m in imports_of(path, "adapterswap"))
    if module == "backbone":
        assert len(path.read_text().splitlines()) < 440
