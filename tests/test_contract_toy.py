"""The contract mixins run against the toy plugin: they must pass for a correct plugin."""

from adapterswap.testing import AdapterContract, BackboneContract


class TestToyDevContract(BackboneContract):
    backbone_name = "toy-dev"


class TestToyFastContract(BackboneContract):
    backbone_name = "toy-fast"


class TestToyAdapterContract(AdapterContract):
    adapter_name = "toy-adapter"
    backbone_names = ("toy-dev", "toy-fast")
