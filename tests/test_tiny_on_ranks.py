"""Tiny presets are built per process, on every torch.distributed rank: transformers'
``save_pretrained`` writes on rank 0 only once a process group exists, which left ranks other
than 0 with a tiny folder missing its text encoders (``sweep --launcher torchrun`` with
``--preset tiny``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from adapterswap.kit.tiny import build_once, tiny_clip_text_encoder
from adapterswap.kit.tiny_tokenizers import tiny_clip_tokenizer


def test_a_rank_other_than_0_writes_its_tiny_text_encoder(tmp_path):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def build(folder):
        tokenizer = tiny_clip_tokenizer()
        encoder = tiny_clip_text_encoder(0, tokenizer)
        encoder.save_pretrained(str(folder / "text_encoder"))

    dist.init_process_group("fake", rank=1, world_size=2, store=FakeStore())
    try:
        assert dist.get_rank() == 1
        built = build_once(tmp_path / "tiny-seed0", build)
    finally:
        dist.destroy_process_group()
    assert (built / "text_encoder" / "config.json").is_file()
    assert any((built / "text_encoder").glob("*.safetensors"))
    from transformers import PreTrainedModel  # the switch does not outlive the build

    assert "should_save_on_this_rank" not in PreTrainedModel.__dict__
    assert torch.distributed.is_initialized() is False
