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


# Real sentences for the text models: pairs that mean nearly the same, and unrelated ones; the last is long enough
# to be truncated at 256 word pieces.
SENTENCES = {
    "cat": "A cat is sleeping on the sofa.",
    "kitten": "A kitten naps on the couch.",
    "espresso": "She ordered a strong espresso at the café.",
    "coffee": "He drank a cup of strong coffee in the café.",
    "rocket": "The rocket lifted off from the launch pad at dawn.",
    "launch": "A spacecraft was launched into orbit this morning.",
    "markets": "Stock markets fell sharply after the interest rate decision.",
    "long": " ".join(["The committee reviewed the proposal in detail, discussed its budget, its schedule and its risks,"
                      " and asked the authors to return with a revised plan before the end of the quarter."] * 12),
}


def photo(name: str) -> np.ndarray:
    """The photo as an HxWx3 uint8 array; a name not in PHOTOS is any other scikit-image picture (``camera``: HxW)."""
    origin, key = PHOTOS.get(name, f"skimage:{name}").split(":")
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


def image_modes() -> dict[str, bytes]:
    """Photos in the image modes people send besides RGB: grayscale, RGBA, palette and CMYK."""
    modes = {}
    for name, (source, mode, fmt) in {"chelsea (grayscale PNG)": ("chelsea", "L", "PNG"),
                                      "coffee (RGBA PNG)": ("coffee", "RGBA", "PNG"),
                                      "rocket (palette PNG)": ("rocket", "P", "PNG"),
                                      "astronaut (CMYK JPEG)": ("astronaut", "CMYK", "JPEG")}.items():
        buffer = io.BytesIO()
        Image.fromarray(photo(source)).convert(mode).save(buffer, format=fmt)
        modes[name] = buffer.getvalue()
    return modes


def samples_for(handler) -> dict[str, bytes]:
    """Real inputs for a model's handler, encoded as a client sends them: sentences for a text model, else photos
    (JPEG, and the other image modes)."""
    from handlers.text import TextHandler

    if isinstance(handler, TextHandler):
        return {name: text.encode() for name, text in SENTENCES.items()}
    return {**photo_files(), **image_modes()}
