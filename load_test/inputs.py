"""What the load tests, the benchmark and the rehearsal send: real photos at three sizes, held-out digits, and real
requests for any model.

The photos ship inside scikit-image and scikit-learn (``export/samples.py``); each is sent at half, native and
two-and-a-half times its size (213 to 1600 pixels on a side, 20 kB to 400 kB), so decoding weighs as it does with
real uploads. Every server in a comparison gets the same bytes in the same order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from export.samples import PHOTOS, encode, photo

SCALES = (0.5, 1.0, 2.5)


def photos() -> dict[str, bytes]:
    """``"chelsea@0.5"`` → JPEG bytes, for every photo at every scale."""
    payloads = {}
    for name in PHOTOS:
        image = Image.fromarray(photo(name))
        for scale in SCALES:
            size = (round(image.width * scale), round(image.height * scale))
            resized = image if scale == 1.0 else image.resize(size, Image.LANCZOS)
            payloads[f"{name}@{scale:g}"] = encode(np.asarray(resized))
    return payloads


def digits() -> list[bytes]:
    from export import digits as digits_data

    images, _ = digits_data.held_out()
    return [encode(image, "PNG") for image in images]


def requests_for(model: str, handler: str) -> list[tuple[bytes, str]]:
    """Real requests for a model whose archive names ``handler``: (body, content type)."""
    from export.samples import SENTENCES, photo_files

    if handler in ("sentence_embedding", "text_classifier"):
        texts = list(SENTENCES.values())
        return [(json.dumps({"texts": texts[:3]}).encode(), "application/json"),
                (json.dumps({"text": texts[0]}).encode(), "application/json"),
                (texts[4].encode(), "text/plain")]
    if handler == "super_resolution":
        from export.super_resolution import held_out

        return [(payload, "application/octet-stream") for _, payload in held_out(2).values()]
    if model == "digits":
        return [(body, "application/octet-stream") for body in digits()[:8]]
    return [(body, "application/octet-stream") for body in photo_files().values()]


def write(payloads: dict[str, bytes], folder: Path) -> list[Path]:
    """The payloads as files (the load generator reads them), in a fixed order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, payload in payloads.items():
        paths.append(folder / f"{name}.jpg")
        paths[-1].write_bytes(payload)
    return paths
