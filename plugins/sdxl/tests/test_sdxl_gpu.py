"""The tiny SDXL backbones and the style IP-Adapter on CUDA (run on a GPU machine:
``pytest -m gpu plugins/sdxl``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapterswap_sdxl.adapters import TARGETS, StyleIPAdapter
from adapterswap_sdxl.backbones import SDXLBackbone, SDXLLightningBackbone
from test_sdxl_plugin import PROMPT, reference_pipeline

from adapterswap.denoise import denoise

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("cls", [SDXLBackbone, SDXLLightningBackbone])
def test_tiny_sdxl_on_cuda_matches_the_pipeline(cls, dtype):
    """On CUDA, in every precision, with CPU generators, CPU-held Euler sigmas and (fp16) the
    VAE upcast, denoise() with the style adapter gives the diffusers pipeline's image; in float32
    it also matches the CPU image. (Half precision is far from float32 on random tiny weights,
    for the pipeline too, so that is not compared.)"""
    lightning = cls is SDXLLightningBackbone
    steps, guidance = (4, 0.0) if lightning else (3, 5.0)
    cpu = cls.tiny(0)
    cpu_adapter = StyleIPAdapter.tiny(cpu, 0)
    options = {"unet": cpu.options["unet"]} if lightning else {}
    gpu = cls(cpu.source, device="cuda", dtype=dtype, **options).load()
    adapter = StyleIPAdapter(cpu_adapter.source, device="cuda", dtype=dtype).load()
    reference = StyleIPAdapter.tiny_reference(0)

    def run(backbone, with_adapter):
        result = denoise(backbone, PROMPT, num_inference_steps=steps, seeds=[0],
                         height=64, width=64, adapter=with_adapter,
                         reference=reference if with_adapter else None, output_type="np")
        return np.asarray(result.images)

    ours = run(gpu, adapter)
    assert np.isfinite(ours).all()
    pipe = reference_pipeline(cpu, lightning=lightning, device="cuda", dtype=DTYPES[dtype])
    pipe.load_ip_adapter(cpu_adapter.source, subfolder="sdxl_models",
                         weight_name="ip-adapter_sdxl.safetensors",
                         image_encoder_folder="image_encoder", local_files_only=True)
    pipe.set_ip_adapter_scale(TARGETS["style"])
    expected = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=64,
                    width=64, generator=torch.Generator().manual_seed(0), output_type="np",
                    ip_adapter_image=reference).images
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)
    if dtype == "fp32":
        np.testing.assert_allclose(ours, run(cpu, cpu_adapter), atol=1e-2, rtol=0)
