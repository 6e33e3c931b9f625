"""adapterswap's contract mixins for the SDXL backbones and the style IP-Adapter."""

from adapterswap.testing import AdapterContract, BackboneContract


class TestSDXLContract(BackboneContract):
    backbone_name = "sdxl"


class TestSDXLLightningContract(BackboneContract):
    backbone_name = "sdxl-lightning"


class TestStyleIPAdapterContract(AdapterContract):
    adapter_name = "style-ip-adapter"
    backbone_names = ("sdxl", "sdxl-lightning")
