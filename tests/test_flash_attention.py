"""FlashAttention-3 in SDPA's place (``attention="fa3"`` / ``"fa3-fp8"``,
:mod:`adapterswap.fastpath.flash`).

On the CPU the routing, the layouts, the float8 quantisation and the fallbacks are checked with
a stand-in kernel that computes attention in FlashAttention-3's layout (batch, seq, heads, dim)
and its float8 contract (e4m3 inputs, per-(batch, head) descales). The real kernel against
cuDNN's SDPA runs on a Hopper GPU (``-m gpu``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from adapterswap.errors import InvalidArgumentError
from adapterswap.fastpath import FastPath
from adapterswap.fastpath.flash import (
    _quantise,
    check_attention,
    fa3_unavailable,
    flash_attention,
    sdpa_override,
)


class StandIn:
    """Attention in FlashAttention-3's layout and float8 contract, counting its calls."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, q, k, v, softmax_scale=None, causal=False, q_descale=None,
                 k_descale=None, v_descale=None):
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
        self.calls.append({"dtype": q.dtype, "scale": softmax_scale, "causal": causal,
                           "descale": q_descale is not None})
        if q_descale is not None:  # dequantise: x8 * descale[b, h]
            q, k, v = (t.float() * d[:, None, :, None]
                       for t, d in ((q, q_descale), (k, k_descale), (v, v_descale)))
        q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))  # -> (b, h, s, d)
        scores = (q @ k.transpose(-1, -2)) * softmax_scale
        if causal:
            rows, cols = scores.shape[-2:]
            mask = torch.ones(rows, cols, dtype=torch.bool).tril(cols - rows)
            scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(-1) @ v
        return out.transpose(1, 2).to(torch.bfloat16)  # (b, s, h, d)


def qkv(seq_q: int = 7, seq_k: int = 11, heads: int = 3, dim: int = 64,
        dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    make = lambda s: torch.randn(2, heads, s, dim, generator=g).to(dtype)  # noqa: E731
    return make(seq_q), make(seq_k), make(seq_k)


def reference(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)


def test_supported_calls_run_the_kernel_in_its_layout_and_match_sdpa():
    kernel = StandIn()
    attend = flash_attention(F.scaled_dot_product_attention, kernel=kernel, device_type="cpu")
    q, k, v = qkv()
    out = attend(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert len(kernel.calls) == 1 and kernel.calls[0]["dtype"] == torch.bfloat16
    assert kernel.calls[0]["scale"] == pytest.approx(1 / math.sqrt(64))
    # bf16 output rounding: within 2^-7 of the largest magnitude
    assert torch.allclose(out.float(), reference(q, k, v), atol=1e-2, rtol=1e-2)
    q, k, v = qkv(seq_q=9, seq_k=9)
    out = attend(q, k, v, scale=0.05, is_causal=True)
    assert kernel.calls[-1]["scale"] == 0.05 and kernel.calls[-1]["causal"]
    assert torch.allclose(out.float(), reference(q, k, v, scale=0.05, is_causal=True),
                          atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("case", ["mask", "dropout", "fp32", "head_dim", "three_d", "device",
                                  "gqa_heads", "causal_not_square"])
def test_calls_the_kernel_cannot_run_exactly_fall_back_unchanged(case):
    kernel = StandIn()
    seen = []

    def fallback(*args, **kwargs):
        seen.append(kwargs)
        return F.scaled_dot_product_attention(*args, **kwargs)

    attend = flash_attention(fallback, kernel=kernel,
                             device_type="cuda" if case == "device" else "cpu")
    q, k, v = qkv(dtype=torch.float32 if case == "fp32" else torch.bfloat16,
                  dim=40 if case == "head_dim" else 64)
    kwargs = {}
    if case == "mask":
        kwargs["attn_mask"] = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
    if case == "dropout":
        kwargs["dropout_p"] = 0.0 + 1e-9
        torch.manual_seed(0)
    if case == "three_d":
        q, k, v = q[0], k[0], v[0]
    if case == "causal_not_square":  # the kernel's causal mask sits bottom-right, SDPA's not
        kwargs["is_causal"] = True
    if case == "gqa_heads":
        k, v = k[:, :1], v[:, :1]
        kwargs["enable_gqa"] = True
    out = attend(q, k, v, **kwargs)
    assert kernel.calls == [] and len(seen) == 1
    if case != "dropout":
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, **kwargs))


def test_float8_quantisation_is_per_batch_and_head_and_round_trips_within_e4m3():
    x = torch.randn(2, 9, 3, 64) * torch.tensor([1.0, 50.0, 0.01])[None, None, :, None]
    quantised, descale = _quantise(x)
    assert quantised.dtype == torch.float8_e4m3fn and descale.shape == (2, 3)
    back = quantised.float() * descale[:, None, :, None]
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values; the per-head
    # scale keeps the small head (0.01) as accurate as the large one (50)
    big = x.abs() > x.abs().amax(dim=(1, 3), keepdim=True) / 64
    assert ((back - x).abs()[big] <= x.abs()[big] * 2 ** -4 + 1e-6).all()
    assert quantised.float().abs().amax() <= 448.0


def test_float8_attention_gets_e4m3_inputs_and_descales_and_stays_close():
    kernel = StandIn()
    attend = flash_attention(F.scaled_dot_product_attention, fp8=True, kernel=kernel,
                             device_type="cpu")
    q, k, v = qkv(seq_q=16, seq_k=16)
    out = attend(q, k, v)
    assert kernel.calls[0]["dtype"] == torch.float8_e4m3fn and kernel.calls[0]["descale"]
    exact = reference(q, k, v)
    relative = (out.float() - exact).norm() / exact.norm()
    assert 0 < relative < 0.1  # an approximation: not exact, within float8's error


def test_override_swaps_sdpa_for_the_block_and_restores_it_on_errors():
    kernel = StandIn()
    original = F.scaled_dot_product_attention
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="boom"):
        with sdpa_override(kernel=kernel, device_type="cpu"):
            assert F.scaled_dot_product_attention is not original
            F.scaled_dot_product_attention(q, k, v)
            with sdpa_override(fp8=True, kernel=kernel, device_type="cpu"):
                F.scaled_dot_product_attention(q, k, v)  # nested: float8 inside
                # the nested override falls back to the original, not to the outer override
                F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is original
    assert [c["descale"] for c in kernel.calls] == [False, True]


def test_override_reaches_diffusers_attention_processors():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=128, heads=2, dim_head=64, processor=AttnProcessor2_0())
    attn = attn.to(torch.bfloat16)
    x = torch.randn(1, 10, 128, dtype=torch.bfloat16)
    kernel = StandIn()
    with torch.no_grad():
        plain = attn(x)
        with sdpa_override(kernel=kernel, device_type="cpu"):
            routed = attn(x)
    assert len(kernel.calls) == 1
    assert torch.allclose(routed.float(), plain.float(), atol=2e-2, rtol=2e-2)


def test_fa3_choices_are_checked_in_one_line_and_fp8_is_keyed_as_an_approximation():
    assert fa3_unavailable("cpu").endswith("the device is cpu")
    with pytest.raises(InvalidArgumentError, match=r"attention='fa3'.*FlashAttention-3"):
        check_attention("fa3", "cpu")
    check_attention("cudnn", "cpu")  # other choices: nothing to check
    assert FastPath(attention="fa3").approximations() == []
    assert FastPath(attention="fa3-fp8").approximations() == ["attn=fa3-fp8"]
    assert FastPath(attention="fa3-fp8", fp8=True).approximate


def test_generate_refuses_fa3_on_the_cpu_before_loading(tmp_path):
    from click.testing import CliRunner

    from adapterswap.cli import main

    result = CliRunner().invoke(main, ["generate", "--preset", "tiny", "--device", "cpu",
                                       "--attention", "fa3", "--out",
                                       str(tmp_path / "x.png")])
    assert result.exit_code != 0
    assert "attention='fa3'" in result.output and "FlashAttention-3" in result.output
    assert not (tmp_path / "x.png").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("fp8, tolerance", [(False, 0.01), (True, 0.08)])
def test_flash_attention_3_matches_cudnn_on_hopper(fp8, tolerance):
    if fa3_unavailable("cuda"):
        pytest.skip(fa3_unavailable("cuda"))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 24, 4608, 128, device="cuda", generator=g,
                           dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        exact = F.scaled_dot_product_attention(q, k, v)
    with sdpa_override(fp8=fp8):
        out = F.scaled_dot_product_attention(q, k, v)
    relative = float((out.float() - exact.float()).norm() / exact.float().norm())
    assert relative < tolerance
