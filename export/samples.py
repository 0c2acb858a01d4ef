"""Real photos that ship inside registry packages (scikit-image, scikit-learn), encoded as a client would send them."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# name → (loader, what the photo shows); the loaders read files inside the installed packages, no network.
PHOTOS = {
    "chelsea": "skimage:chelsea",  # a tabby cat
    "coffee": "skimage:coffee",  # a cup of espresso
    "rocket": "skimage:rocket",  # a rocket on its launch pad
    "astronaut": "skimage:astronaut",  # a portrait
    "china": "sklearn:china.jpg",  # a temple
    "flower": "sklearn:flower.jpg",  # a flower
}


def photo(name: str) -> np.ndarray:
    """The photo as an HxWx3 uint8 array."""
    origin, key = PHOTOS[name].split(":")
    if origin == "skimage":
        import skimage.data

        return getattr(skimage.data, key)()
    from sklearn.datasets import load_sample_image

    return load_sample_image(key)


def encode(array: np.ndarray, fmt: str = "JPEG", quality: int = 95) -> bytes:
    """An image array as the bytes of a file (JPEG or PNG)."""
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt == "JPEG" else {}
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo_files(fmt: str = "JPEG") -> dict[str, bytes]:
    """Every photo, encoded."""
    return {name: encode(photo(name), fmt) for name in PHOTOS}
