"""References given as embeddings instead of images.

An identity adapter conditions on a face embedding (InfiniteYou: a 512-d ArcFace vector from
IR-SE50), so a user who already has one (from InfiniteYou's own scripts, or a face model they
trust) can pass it as ``--ref face.npy``: no face detector or recognizer loads. An adapter
says it takes embeddings, and of which length, with :attr:`Adapter.embedding_dim
<adapterswap.adapter.Adapter.embedding_dim>`; any other adapter refuses the file by name.

Metrics that compare an image with the reference image cannot score against an embedding:
their scores are recorded as missing (counted in the report), never guessed.

The file is a NumPy ``.npy`` array of floats, shape ``(D,)`` or ``(1, D)``, read with
``allow_pickle=False``: a pickled object array is refused, never executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapterswap.errors import InvalidArgumentError

#: File suffixes read as embeddings.
EMBEDDING_SUFFIXES = (".npy",)


def is_embedding(reference: Any) -> bool:
    """Whether a reference (a path or a name) names an embedding file."""
    return isinstance(reference, (str, Path)) and \
        Path(str(reference)).suffix.lower() in EMBEDDING_SUFFIXES


def load_embedding(path: str | Path, *, argument: str = "reference",
                   dim: int | None = None) -> Any:
    """The embedding in ``path`` as a float32 array of shape ``(D,)``; one
    :class:`~adapterswap.errors.InvalidArgumentError` naming ``argument`` and the file when it
    is missing, not a NumPy array, not a vector of finite floats, or not ``dim`` long."""
    import numpy as np

    shown = str(path)
    file = Path(path).expanduser()
    if not file.is_file():
        raise InvalidArgumentError(argument, shown, "no such file")
    try:
        array = np.load(file, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle: refused
        raise InvalidArgumentError(argument, shown, f"cannot be read as a NumPy array of "
                                                    f"numbers ({exc})") from None
    except (OSError, EOFError) as exc:
        raise InvalidArgumentError(argument, shown, f"is not a .npy array file ({exc})") \
            from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise InvalidArgumentError(argument, shown, "must hold an array of numbers")
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1 or array.size == 0:
        raise InvalidArgumentError(argument, shown, f"must be one vector, shape (D,) or "
                                                    f"(1, D); got {tuple(array.shape)}")
    if dim is not None and array.size != dim:
        raise InvalidArgumentError(argument, shown, f"is a {array.size}-d embedding; the "
                                                    f"adapter takes {dim}-d ones")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InvalidArgumentError(argument, shown, "has values that are not finite")
    return array
