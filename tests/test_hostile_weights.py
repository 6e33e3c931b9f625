"""Hostile or broken weight files give one clear error naming the file (issue: hardening, 2).

Real on-disk layouts are built with the tiny presets (diffusers pipelines, h94 IP-Adapter
folders, InfiniteYou, a CSD checkpoint) and then broken: a pickle that runs code when loaded, a
truncated safetensors file, a config that does not match its weights, an IP-Adapter file with
missing keys, an InfuseNet of another architecture. Each must raise one adapterswap error
(exit code 2) naming the file and what is wrong, and a pickle's payload must never run.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adapterswap.errors import (
    AdapterswapError,
    InvalidArgumentError,
    UnsafeWeightsError,
    WeightsNotFoundError,
)

pytest.importorskip("adapterswap_sd15")
pytest.importorskip("adapterswap_sdxl")
pytest.importorskip("adapterswap_flux")

from adapterswap_flux.infusenet import InfuseNet, save_tiny_infiniteyou  # noqa: E402
from adapterswap_sd15.adapters import ObjectIPAdapter  # noqa: E402
from adapterswap_sd15.backbones import SD15Backbone  # noqa: E402
from adapterswap_sdxl.adapters import StyleIPAdapter  # noqa: E402
from adapterswap_sdxl.backbones import SDXLBackbone  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Pickles as ``open(marker, "w")``: unpickling it creates the marker file, so a test can
    see whether a loader ran code from the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def hostile_pickle(path: Path, marker: Path, content: dict | None = None) -> Path:
    """Write a torch checkpoint whose unpickling would create ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(content or {}), "payload": Payload(marker)}, str(path))
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def copy(source: str | Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def one_line_error(exc: pytest.ExceptionInfo, *names: str) -> str:
    """The error is an adapterswap usage error (exit 2) on one line naming every ``names``."""
    message = str(exc.value)
    assert isinstance(exc.value, AdapterswapError) and exc.value.exit_code == 2, message
    assert "\n" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sd15():
    return SD15Backbone.tiny(0)


@pytest.fixture(scope="module")
def sdxl():
    return SDXLBackbone.tiny(0)


@pytest.fixture(scope="module")
def object_adapter_dir(sd15):
    """The tiny SD 1.5 IP-Adapter Plus folder (h94 layout: models/...)."""
    return Path(ObjectIPAdapter.tiny(sd15).source)


@pytest.fixture(scope="module")
def style_adapter_dir(sdxl):
    """The tiny SDXL IP-Adapter folder (h94 layout: sdxl_models/...)."""
    return Path(StyleIPAdapter.tiny(sdxl).source)


@pytest.fixture(scope="module")
def infiniteyou(tmp_path_factory, sd15):
    """A tiny InfiniteYou repository (InfuseNetModel, image_proj_model.bin, face models) for the
    tiny FLUX transformer, and that transformer's config."""
    from adapterswap_flux.tiny import save_tiny_pipeline

    base = tmp_path_factory.mktemp("infiniteyou")
    flux = save_tiny_pipeline("flux-dev", base / "flux-dev", 0)
    config = json.loads((flux / "transformer" / "config.json").read_text())
    return save_tiny_infiniteyou(base / "InfiniteYou", config, 0), flux, config


def model_dir(root: Path) -> Path:
    return root / "infu_flux_v1.0" / "aes_stage2"


# ------------------------------------------------------------------- 1. pickles that run code
def test_the_payload_is_live(tmp_path):
    """Unpickled without restrictions, the payload creates its marker: so the absent markers
    below mean no loader ran it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_pickled_image_projection_of_infusenet_is_refused(infiniteyou, tmp_path):
    root = copy(infiniteyou[0], tmp_path / "InfiniteYou")
    marker = tmp_path / "ran"
    path = model_dir(root) / "image_proj_model.bin"
    path.unlink()
    hostile_pickle(path, marker)
    with pytest.raises(UnsafeWeightsError) as exc:
        InfuseNet(str(root), device="cpu").load()
    one_line_error(exc, str(path), "weights_only=True", "convert it to safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_pickled_legacy_ip_adapter_bin_is_refused(family, object_adapter_dir, style_adapter_dir,
                                                  tmp_path):
    adapter_class, source, weight_name = {
        "sd15": (ObjectIPAdapter, object_adapter_dir, "models/ip-adapter-plus_sd15.bin"),
        "sdxl": (StyleIPAdapter, style_adapter_dir, "sdxl_models/ip-adapter_sdxl.bin"),
    }[family]
    root = copy(source, tmp_path / "IP-Adapter")
    marker = tmp_path / "ran"
    path = root / weight_name
    legacy = torch.load(str(path), weights_only=True)  # the real legacy file loads
    assert set(legacy) == {"image_proj", "ip_adapter"}
    hostile_pickle(path, marker, {"image_proj": legacy["image_proj"]})
    with pytest.raises(UnsafeWeightsError) as exc:
        adapter_class(str(root), device="cpu", weight_name=weight_name).load()
    one_line_error(exc, str(path), "not loaded")
    assert not marker.exists()


def test_pickled_csd_checkpoint_is_refused(tmp_path):
    pytest.importorskip("adapterswap_metrics")
    from adapterswap_metrics.clip_metrics import StyleSimilarity

    marker = tmp_path / "ran"
    path = hostile_pickle(tmp_path / "checkpoint.pth", marker,
                          {"model_state_dict": {"last_layer_style": torch.zeros(4, 2)}})
    with pytest.raises(UnsafeWeightsError) as exc:
        StyleSimilarity(csd_weights=str(path), device="cpu").load()
    one_line_error(exc, str(path), "weights_only=True")
    assert not marker.exists()


def test_pickled_arcface_weights_are_refused(tmp_path):
    from adapterswap_flux.face import _load_arcface

    marker = tmp_path / "ran"
    path = hostile_pickle(tmp_path / "recognition_arcface_ir_se50.pth", marker)
    with pytest.raises(UnsafeWeightsError) as exc:
        _load_arcface(path)
    one_line_error(exc, str(path))
    assert not marker.exists()


def test_model_directory_with_pickled_weights_is_refused(sd15, tmp_path):
    """Backbones load safetensors only: a component with only a pickle is refused, naming it
    and saying to convert it, and nothing in it runs."""
    root = copy(sd15.source, tmp_path / "sd15")
    marker = tmp_path / "ran"
    (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    hostile_pickle(root / "vae" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(UnsafeWeightsError) as exc:
        SD15Backbone(str(root), device="cpu").load()
    one_line_error(exc, str(root / "vae"), "diffusion_pytorch_model.bin",
                   "convert it to safetensors")
    # a required component (the UNet) with only a pickle: named before anything loads
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    hostile_pickle(root / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(WeightsNotFoundError) as exc:
        SD15Backbone(str(root), device="cpu").load()
    one_line_error(exc, "unet/diffusion_pytorch_model.bin", "convert it to safetensors")
    assert not marker.exists()


def test_diffusers_itself_reads_bin_weights_with_weights_only(sd15, tmp_path):
    """Guard for a diffusers upgrade: were a .bin ever loaded by diffusers directly, it would
    not run the payload either (diffusers 0.42 uses torch.load(weights_only=True))."""
    from diffusers import AutoencoderKL

    folder = copy(Path(sd15.source) / "vae", tmp_path / "vae")
    marker = tmp_path / "ran"
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    hostile_pickle(folder / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(Exception):  # noqa: B017 - whatever diffusers raises, it must not run it
        AutoencoderKL.from_pretrained(str(folder), use_safetensors=False)
    assert not marker.exists()


def test_custom_code_in_a_model_directory_never_runs(sd15, tmp_path):
    root = copy(sd15.source, tmp_path / "sd15")
    marker = tmp_path / "ran"
    edit_json(root / "model_index.json", unet=["evil_unet", "EvilUNet"])
    script = root / "unet" / "evil_unet.py"
    script.write_text(f"open({str(marker)!r}, 'w')\nclass EvilUNet:\n    pass\n")
    with pytest.raises(UnsafeWeightsError) as exc:
        SD15Backbone(str(root), device="cpu").load()
    one_line_error(exc, str(script), "never runs code")
    assert not marker.exists()


def test_no_trust_remote_code_anywhere():
    """No loader passes trust_remote_code (it would let a model directory run its code)."""
    sources = [*sorted((REPO / "adapterswap").rglob("*.py")),
               *sorted((REPO / "plugins").glob("*/adapterswap_*/**/*.py"))]
    assert len(sources) > 20
    offenders = [str(p.relative_to(REPO)) for p in sources
                 if re.search(r"trust_remote_code\s*=", p.read_text())]
    assert offenders == []


# -------------------------------------------------------------- 2. truncated safetensors files
def test_truncated_backbone_weights_are_named(sd15, tmp_path):
    root = copy(sd15.source, tmp_path / "sd15")
    path = truncate(root / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsNotFoundError) as exc:
        SD15Backbone(str(root), device="cpu").load()
    one_line_error(exc, str(path), "truncated or corrupt safetensors file")


def test_truncated_ip_adapter_file_is_named(style_adapter_dir, tmp_path):
    root = copy(style_adapter_dir, tmp_path / "IP-Adapter")
    path = truncate(root / "sdxl_models" / "ip-adapter_sdxl.safetensors")
    with pytest.raises(WeightsNotFoundError) as exc:
        StyleIPAdapter(str(root), device="cpu").load()
    one_line_error(exc, str(path), "truncated or corrupt safetensors file")


def test_truncated_infusenet_weights_are_named(infiniteyou, tmp_path):
    root = copy(infiniteyou[0], tmp_path / "InfiniteYou")
    path = truncate(model_dir(root) / "InfuseNetModel" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsNotFoundError) as exc:
        InfuseNet(str(root), device="cpu").load()
    one_line_error(exc, str(path), "truncated or corrupt safetensors file")


def test_garbage_header_is_named(sd15, tmp_path):
    root = copy(sd15.source, tmp_path / "sd15")
    path = root / "text_encoder" / "model.safetensors"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(WeightsNotFoundError) as exc:
        SD15Backbone(str(root), device="cpu").load()
    one_line_error(exc, str(path), "truncated or corrupt safetensors file")


# ------------------------------------------------------ 3. configs that do not match the weights
def test_unet_config_with_other_widths_is_named(sd15, tmp_path):
    root = copy(sd15.source, tmp_path / "sd15")
    config = root / "unet" / "config.json"
    widths = json.loads(config.read_text())["block_out_channels"]
    edit_json(config, block_out_channels=[2 * w for w in widths])
    with pytest.raises(WeightsNotFoundError) as exc:
        SD15Backbone(str(root), device="cpu").load()
    message = one_line_error(exc, str(config), "diffusion_pytorch_model.safetensors",
                             "in the weights but")
    assert "conv_in" in message


def test_text_encoder_config_with_more_layers_is_not_filled_at_random(sd15, tmp_path):
    """transformers would initialise the missing layer at random with a log line."""
    root = copy(sd15.source, tmp_path / "sd15")
    config = root / "text_encoder" / "config.json"
    layers = json.loads(config.read_text())["num_hidden_layers"]
    edit_json(config, num_hidden_layers=layers + 1)
    with pytest.raises(WeightsNotFoundError) as exc:
        SD15Backbone(str(root), device="cpu").load()
    one_line_error(exc, str(config), "lacks", f"encoder.layers.{layers}.")


@pytest.mark.parametrize("delta, expected", [(1, "lacks"), (-1, "layers the config lacks")])
def test_transformer_config_with_other_layer_count_is_named(infiniteyou, tmp_path, delta,
                                                            expected):
    """More layers than the weights: diffusers would fill them at random; fewer: it would drop
    the extra ones. Both are refused."""
    from adapterswap_flux.backbones import FluxDev

    root = copy(infiniteyou[1], tmp_path / "flux-dev")
    config = root / "transformer" / "config.json"
    edit_json(config, num_layers=infiniteyou[2]["num_layers"] + delta)
    with pytest.raises(WeightsNotFoundError) as exc:
        FluxDev(str(root), device="cpu", dtype="fp32").load()
    one_line_error(exc, str(config), "does not match", expected, "transformer_blocks.")


def test_component_of_another_class_is_named(sd15, tmp_path):
    root = copy(sd15.source, tmp_path / "sd15")
    config = root / "vae" / "config.json"
    edit_json(config, _class_name="UNet2DModel")
    with pytest.raises(WeightsNotFoundError) as exc:
        SD15Backbone(str(root), device="cpu").load()
    one_line_error(exc, str(config), "UNet2DModel", "AutoencoderKL")


# ------------------------------------------------------------- 4. IP-Adapter files missing keys
def _resave(path: Path, drop) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if not drop(k)}, str(path))


def test_ip_adapter_without_image_projection_is_named(style_adapter_dir, tmp_path):
    root = copy(style_adapter_dir, tmp_path / "IP-Adapter")
    path = root / "sdxl_models" / "ip-adapter_sdxl.safetensors"
    _resave(path, lambda key: key.startswith("image_proj."))
    with pytest.raises(WeightsNotFoundError) as exc:
        StyleIPAdapter(str(root), device="cpu").load()
    one_line_error(exc, str(path), "no 'image_proj' weights")


def test_ip_adapter_missing_a_projection_key_is_named(style_adapter_dir, tmp_path):
    root = copy(style_adapter_dir, tmp_path / "IP-Adapter")
    path = root / "sdxl_models" / "ip-adapter_sdxl.safetensors"
    _resave(path, lambda key: key == "image_proj.proj.weight")
    with pytest.raises(WeightsNotFoundError) as exc:
        StyleIPAdapter(str(root), device="cpu").load()
    one_line_error(exc, str(path), "image_proj.proj.weight")


@pytest.mark.parametrize("dropped", ["ip_adapter.3.to_v_ip.weight", "image_proj.latents",
                                     "image_proj.layers.1.0.to_kv.weight"])
def test_ip_adapter_plus_missing_keys_is_named(object_adapter_dir, tmp_path, dropped):
    root = copy(object_adapter_dir, tmp_path / "IP-Adapter")
    path = root / "models" / "ip-adapter-plus_sd15.safetensors"
    _resave(path, lambda key: key == dropped)
    with pytest.raises(WeightsNotFoundError) as exc:
        ObjectIPAdapter(str(root), device="cpu").load()
    one_line_error(exc, str(path), "incomplete", dropped)


def test_ip_adapter_with_too_few_layers_is_named_on_attach(sdxl, style_adapter_dir, tmp_path):
    """Layers missing at the end only show against the UNet: named when attaching, and the
    UNet is left as it was."""
    from safetensors.torch import load_file, save_file

    root = copy(style_adapter_dir, tmp_path / "IP-Adapter")
    path = root / "sdxl_models" / "ip-adapter_sdxl.safetensors"
    tensors = load_file(str(path))
    last = max(int(k.split(".")[1]) for k in tensors if k.startswith("ip_adapter."))
    save_file({k: v for k, v in tensors.items() if not k.startswith(f"ip_adapter.{last}.")},
              str(path))
    adapter = StyleIPAdapter(str(root), device="cpu").load()
    before = dict(sdxl.pipe.unet.attn_processors)
    with pytest.raises(WeightsNotFoundError) as exc:
        adapter.attach(sdxl)
    one_line_error(exc, str(path), f"ip_adapter.{last}.to_k_ip.weight")
    assert dict(sdxl.pipe.unet.attn_processors) == before and adapter.attached_to is None


def test_file_that_is_no_ip_adapter_is_named(style_adapter_dir, tmp_path):
    root = copy(style_adapter_dir, tmp_path / "IP-Adapter")
    path = root / "sdxl_models" / "ip-adapter_sdxl.safetensors"
    _resave(path, lambda key: True)  # an empty safetensors file
    with pytest.raises(InvalidArgumentError) as exc:
        StyleIPAdapter(str(root), device="cpu").load()
    one_line_error(exc, str(path), "not an IP-Adapter file")


# -------------------------------------------------------- 5. InfuseNet of the wrong architecture
def test_infusenet_with_other_joint_attention_dim_is_named(infiniteyou, tmp_path):
    from adapterswap_flux.tiny import tiny_flux_controlnet

    root = copy(infiniteyou[0], tmp_path / "InfiniteYou")
    folder = model_dir(root) / "InfuseNetModel"
    shutil.rmtree(folder)
    other = {**infiniteyou[2], "joint_attention_dim": infiniteyou[2]["joint_attention_dim"] * 2}
    tiny_flux_controlnet(0, transformer_config=other).save_pretrained(str(folder))
    with pytest.raises(WeightsNotFoundError) as exc:
        InfuseNet(str(root), device="cpu").load()
    one_line_error(exc, str(folder), "image_proj_model.bin",
                   f"joint_attention_dim={other['joint_attention_dim']}")


def test_sd_controlnet_in_place_of_infusenet_is_named(infiniteyou, tmp_path):
    from diffusers import ControlNetModel

    root = copy(infiniteyou[0], tmp_path / "InfiniteYou")
    folder = model_dir(root) / "InfuseNetModel"
    shutil.rmtree(folder)
    torch.manual_seed(0)
    ControlNetModel(block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                    layers_per_block=1, cross_attention_dim=8, attention_head_dim=2,
                    norm_num_groups=4,
                    conditioning_embedding_out_channels=(4, 8)).save_pretrained(str(folder))
    with pytest.raises(WeightsNotFoundError) as exc:
        InfuseNet(str(root), device="cpu").load()
    one_line_error(exc, str(folder / "config.json"), "ControlNetModel",
                   "not FluxControlNetModel")


def test_infusenet_config_not_matching_its_weights_is_named(infiniteyou, tmp_path):
    root = copy(infiniteyou[0], tmp_path / "InfiniteYou")
    config = model_dir(root) / "InfuseNetModel" / "config.json"
    edit_json(config, num_single_layers=json.loads(config.read_text())["num_single_layers"] + 1)
    with pytest.raises(WeightsNotFoundError) as exc:
        InfuseNet(str(root), device="cpu").load()
    one_line_error(exc, str(config), "single_transformer_blocks.")


# ------------------------------------------------------------------------------------- the CLI
def test_cli_prints_one_line_naming_the_file(sd15, tmp_path):
    from adapterswap.cli import main

    root = copy(sd15.source, tmp_path / "sd15")
    path = truncate(root / "unet" / "diffusion_pytorch_model.safetensors")
    result = CliRunner().invoke(main, ["generate", "--backbone", "sd15", "--source", str(root),
                                       "--prompt", "x", "--adapter", "none",
                                       "--out", str(tmp_path / "out.png")])
    assert result.exit_code == 2, (result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert "truncated or corrupt safetensors file" in errors[0]
