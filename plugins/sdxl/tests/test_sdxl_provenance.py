"""Provenance of the distilled SDXL backbones' own weights: a cell's weights identity names
the LoRA or UNet file each one reads besides its SDXL-base source
(:meth:`~adapterswap.backbone.Backbone.extra_weights`), so another file at the same path is
another cell. Only files are hashed here: nothing loads."""

from __future__ import annotations

import pytest
import torch
from adapterswap_sdxl.backbones import LIGHTNING_UNET, tiny_sdxl_dir
from adapterswap_sdxl.distilled import (
    DMD2_UNET,
    HYPER_SDXL_4STEP,
    HYPER_SDXL_8STEP,
    TCD_LORA_FILE,
)

from adapterswap.plugins import get_backbone
from adapterswap.sweep.provenance import resolve_provenance
from adapterswap.sweep.spec import SweepSpec

#: backbone, label, the option naming the file's directory, the option naming the file in it,
#: the default file, the default repo.
EXTRA = [
    ("sdxl-lightning", "unet", "unet", "unet_file", LIGHTNING_UNET, "ByteDance/SDXL-Lightning"),
    ("sdxl-dmd2", "unet", "unet", "unet_file", DMD2_UNET, "tianweiy/DMD2"),
    ("sdxl-hyper", "lora", "lora", "lora_file", HYPER_SDXL_8STEP, "ByteDance/Hyper-SD"),
    ("sdxl-tcd", "lora", "lora", "lora_file", TCD_LORA_FILE, "h1t/TCD-SDXL-LoRA"),
]


@pytest.fixture(scope="module")
def base() -> str:
    """The tiny SDXL-base pipeline directory, as every one of these backbones' source."""
    return str(tiny_sdxl_dir(0, None))


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


@pytest.mark.parametrize("name, label, option, file_option, filename, repo", EXTRA)
def test_provenance_identifies_the_extra_file(name, label, option, file_option, filename,
                                              repo, base, tmp_path):
    """The file given as a path shows as ``+ <label>:local:<hash>`` after the base's identity,
    a directory holding it gives the same, and other bytes give another identity."""
    file = tmp_path / "weights" / filename
    write_weights(file, 1.0)
    first = weights_identity(name, base, tmp_path / "run", **{option: str(file)})
    base_id, _, extra = first.partition(f" + {label}:local:")
    assert base_id.startswith("local:") and extra and " + " not in extra
    assert weights_identity(name, base, tmp_path / "run", **{option: str(file.parent)}) == first
    write_weights(file, 2.0, columns=5)
    second = weights_identity(name, base, tmp_path / "run", **{option: str(file)})
    assert second.startswith(f"{base_id} + {label}:local:") and second != first
    # another file name in the same directory is another file
    write_weights(tmp_path / "weights" / "other.safetensors", 1.0)
    other = weights_identity(name, base, tmp_path / "run",
                             **{option: str(file.parent), file_option: "other.safetensors"})
    assert other.startswith(f"{base_id} + {label}:local:") and other not in (first, second)


@pytest.mark.parametrize("name, label, option, file_option, filename, repo", EXTRA)
def test_default_file_is_named_by_repo_and_file(name, label, option, file_option, filename,
                                                repo, base, tmp_path):
    cls = get_backbone(name)
    assert cls.extra_weights({}) == {label: (repo, (filename,))}
    assert cls.extra_weights({file_option: "x.safetensors"}) == {
        label: (repo, ("x.safetensors",))}
    identity = weights_identity(name, base, tmp_path / "run")
    assert f" + {label}:hub:{repo}@" in identity


@pytest.mark.parametrize("name", ["sdxl-hyper", "sdxl-tcd"])
def test_a_fused_source_has_no_extra_file(name, base, tmp_path):
    """``lora=None``: the source has the LoRA fused, so its identity is the source's."""
    assert get_backbone(name).extra_weights({"lora": None}) == {}
    assert " + " not in weights_identity(name, base, tmp_path / "run", lora=None)


def test_hyper_lora_steps_picks_the_file_provenance_names(base, tmp_path):
    cls = get_backbone("sdxl-hyper")
    assert cls.extra_weights({"lora_steps": 4}) == {
        "lora": ("ByteDance/Hyper-SD", (HYPER_SDXL_4STEP,))}
    folder = tmp_path / "hyper"
    write_weights(folder / HYPER_SDXL_8STEP, 8.0)
    write_weights(folder / HYPER_SDXL_4STEP, 4.0)
    eight = weights_identity("sdxl-hyper", base, tmp_path / "run", lora=str(folder))
    four = weights_identity("sdxl-hyper", base, tmp_path / "run", lora=str(folder),
                            lora_steps=4)
    assert four != eight
    assert four == weights_identity("sdxl-hyper", base, tmp_path / "run",
                                    lora=str(folder / HYPER_SDXL_4STEP))


def test_turbo_and_base_read_no_extra_file(base, tmp_path):
    for name in ("sdxl-turbo", "sdxl"):
        assert get_backbone(name).extra_weights({}) == {}
        assert " + " not in weights_identity(name, base, tmp_path / "run")
