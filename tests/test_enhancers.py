"""Enhancers (:mod:`adapterswap.enhancer`) and the built-in ``dcg`` on tiny weights.

- ``--enhancer`` specs parse, canonicalise and are refused by name when malformed; per-step
  schedules read as documented.
- ``dcg`` is FastFace's combination of its three forwards, per row, with the rescale; neutral
  settings (a = b = 1, rescale 0) are not installed and give the plain run bit for bit, also on
  a backbone with classifier-free guidance; steps where a schedule is neutral cost one forward.
- In a sweep, enhancers are a dimension: cells carry their enhancer and their denoiser forwards,
  latency rows are timed per enhancer, a step-parallel batch with an enhancer equals its rows
  one at a time, and cells without an enhancer keep the keys they had before enhancers existed.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adapterswap.cli import main
from adapterswap.denoise import StepContext, denoise
from adapterswap.enhancer import PredictCall, format_value, parse_enhancer, per_step
from adapterswap.errors import InvalidArgumentError
from adapterswap.plugins import get_adapter, get_backbone, get_enhancer

PROMPT = "a portrait photo of a person"


@pytest.fixture(scope="module")
def lightning():
    """A guidance-free distilled backbone with its style IP-Adapter attached."""
    backbone = get_backbone("sdxl-lightning").tiny(0)
    adapter = get_adapter("style-ip-adapter").tiny(backbone, 0)
    adapter.attach(backbone)
    yield backbone, adapter, adapter.tiny_reference(0)
    adapter.detach()


# -- specs -----------------------------------------------------------------------------------
def test_specs_parse_and_print_back():
    assert parse_enhancer("dcg") == ("dcg", {})
    name, options = parse_enhancer("dcg:a=1/1.5/1.5/1,b=3,rescale=0")
    assert name == "dcg" and options == {"a": [1.0, 1.5, 1.5, 1.0], "b": 3.0, "rescale": 0.0}
    enhancer = get_enhancer("dcg")(**options)
    assert enhancer.spec() == "dcg:a=1/1.5/1.5/1,b=3,rescale=0"
    assert parse_enhancer(enhancer.spec()) == (name, options)
    assert format_value(True) == "true" and parse_enhancer("x:flag=true")[1] == {"flag": True}
    for bad, message in [("", "NAME"), ("dcg:", "nothing after"), ("dcg:a", "key=value"),
                         ("dcg:a=1,a=2", "given twice"), ("dcg:A=1", "key=value")]:
        with pytest.raises(InvalidArgumentError, match=message):
            parse_enhancer(bad)


def test_per_step_schedules():
    assert [per_step(2.0, i, 4) for i in range(4)] == [2.0] * 4
    assert [per_step([1, 1.5, 1.5, 1], i, 4) for i in range(4)] == [1, 1.5, 1.5, 1]
    assert [per_step([1, 2], i, 4) for i in range(4)] == [1, 1, 2, 2]
    assert [per_step([1, 2, 3, 4], i, 2) for i in range(2)] == [1, 3]
    assert per_step([5, 6], 0, 1) == 5


def test_bad_options_are_named():
    dcg = get_enhancer("dcg")
    with pytest.raises(InvalidArgumentError, match="enhancer 'dcg' option.*'c'"):
        dcg(c=1)
    with pytest.raises(InvalidArgumentError, match="rescale"):
        dcg(rescale=2.0)
    with pytest.raises(InvalidArgumentError, match="a="):
        dcg(a="high")
    with pytest.raises(InvalidArgumentError, match="b="):
        dcg(b=[1.0, float("nan")])


# -- dcg --------------------------------------------------------------------------------------
def _call(backbone, adapter, reference, latents, step_indices, num_steps):
    conditioning = adapter.encode_reference(reference, backbone).repeat(latents.shape[0])
    prompt = backbone.encode_prompt([PROMPT] * latents.shape[0])
    timesteps = torch.stack([backbone.schedule(n, height=64, width=64).timesteps[i]
                             for i, n in zip(step_indices, num_steps)])
    ctx = StepContext(timesteps=timesteps, step_indices=tuple(step_indices),
                      num_steps=tuple(num_steps), height=64, width=64)
    return PredictCall(backbone, adapter, conditioning, latents, ctx, prompt, None)


def test_dcg_is_fastfaces_combination_per_row(lightning):
    backbone, adapter, reference = lightning
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    latents = backbone.prepare_latents(generators, height=64, width=64)
    rows = ([1, 0], [4, 2])  # a step-parallel batch: step 1 of 4, step 0 of 2
    dcg = get_enhancer("dcg")(a=[1.0, 2.0], b=[0.5, 3.0], rescale=0.7)

    call = _call(backbone, adapter, reference, latents, *rows)
    e0 = call.forward(text=False, identity=False, guided=False).numpy()
    e_id = call.forward(text=False, identity=True, guided=False).numpy()
    e_full = call.forward(text=True, identity=True, guided=False).numpy()
    # the three branches are what they say: the adapter's inputs change e_id, the text e_full
    assert np.abs(e_id - e0).max() > 0 and np.abs(e_full - e_id).max() > 0
    got_call = _call(backbone, adapter, reference, latents, *rows)
    got = dcg.predict(got_call).numpy()
    assert got_call.forwards == 3
    for row, (i, n) in enumerate(zip(*rows)):
        a, b = per_step([1.0, 2.0], i, n), per_step([0.5, 3.0], i, n)
        pred = e0[row] + a * (e_id[row] - e0[row]) + b * (e_full[row] - e_id[row])
        factor = (e_id[row].std(ddof=1) + e_full[row].std(ddof=1)) / (2 * pred.std(ddof=1))
        np.testing.assert_allclose(got[row], pred * (0.7 * factor + 0.3), rtol=1e-5,
                                   atol=1e-6)


def test_no_text_is_the_empty_prompt_and_no_identity_the_adapter_off(lightning):
    backbone, adapter, reference = lightning
    latents = backbone.prepare_latents([torch.Generator().manual_seed(0)], height=64, width=64)
    call = _call(backbone, adapter, reference, latents, [0], [4])
    e0 = call.forward(text=False, identity=False, guided=False)
    with adapter.switched_off():
        inputs = adapter.denoiser_inputs(backbone, call.conditioning, latents, call.ctx,
                                         call.prompt)
    assert inputs.scales == [None] and adapter.is_active(0, 4)  # back on afterwards
    expected = backbone.predict(latents, call.ctx, backbone.null_prompt(call.prompt),
                                guidance_scale=None, adapter_inputs=inputs)
    assert torch.equal(e0, expected)


@pytest.mark.parametrize("name", ["sdxl-lightning", "sdxl"])
def test_neutral_settings_are_the_plain_run_bit_for_bit(name):
    backbone = get_backbone(name).tiny(0)
    adapter = get_adapter("style-ip-adapter").tiny(backbone, 0)
    reference = adapter.tiny_reference(0)
    neutral = get_enhancer("dcg")(a=1.0, b=[1.0, 1.0], rescale=0.0)
    assert neutral.is_neutral()
    try:
        plain = denoise(backbone, PROMPT, num_inference_steps=2, seeds=[0, 1],
                        adapter=adapter, reference=reference, output_type="np")
        same = denoise(backbone, PROMPT, num_inference_steps=2, seeds=[0, 1],
                       adapter=adapter, reference=reference, output_type="np",
                       enhancer=neutral)
        changed = denoise(backbone, PROMPT, num_inference_steps=2, seeds=[0, 1],
                          adapter=adapter, reference=reference, output_type="np",
                          enhancer=get_enhancer("dcg")())
    finally:
        adapter.detach()
    assert np.array_equal(plain.images, same.images) and same.forwards == plain.forwards
    assert np.abs(plain.images - changed.images).max() > 1e-3
    # classifier-free guidance counts two forwards a step; dcg three
    assert plain.forwards == (4 if name == "sdxl" else 2) and changed.forwards == 6


def test_a_neutral_step_of_a_schedule_costs_one_forward(lightning):
    backbone, adapter, reference = lightning
    dcg = get_enhancer("dcg")(a=[1.0, 2.0], b=1.0, rescale=0.0)
    assert not dcg.is_neutral() and [dcg.forwards_at(i, 4) for i in range(4)] == [1, 1, 3, 3]
    result = denoise(backbone, PROMPT, num_inference_steps=4, seeds=[0], adapter=adapter,
                     reference=reference, output_type="np", enhancer=dcg)
    assert result.forwards == 8


def test_an_enhancer_needs_an_adapter(lightning):
    backbone = lightning[0]
    with pytest.raises(InvalidArgumentError, match="acts on an adapter"):
        denoise(backbone, PROMPT, num_inference_steps=1, enhancer=get_enhancer("dcg")())


# -- sweeps -----------------------------------------------------------------------------------
def test_sweep_cells_carry_enhancer_and_forwards(tmp_path):
    from adapterswap.sweep.engine import run_sweep
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    spec = SweepSpec(backbones=["sdxl-lightning"], preset="tiny", seeds=[0, 1], steps=[1, 2],
                     enhancers=["none", "dcg:rescale=0.5"], metrics=["sharpness", "latency"],
                     timing_repeats=1, out=str(tmp_path))
    summary = run_sweep(spec)
    assert summary.done == 8 and summary.failed == 0
    with RunStore(tmp_path, lock=False) as store:
        rows = store.rows()
        latency = store.latency_rows()
    by = {(r["enhancer"], r["seed"], r["steps"]): r for r in rows}
    assert {r["enhancer"] for r in rows} == {"none", "dcg:rescale=0.5"}
    for seed in (0, 1):
        for steps in (1, 2):
            assert by[("none", seed, steps)]["forwards"] == steps
            assert by[("dcg:rescale=0.5", seed, steps)]["forwards"] == 3 * steps
    assert {r["enhancer"] or "none" for r in latency} == {"none", "dcg:rescale=0.5"}

    # a step-parallel batch (seeds and step counts together) equals each cell run alone
    backbone = get_backbone("sdxl-lightning").tiny(0)
    adapter = get_adapter("style-ip-adapter").tiny(backbone, 0)
    from PIL import Image

    enhancer = get_enhancer("dcg")(rescale=0.5)
    try:
        for (name, seed, steps), row in by.items():
            one = denoise(backbone, row["prompt"], num_inference_steps=steps, seeds=[seed],
                          adapter=adapter, reference=adapter.tiny_reference(0),
                          enhancer=enhancer if name != "none" else None)
            stored = np.asarray(Image.open(tmp_path / row["image"]), dtype=int)
            # 8-bit images of floats that differ in the last bits (batch sizes): one level
            assert np.abs(stored - np.asarray(one.images[0], dtype=int)).max() <= 1
    finally:
        adapter.detach()


def test_cells_without_an_enhancer_keep_their_old_keys():
    from dataclasses import asdict

    from adapterswap.sweep.cells import Cell

    cell = Cell(backbone="sdxl", adapter="style-ip-adapter", scale=None, start=0.0, end=1.0,
                reference="r.png", prompt="p", seed=0, steps=4, height=64, width=64,
                guidance_scale=None, source="s", adapter_source="a", dtype="")
    legacy = asdict(cell)
    del legacy["enhancer"]
    payload = {"cell": legacy, "versions": {"adapterswap": "1"}}
    expected = hashlib.sha256(json.dumps(payload, sort_keys=True,
                                         default=str).encode()).hexdigest()[:24]
    assert cell.key({"adapterswap": "1"}) == expected
    from dataclasses import replace

    assert replace(cell, enhancer="dcg").key({"adapterswap": "1"}) != expected


def test_spec_and_cli_refuse_bad_enhancers(tmp_path):
    from adapterswap.sweep.spec import SweepSpec

    def spec(**kw):
        return SweepSpec(backbones=["sdxl-lightning"], preset="tiny", out=str(tmp_path),
                         **kw).validate()

    assert spec().enhancers == ["none"]
    assert spec(enhancers=["dcg:b=3", "none"]).enhancers == ["dcg:b=3", "none"]
    with pytest.raises(InvalidArgumentError, match="given twice"):
        spec(enhancers=["dcg", "dcg"])
    with pytest.raises(InvalidArgumentError, match="acts on an adapter"):
        spec(enhancers=["dcg"], adapter="none")
    result = CliRunner().invoke(main, ["sweep", "--backbone", "sdxl-lightning", "--preset",
                                       "tiny", "--enhancer", "dgc", "--dry-run"])
    assert result.exit_code == 2 and "dgc" in result.output and "dcg" in result.output
    listed = CliRunner().invoke(main, ["list", "enhancers", "--json"])
    assert listed.exit_code == 0 and "dcg" in {e["name"] for e in json.loads(listed.output)}


# -- swap to many targets -------------------------------------------------------------------
def test_swap_to_many_targets_with_enhancers(tmp_path):
    """One table and one plot over targets x enhancers; the source runs without enhancer;
    the enhancer-minus-none deltas carry their cost in forwards and latency."""
    from adapterswap.sweep.store import RunStore

    out = tmp_path / "swap"
    result = CliRunner().invoke(main, [
        "swap", "--from", "sdxl", "--to", "sdxl-lightning,sdxl-turbo", "--enhancer", "none",
        "--enhancer", "dcg", "--preset", "tiny", "--seeds", "0,1", "--timing-repeats", "1",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    for line in ("sdxl -> sdxl-lightning:", "sdxl -> sdxl-lightning + dcg:",
                 "sdxl -> sdxl-turbo:", "sdxl -> sdxl-turbo + dcg:"):
        assert line in result.output
    swap = json.loads((out / "swap.json").read_text())
    assert swap["targets"] == ["sdxl-lightning", "sdxl-turbo"]
    pairs = [(c["to"], c["enhancer"]) for c in swap["comparisons"]]
    assert pairs == [("sdxl-lightning", "none"), ("sdxl-lightning", "dcg"),
                     ("sdxl-turbo", "none"), ("sdxl-turbo", "dcg")]
    with RunStore(out, lock=False) as store:
        rows = store.rows()
    assert {r["enhancer"] for r in rows if r["backbone"] == "sdxl"} == {"none"}
    for c in swap["comparisons"]:
        assert c["latency"]["speedup"] > 0 and c["metrics"]
        steps = c["steps"][c["to"]][-1]
        assert c["forwards"]["to"] == (3 if c["enhancer"] == "dcg" else 1) * steps
        for d in c["metrics"].values():
            assert d["n"] == 2  # two seeds, paired
    html_text = (out / "report.html").read_text()
    assert (out / "plots" / "swap-targets.png").is_file() and "speed-up against" in html_text
    assert "sdxl-turbo + dcg" in html_text
    enhancers = json.loads((out / "enhancers.json").read_text())
    assert {(e["backbone"], e["enhancer"]) for e in enhancers} == {
        ("sdxl-lightning", "dcg"), ("sdxl-turbo", "dcg")}
    for e in enhancers:
        assert e["forwards"]["dcg"] == 3 * e["forwards"]["none"]
        assert e["latency_ratio"] is not None and e["metrics"]
    assert "Enhancers: enhancer minus none" in html_text

    bad = CliRunner().invoke(main, ["swap", "--from", "sdxl", "--to", "sdxl,sdxl-turbo",
                                    "--preset", "tiny", "--dry-run"])
    assert bad.exit_code == 2 and "--to" in bad.output


# -- the contract mixin, on both built-in enhancers and three families -----------------------
from adapterswap.testing import EnhancerContract  # noqa: E402


class TestDCGContractSDXL(EnhancerContract):
    enhancer_name = "dcg"
    options = {"a": [1.0, 1.5], "b": 2.0, "rescale": 0.5}
    neutral_options = {"a": 1.0, "b": 1.0, "rescale": 0.0}
    backbone_name, adapter_name = "sdxl-turbo", "style-ip-adapter"


class TestDCGContractSD15(EnhancerContract):
    enhancer_name = "dcg"
    options = {"a": 1.5, "b": 3.0}
    neutral_options = {"a": 1.0, "b": 1.0, "rescale": 0.0}
    backbone_name, adapter_name = "sd15-hyper", "object-ip-adapter"


class TestAttentionManipulationContract(EnhancerContract):
    enhancer_name = "attention-manipulation"
    options = {"power": 1.5, "scale": 2.0}
    neutral_options = {"power": 1.0, "scale": 1.0}
    backbone_name, adapter_name = "sdxl-dmd2", "style-ip-adapter"


def test_the_empty_prompt_is_encoded_once_not_at_every_step(lightning, monkeypatch):
    backbone, adapter, reference = lightning
    calls = []
    original = type(backbone).null_prompt

    def counting(self, prompt):
        calls.append(prompt.batch_size)
        return original(self, prompt)

    monkeypatch.setattr(type(backbone), "null_prompt", counting)
    from adapterswap.enhancer import _NULL_PROMPTS

    _NULL_PROMPTS.pop(backbone, None)
    first = denoise(backbone, PROMPT, num_inference_steps=4, seeds=[0], adapter=adapter,
                    reference=reference, output_type="np", enhancer=get_enhancer("dcg")())
    again = denoise(backbone, PROMPT, num_inference_steps=4, seeds=[0], adapter=adapter,
                    reference=reference, output_type="np", enhancer=get_enhancer("dcg")())
    assert calls == [1]  # 4 steps x 2 text-free forwards x 2 runs: one encoding
    assert np.array_equal(first.images, again.images)
