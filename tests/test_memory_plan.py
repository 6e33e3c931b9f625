"""Memory budgets, family-independent (``adapterswap.fastpath.memory`` and ``.streaming``):

- the planner's order (all resident, encoders evicted, float8, streaming), its arithmetic and
  its refusal, on parts of known sizes;
- module sizes with and without float8 linears, read on the meta device (nothing allocated);
- the block streamer and the host-resident module on the CPU with a recording copy function:
  outputs bit for bit, prefetch one block ahead, at most two blocks "on the device", nothing
  left there after a non-cyclic pass;
- a placement's adapter room, records and refusals.

The mechanics never need a GPU here: a CPU "device" with a copy function of the test's own runs
the same hooks synchronously (the CUDA path adds the side stream and events around them).
"""

from __future__ import annotations

import pytest
import torch

from adapterswap.errors import InvalidArgumentError, UsageError
from adapterswap.fastpath.memory import (
    GIB,
    HEADROOM_SHARE,
    Activations,
    Block,
    MemoryPlan,
    Part,
    Placement,
    check_budget,
    least_budget_gib,
    measure,
    module_bytes,
    move_in_chunks,
    plan_memory,
)
from adapterswap.fastpath.streaming import BlockStreamer, HostResident, outer_blocks

# A pipeline of round sizes (GiB): a 16-GiB denoiser of 8 blocks (1.5 each, half in float8),
# a 4-GiB adapter, a 6-GiB encoder of 4 blocks, a small decoder; activations 1 GiB at most.
DENOISER = Part("denoiser", "denoiser", 16 * GIB, 8 * GIB,
                tuple(Block(f"blocks.{i}", int(1.5 * GIB), int(0.75 * GIB))
                      for i in reversed(range(8))))
ADAPTER = Part("adapter", "adapter", 4 * GIB, 2 * GIB)
ENCODER = Part("encoder", "encoder", 6 * GIB, 3 * GIB,
               tuple(Block(f"layers.{i}", int(1.25 * GIB), int(0.6 * GIB)) for i in range(4)))
DECODER = Part("decoder", "other", GIB // 4, GIB // 4)
PARTS = (DENOISER, ADAPTER, ENCODER, DECODER)
ACT = Activations(encode=GIB // 8, denoise=GIB // 2, decode=GIB)


def plan(budget: float, **kwargs) -> MemoryPlan:
    return plan_memory(budget, PARTS, ACT, **kwargs)


def limit(budget: float) -> float:
    return budget * (1 - HEADROOM_SHARE) * GIB


def test_a_large_budget_keeps_everything_resident_and_exact():
    result = plan(40)
    assert (result.float8, result.streamed, result.evicted) == ((), (), ())
    assert result.exact and result.approximations() == []
    # all weights + the largest activation (decode, nothing in flight)
    assert result.peaks["decode"] == 16 * GIB + 4 * GIB + 6 * GIB + GIB // 4 + GIB
    assert max(result.peaks.values()) <= limit(40)


def test_encoders_leave_before_anything_approximates():
    result = plan(27)  # 28.25 GiB all resident does not fit 24.3; without the encoder 23.9 does
    assert result.evicted == ("encoder",) and result.float8 == () and result.streamed == ()
    assert result.exact
    # while encoding: everything else + the encoder's non-block weights + two of its blocks
    assert result.peaks["encode"] == (16 + 4 + 0.25) * GIB + 1 * GIB + 2 * int(1.25 * GIB) \
        + GIB // 8


def test_float8_before_streaming_and_it_is_an_approximation():
    result = plan(16)  # 21.25 GiB in 16 bits > 14.4; in float8 11.25 GiB fits
    assert result.float8 == ("denoiser", "adapter") and result.streamed == ()
    assert result.approximations() == ["fp8"] and not result.exact
    assert result.resident_bytes == (8 + 2 + 0.25) * GIB
    assert result.to_dict()["approximations"] == ["fp8"]
    assert "float8 linears in denoiser and adapter (approximation)" in result.describe()


def test_streaming_takes_the_preferred_blocks_first_until_every_phase_fits():
    result = plan(10)  # limit 9 GiB; float8 leaves 10.25 GiB resident: blocks must stream
    assert result.float8 and result.evicted == ("encoder",)
    streamed = [name.split(".", 1)[1] for name in result.streamed]
    assert streamed == [b.name for b in DENOISER.blocks[:len(streamed)]]  # in preference order
    assert streamed[0] == "blocks.7"

    def peaks(count: int) -> dict[str, float]:  # the arithmetic, restated
        resident = (8 + 2 + 0.25) * GIB - count * int(0.75 * GIB)
        arriving = int(0.75 * GIB)  # the first streamed block, for the next denoiser call
        visiting = 1 * GIB + 2 * int(1.25 * GIB)  # encoder: non-block weights + two blocks
        return {"encode": resident + arriving + visiting + ACT.encode,
                "denoise": resident + 2 * arriving + ACT.denoise,
                "decode": resident + arriving + ACT.decode}

    assert result.peaks == peaks(len(streamed))
    assert max(peaks(len(streamed)).values()) <= limit(10)
    assert max(peaks(len(streamed) - 1).values()) > limit(10)  # one block fewer: no fit
    assert result.window_bytes == 2 * int(0.75 * GIB)  # two blocks in flight while denoising


def test_without_float8_the_plan_streams_16_bit_blocks_exactly():
    result = plan(16, float8_available=False)
    assert result.float8 == () and result.exact and result.streamed
    assert max(result.peaks.values()) <= limit(16)


def test_a_budget_too_small_is_refused_naming_the_least_that_fits():
    least = least_budget_gib(PARTS, ACT)
    assert plan(least * 1.001).streamed == tuple(f"denoiser.blocks.{i}" for i in reversed(range(8)))
    with pytest.raises(InvalidArgumentError,
                       match=rf"invalid memory_budget=2.0: too small for this pipeline: it "
                             rf"needs at least {least:.3g} GiB with its text encoders off the "
                             "GPU, every block streamed and float8 linears$"):
        plan(2)


@pytest.mark.parametrize("value", [0, -1, "24", True, float("nan"), float("inf"), None])
def test_budget_values_are_checked(value):
    with pytest.raises(InvalidArgumentError,
                       match=r"^invalid memory_budget=.*: must be a number of GiB > 0, e\.g\. 24$"):
        check_budget(value)
    assert check_budget(24) == 24.0 and isinstance(check_budget(16), float)


def test_sizes_with_and_without_float8_on_the_meta_device():
    with torch.device("meta"):
        model = torch.nn.Sequential(
            torch.nn.Linear(2048, 1024),          # cast: both sides >= 1024, multiples of 16
            torch.nn.Linear(1024, 64),            # too narrow: stays
            torch.nn.LayerNorm(64),
            torch.nn.Linear(1000, 2048),          # 1000 is no multiple of 16: stays
        )
    nbytes, float8 = module_bytes(model, dtype_bytes=2)  # meta tensors are float32: bf16 run
    params = sum(p.numel() for p in model.parameters())
    assert nbytes == 2 * params
    # the cast layer keeps 1 byte per weight, a float32 scale per output row and its bias
    assert nbytes - float8 == 2 * 2048 * 1024 - (2048 * 1024 + 4 * 1024)
    part = measure("denoiser", "denoiser", model, blocks=["0", "3"], dtype_bytes=2)
    assert [b.name for b in part.blocks] == ["0", "3"]
    assert part.blocks[0].float8_nbytes == 2048 * 1024 + 4 * 1024 + 2 * 1024
    assert part.blocks[1].nbytes == part.blocks[1].float8_nbytes


# ---------------------------------------------------------------------- streaming
class Recorder:
    """A copy function that records what it copied (the streamer's only device traffic)."""

    def __init__(self):
        self.copies: list[int] = []

    def __call__(self, dst, src):
        self.copies.append(src.data_ptr())
        dst.copy_(src)


def toy_blocks(n: int = 4, width: int = 32) -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU()) for _ in range(n))


def run(blocks, x):
    for block in blocks:
        x = block(x)
    return x


def test_the_streamer_gives_the_same_bits_and_keeps_two_blocks_at_most():
    blocks = toy_blocks()
    x = torch.randn(3, 32)
    expected = run(blocks, x)
    log: list[tuple[str, int]] = []
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=index: log.append(("run", i)))
    recorder = Recorder()
    streamer = BlockStreamer(blocks, "cpu", copy=recorder).install()
    homes = [[p.data_ptr() for p in block.parameters()] for block in blocks]
    for _ in range(3):
        assert torch.equal(run(blocks, x), expected)
    assert streamer.max_loaded == 2
    assert streamer.waits == 1  # only the very first block was not prefetched
    assert streamer.loads == 3 * 4 + 1  # each block per pass, and the first again, ahead
    assert len(recorder.copies) == 2 * streamer.loads  # weight and bias per load
    # between calls the blocks point at their host copies; the first block is arriving
    assert [[p.data_ptr() for p in b.parameters()] for b in blocks[1:]] == homes[1:]
    assert list(streamer._loaded) == [0]
    streamer.remove()
    assert [[p.data_ptr() for p in b.parameters()] for b in blocks] == homes
    assert torch.equal(run(blocks, x), expected)


def test_the_next_block_is_copied_while_one_runs():
    blocks = toy_blocks(3)
    events: list[str] = []
    streamer = BlockStreamer(blocks, "cpu", copy=lambda d, s: d.copy_(s), cyclic=False)
    original = streamer._load
    streamer._load = lambda i: (events.append(f"copy {i}"), original(i))[1]
    streamer.install()
    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda m, a, o, i=index: events.append(f"ran {i}"))
    run(blocks, torch.randn(2, 32))
    assert events == ["copy 0", "copy 1", "ran 0", "copy 2", "ran 1", "ran 2"]
    assert streamer._loaded == {}  # not cyclic: nothing stays after the pass


def test_a_skipped_block_leaves_nothing_behind():
    blocks = toy_blocks(4)
    x = torch.randn(2, 32)
    expected = blocks[3](blocks[0](x))
    streamer = BlockStreamer(blocks, "cpu", copy=lambda d, s: d.copy_(s)).install()
    assert torch.equal(blocks[3](blocks[0](x)), expected)  # block 1 prefetched, never ran
    assert streamer.max_loaded == 2 and set(streamer._loaded) == {0}


def test_a_host_resident_module_visits_and_leaves():
    torch.manual_seed(1)
    encoder = torch.nn.Sequential(torch.nn.Embedding(10, 16), toy_blocks(3, 16),
                                  torch.nn.LayerNorm(16))
    tokens = torch.tensor([[1, 2, 3]])

    def forward():
        return encoder[2](run(encoder[1], encoder[0](tokens)))

    expected = forward()
    assert outer_blocks(encoder) == ["1.0", "1.1", "1.2"]
    visits: list[str] = []
    resident = HostResident(encoder, "cpu", blocks=list(encoder[1]),
                            copy=lambda d, s: d.copy_(s), on_visit=visits.append)
    homes = [p.data_ptr() for p in encoder.parameters()]
    with resident.visiting():
        inside = [p.data_ptr() for p in encoder[0].parameters()]
        assert torch.equal(forward(), expected)
    assert inside != homes[:1] and visits == ["arrive", "leave"]
    assert [p.data_ptr() for p in encoder.parameters()] == homes  # nothing left "on device"
    assert resident.streamer._loaded == {}
    assert resident.rest_nbytes == 4 * (10 * 16 + 2 * 16)


# ---------------------------------------------------------------------- placement
def test_a_placement_streams_evicts_adopts_and_records_on_a_cpu_device():
    blocks = toy_blocks(4)
    denoiser = torch.nn.Module()
    denoiser.blocks = blocks
    encoder = torch.nn.Sequential(torch.nn.Embedding(10, 32), toy_blocks(2))
    parts = [measure("denoiser", "denoiser", denoiser, blocks=["blocks.3", "blocks.2",
                                                              "blocks.1", "blocks.0"]),
             Part("adapter", "adapter", 40_000, 40_000),
             measure("encoder", "encoder", encoder, blocks=outer_blocks(encoder))]
    act = Activations(0, 0, 0)
    resident = sum(p.nbytes for p in parts if p.role != "encoder")
    small = plan_memory(resident / GIB / (1 - HEADROOM_SHARE) * 0.99, parts, act,
                        float8_available=False)
    assert small.evicted == ("encoder",) and small.streamed[0] == "denoiser.blocks.3"
    x = torch.randn(2, 32)
    expected = run(blocks, x)
    placement = Placement(small, "cpu", copy=lambda d, s: d.copy_(s), cap=False)
    assert placement.fraction is None  # no cap off CUDA
    placement.place("denoiser", denoiser)
    placement.place("encoder", encoder, blocks=list(encoder[1]))
    assert torch.equal(run(blocks, x), expected)
    with placement.encoding():
        encoder[1][0](encoder[0](torch.tensor([1])))
    assert placement.visits == [("encoder", "arrive"), ("encoder", "leave")]
    assert placement.adopt("adapter", torch.nn.Linear(10, 10)) == 0
    with pytest.raises(UsageError, match="more than the .* reserved for it"):
        placement.adopt("adapter", torch.nn.Linear(200, 200))
    with pytest.raises(UsageError, match="reserved no room for 'vae'"):
        placement.adopt("vae", torch.nn.Linear(2, 2))
    record = placement.record()
    assert record["plan"]["streamed"] == list(small.streamed)
    assert record["plan"]["evicted"] == ["encoder"] and record["peak_gib"] is None
    assert record["streaming"]["denoiser"]["blocks"] == len(small.streamed)
    assert record["encoder_visits"] == {"encoder": 1} and record["enforced"] is None
    placement.remove()
    assert placement.streamers == {} and torch.equal(run(blocks, x), expected)


def test_moving_in_chunks_without_float8_changes_nothing():
    blocks = toy_blocks(2)
    x = torch.randn(1, 32)
    expected = run(blocks, x)
    assert move_in_chunks(blocks, "cpu", float8=False) == 0
    assert torch.equal(run(blocks, x), expected)


def test_a_streamed_block_holding_a_block_list_goes_home_as_one_chunk(monkeypatch):
    """FLUX's double blocks hold ModuleLists (``ff.net``): a block that streams is one chunk
    sent to host memory whole, not entered like a block list and left where it was placed."""
    from adapterswap.fastpath import streaming

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([Holder(), Holder()])

    model = Model()
    homed = []
    real = streaming.host_slots
    monkeypatch.setattr(streaming, "host_slots",
                        lambda module, **kw: homed.append(module) or real(module, **kw))
    move_in_chunks(model, "cpu", float8=False, host=[model.blocks[1]])
    assert homed == [model.blocks[1]]


def test_the_cap_names_the_cuda_device_by_index(monkeypatch):
    """``memory_budget`` on a bare ``"cuda"`` device: torch's per-device calls refuse a device
    without an index (``set_per_process_memory_fraction`` raised "Expected a torch.device with a
    specified index" on the H200), so the placement resolves it to the current device first.
    The fakes below refuse an index-less device as torch does."""
    from adapterswap.devices import indexed_device

    calls = []

    def needs_index(name, result=None):
        def call(*args):
            device = args[-1]
            if isinstance(device, torch.device) and device.index is None or device == "cuda":
                raise ValueError(f"Expected a torch.device with a specified index, got {device}")
            calls.append((name, *args))
            return result
        return call

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for name in ("set_per_process_memory_fraction", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, needs_index(name))
    monkeypatch.setattr(torch.cuda, "get_device_properties", needs_index(
        "get_device_properties", type("Props", (), {"total_memory": 80 * GIB})()))
    monkeypatch.setattr(torch.cuda, "memory_allocated", needs_index("memory_allocated", GIB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert indexed_device("cuda") == torch.device("cuda", 1)
    assert indexed_device("cuda:0") == torch.device("cuda", 0)
    assert indexed_device("cpu") == torch.device("cpu")
    plan = plan_memory(40, [DENOISER], Activations(0, 0, 0), float8_available=False)
    placement = Placement(plan, "cuda", cap=True)
    assert placement.device == torch.device("cuda", 1)
    assert placement.fraction == pytest.approx(40 / 80)
    assert placement.allocated_before == GIB  # what the process held before, recorded
    assert ("set_per_process_memory_fraction", 0.5, torch.device("cuda", 1)) in calls
