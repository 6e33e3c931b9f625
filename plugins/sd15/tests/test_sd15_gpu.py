"""The tiny SD 1.5 backbones and the object IP-Adapter on CUDA (run on a GPU machine:
``pytest -m gpu plugins/sd15``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapterswap_sd15.adapters import ObjectIPAdapter
from adapterswap_sd15.backbones import SD15Backbone, SD15LCMBackbone
from test_sd15_plugin import PROMPT, load_plus, reference_pipeline

from adapterswap.denoise import denoise

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("cls", [SD15Backbone, SD15LCMBackbone])
def test_tiny_sd15_on_cuda_matches_the_pipeline(cls, dtype):
    """On CUDA, in every precision, with CPU generators feeding CUDA noise (LCM draws some at
    every step), the LoRA fused in that precision and IP-Adapter Plus, denoise() gives the
    diffusers pipeline's image; in float32 it also matches the CPU image."""
    lcm = cls is SD15LCMBackbone
    steps, guidance = (4, 1.0) if lcm else (3, 7.5)
    cpu = cls.tiny(0)
    cpu_adapter = ObjectIPAdapter.tiny(cpu, 0)
    options = {"lora": cpu.options["lora"]} if lcm else {}
    gpu = cls(cpu.source, device="cuda", dtype=dtype, **options).load()
    adapter = ObjectIPAdapter(cpu_adapter.source, device="cuda", dtype=dtype).load()
    reference = ObjectIPAdapter.tiny_reference(0)

    def run(backbone, with_adapter):
        result = denoise(backbone, PROMPT, num_inference_steps=steps, seeds=[0],
                         height=64, width=64, adapter=with_adapter,
                         reference=reference if with_adapter else None, output_type="np")
        return np.asarray(result.images)

    ours = run(gpu, adapter)
    assert np.isfinite(ours).all()
    pipe = reference_pipeline(cpu.source, scheduler="lcm" if lcm else "ddim",
                              lora_dir=cpu.options["lora"] if lcm else None, device="cuda",
                              dtype=DTYPES[dtype])
    if lcm:
        pipe.fuse_lora()
    load_plus(pipe, cpu_adapter)
    expected = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=64,
                    width=64, generator=torch.Generator().manual_seed(0), output_type="np",
                    ip_adapter_image=reference).images
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)
    if dtype == "fp32":
        np.testing.assert_allclose(ours, run(cpu, cpu_adapter), atol=1e-2, rtol=0)
