"""A sweep's image files: the formats a cell's image is stored in, their encoder settings,
atomic writes, the thumbnails the report's image grids show, and a small thread pool that
encodes a chunk's images in parallel.

Formats (``--image-format``, the spec's ``image_format``):

- ``png`` (default): lossless, zlib level 1. Level 1 writes a 1024x1024 image 3.5-5x faster
  than Pillow's default level 6 for files about 12% larger; the pixels are the same.
- ``webp``: lossless WebP at its fastest effort (method 0): the same pixels as ``png``, in a
  smaller file (about 20% below level-1 PNG) written faster still.
- ``jpeg``: quality 95, no chroma subsampling (4:4:4): lossy, 3-4x smaller than PNG and
  fastest to write. Metrics are always computed on the decoded image in memory, never on the
  file, so the format changes no score; ``adapterswap compare`` and ``score`` read files and
  then measure the JPEG's own error too.

The format changes no pixel the metrics see, so it is not part of a cell's key: a resumed
sweep keeps the files of finished cells as they were written, and the ``image`` column of each
cell holds its file's path (with its extension) relative to the output folder.

Pillow's encoders release the GIL while they compress, so a chunk's images are encoded on a
few threads (:class:`ImageEncoder`) beside the scoring and the store's transactions.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ImageFormat:
    """How a cell's image is written: Pillow's format name and encoder options."""

    name: str
    suffix: str
    pil_format: str
    options: Mapping[str, Any]
    lossless: bool

    def record(self) -> dict[str, Any]:
        """What the store records of the format (meta ``image_formats``)."""
        return {"suffix": self.suffix, "pil_format": self.pil_format,
                "options": dict(self.options), "lossless": self.lossless}


IMAGE_FORMATS: dict[str, ImageFormat] = {
    "png": ImageFormat("png", ".png", "PNG", {"compress_level": 1}, lossless=True),
    "webp": ImageFormat("webp", ".webp", "WEBP",
                        {"lossless": True, "method": 0, "quality": 0, "exact": True},
                        lossless=True),
    "jpeg": ImageFormat("jpeg", ".jpg", "JPEG", {"quality": 95, "subsampling": 0},
                        lossless=False),
}
DEFAULT_IMAGE_FORMAT = "png"

#: Image-grid thumbnails: at least this many pixels on the long side on screen.
THUMB_MIN = 128
#: Image-grid thumbnails are stored at most this large (the enlarged view shows them).
THUMB_MAX = 256
#: The folder (under the output folder) of the cells' grid thumbnails, one PNG per cell key.
THUMBNAILS = "thumbnails"


@dataclass(frozen=True)
class EncodedImage:
    """A cell's image, encoded: its file's bytes and extension, and its grid thumbnail's PNG
    bytes (``None``: none made)."""

    data: bytes
    suffix: str
    thumbnail: bytes | None = field(default=None, repr=False)


def png_bytes(image: Any, compress_level: int = 6) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def thumbnail(image: Any) -> tuple[Any, bool]:
    """At most :data:`THUMB_MAX` pixels on the long side; a small image is enlarged by a
    whole factor (nearest pixel, so its pixels stay visible) to at least :data:`THUMB_MIN`.
    Returns the image and whether it was enlarged."""
    from PIL import Image

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    long_side = max(rgb.size)
    if long_side > THUMB_MAX:
        small = rgb.copy() if rgb is image else rgb  # thumbnail() works in place
        small.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.LANCZOS)
        return small, False
    if long_side < THUMB_MIN:
        k = math.ceil(THUMB_MIN / long_side)
        return rgb.resize((rgb.width * k, rgb.height * k), Image.Resampling.NEAREST), True
    return (rgb.copy() if rgb is image else rgb), False  # usable once a file is closed


def thumbnail_long_side(width: int, height: int) -> int:
    """The long side, in pixels, of :func:`thumbnail` of a ``width`` x ``height`` image."""
    long_side = max(width, height)
    if long_side > THUMB_MAX:
        return THUMB_MAX
    if long_side < THUMB_MIN:
        return long_side * math.ceil(THUMB_MIN / long_side)
    return long_side


def encode_image(image: Any, image_format: str = DEFAULT_IMAGE_FORMAT, *,
                 with_thumbnail: bool = False) -> EncodedImage:
    """Encode a cell's image in ``image_format`` (:data:`IMAGE_FORMATS`), and its grid
    thumbnail from the image in memory when asked."""
    spec = IMAGE_FORMATS[image_format]
    buffer = io.BytesIO()
    image.save(buffer, format=spec.pil_format, **spec.options)
    thumb = png_bytes(thumbnail(image)[0]) if with_thumbnail else None
    return EncodedImage(buffer.getvalue(), spec.suffix, thumb)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then rename it into place (a crash
    leaves the old file or the new one, never half of one)."""
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def thumbnail_file(out: Path, key: str) -> Path:
    return Path(out) / THUMBNAILS / f"{key}.png"


def save_image_files(out: Path, key: str, image: Any) -> str:
    """Write a cell's image (a PIL image: PNG; or an :class:`EncodedImage`) and its thumbnail
    under ``out``, each atomically, the thumbnail first; return the image's path relative to
    ``out``. Raises ``OSError``."""
    encoded = image if isinstance(image, EncodedImage) else encode_image(image)
    if encoded.thumbnail is not None:
        thumb = thumbnail_file(out, key)
        thumb.parent.mkdir(exist_ok=True)
        write_atomically(thumb, encoded.thumbnail)
    final = Path(out) / "images" / f"{key}{encoded.suffix}"
    write_atomically(final, encoded.data)
    return str(final.relative_to(out))


def encode_workers() -> int:
    """Threads that encode images: one core is left to the thread that drives the device,
    at most four (a chunk holds at most a few dozen images)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores - 1))


class ImageEncoder:
    """Encodes images on a few threads (:func:`encode_workers`); each :meth:`submit` returns
    a future of an :class:`EncodedImage`. The pool starts on the first image."""

    def __init__(self, image_format: str = DEFAULT_IMAGE_FORMAT, *,
                 workers: int | None = None, thumbnails: bool = True) -> None:
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"unknown image format {image_format!r}; "
                             f"choose one of {', '.join(IMAGE_FORMATS)}")
        self.image_format = image_format
        self.workers = workers or encode_workers()
        self.thumbnails = thumbnails
        self._pool: Any = None

    def submit(self, image: Any) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="adapterswap-encode")
        return self._pool.submit(encode_image, image, self.image_format,
                                 with_thumbnail=self.thumbnails)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
