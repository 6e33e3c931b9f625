"""Real public-domain photos shipped inside installed packages (nothing is downloaded), and
the degradations the identity tests apply to them."""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image, ImageFilter


def astronaut() -> Image.Image:
    """Eileen Collins, NASA portrait (public domain), 512 x 512, from scikit-image."""
    from skimage import data

    return Image.fromarray(data.astronaut())


def grace_hopper() -> Image.Image:
    """Grace Hopper, US Navy photo (public domain), 512 x 600, from matplotlib."""
    import matplotlib

    with Image.open(f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg") as image:
        return image.convert("RGB")


def coffee() -> Image.Image:
    """A cup of coffee (scikit-image, CC0): no face."""
    from skimage import data

    return Image.fromarray(data.coffee())


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """The image after a round trip through JPEG at ``quality``."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def head_crop(image: Image.Image) -> Image.Image:
    """The middle three quarters of the width and the top three quarters of the height."""
    width, height = image.size
    return image.crop((width // 8, 0, width * 7 // 8, height * 3 // 4))


#: The degradations under which a face must stay the same person.
DEGRADATIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "flip": lambda image: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "crop": head_crop,
    "jpeg30": lambda image: jpeg(image, 30),
    "blur2": lambda image: image.filter(ImageFilter.GaussianBlur(2)),
}

PHOTOS: dict[str, Callable[[], Image.Image]] = {"astronaut": astronaut,
                                                "grace_hopper": grace_hopper}
