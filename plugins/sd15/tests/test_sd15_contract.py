"""adapterswap's contract mixins for the SD 1.5 backbones and the object IP-Adapter."""

from adapterswap.testing import AdapterContract, BackboneContract


class TestSD15Contract(BackboneContract):
    backbone_name = "sd15"


class TestSD15LCMContract(BackboneContract):
    backbone_name = "sd15-lcm"


class TestObjectIPAdapterContract(AdapterContract):
    adapter_name = "object-ip-adapter"
    backbone_names = ("sd15", "sd15-lcm")
