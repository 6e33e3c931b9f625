"""InfuseNet's ``reproduce="infiniteyou"``: a seed gives InfiniteYou's image for that seed.

- ``denoise()`` with it equals, bit for bit, ``flux_reference.infiniteyou_generate`` with
  ``seeding="global"`` (InfiniteYou's ``seed_everything``, the control posterior *sampled*
  from the global RNG first, then the initial latents; T5 at 512 tokens), on flux-dev and
  flux-schnell; without it the same seed gives another image.
- A batch of seeds draws exactly what the seeds draw one at a time (each row from its own
  generator, in InfiniteYou's order), in ``denoise()`` and in a sweep, whose rows finish at
  different steps. The images agree to 1e-5 (``denoise``, floats) and one 8-bit level (a
  sweep's stored PNGs): the denoiser runs at another batch size, and the matrix products
  round differently in the last bits, as on the default path.
- The option enters cell keys (its own and the backbone options it requires), contradicting
  backbone options and bad values are refused by name, and the CLI form runs.

The CUDA path (generators on the GPU, draws in the pipeline's dtype) needs a GPU, so it is not
tested here (see :mod:`adapterswap_flux.reproduce` for the one-off check made on one).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from adapterswap_flux.infusenet import InfuseNet
from adapterswap_flux.reproduce import INFINITEYOU_BACKBONE_OPTIONS
from flux_reference import (
    infiniteyou_generate,
    infiniteyou_root_id_embed,
    pipeline_components,
)
from PIL import Image

from adapterswap.denoise import StepContext, denoise
from adapterswap.errors import InvalidArgumentError, UsageError
from adapterswap.plugins import get_backbone

PROMPT = "a portrait photo of a person"
REPRODUCE = {"reproduce": "infiniteyou"}


@pytest.fixture(scope="module")
def reproducing(flux_infusenet_loaded):
    """Tiny flux-dev and flux-schnell built with the backbone options ``reproduce`` requires,
    and a tiny InfuseNet with the option (the same weights as the session's)."""
    options = InfuseNet.backbone_options(REPRODUCE)
    backbones = {name: get_backbone(name).tiny(0, **options)
                 for name in ("flux-dev", "flux-schnell")}
    adapter = InfuseNet.tiny(backbones["flux-dev"], 0, **REPRODUCE)
    yield backbones, adapter
    adapter.detach()


def _reference(backbone, adapter, reference_image, *, seed, steps, seeding,
               max_sequence_length=512, scale=1.0, start=0.0, end=1.0):
    id_embed = infiniteyou_root_id_embed(adapter.weights_root, reference_image,
                                         adapter.face.arcface,
                                         heads=adapter.resampler.config.heads)
    return infiniteyou_generate(
        pipeline_components(backbone.pipe), adapter.infusenet, id_embed, prompt=PROMPT,
        seed=seed, num_steps=steps,
        height=64, width=64, guidance_scale=3.5, conditioning_scale=scale,
        guidance_start=start, guidance_end=end, max_sequence_length=max_sequence_length,
        seeding=seeding)


# -- the image of a seed ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
@pytest.mark.parametrize("seed, steps, scale, start, end", [
    (3, 2, 1.0, 0.0, 1.0),
    (42, 4, 0.7, 0.25, 0.75),
])
def test_reproduce_equals_infiniteyou_for_the_seed(name, seed, steps, scale, start, end,
                                                   reproducing):
    backbones, adapter = reproducing
    backbone = backbones[name]
    adapter.set_scale(scale)
    adapter.set_window(start, end)
    try:
        reference_image = adapter.tiny_reference(0)
        result = denoise(backbone, PROMPT, num_inference_steps=steps, seeds=[seed],
                         adapter=adapter, reference=reference_image, output_type="np")
        expected = _reference(backbone, adapter, reference_image, seed=seed, steps=steps,
                              seeding="global", scale=scale, start=start, end=end)
    finally:
        adapter.set_scale(1.0)
        adapter.set_window(0.0, 1.0)
    # bit-identical: the same draws in the same order, the same modules at batch 1
    np.testing.assert_array_equal(result.images, expected)
    assert backbone.max_sequence_length == 512 and backbone.generator_device == "cpu"


def test_without_the_option_the_seed_gives_another_image(flux_schnell, flux_infusenet,
                                                         reproducing):
    """The default path is adapterswap's own seeding: its image for a seed is the reference's
    with the generator seeding (the parity tests hold it there), not InfiniteYou's."""
    backbones, adapter = reproducing
    reference_image = adapter.tiny_reference(0)
    default = denoise(flux_schnell, PROMPT, num_inference_steps=2, seeds=[3],
                      adapter=flux_infusenet, reference=reference_image, output_type="np")
    infiniteyou = _reference(backbones["flux-schnell"], adapter, reference_image, seed=3,
                             steps=2, seeding="global")
    assert np.abs(default.images - infiniteyou).max() > 0.1
    assert flux_infusenet.draw_before_latents([torch.Generator().manual_seed(3)], flux_schnell,
                                              height=64, width=64) is None
    assert InfuseNet.backbone_options({}) == {}


# -- batches of seeds ------------------------------------------------------------------------
def test_a_batch_of_seeds_draws_what_the_seeds_draw_one_at_a_time(reproducing):
    backbones, adapter = reproducing
    backbone = backbones["flux-dev"]
    adapter.attach(backbone)
    seeds = [3, 42, 7]

    def draws(batch):
        generators = [torch.Generator(backbone.generator_device).manual_seed(s) for s in batch]
        control = adapter.draw_before_latents(generators, backbone, height=64, width=64)
        return control["control_latents"], backbone.prepare_latents(generators, height=64,
                                                                    width=64)

    control, latents = draws(seeds)
    for row, seed in enumerate(seeds):
        one_control, one_latents = draws([seed])
        assert torch.equal(control[row:row + 1], one_control)
        assert torch.equal(latents[row:row + 1], one_latents)
    assert not torch.equal(control[0], control[1])  # each seed samples its own posterior

    reference_image = adapter.tiny_reference(0)
    batch = denoise(backbone, PROMPT, num_inference_steps=2, seeds=seeds, adapter=adapter,
                    reference=reference_image, output_type="np").images
    for row, seed in enumerate(seeds):
        one = denoise(backbone, PROMPT, num_inference_steps=2, seeds=[seed], adapter=adapter,
                      reference=reference_image, output_type="np").images
        # the denoiser at batch 3 rounds its matrix products differently from batch 1
        np.testing.assert_allclose(batch[row:row + 1], one, atol=1e-5, rtol=0)


def test_a_sweep_equals_the_seeds_one_at_a_time(tmp_path, reproducing):
    """Seeds batched in one chunk, step counts 1 and 2 side by side (rows finish early, the
    first step shared by a seed's step counts): each stored image is that seed's own."""
    from adapterswap.sweep.engine import run_sweep
    from adapterswap.sweep.spec import DEFAULT_PROMPTS, SweepSpec
    from adapterswap.sweep.store import RunStore

    backbones, adapter = reproducing
    backbone = backbones["flux-schnell"]
    summary = run_sweep(SweepSpec(backbones=["flux-schnell"], preset="tiny", seeds=[3, 42],
                                  steps=[1, 2], adapter_options=dict(REPRODUCE),
                                  metrics=["sharpness"], timing_repeats=0, out=str(tmp_path)))
    assert summary.done == 4 and summary.failed == 0
    reference_image = adapter.tiny_reference(0)
    with RunStore(tmp_path, lock=False) as store:
        rows = store.rows()
    assert {(r["seed"], r["steps"]) for r in rows} == {(3, 1), (3, 2), (42, 1), (42, 2)}
    for row in rows:
        one = denoise(backbone, DEFAULT_PROMPTS[0], num_inference_steps=row["steps"],
                      seeds=[row["seed"]], adapter=adapter, reference=reference_image)
        stored = np.asarray(Image.open(tmp_path / row["image"]), dtype=int)
        # 8-bit images of floats that differ in the last bits (batch sizes): one level
        assert np.abs(stored - np.asarray(one.images[0], dtype=int)).max() <= 1, row


def test_control_latents_must_come_through_the_draw(reproducing):
    backbones, adapter = reproducing
    backbone = backbones["flux-dev"]
    adapter.attach(backbone)
    conditioning = adapter.encode_reference(adapter.tiny_reference(0), backbone)
    prompt = backbone.encode_prompt([PROMPT])
    latents = backbone.prepare_latents([torch.Generator().manual_seed(0)], height=64, width=64)
    schedule = backbone.schedule(2, height=64, width=64)
    ctx = StepContext(timesteps=schedule.timesteps[:1], step_indices=(0,), num_steps=(2,),
                      height=64, width=64)
    with pytest.raises(UsageError, match="reproduce='infiniteyou'.*draw_before_latents"):
        adapter.denoiser_inputs(backbone, conditioning, latents, ctx, prompt)


# -- options, keys and errors ----------------------------------------------------------------
def test_bad_value_is_refused_naming_the_option(tmp_path):
    from adapterswap.sweep.spec import SweepSpec

    with pytest.raises(InvalidArgumentError, match=r"reproduce='infinite-you'.*'infiniteyou'"):
        InfuseNet(reproduce="infinite-you")
    with pytest.raises(InvalidArgumentError, match=r"reproduce='yes'"):
        InfuseNet.backbone_options({"reproduce": "yes"})
    spec = SweepSpec(backbones=["flux-dev"], preset="tiny", adapter_options={"reproduce": 1},
                     out=str(tmp_path))
    with pytest.raises(InvalidArgumentError, match=r"invalid reproduce=1"):
        spec.validate()


def test_the_option_changes_cell_keys_and_backbone_options(tmp_path):
    from adapterswap.sweep.spec import SweepSpec

    def cells(**overrides):
        spec = SweepSpec(backbones=["flux-schnell"], preset="tiny", seeds=[0], steps=[2],
                         adapter_off=True, out=str(tmp_path), **overrides).validate()
        return {c.adapter: c for c in spec.cells()}

    plain, reproduced = cells(), cells(adapter_options=dict(REPRODUCE))
    versions = {"adapterswap": "test"}
    for adapter in ("infusenet", "none"):  # the adapter-off cells run on that backbone too
        assert plain[adapter].key(versions) != reproduced[adapter].key(versions)
        assert plain[adapter].backbone_options == "{}"
        assert json.loads(reproduced[adapter].backbone_options) == INFINITEYOU_BACKBONE_OPTIONS
    assert reproduced["infusenet"].adapter_options == '{"reproduce": "infiniteyou"}'
    # a backbone option that agrees is accepted; one that contradicts is refused naming both
    cells(adapter_options=dict(REPRODUCE), backbone_options={"max_sequence_length": 512})
    with pytest.raises(InvalidArgumentError, match=r"max_sequence_length': 256.*'infusenet'.*"
                                                   r"'reproduce': 'infiniteyou'.*=512"):
        cells(adapter_options=dict(REPRODUCE),
              backbone_options={"flux-schnell": {"max_sequence_length": 256}})


def test_generator_device_option():
    cls = get_backbone("flux-dev")
    assert cls.check_options({"generator_device": "execution"}) == {
        "generator_device": "execution"}
    with pytest.raises(InvalidArgumentError, match=r"generator_device='cuda'.*cpu, execution"):
        cls.check_options({"generator_device": "cuda"})


# -- the command line ------------------------------------------------------------------------
def test_cli_generate_reproduces_infiniteyou(tmp_path, reproducing):
    from click.testing import CliRunner

    from adapterswap.cli import main

    out = tmp_path / "x.png"
    args = ["generate", "--backbone", "flux-dev", "--preset", "tiny", "--adapter", "infusenet",
            "--adapter-option", "reproduce=infiniteyou", "--seed", "42", "--steps", "4",
            "--prompt", "a portrait of a man", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    backbones, adapter = reproducing
    expected = denoise(backbones["flux-dev"], "a portrait of a man", num_inference_steps=4,
                       seeds=[42], adapter=adapter, reference=adapter.tiny_reference(0))
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected.images[0]))

    bad = CliRunner().invoke(main, [*args[:-2], "--out", str(tmp_path / "y.png"),
                                    "--option", "max_sequence_length=256"])
    assert bad.exit_code == 2 and "max_sequence_length" in bad.output \
        and "reproduce" in bad.output
    bad = CliRunner().invoke(main, [*args[:7], "--adapter-option", "reproduce=nope",
                                    "--prompt", "x", "--out", str(tmp_path / "z.png")])
    assert bad.exit_code == 2 and "reproduce='nope'" in bad.output


def test_drawn_rows_join_the_conditioning_rows():
    """The core's merge of an adapter's draws into the conditioning (``TensorBundle.merged``):
    side by side, same rows; a clashing key or another row count is refused."""
    from adapterswap.denoise import TensorBundle

    conditioning = TensorBundle({"id_embeds": torch.zeros(2, 8, 4)}, {"ids": torch.ones(3)})
    drawn = TensorBundle({"control_latents": torch.randn(2, 16, 4)})
    merged = conditioning.merged(drawn)
    assert merged.batch_size == 2 and set(merged.batched) == {"id_embeds", "control_latents"}
    assert torch.equal(merged.select([1])["control_latents"], drawn["control_latents"][1:])
    with pytest.raises(ValueError, match="both bundles have"):
        conditioning.merged(TensorBundle({"id_embeds": torch.zeros(2, 1)}))
    with pytest.raises(ValueError, match="2 rows against 3"):
        conditioning.merged(TensorBundle({"control_latents": torch.zeros(3, 1)}))
