"""TensorBundle batching, the adapter window rule, and the reference loop on the toy backbone."""

from __future__ import annotations

import pytest
import torch

from adapterswap.adapter import is_active
from adapterswap.denoise import TensorBundle, denoise
from adapterswap.errors import InvalidArgumentError
from adapterswap.plugins import get_backbone


def test_bundle_select_repeat_cat():
    a = TensorBundle({"x": torch.arange(6.0).reshape(3, 2), "n": None}, {"ids": torch.ones(2)})
    assert a.batch_size == 3
    assert torch.equal(a.select([2, 0])["x"], torch.tensor([[4.0, 5.0], [0.0, 1.0]]))
    assert torch.equal(a.select([1]).repeat(2)["x"], torch.tensor([[2.0, 3.0], [2.0, 3.0]]))
    both = TensorBundle.cat([a, a.select([0])])
    assert both.batch_size == 4 and both["n"] is None and torch.equal(both["ids"], torch.ones(2))
    other = TensorBundle({"x": torch.zeros(1, 2), "n": None}, {"ids": torch.zeros(2)})
    with pytest.raises(ValueError, match="shared value 'ids' differs"):
        TensorBundle.cat([a, other])


@pytest.mark.parametrize("n", [1, 2, 4, 7, 28])
@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (0.0, 0.5), (0.25, 1.0), (0.1, 0.3)])
def test_window_rule_is_diffusers_control_guidance(n, start, end):
    for i in range(n):
        keep = 1.0 - float(i / n < start or (i + 1) / n > end)  # diffusers' controlnet rule
        assert is_active(i, n, start, end) is (keep == 1.0)


def test_on_step_records_every_step_with_x0():
    backbone = get_backbone("toy-dev").tiny()
    records = []
    result = denoise(backbone, "a", num_inference_steps=3, seeds=[0], on_step=records.append,
                     output_type="pt")
    assert [r.step_index for r in records] == [0, 1, 2]
    # at the last step x_next = x0 for flow matching (sigma_next = 0)
    assert torch.allclose(records[-1].x0, records[-1].latents, atol=1e-6)
    assert result.images.shape == (1, 3, 16, 16)
    assert set(result.timings) == {"encode_s", "denoise_s", "decode_s", "total_s"}


def test_cached_prompt_encoding_gives_the_same_image():
    backbone = get_backbone("toy-dev").tiny()
    encoding = backbone.encode_prompt(["a cat"], guidance_scale=3.5)
    direct = denoise(backbone, "a cat", num_inference_steps=2, seeds=[1, 2], output_type="pt")
    cached = denoise(backbone, "a cat", num_inference_steps=2, seeds=[1, 2],
                     prompt_encoding=encoding, output_type="pt")
    assert torch.equal(direct.images, cached.images)


def test_denoise_validates_arguments():
    backbone = get_backbone("toy-dev").tiny()
    with pytest.raises(InvalidArgumentError, match="seeds"):
        denoise(backbone, "a", seeds=[])
    with pytest.raises(InvalidArgumentError, match="prompt"):
        denoise(backbone, ["a", "b", "c"], seeds=[0, 1])
    with pytest.raises(InvalidArgumentError, match="reference"):
        from toy_plugin import ToyAdapter

        denoise(backbone, "a", seeds=[0], adapter=ToyAdapter.tiny(backbone))
