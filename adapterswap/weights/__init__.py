"""Reading weight files and model directories safely, with one clear error when they are broken.

Users point adapterswap at weights downloaded from anywhere. The loaders here stand between those
files and torch/diffusers/transformers, so that a broken or hostile file gives one adapterswap
error naming the file and what is wrong, never a library traceback or a silently wrong model:

* A truncated or corrupt ``.safetensors`` file: :class:`~adapterswap.errors.WeightsNotFoundError`
  ("truncated or corrupt safetensors file"), found from its header before anything is loaded.
* A pickle (``.bin``, ``.pt``, ``.pth``) is only ever read with ``torch.load(weights_only=True)``;
  one that needs code execution is refused with :class:`~adapterswap.errors.UnsafeWeightsError`
  and its code never runs. Model directories load from safetensors only: a component whose
  weights exist only as a pickle is refused ("convert to safetensors").
* A model directory whose config does not match its weights (other widths, more or fewer layers,
  another model class): :class:`~adapterswap.errors.WeightsNotFoundError` naming the config and
  the weights. diffusers and transformers would initialise missing layers at random with a log
  line, or drop extra ones; here every model component is loaded with ``output_loading_info`` and
  checked.
* No code from a model directory runs: component classes are looked up in diffusers and
  transformers only, a ``model_index.json`` naming a class from a ``.py`` file shipped with the
  model is refused (:class:`~adapterswap.errors.UnsafeWeightsError`), and ``trust_remote_code``
  is never passed.

torch, safetensors, diffusers and transformers are imported inside the functions.

The package: :mod:`adapterswap.weights.files` reads single files (safetensors, pickles) and
:mod:`adapterswap.weights.models` loads model directories and pipelines. Plugins import the
names below from ``adapterswap.weights``.
"""

from adapterswap.weights.files import (
    PICKLE_SUFFIXES,
    check_safetensors,
    first_line,
    read_pickle,
    read_safetensors,
    safetensors_problem,
    unpickling_reason,
)
from adapterswap.weights.models import (
    check_model_dir,
    folder_variant,
    library_exceptions,
    load_model,
    load_pipeline,
    loading,
    pipeline_components,
    pipeline_root,
    quiet_loading,
    refuse_custom_code,
    weight_files,
)

__all__ = [
    "PICKLE_SUFFIXES", "check_model_dir", "check_safetensors", "first_line", "folder_variant",
    "library_exceptions", "load_model", "load_pipeline", "loading", "pipeline_components",
    "pipeline_root", "quiet_loading", "read_pickle", "read_safetensors", "refuse_custom_code",
    "safetensors_problem", "unpickling_reason", "weight_files",
]
