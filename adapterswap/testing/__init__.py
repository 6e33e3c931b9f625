"""Contract test mixins every backbone and adapter plugin's tests subclass.

Like diffusers' ``PipelineTesterMixin``: a third-party plugin gets the same checks as the
built-in ones by writing::

    from adapterswap.testing import AdapterContract, BackboneContract

    class TestMyBackbone(BackboneContract):
        backbone_name = "my-backbone"          # built with MyBackbone.tiny(seed)

    class TestMyAdapter(AdapterContract):
        adapter_name = "my-adapter"            # built with MyAdapter.tiny(backbone, seed)
        backbone_names = ("my-backbone", "my-backbone-distilled")

    class TestMyEnhancer(EnhancerContract):
        enhancer_name = "my-enhancer"
        options, neutral_options = {"strength": 2.0}, {"strength": 1.0}
        backbone_name, adapter_name = "my-backbone-distilled", "my-adapter"

Override ``make_backbone`` / ``make_adapter`` / ``make_reference`` to build them another way.
The mixins need pytest and torch; they run on CPU in seconds with tiny components, and each
also runs a one-cell ``adapterswap sweep --preset tiny`` through the CLI and checks it ran at
the backbone's declared :attr:`~adapterswap.backbone.Backbone.tiny_size`.

Test helpers only: the runtime never imports this package.
"""

from adapterswap.testing.adapter_contract import AdapterContract
from adapterswap.testing.backbone_contract import BackboneContract
from adapterswap.testing.enhancer_contract import EnhancerContract
from adapterswap.testing.tiny_sweep import TinySweep, run_tiny_sweep

__all__ = ["AdapterContract", "BackboneContract", "EnhancerContract", "TinySweep",
           "run_tiny_sweep"]
