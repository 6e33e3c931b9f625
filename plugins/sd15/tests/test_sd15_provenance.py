"""Provenance of the distilled SD 1.5 backbones' LoRA files: a cell's weights identity names
the LoRA each one fuses besides its SD 1.5 source
(:meth:`~adapterswap.backbone.Backbone.extra_weights`), so another file at the same path is
another cell. Only files are hashed here: nothing loads."""

from __future__ import annotations

import pytest
import torch
from adapterswap_sd15.backbones import LCM_LORA, LCM_LORA_FILE, tiny_sd15_dir
from adapterswap_sd15.distilled import HYPER_SD, HYPER_SD15_4STEP, HYPER_SD15_8STEP

from adapterswap.plugins import get_backbone
from adapterswap.sweep.provenance import resolve_provenance
from adapterswap.sweep.spec import SweepSpec

#: backbone, the default LoRA file, the default repo.
LORAS = [("sd15-lcm", LCM_LORA_FILE, LCM_LORA), ("sd15-hyper", HYPER_SD15_8STEP, HYPER_SD)]


@pytest.fixture(scope="module")
def base() -> str:
    """The tiny SD 1.5 pipeline directory, as both backbones' source."""
    return str(tiny_sd15_dir(0, None))


def weights_identity(name, base, out, **options):
    spec = SweepSpec(backbones=[name], adapter="none", sources={name: base},
                     backbone_options=options, out=str(out))
    return resolve_provenance(spec.validate()).weights[f"backbone:{name}"]


def write_weights(path, value: float, columns: int = 4):
    """A small safetensors file; another ``columns`` changes its size too, so the weights
    hash cache (keyed on size and mtime) sees the change on a coarse-clock filesystem."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": torch.full((4, columns), value)}, str(path))


@pytest.mark.parametrize("name, filename, repo", LORAS)
def test_provenance_identifies_the_lora_file(name, filename, repo, base, tmp_path):
    """The LoRA given as a file shows as ``+ lora:local:<hash>`` after the base's identity, a
    directory holding it gives the same, and other bytes give another identity."""
    file = tmp_path / "lora" / filename
    write_weights(file, 1.0)
    first = weights_identity(name, base, tmp_path / "run", lora=str(file))
    base_id, _, extra = first.partition(" + lora:local:")
    assert base_id.startswith("local:") and extra and " + " not in extra
    assert weights_identity(name, base, tmp_path / "run", lora=str(file.parent)) == first
    write_weights(file, 2.0, columns=5)
    second = weights_identity(name, base, tmp_path / "run", lora=str(file))
    assert second.startswith(f"{base_id} + lora:local:") and second != first
    write_weights(tmp_path / "lora" / "other.safetensors", 1.0)
    other = weights_identity(name, base, tmp_path / "run", lora=str(file.parent),
                             lora_file="other.safetensors")
    assert other.startswith(f"{base_id} + lora:local:") and other not in (first, second)


@pytest.mark.parametrize("name, filename, repo", LORAS)
def test_default_lora_is_named_by_repo_and_file(name, filename, repo, base, tmp_path):
    cls = get_backbone(name)
    assert cls.extra_weights({}) == {"lora": (repo, (filename,))}
    assert cls.extra_weights({"lora_file": "x.safetensors"}) == {
        "lora": (repo, ("x.safetensors",))}
    assert f" + lora:hub:{repo}@" in weights_identity(name, base, tmp_path / "run")


@pytest.mark.parametrize("name, filename, repo", LORAS)
def test_a_fused_source_has_no_lora_file(name, filename, repo, base, tmp_path):
    """``lora=None``: the source is the distilled model, so its identity is the source's."""
    assert get_backbone(name).extra_weights({"lora": None}) == {}
    assert " + " not in weights_identity(name, base, tmp_path / "run", lora=None)


def test_hyper_lora_steps_picks_the_file_provenance_names(base, tmp_path):
    cls = get_backbone("sd15-hyper")
    assert cls.extra_weights({"lora_steps": 4}) == {"lora": (HYPER_SD, (HYPER_SD15_4STEP,))}
    folder = tmp_path / "hyper"
    write_weights(folder / HYPER_SD15_8STEP, 8.0)
    write_weights(folder / HYPER_SD15_4STEP, 4.0)
    eight = weights_identity("sd15-hyper", base, tmp_path / "run", lora=str(folder))
    four = weights_identity("sd15-hyper", base, tmp_path / "run", lora=str(folder),
                            lora_steps=4)
    assert four != eight
    assert four == weights_identity("sd15-hyper", base, tmp_path / "run",
                                    lora=str(folder / HYPER_SD15_4STEP))


def test_sd15_reads_no_extra_file(base, tmp_path):
    assert get_backbone("sd15").extra_weights({}) == {}
    assert " + " not in weights_identity("sd15", base, tmp_path / "run")
