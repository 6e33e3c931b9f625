"""The contract mixins catch broken plugins (a check that cannot fail would prove nothing)."""

from __future__ import annotations

import pytest
from toy_plugin import ToyAdapter, ToyDev

from adapterswap.testing import AdapterContract, BackboneContract


class LeakyAdapter(ToyAdapter):
    """Patches the denoiser on attach and forgets to undo it on detach."""

    def _attach(self, backbone) -> None:  # noqa: ANN001
        super()._attach(backbone)
        with __import__("torch").no_grad():
            backbone.pipe.components["denoiser"][2].bias.add_(0.5)

    def _detach(self, backbone) -> None:  # noqa: ANN001
        pass


class WindowIgnoringAdapter(ToyAdapter):
    """Acts at every step, whatever its window."""

    def active_mask(self, ctx):  # noqa: ANN001
        return [True] * ctx.batch_size


class BatchDependentBackbone(ToyDev):
    """Draws noise for the whole batch from the first generator only."""

    def prepare_latents(self, generators, *, height, width):  # noqa: ANN001
        return super().prepare_latents([generators[0]] * len(generators), height=height,
                                       width=width)


def test_adapter_contract_detects_a_leaky_detach():
    contract = AdapterContract()
    contract.adapter_name = "toy-adapter"
    backbone = ToyDev.tiny()
    adapter = LeakyAdapter.tiny(backbone)
    with pytest.raises(AssertionError, match="detach did not restore"):
        contract.test_adapter_changes_output_and_detach_restores_exactly(
            adapter, {"toy-dev": backbone})


def test_adapter_contract_detects_an_ignored_window():
    contract = AdapterContract()
    contract.adapter_name = "toy-adapter"
    contract.backbone_names = ("toy-dev",)
    backbone = ToyDev.tiny()
    adapter = WindowIgnoringAdapter.tiny(backbone)
    with pytest.raises(AssertionError):
        contract.test_scale_zero_and_empty_window_equal_no_adapter(adapter, {"toy-dev": backbone})
    adapter.detach()


def test_backbone_contract_detects_shared_noise():
    contract = BackboneContract()
    backbone = BatchDependentBackbone.tiny()
    with pytest.raises(AssertionError):
        contract.test_prepare_latents_one_generator_per_sample(backbone)
