"""The FLUX backbones' ``memory_budget`` option (``adapterswap_flux.budget``), on the CPU:

- the plans at FLUX.1 + InfuseNet's published sizes (read from their configs on the meta
  device; nothing of 24 GB is allocated): 24 GiB evicts the text encoders and casts the
  transformer and InfuseNet to float8, streaming nothing; 16 GiB also streams single blocks,
  from the last one back; a budget that holds everything in bf16 changes nothing;
- the option's one-line refusals, before any model loads: bad values, ``cpu_offload`` or
  ``quantize_8bit`` beside it, a non-CUDA device (the tiny preset, ``load``, ``random``, the
  ``generate`` command);
- a tiny FLUX transformer with streamed blocks gives the same bits as without; a tiny
  flux-schnell + InfuseNet placed under a plan on a CPU "device" (the placement's copies made
  by the test's own function) gives the unbudgeted images bit for bit, its text encoders
  arrive for the prompt encoding and leave before the transformer's first block runs, and
  InfuseNet is placed by the backbone.

The CUDA parts (process cap, side-stream copies, float8 kernels) are measured by
``benchmarks/gpu/bench_memory.py``.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from adapterswap.errors import InvalidArgumentError, UsageError
from adapterswap.fastpath.memory import (
    GIB,
    HEADROOM_SHARE,
    Activations,
    least_budget_gib,
    plan_memory,
)
from adapterswap.plugins import get_adapter, get_backbone

SINGLE_BLOCKS = 38


@pytest.fixture(scope="module")
def published():
    """FLUX.1's transformer, CLIP-L, T5-XXL and VAE at their published sizes on the meta
    device."""
    from adapterswap_flux.budget import meta_components

    return meta_components()


def published_plan(components, budget):
    from adapterswap_flux.budget import plan_for

    return plan_for(components, budget, dtype=torch.bfloat16, height=1024, width=1024,
                    text_tokens=256)


def test_published_sizes_as_the_planner_counts_them(published):
    from adapterswap_flux.budget import pipeline_parts

    parts = {p.name: p for p in pipeline_parts(published, dtype_bytes=2)}
    assert 11.8e9 < parts["transformer"].nbytes / 2 < 12.0e9  # ~11.9B parameters in bf16
    assert 0.49 < parts["transformer"].float8_nbytes / parts["transformer"].nbytes < 0.51
    assert 2.8e9 < (parts["adapter"].nbytes - 0.2e9) / 2 < 3.1e9  # InfuseNet + resampler
    assert 4.6e9 < parts["text_encoder_2"].nbytes / 2 < 4.8e9  # T5-XXL's encoder
    assert len(parts["transformer"].blocks) == 19 + SINGLE_BLOCKS
    assert len(parts["text_encoder_2"].blocks) == 24 and len(parts["text_encoder"].blocks) == 12


def test_24_gib_float8_resident_and_text_encoders_evicted(published):
    plan = published_plan(published, 24)
    assert plan.evicted == ("text_encoder", "text_encoder_2")
    assert plan.float8 == ("transformer", "adapter") and plan.approximations() == ["fp8"]
    assert plan.streamed == ()
    assert max(plan.peaks.values()) <= 24 * GIB * (1 - HEADROOM_SHARE)
    assert plan.resident_bytes < 15 * GIB  # float8 transformer + InfuseNet, VAE


def test_16_gib_streams_single_blocks_from_the_last(published):
    plan = published_plan(published, 16)
    assert plan.evicted == ("text_encoder", "text_encoder_2")
    assert plan.float8 == ("transformer", "adapter")
    count = len(plan.streamed)
    assert 0 < count <= SINGLE_BLOCKS
    assert list(plan.streamed) == [f"transformer.single_transformer_blocks.{i}"
                                   for i in range(SINGLE_BLOCKS - 1, SINGLE_BLOCKS - 1 - count, -1)]
    assert max(plan.peaks.values()) <= 16 * GIB * (1 - HEADROOM_SHARE)
    # the two blocks in flight are float8 single blocks (~0.13 GiB each)
    assert plan.window_bytes < 0.3 * GIB
    assert plan.resident_bytes + plan.window_bytes < 15 * GIB


def test_budgets_that_hold_bf16_stay_exact_and_too_small_ones_are_refused(published):
    roomy = published_plan(published, 80)
    assert (roomy.float8, roomy.streamed, roomy.evicted) == ((), (), ())
    evicting = published_plan(published, 40)
    assert evicting.evicted and not evicting.float8 and not evicting.streamed
    with pytest.raises(InvalidArgumentError,
                       match=r"^invalid memory_budget=4.0: too small for this pipeline: it "
                             r"needs at least [0-9.]+ GiB"):
        published_plan(published, 4)


def test_the_option_says_which_budgets_approximate():
    schnell = get_backbone("flux-schnell")
    assert schnell.option_approximations({"memory_budget": 24}) == ["fp8"]
    assert schnell.option_approximations({"memory_budget": 16}) == ["fp8"]
    assert schnell.option_approximations({"memory_budget": 80}) == []
    assert schnell.option_approximations({}) == []


# ---------------------------------------------------------------------- the option
@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell", "flux-dev-turbo", "flux-dev-hyper"])
def test_every_flux_backbone_takes_and_documents_the_option(name):
    cls = get_backbone(name)
    assert "memory_budget" in cls.option_docs and "GiB" in cls.option_docs["memory_budget"]
    assert cls.check_options({"memory_budget": 24}) == {"memory_budget": 24.0}


@pytest.mark.parametrize("value", [0, -16, "24GB", True, float("nan")])
def test_bad_budgets_are_refused_in_one_line(value):
    with pytest.raises(InvalidArgumentError,
                       match=r"^invalid memory_budget=.*: must be a number of GiB > 0, e\.g\. 24$"):
        get_backbone("flux-schnell").check_options({"memory_budget": value})


@pytest.mark.parametrize("other", ["cpu_offload", "quantize_8bit"])
def test_the_budget_refuses_options_that_place_weights_too(other):
    cls = get_backbone("flux-dev")
    with pytest.raises(InvalidArgumentError,
                       match=rf"^invalid memory_budget=24.0: cannot be combined with {other} "
                             r"\(.*\); the budget places the models itself: drop one of them$"):
        cls.check_options({"memory_budget": 24, other: True})
    with pytest.raises(InvalidArgumentError, match="cannot be combined"):
        cls(memory_budget=16, **{other: True})
    assert cls.check_options({"memory_budget": 24, other: False})


def _no_cuda(monkeypatch):
    import adapterswap.backbone

    monkeypatch.setattr(adapterswap.backbone, "default_device", lambda: "cpu")


CPU_REFUSAL = (r"^invalid memory_budget=24.0: needs a CUDA device \(it caps this process's GPU "
               r"memory\), not 'cpu'$")


def test_a_non_cuda_device_is_refused_before_any_model_loads(monkeypatch, flux_schnell):
    import adapterswap_flux.published
    from adapterswap_flux.backbones import FluxBackbone

    def never(*args, **kwargs):
        raise AssertionError("nothing may load or be built before the refusal")

    monkeypatch.setattr(FluxBackbone, "load_pipeline", never)
    monkeypatch.setattr(adapterswap_flux.published, "random_flux_pipeline", never)
    _no_cuda(monkeypatch)
    cls = get_backbone("flux-schnell")
    with pytest.raises(InvalidArgumentError, match=CPU_REFUSAL):
        cls(flux_schnell.source, device="cpu", memory_budget=24).load()
    with pytest.raises(InvalidArgumentError, match=CPU_REFUSAL):
        cls(flux_schnell.source, memory_budget=24).load()  # default device: the CPU here
    with pytest.raises(InvalidArgumentError, match=CPU_REFUSAL):
        cls.random(device="cpu", memory_budget=24)
    with pytest.raises(InvalidArgumentError, match=CPU_REFUSAL):
        cls.tiny(0, cache_dir="/nonexistent/not-built", memory_budget=24)


@pytest.mark.parametrize("command, option, out", [
    ("generate", "--option", "x.png"), ("sweep", "--backbone-option", "run")])
def test_a_budget_on_the_cpu_is_refused_in_one_line_before_any_output(monkeypatch, tmp_path,
                                                                      command, option, out):
    """``generate`` before its image, ``sweep`` before its store exists."""
    from adapterswap.cli import main

    _no_cuda(monkeypatch)
    out = tmp_path / out
    result = CliRunner().invoke(main, [command, "--preset", "tiny", "--backbone",
                                       "flux-schnell", option, "memory_budget=24",
                                       "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: invalid memory_budget=24.0: needs "
                                                   "a CUDA device"), lines
    assert not out.exists()
    bad = CliRunner().invoke(main, [command, "--preset", "tiny", "--backbone",
                                    "flux-schnell", option, "memory_budget=0",
                                    "--out", str(out)])
    assert bad.exit_code == 2 and "must be a number of GiB > 0" in bad.stderr


def test_a_sweep_spec_refuses_a_conflicting_budget_before_loading(tmp_path):
    from adapterswap.sweep.spec import SweepSpec

    spec = SweepSpec(backbones=["flux-schnell"], preset="tiny", out=str(tmp_path),
                     backbone_options={"memory_budget": 24, "cpu_offload": True})
    with pytest.raises(InvalidArgumentError, match="cannot be combined with cpu_offload"):
        spec.validate()


# ---------------------------------------------------------------------- the mechanics
def _transformer_inputs(transformer, seed=0):
    config = transformer.config
    g = torch.Generator().manual_seed(seed)
    image, text = 16, 8
    return dict(
        hidden_states=torch.randn(1, image, config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5]), img_ids=torch.zeros(image, 3),
        txt_ids=torch.zeros(text, 3), return_dict=False)


def test_a_tiny_flux_transformer_streams_bit_for_bit():
    from adapterswap_flux.budget import stream_order
    from adapterswap_flux.tiny import tiny_flux_components

    from adapterswap.fastpath.streaming import BlockStreamer

    transformer = tiny_flux_components(0, guidance_embeds=False)["transformer"]
    inputs = _transformer_inputs(transformer)
    with torch.no_grad():
        expected = transformer(**inputs)[0]
    names = stream_order(transformer)
    assert names[0] == "single_transformer_blocks.3" and names[-1] == "transformer_blocks.0"
    copies = []
    blocks = [transformer.get_submodule(n) for n in reversed(names)]  # in the order they run
    streamer = BlockStreamer(blocks, "cpu", copy=lambda d, s: (copies.append(1), d.copy_(s)))
    streamer.install()
    with torch.no_grad():
        outputs = [transformer(**inputs)[0] for _ in range(2)]
    assert all(torch.equal(out, expected) for out in outputs)
    per_pass = sum(len(list(b.parameters())) + len(list(b.buffers())) for b in blocks)
    assert len(copies) == 2 * per_pass + len(list(blocks[0].parameters()))  # + the prefetch
    assert streamer.waits == 1 and streamer.max_loaded == 2


@pytest.fixture()
def placed_schnell(flux_schnell):
    """A tiny flux-schnell placed under a plan that evicts its text encoders and streams
    every transformer block, on the CPU (the placement's copies by a plain ``copy_``)."""
    from adapterswap_flux.budget import parts_and_activations

    backbone = get_backbone("flux-schnell").tiny(0)
    parts, act = parts_and_activations(backbone.pipe.components, dtype=torch.float32,
                                       height=64, width=64, text_tokens=256)
    act = Activations(encode=0, denoise=act.denoise, decode=act.decode)
    budget = least_budget_gib(parts, act, float8_available=False) * 1.0001
    plan = plan_memory(budget, parts, act, float8_available=False)
    assert plan.evicted == ("text_encoder", "text_encoder_2")
    assert len(plan.streamed) == len(parts[0].blocks) == 6
    backbone.memory_budget = budget
    backbone.place_under_budget(plan, copy=lambda dst, src: dst.copy_(src), cap=False)
    yield backbone
    backbone.unload()


def test_budgeted_images_equal_unbudgeted_ones_and_encoders_leave_first(
        flux_schnell, flux_infusenet, placed_schnell):
    from adapterswap.denoise import denoise

    reference = flux_infusenet.tiny_reference(0)
    expected = denoise(flux_schnell, "a photo", num_inference_steps=2, seeds=[0, 1],
                       adapter=flux_infusenet, reference=reference, output_type="pt").images
    flux_infusenet.detach()
    placement = placed_schnell.placement
    seen_by_first_block = []  # the encoders' visits when the transformer's first block starts
    placed_schnell.pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a: seen_by_first_block.append(list(placement.visits)))
    adapter = get_adapter("infusenet").tiny(placed_schnell, 0)
    assert adapter.attached_to is None
    images = denoise(placed_schnell, "a photo", num_inference_steps=2, seeds=[0, 1],
                     adapter=adapter, reference=reference, output_type="pt").images
    assert torch.equal(images, expected)
    assert seen_by_first_block[0] == [("text_encoder", "arrive"), ("text_encoder_2", "arrive"),
                                      ("text_encoder_2", "leave"), ("text_encoder", "leave")]
    for name in ("text_encoder", "text_encoder_2"):  # between encodings: the host copies
        resident = placement.evicted[name]
        assert all(s.current is s.home or s.current.data_ptr() == s.home.data_ptr()
                   for s in resident._rest)
    record = placed_schnell.memory_record()
    assert record["plan"]["evicted"] == ["text_encoder", "text_encoder_2"]
    assert record["streaming"]["transformer"]["max_loaded"] == 2
    assert "adapter" in record["float8_layers"]  # InfuseNet placed by the backbone
    adapter.detach()


def test_an_adapter_cast_by_a_budget_attaches_only_where_float8_runs(flux_dev, flux_infusenet):
    flux_infusenet.float8_from_budget = "flux-schnell"
    try:
        with pytest.raises(UsageError, match=r"float8 linears from memory_budget on backbone "
                                             r"'flux-schnell'; backbone 'flux-dev' runs without"):
            flux_infusenet.attach(flux_dev)
    finally:
        flux_infusenet.float8_from_budget = None


def test_a_placed_backbone_does_not_move(placed_schnell):
    with pytest.raises(InvalidArgumentError, match="needs a CUDA device"):
        placed_schnell.to("cpu")


def test_a_budgeted_cell_carries_its_budget_and_is_keyed_apart(tmp_path):
    """As ``quantize_8bit``: the option is in each cell's fields and key (and the run's
    provenance), so a stored cell knows it ran under a budget."""
    import json

    from adapterswap.sweep.spec import SweepSpec

    def first_cell(options):
        spec = SweepSpec(backbones=["flux-schnell"], preset="tiny", out=str(tmp_path),
                         steps=[1], seeds=[0], backbone_options=options).validate()
        return spec.cells()[0]

    budgeted, plain = first_cell({"memory_budget": 24}), first_cell({})
    assert json.loads(budgeted.backbone_options) == {"memory_budget": 24.0}
    assert budgeted.key({}) != plain.key({})


def test_a_budget_with_float8_marks_the_run_approximate_for_its_backbone(tmp_path):
    """``compare`` reads a run's approximations from its versions: a budget that turns float8
    on names the backbone it approximates; one that holds bf16 adds nothing."""
    from adapterswap.sweep.engine import SweepEngine
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    def approximation(options):
        spec = SweepSpec(backbones=["flux-schnell"], preset="tiny", out=str(tmp_path / "o"),
                         steps=[1], seeds=[0], backbone_options=options).validate()
        with RunStore(spec.out) as store:
            return SweepEngine(spec, store).versions().get("approximation")

    assert approximation({"flux-schnell": {"memory_budget": 24}}) == "flux-schnell:fp8"
    assert approximation({"flux-schnell": {"memory_budget": 200}}) is None
    assert approximation({}) is None


def test_a_sweep_stores_the_budget_s_plan_and_peak(tmp_path, monkeypatch):
    """What ``memory_record`` reports (plan, enforcement, peak) lands in the store's meta and
    the summary, per backbone (on the CPU no budget can be placed: the record is given)."""
    from adapterswap.sweep.engine import run_sweep
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    record = {"budget_gib": 24.0, "peak_gib": 17.5, "enforced": "set_per_process_memory_fraction"}
    monkeypatch.setattr(get_backbone("flux-schnell"), "memory_record",
                        lambda self: dict(record), raising=False)
    spec = SweepSpec(backbones=["flux-schnell"], preset="tiny", out=str(tmp_path / "run"),
                     steps=[1], seeds=[0], metrics=[])
    summary = run_sweep(spec)
    assert summary.fast_path["flux-schnell"]["memory"] == record
    with RunStore(str(tmp_path / "run")) as store:
        assert store.meta("memory:flux-schnell") == record


@pytest.mark.parametrize("switches, refused", [
    ({"compile": True, "compile_mode": "reduce-overhead"}, "CUDA graphs"),
    ({"fuse_qkv": True}, "fuse_qkv"),
    ({"fp8": True}, "fp8"),
    ({"compile": True, "compile_encoders": True}, "compiled text encoders"),
])
def test_fast_path_switches_a_placement_cannot_take_are_refused(placed_schnell, switches,
                                                                refused):
    """Streamed blocks arrive at new addresses each step: CUDA graphs would replay stale
    weights; fused or float8 weights would be new tensors the streamer never moves; evicted
    encoders visit by hooks a compiled encoder would trace. Each is one line, before any
    module changes; the exact switches still run."""
    from adapterswap.fastpath import Accelerator, FastPath

    accelerator = Accelerator(placed_schnell)
    transformer = placed_schnell.pipe.transformer
    before = {n: type(m) for n, m in transformer.named_modules()}
    with pytest.raises(InvalidArgumentError, match=f"memory_budget=.*{refused}.*leave them off"):
        accelerator.enable(FastPath(**switches))
    assert {n: type(m) for n, m in transformer.named_modules()} == before
    assert accelerator.enable(FastPath())["compiled"] == []


def test_a_budgeted_sweep_encodes_all_its_prompts_in_one_encoder_visit(placed_schnell,
                                                                        tmp_path):
    """The engine encodes a backbone's distinct prompts before its first group, inside the
    backbone's encoding session: the evicted text encoders visit the GPU once for three
    prompts, not once per prompt."""
    from adapterswap.sweep.engine import SweepEngine
    from adapterswap.sweep.models import ModelFactory
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    prompts = ["a photo", "a red bicycle", "a fox in the snow"]
    spec = SweepSpec(backbones=["flux-schnell"], adapter="none", preset="tiny",
                     out=str(tmp_path / "run"), steps=[1], seeds=[0], prompts=prompts,
                     metrics=[], timing_repeats=0).validate()
    models = ModelFactory.from_spec(spec)
    models.backbone = lambda name: placed_schnell
    placement = placed_schnell.placement
    with RunStore(spec.out) as store:
        summary = SweepEngine(spec, store, models=models).run()
    assert summary.done == 3 and not summary.failed
    assert placement.visits == [("text_encoder", "arrive"), ("text_encoder_2", "arrive"),
                                ("text_encoder_2", "leave"), ("text_encoder", "leave")]


def test_a_profile_s_cuda_graph_mode_becomes_default_where_blocks_stream(placed_schnell):
    """The card's compile profile may pick a CUDA-graph mode the user never asked for: under
    a streaming placement it becomes ``default``; asked for by name, it is refused."""
    from adapterswap.fastpath import FastPath

    fast = FastPath(compile=True)
    assert placed_schnell.check_fast_path(fast, "reduce-overhead", chosen=False) == "default"
    assert placed_schnell.check_fast_path(fast, "default", chosen=False) == "default"
    with pytest.raises(InvalidArgumentError, match="CUDA graphs"):
        placed_schnell.check_fast_path(fast, "reduce-overhead", chosen=True)


def test_switches_a_budget_cannot_take_are_refused_before_loading():
    """What the published-size plan of a budget streams or evicts is known before any weight
    is read: ``--fp8`` beside a budget that streams (16 GiB) is refused then, in one line;
    beside one that only evicts and casts (24 GiB) it runs."""
    from adapterswap.fastpath import FastPath

    schnell = get_backbone("flux-schnell")
    with pytest.raises(InvalidArgumentError, match=r"memory_budget.*16.*published size.*fp8"):
        schnell.check_run_device({"memory_budget": 16}, "cuda", fast=FastPath(fp8=True))
    schnell.check_run_device({"memory_budget": 24}, "cuda", fast=FastPath(fp8=True))
    schnell.check_run_device({"memory_budget": 16}, "cuda", fast=FastPath())
    with pytest.raises(InvalidArgumentError, match="compiled text encoders"):
        schnell.check_run_device({"memory_budget": 24}, "cuda",
                                 fast=FastPath(compile=True, compile_encoders=True))


def test_weights_whose_plan_needs_float8_where_the_keys_say_exact_are_refused():
    """Cells are keyed by the budget's plan at the published size; the plan for the actual
    weights (their configs) must not add float8 to cells keyed exact. An exact plan under an
    ``fp8`` key (a GPU without float8, smaller weights) runs, and its record says so."""
    class Plan:
        def __init__(self, approximations):
            self._approximations = approximations

        def approximations(self):
            return list(self._approximations)

    schnell = get_backbone("flux-schnell")
    roomy = schnell(device="cuda", memory_budget=80)
    assert schnell.option_approximations({"memory_budget": 80}) == []
    with pytest.raises(InvalidArgumentError, match=r"memory_budget.*80.*need fp8.*exact"):
        roomy._check_keyed_approximations(Plan(["fp8"]))
    roomy._check_keyed_approximations(Plan([]))
    tight = schnell(device="cuda", memory_budget=24)
    tight._check_keyed_approximations(Plan([]))  # exact under an fp8 key: runs
    assert tight._keyed_approximations == ["fp8"]
