"""Test settings of the adapterswap-sd15 plugin."""

import os

import pytest

# tests never touch the network, also when this folder runs alone
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def sd15_single_cpu_thread():
    """Run these tests' tiny models on one CPU thread, restoring the setting afterwards: on a
    busy 2-core machine intra-op threads only contend (the suite runs several times slower with
    two), and a 64 px UNet gains nothing from them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
