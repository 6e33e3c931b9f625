"""The ``attention-manipulation`` enhancer (FastFace's AM) on tiny random weights: the
transform against a hand-written attention, neutral settings as the plain run bit for bit,
windows per row of a step-parallel batch, exact restoration of the processors, options and
adapters it refuses."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from adapterswap.denoise import StepContext, denoise
from adapterswap.enhancer import parse_enhancer, predict_step
from adapterswap.errors import InvalidArgumentError, UsageError
from adapterswap.kit.am_processor import manipulate_weights, processor_class
from adapterswap.kit.attention_manipulation import AttentionManipulation
from adapterswap.kit.ip_adapter_install import ip_processors
from adapterswap.plugins import get_adapter, get_backbone, get_enhancer
from adapterswap.probes import ProbeRecorder

PROMPT = "a photo of a cat"
#: Rows of one forward against the same rows run alone: batching reorders float sums in the
#: UNet's convolutions and matmuls, nothing more.
BATCH_ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def single_cpu_thread():
    """One intra-op thread: the machine is shared and tiny UNets gain nothing from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(backbone_name: str, adapter_name: str, guidance_scale: float | None) -> Any:
    backbone = get_backbone(backbone_name).tiny(0)
    adapter = get_adapter(adapter_name).tiny(backbone, 0)
    height, width = backbone.tiny_size
    return SimpleNamespace(backbone=backbone, adapter=adapter, height=height, width=width,
                           reference=type(adapter).tiny_reference(0),
                           guidance_scale=guidance_scale)


@pytest.fixture(scope="module")
def sdxl() -> SimpleNamespace:
    """SDXL style IP-Adapter (InstantStyle: one up-block layer acts), no guidance."""
    return _setup("sdxl-lightning", "style-ip-adapter", None)


@pytest.fixture(scope="module")
def sd15() -> SimpleNamespace:
    """SD1.5 IP-Adapter Plus (16 image tokens, every layer), with classifier-free guidance."""
    return _setup("sd15-lcm", "object-ip-adapter", 3.0)


BOTH = ["sdxl", "sd15"]


def _run(setup: SimpleNamespace, enhancer: AttentionManipulation | None = None,
         steps: int = 2) -> Any:
    return denoise(setup.backbone, PROMPT, num_inference_steps=steps, seeds=[0, 1],
                   height=setup.height, width=setup.width,
                   guidance_scale=setup.guidance_scale, adapter=setup.adapter,
                   reference=setup.reference, output_type="pt", enhancer=enhancer)


# ---------------------------------------------------------------------------- options
def test_registered_with_fastface_defaults():
    assert get_enhancer("attention-manipulation") is AttentionManipulation
    am = AttentionManipulation()
    assert am.parts == ["down", "up"] and am.clamp == 10.0 and am.tokens is None
    assert am.part_values("down") == (1.3, 1.55) and am.part_values("up") == (1.3, 1.45)
    assert (am.start, am.end) == (0.0, 1.0) and not am.is_neutral()
    assert am.forwards_at(0, 4) == 1


def test_spec_round_trips():
    name, options = parse_enhancer(
        "attention-manipulation:parts=down/up,scale=1.5/1.4,power=1.2,tokens=2/0,steps=1")
    am = get_enhancer(name)(**options)
    assert am.spec() == ("attention-manipulation:parts=down/up,power=1.2,scale=1.5/1.4,"
                         "steps=1,tokens=0/2")
    again = AttentionManipulation(**parse_enhancer(am.spec())[1])
    assert again.options == am.options
    assert am.part_values("up") == (1.2, 1.4) and am.tokens == [0, 2]


@pytest.mark.parametrize("options, neutral", [
    ({"power": 1, "scale": 1}, True),
    ({"power": 1, "scale": 1, "clamp": 1}, True),
    ({"parts": "mid"}, True),                    # FastFace's mid values are 1 and 1
    ({"power": 1, "scale": 1, "clamp": 0.5}, False),   # the clamp alone changes weights
    ({"power": 1}, False),
    ({"parts": "down/up", "power": 1, "scale": "1/1.2"}, False),
])
def test_neutral_settings(options, neutral):
    options = {k: parse_enhancer(f"x:{k}={v}")[1][k] if isinstance(v, str) else v
               for k, v in options.items()}
    assert AttentionManipulation(**options).is_neutral() is neutral


@pytest.mark.parametrize("options, argument", [
    ({"power": 0}, "power"),
    ({"power": -1.0}, "power"),
    ({"scale": "big"}, "scale"),
    ({"scale": [1.5, 1.4, 1.3]}, "scale"),       # three values for two parts
    ({"clamp": 0}, "clamp"),
    ({"parts": "side"}, "parts"),
    ({"parts": ["down", "down"]}, "parts"),
    ({"tokens": -1.0}, "tokens"),
    ({"tokens": 1.5}, "tokens"),
    ({"tokens": "some"}, "tokens"),
    ({"steps": "first"}, "steps"),
    ({"start": 1.5}, "start"),
    ({"start": 0.6, "end": 0.5}, "start"),
    ({"gain": 2}, "enhancer 'attention-manipulation' option"),
])
def test_bad_options_are_one_line_errors(options, argument):
    with pytest.raises(InvalidArgumentError) as info:
        AttentionManipulation(**options)
    assert info.value.argument == argument
    assert "\n" not in str(info.value)


def test_refuses_adapters_that_are_not_ip_adapters():
    am = AttentionManipulation()
    with pytest.raises(InvalidArgumentError) as info:
        am.check_adapter(get_adapter("infusenet"))
    message = str(info.value)
    assert "--enhancer" in message and "infusenet" in message and "\n" not in message
    with pytest.raises(InvalidArgumentError, match="--enhancer"):
        am.check_adapter(None)
    am.check_adapter(get_adapter("style-ip-adapter"))
    am.check_adapter(get_adapter("object-ip-adapter"))


# ---------------------------------------------------------------------------- the transform
def test_manipulate_weights_formula():
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    out = manipulate_weights(weights, power=2.0, scale=3.0, clamp=0.3, tokens=[1, 3])
    expected = torch.tensor([[0.1, min(3 * 0.2 ** 2, 0.3), 0.3, min(3 * 0.4 ** 2, 0.3)]])
    torch.testing.assert_close(out, expected)
    every = manipulate_weights(weights, power=2.0, scale=3.0, clamp=10.0)
    torch.testing.assert_close(every, 3 * weights ** 2)


def test_processor_matches_hand_written_attention():
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    torch.manual_seed(0)
    heads, dim_head, batch = 2, 16, 2
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=heads, dim_head=dim_head)
    original = IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=24,
                                         num_tokens=(4,), scale=0.7)
    attn.set_processor(original)
    hidden = torch.randn(batch, 10, 32)
    text, image = torch.randn(batch, 7, 24), torch.randn(batch, 4, 24)
    states = (text, [image])
    plain = attn(hidden, encoder_hidden_states=states)

    switch = SimpleNamespace(on=True)
    power, scale, clamp, tokens = 1.7, 1.6, 0.5, [0, 2]
    processor = processor_class()(original, switch, power=power, scale=scale, clamp=clamp,
                                  tokens=tokens)
    attn.set_processor(processor)
    got = attn(hidden, encoder_hidden_states=states)

    def split(x):
        return x.view(batch, -1, heads, dim_head).transpose(1, 2)

    def merge(x):
        return x.transpose(1, 2).reshape(batch, -1, heads * dim_head)

    def weights(query, key):
        return torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(dim_head), dim=-1)

    with torch.no_grad():
        query = split(attn.to_q(hidden))
        text_out = weights(query, split(attn.to_k(text))) @ split(attn.to_v(text))
        w = weights(query, split(original.to_k_ip[0](image)))
        changed = w.clone()
        for token in tokens:
            changed[..., token] = torch.clamp(scale * w[..., token] ** power, max=clamp)
        image_value = split(original.to_v_ip[0](image))
        image_out = changed @ image_value
        # what a probe recomputing the image branch gets: the manipulated attention
        probed = processor.image_attention(query, split(original.to_k_ip[0](image)),
                                           image_value)
        assert (probed - image_out).abs().max().item() < 1e-6
        expected = attn.to_out[1](attn.to_out[0](merge(text_out) + 0.7 * merge(image_out)))
        assert (w * scale > clamp).any()  # the clamp is exercised
    assert (got - expected).abs().max().item() < 1e-6
    assert (got - plain).abs().max().item() > 1e-3
    switch.on = False
    assert torch.equal(attn(hidden, encoder_hidden_states=states), plain)
    processor.scale = [0.25]  # the wrapped processor's scale is the one set and read
    assert original.scale == [0.25] and processor.scale == [0.25]


# ---------------------------------------------------------------------------- on a UNet
@pytest.mark.parametrize("name", BOTH)
def test_neutral_settings_give_the_plain_run_bit_for_bit(name, request):
    setup = request.getfixturevalue(name)
    plain = _run(setup)
    neutral = _run(setup, AttentionManipulation(power=1, scale=1))
    assert torch.equal(neutral.images, plain.images)
    assert neutral.forwards == plain.forwards


@pytest.mark.parametrize("name", BOTH)
def test_manipulation_changes_the_image(name, request):
    setup = request.getfixturevalue(name)
    plain = _run(setup).images
    changed = _run(setup, AttentionManipulation()).images
    stronger = _run(setup, AttentionManipulation(power=2, scale=3)).images
    assert (changed - plain).abs().max().item() > 1e-4
    assert (stronger - plain).abs().max().item() > (changed - plain).abs().max().item()


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize("options", [{"start": 0.0, "end": 0.2}, {"steps": [5.0]},
                                     {"parts": ["mid"], "power": 2}])
def test_nothing_changes_where_it_does_not_act(name, options, request):
    """A window that opens at no step of a 2-step run, and (SDXL) a part where the style
    adapter's layers have scale 0, give the plain run bit for bit, installed or not."""
    setup = request.getfixturevalue(name)
    am = AttentionManipulation(**options)
    assert not am.is_neutral()
    plain = _run(setup).images
    out = _run(setup, am).images
    if name == "sd15" and "parts" in options:  # IP-Adapter Plus acts in the mid block
        assert not torch.equal(out, plain)
    else:
        assert torch.equal(out, plain)


def _context(setup: SimpleNamespace, rows: list[tuple[int, int]]) -> StepContext:
    """A step-parallel context: ``(step index, step count)`` per row."""
    backbone = setup.backbone
    schedules = {n: backbone.schedule(n, height=setup.height, width=setup.width)
                 for _, n in rows}
    timesteps = torch.stack([schedules[n].timesteps[i].reshape(()) for i, n in rows])
    sigmas = None
    if all(schedules[n].sigmas is not None for _, n in rows):
        sigmas = torch.stack([schedules[n].sigmas[i].reshape(()) for i, n in rows])
    return StepContext(timesteps=timesteps, step_indices=tuple(i for i, _ in rows),
                       num_steps=tuple(n for _, n in rows), height=setup.height,
                       width=setup.width, sigmas=sigmas)


@pytest.mark.parametrize("name", BOTH)
def test_step_parallel_rows_match_rows_run_alone(name, request):
    """Row 0 (step 0 of 2) is outside the window start=0.5, row 1 (step 2 of 4) inside: the
    batch equals each row alone, row 0 is the plain output, and the probe values come back
    per row of the whole batch."""
    setup = request.getfixturevalue(name)
    backbone, adapter, guidance = setup.backbone, setup.adapter, setup.guidance_scale
    rows = [(0, 2), (2, 4)]
    generators = [torch.Generator(backbone.generator_device).manual_seed(s) for s in (0, 1)]
    latents = backbone.prepare_latents(generators, height=setup.height, width=setup.width)
    prompt = backbone.encode_prompt([PROMPT], guidance_scale=guidance).repeat(2)
    conditioning = adapter.encode_reference(setup.reference, backbone)
    if adapter.attached_to is not backbone:
        adapter.attach(backbone)
    am = AttentionManipulation(start=0.5)
    assert [am.acts_at(i, n) for i, n in rows] == [False, True]

    def predict(row: int | None, enhancer: AttentionManipulation | None = None) -> Any:
        picked = [0, 1] if row is None else [row]
        ctx = _context(setup, [rows[r] for r in picked])
        return predict_step(backbone, adapter, conditioning, latents[picked], ctx,
                            prompt.select(picked), guidance, enhancer)

    recorder = ProbeRecorder()
    adapter.set_probe(recorder)
    am.attach(backbone, adapter)
    try:
        batched, forwards = predict(None, am)
        batched_probes = recorder.drain()
        alone = []
        for row in (0, 1):
            alone.append(predict(row, am)[0])
            alone_probes = {(b, q): v for b, q, v in recorder.drain()}
            for block, quantity, values in batched_probes:
                assert values[row] == pytest.approx(alone_probes[block, quantity][0],
                                                    rel=1e-4, abs=1e-6)
    finally:
        am.detach()
        adapter.set_probe(None)
    plain = [predict(row)[0] for row in (0, 1)]
    assert forwards == (2 if backbone.uses_cfg(guidance) else 1)
    assert batched_probes and all(len(values) == 2 for _, _, values in batched_probes)
    for row in (0, 1):
        assert (batched[row] - alone[row][0]).abs().max().item() < BATCH_ATOL
    assert torch.equal(alone[0], plain[0])
    assert (alone[1] - plain[1]).abs().max().item() > 1e-4


def test_attach_wraps_the_chosen_parts_and_detach_restores_them(sd15):
    backbone, adapter = sd15.backbone, sd15.adapter
    if adapter.attached_to is not backbone:
        adapter.attach(backbone)
    unet = backbone.pipe.unet
    before = dict(unet.attn_processors)
    parameters = [(name, id(p)) for name, p in unet.named_parameters()]
    cached = dict(ip_processors(unet))
    am = AttentionManipulation(parts="down")
    am.attach(backbone, adapter)
    try:
        during = unet.attn_processors
        wrapped = [name for name in before if during[name] is not before[name]]
        assert wrapped and all(name.startswith("down_blocks.") for name in wrapped)
        assert all(during[name].original is before[name] for name in wrapped)
        assert all(isinstance(during[name], processor_class()) for name in wrapped)
        assert [(name, id(p)) for name, p in unet.named_parameters()] == parameters
        assert ip_processors(unet) == cached  # per-row scales are still set on these
        with pytest.raises(UsageError, match="already attached"):
            am.attach(backbone, adapter)
    finally:
        am.detach()
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    am.detach()  # idempotent


def test_tokens_beyond_the_adapter_are_refused_at_attach(sdxl):
    backbone, adapter = sdxl.backbone, sdxl.adapter
    if adapter.attached_to is not backbone:
        adapter.attach(backbone)
    before = dict(backbone.pipe.unet.attn_processors)
    with pytest.raises(InvalidArgumentError, match="4 image tokens"):
        AttentionManipulation(tokens=[0.0, 4.0]).attach(backbone, adapter)
    after = backbone.pipe.unet.attn_processors
    assert all(after[name] is before[name] for name in before)


def test_tokens_choose_which_weights_change(sdxl):
    plain = _run(sdxl).images
    first = _run(sdxl, AttentionManipulation(tokens=0.0, power=2, scale=3)).images
    every = _run(sdxl, AttentionManipulation(power=2, scale=3)).images
    assert not torch.equal(first, plain) and not torch.equal(first, every)
