"""Tests for :mod:`adapterswap.kit`, the toolkit for diffusers-based plugins: schedulers that
inject noise (checked against what real diffusers schedulers do), noise and per-sample
generators, guidance, row grouping, typed IP-Adapter inputs, IP-Adapter files and InstantStyle
scales on a small real UNet, and the package's own shape (documented modules, light imports,
no model family in its code)."""

from __future__ import annotations

import ast
import copy
import inspect
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adapterswap.errors import InvalidArgumentError, UsageError, WeightsNotFoundError
from adapterswap.kit import guidance, rows
from adapterswap.kit.ip_adapter_inputs import IPAdapterInputs, split_ip_inputs
from adapterswap.kit.noise import SampleGenerators, draw_noise
from adapterswap.kit.schedules import injects_noise

KIT = Path(__file__).resolve().parents[1] / "adapterswap" / "kit"
KIT_MODULES = sorted(p.stem for p in KIT.glob("*.py") if p.stem != "__init__")

#: What Stable Diffusion checkpoints ship (the parts every scheduler below takes).
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear"}


# ------------------------------------------------------------------------------ injects_noise
def make_scheduler(name: str, **config):
    import diffusers

    klass = getattr(diffusers, name)
    base = {} if name.startswith("FlowMatch") else SD_BETAS
    return klass.from_config({**base, **config})


def step_noise_changes_output(scheduler) -> bool:
    """Whether the first step's output depends on the generator passed to ``step``."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(4)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model_output = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    outputs = []
    for seed in (2, 3):
        run = copy.deepcopy(scheduler)
        t = run.timesteps[0]
        x = run.scale_model_input(sample, t) if hasattr(run, "scale_model_input") else sample
        kwargs = {"generator": torch.Generator().manual_seed(seed)} if takes_generator else {}
        torch.manual_seed(seed)  # schedulers that ignore the generator draw from the global one
        outputs.append(run.step(model_output, t, x, **kwargs).prev_sample)
    return not torch.equal(*outputs)


@pytest.mark.parametrize("name, config, expected", [
    ("LCMScheduler", {}, True),
    ("TCDScheduler", {}, True),  # step(eta=0.3) by default
    ("EulerAncestralDiscreteScheduler", {}, True),
    ("DDPMScheduler", {}, True),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, True),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, True),
    ("DDIMScheduler", {}, False),  # step(eta=0.0) by default
    ("EulerDiscreteScheduler", {}, False),  # step(s_churn=0.0) by default
    ("DPMSolverMultistepScheduler", {}, False),
    ("FlowMatchEulerDiscreteScheduler", {}, False),
    ("PNDMScheduler", {"skip_prk_steps": True}, False),
    ("UniPCMultistepScheduler", {}, False),
])
def test_injects_noise_matches_what_the_scheduler_does(name, config, expected):
    scheduler = make_scheduler(name, **config)
    assert injects_noise(scheduler) is expected
    assert step_noise_changes_output(scheduler) is expected


def test_injects_noise_follows_subclasses_and_step_defaults():
    from diffusers import LCMScheduler, TCDScheduler

    class MyLCM(LCMScheduler):
        pass

    class DeterministicTCD(TCDScheduler):
        def step(self, model_output, timestep, sample, eta=0.0, generator=None,
                 return_dict=True):  # noqa: ANN001
            return super().step(model_output, timestep, sample, eta=eta, generator=generator,
                                return_dict=return_dict)

    assert injects_noise(MyLCM.from_config(SD_BETAS))
    tcd = DeterministicTCD.from_config(SD_BETAS)
    assert not injects_noise(tcd) and not step_noise_changes_output(tcd)
    assert not injects_noise(object())


def test_dpm_solver_sde_injects_noise():
    pytest.importorskip("torchsde")
    assert injects_noise(make_scheduler("DPMSolverSDEScheduler"))


# ------------------------------------------------------------------------------ noise
def test_draw_noise_is_one_pipeline_draw_per_generator():
    from diffusers.utils.torch_utils import randn_tensor

    noise = draw_noise([torch.Generator().manual_seed(s) for s in (0, 1)], (4, 8, 8),
                       device="cpu", dtype=torch.float32)
    for row, seed in zip(noise, (0, 1)):
        expected = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(row, expected[0])
    with pytest.raises(InvalidArgumentError, match="generators"):
        draw_noise([], (4, 8, 8), device="cpu", dtype=torch.float32)


def test_sample_generators_follow_rows_by_content():
    tracker = SampleGenerators(capacity=2)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    latents = torch.stack([torch.full((2,), 1.0), torch.full((2,), 2.0)])
    tracker.add(latents, generators)
    assert tracker.take(latents[[1, 0]], "toy") == generators[::-1]
    with pytest.raises(UsageError, match="backbone 'toy'.*prepare_latents"):
        tracker.take(latents[:1], "toy")  # taken once, forgotten
    tracker.add(torch.arange(6.0).reshape(3, 2), [object()] * 3)  # over capacity
    with pytest.raises(UsageError):
        tracker.take(torch.tensor([[0.0, 1.0]]), "toy")  # the oldest row was dropped


# ------------------------------------------------------------------------------ guidance
def test_guidance_helpers():
    assert not guidance.uses_cfg(None) and not guidance.uses_cfg(1.0)
    assert guidance.uses_cfg(1.5)
    pred = torch.tensor([[1.0], [3.0]])
    assert torch.equal(guidance.guided(pred, 2.0), torch.tensor([[5.0]]))
    with pytest.raises(UsageError, match="backbone 'toy'.*same guidance_scale"):
        guidance.check_prompt({"negative_prompt_embeds": None}, True, "toy")
    guidance.check_prompt({"negative_prompt_embeds": None}, False, "toy")


# ------------------------------------------------------------------------------ rows
def test_group_rows_groups_equal_settings_and_inactive_rows():
    settings = [{"a": 1.0, "b": 0.5}, None, {"b": 0.5, "a": 1.0}, {"a": 0.0}, {}, {"a": 2.0}]
    groups, group_settings = rows.group_rows(settings)
    assert groups == [[0, 2], [1, 3, 4], [5]]
    assert group_settings == [{"a": 1.0, "b": 0.5}, None, {"a": 2.0}]
    assert rows.group_rows(["x", "y", "x"]) == ([[0, 2], [1]], ["x", "y"])


def test_select_and_merge_rows_restore_batch_order():
    values = [torch.arange(4.0)[:, None]]
    assert rows.select_rows(values, [0, 1, 2, 3], 4) is values
    assert rows.select_rows(None, [0], 4) is None
    picked = rows.select_rows(values, [3, 1], 4)[0]
    assert picked.flatten().tolist() == [3.0, 1.0]
    merged = rows.merge_rows([([1, 3], torch.tensor([[1.0], [3.0]])),
                              ([0, 2], torch.tensor([[0.0], [2.0]]))])
    assert merged.flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    single = torch.ones(2, 1)
    assert rows.merge_rows([([0, 1], single)]) is single


# ------------------------------------------------------------------------------ IP inputs
def fake_unet(installed: bool) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(
        encoder_hid_dim_type="ip_image_proj" if installed else None))


def test_split_ip_inputs_groups_rows_by_scales():
    embeds = [torch.zeros(3, 1, 4)]
    inputs = IPAdapterInputs(image_embeds=embeds, negative_image_embeds=None,
                             scales=[{"x": 1.0}, None, {"x": 1.0}])
    got, negative, groups, scales = split_ip_inputs(inputs, fake_unet(True), 3, "toy")
    assert got == embeds and negative is None
    assert groups == [[0, 2], [1]] and scales == [{"x": 1.0}, None]
    assert split_ip_inputs(None, fake_unet(False), 2, "toy") == (None, None, [[0, 1]], [None])


def test_split_ip_inputs_refuses_what_does_not_fit():
    inputs = IPAdapterInputs([torch.zeros(2, 1, 4)], None, [None, None])
    with pytest.raises(UsageError, match="IP-Adapter attached but predict got no adapter"):
        split_ip_inputs(None, fake_unet(True), 2, "toy")
    with pytest.raises(UsageError, match="no IP-Adapter is attached"):
        split_ip_inputs(inputs, fake_unet(False), 2, "toy")
    with pytest.raises(InvalidArgumentError, match=r"adapter_inputs=\['ip_adapter_scales'\]"):
        split_ip_inputs({"ip_adapter_scales": []}, fake_unet(True), 2, "toy")
    with pytest.raises(InvalidArgumentError, match=r"one row per sample \(3\)"):
        split_ip_inputs(inputs, fake_unet(True), 3, "toy")


# ------------------------------------------------------------------------------ IP files
@pytest.fixture(scope="module")
def unet():
    """A small real UNet with cross-attention in two down blocks, the mid block and two up
    blocks (the layout IP-Adapter code walks)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32), attention_head_dim=2, cross_attention_dim=24,
        norm_num_groups=8).eval()


def test_ip_layer_shapes_and_random_layers_fit_the_unet(unet):
    from adapterswap.kit.ip_adapter_files import check_ip_layers, missing_ip_layer_keys
    from adapterswap.kit.ip_adapter_install import cross_attention_names, ip_layer_shapes
    from adapterswap.kit.tiny import random_ip_layers

    names = cross_attention_names(unet)
    assert len(names) == 2 + 1 + 4 and all(n.endswith("attn2.processor") for n in names)
    shapes = dict(ip_layer_shapes(unet))
    assert shapes["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"] == 32
    assert shapes["up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"] == 16
    layers = random_ip_layers(unet, torch.Generator().manual_seed(0))
    assert missing_ip_layer_keys(layers) == []
    check_ip_layers(layers, unet, what="adapter 'toy'", where="toy.safetensors")
    del layers["3.to_v_ip.weight"]
    assert missing_ip_layer_keys(layers) == ["3.to_v_ip.weight"]
    with pytest.raises(WeightsNotFoundError, match="toy.safetensors' lacks ip_adapter.3.to_v"):
        check_ip_layers(layers, unet, what="adapter 'toy'", where="toy.safetensors")


def test_ip_adapter_files_round_trip_and_incomplete_files_are_named(unet, tmp_path):
    from adapterswap.kit.ip_adapter_files import missing_image_proj_keys, read_ip_adapter_file
    from adapterswap.kit.tiny import random_ip_layers, save_ip_adapter_files

    layers = random_ip_layers(unet, torch.Generator().manual_seed(0))
    proj = {"proj.weight": torch.ones(96, 8), "proj.bias": torch.zeros(96),
            "norm.weight": torch.ones(24), "norm.bias": torch.zeros(24)}
    assert missing_image_proj_keys(proj, plus=False) == []
    assert missing_image_proj_keys({"proj.weight": 1}, plus=False)[0] == "proj.bias"
    assert missing_image_proj_keys(proj, plus=True) == []  # another layout: left to diffusers
    save_ip_adapter_files(tmp_path, "toy", {"image_proj": proj, "ip_adapter": layers})
    for suffix in ("safetensors", "bin"):
        state = read_ip_adapter_file(tmp_path / f"toy.{suffix}")
        assert state["ip_adapter"].keys() == layers.keys()
        assert state["image_proj"]["proj.weight"].dtype == torch.float16
    save_ip_adapter_files(tmp_path, "half", {"image_proj": proj,
                                             "ip_adapter": {"1.to_k_ip.weight": torch.ones(1)}})
    with pytest.raises(WeightsNotFoundError, match=r"half.safetensors'.*1\.to_v_ip"):
        read_ip_adapter_file(tmp_path / "half.safetensors", what="adapter 'toy'")


def test_block_scales_target_blocks_and_name_what_the_unet_lacks(unet):
    from adapterswap.kit.instantstyle import block_scales

    every = block_scales(unet, 0.5)
    assert set(every.values()) == {0.5}
    up = block_scales(unet, {"up": {"block_1": [0.0, 1.0]}})
    assert {n for n, v in up.items() if v} == {
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor"}
    assert block_scales(unet, {"mid": 2.0})["mid_block.attentions.0.transformer_blocks.0"
                                            ".attn2.processor"] == 2.0
    with pytest.raises(InvalidArgumentError, match=r"no down_blocks\.2 with attention"):
        block_scales(unet, {"down": {"block_2": 1.0}})
    with pytest.raises(InvalidArgumentError, match="list of 2 numbers"):
        block_scales(unet, {"up": {"block_0": [1.0]}})


# ------------------------------------------------------------------------------ the package
def test_the_package_docstring_lists_every_module():
    import adapterswap.kit as kit

    for module in KIT_MODULES:
        assert f":mod:`adapterswap.kit.{module}`" in kit.__doc__, module


@pytest.mark.parametrize("module", KIT_MODULES)
def test_every_module_is_documented_and_short(module):
    path = KIT / f"{module}.py"
    source = path.read_text()
    assert ast.get_docstring(ast.parse(source)), module
    assert len(source.splitlines()) < 450, module


def test_importing_the_kit_imports_no_heavy_library():
    """Plugin modules import the kit when ``adapterswap list`` runs: it must stay fast."""
    modules = ", ".join(f"adapterswap.kit.{m}" for m in KIT_MODULES)
    code = (f"import sys, adapterswap.kit, {modules}; "
            "print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


_FAMILY = re.compile(r"flux|sdxl|sd15|sd_15|schnell|lightning|infusenet|infiniteyou", re.I)


@pytest.mark.parametrize("module", ["__init__", *KIT_MODULES])
def test_no_model_family_in_the_kits_code(module):
    """Docstrings and comments may name families as examples; the code may not."""
    source = (KIT / f"{module}.py").read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            docstrings.add(body[0].lineno)
    code = [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type not in (tokenize.COMMENT, tokenize.STRING)
            or (tok.type == tokenize.STRING and tok.start[0] not in docstrings)]
    assert not [word for word in code if _FAMILY.search(word)], module
