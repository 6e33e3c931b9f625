"""The GPU fast path: how the engine runs a denoiser close to the hardware limit.

Two kinds of switch, kept apart because they differ in what they promise:

**Exact within bf16 tolerance** (on by default on CUDA, see :data:`DEFAULT`):

- ``attention``: which scaled-dot-product-attention kernels the denoiser and the adapter may
  use, in priority order. ``"auto"`` prefers cuDNN's fused attention on Hopper (H100/H200),
  where it is faster than FlashAttention-2 for the long sequences of FLUX (0.227 against
  0.247 s per FLUX + InfuseNet step on an H100), then FlashAttention, memory-efficient
  attention and the math kernel; on older GPUs FlashAttention comes first; on the CPU
  PyTorch's own choice is left alone.
- ``fuse_qkv`` (off by default): one matrix product for the query, key and value projections
  (diffusers' ``fuse_qkv_projections``) where the attention processors allow it (not with
  IP-Adapter processors). Measured on an H100 for FLUX + InfuseNet it gained nothing (0.229 s
  per step against 0.224 s) and keeps a second copy of the projections (+4.4 GiB).
- ``compile_encoders`` (off by default): also ``torch.compile`` the text encoders (block by
  block) and the VAE encoder on CUDA, for serving many images with new prompts, where text
  encoding and the control-image encoding are part of every image's latency (on an H100,
  FLUX's text encoding, CLIP-L + T5-XXL at 256 tokens: 57 ms eager, 26 ms compiled).
  A sweep encodes each prompt and reference once, so there it never repays its compile time.
- ``compile``: ``torch.compile`` of the denoiser and the adapter's modules, in the mode and
  scope of the backbone's compile profile (:mod:`~adapterswap.fastpath.profile`: SD1.5's
  UNet whole with CUDA graphs, SDXL's per block, compute-bound FLUX block by block), and on
  CUDA of the VAE decoder (default mode: its batch varies). The first call at each new shape
  compiles; sweeps turn it on where the planned forwards repay it (the profile's break-even
  for the card, measured per backbone, else :data:`AUTO_COMPILE_FORWARDS`). Compiled kernels
  round differently from eager ones: on random FLUX weights (H100) one regionally compiled
  step is 1.3% (relative L2) from the eager bf16 step, a whole-model compiled one 4.8%.

**Approximations** (opt-in, reported separately with their fidelity cost):

- ``fp8``: the large linear layers of the denoiser and adapter in float8 (e4m3) with dynamic
  per-row activation scales and per-channel weight scales (``torch._scaled_mm``), accumulated
  with the tensor cores' fast float8 accumulation (as torchao's inference path does; see
  :func:`to_float8`); Hopper or newer only. On an H100 one compiled FLUX + InfuseNet step
  takes 0.127 s (0.136 s with full-precision accumulation; bf16 compiled 0.168 s), 2.0%
  relative L2 from the eager bf16 step (random weights).

- ``cache``: caching of slowly changing blocks (``"threshold:T"`` first-block cache or
  ``"interval:N"``), FLUX transformers only; see :mod:`adapterswap.fastpath.blockcache`.

Probe-guided adapter exit (``sweep --probe-exit``) is the third approximation; it lives in
:mod:`adapterswap.sweep.exit`.

**The package**, whose modules import one another without a cycle: :mod:`~.switches` (the
:class:`FastPath` switches and the values they take), :mod:`~.kernels` (attention kernels,
float8 layers, fused projections), :mod:`~.compiling` (``torch.compile`` in place),
:mod:`~.blockcache`, :mod:`~.profile` (compile profiles per backbone and card),
:mod:`~.accelerator` (:class:`Accelerator`: the fast path of one loaded backbone, which the
engine owns and the denoising loop calls) and :mod:`~.timer` (:class:`ForwardTimer`). Their
names are re-exported here, and so are :func:`device_tensor` and :func:`host_to_device` (they
live in :mod:`adapterswap.tensors`) for code that imports them from here.
"""

from adapterswap.fastpath.accelerator import Accelerator
from adapterswap.fastpath.blockcache import BlockCache, CachePolicy
from adapterswap.fastpath.compiling import (
    UNET_BLOCKS,
    compile_encoder,
    compile_module,
    mark_step,
)
from adapterswap.fastpath.kernels import (
    attention_context,
    float8_linear_class,
    fp8_supported,
    fuse_qkv,
    sdpa_backends,
    to_float8,
)
from adapterswap.fastpath.profile import (
    PROFILE_FILE,
    CompileProfile,
    find_profile,
    save_profile,
    user_profile_path,
)
from adapterswap.fastpath.switches import (
    ATTENTION_CHOICES,
    AUTO_COMPILE_FORWARDS,
    COMPILE_MODES,
    COMPILE_SCOPES,
    CUDAGRAPH_MODES,
    DEFAULT,
    FastPath,
)
from adapterswap.fastpath.timer import ForwardTimer
from adapterswap.tensors import device_tensor, host_to_device

__all__ = [
    "ATTENTION_CHOICES", "AUTO_COMPILE_FORWARDS", "COMPILE_MODES", "COMPILE_SCOPES",
    "CUDAGRAPH_MODES", "DEFAULT", "PROFILE_FILE", "UNET_BLOCKS", "Accelerator", "BlockCache",
    "CachePolicy", "CompileProfile", "FastPath", "ForwardTimer", "attention_context",
    "compile_encoder", "compile_module", "device_tensor", "find_profile", "float8_linear_class",
    "fp8_supported", "fuse_qkv", "host_to_device", "mark_step", "save_profile", "sdpa_backends",
    "to_float8", "user_profile_path",
]
