"""Image-to-image: one image per request → the same image ``scale`` times larger, as a PNG.

Input: the bytes of any image PIL reads, any size up to ``max_pixels`` (413 ``image_too_large`` above, naming the
limit, checked from the header before decoding), with a longer side at most ``max_aspect_ratio`` times the shorter
(400 ``extreme_aspect_ratio``); the other image errors as in ``handlers/vision.py``. The answer is ``scale``² times
the input's pixels: an image whose upscaled PNG could be larger than ``max_answer_bytes`` (the raw RGB size, which a
PNG exceeds by a fraction of a percent at most) is refused from its header too, 413 ``image_too_large`` naming that
limit (never with the default settings: 1 MP in, 12 MB out at most).

The model upscales the luma (Y of YCbCr) from the image and its bicubic upscaling; the chroma is upscaled bicubic,
as in ESPCN. Response: ``Content-Type: image/png``, the upscaled RGB image, ``X-Output-Size: <width>x<height>``.

Batching: images of a batch are of any size, so each request runs through the model on its own inside the batch
(no padding, which would cost compute and edge artefacts; a fully convolutional network gains little from stacking
on a CPU: its cost is linear in pixels). Explanations are not offered (400 ``no_explanations``).
"""

from __future__ import annotations

import io
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from handlers.base import ModelHandler, Reply
from handlers.inputs import InputError
from handlers.vision import MAX_ASPECT_RATIO, load_image, open_image

SIZE_HEADER = "X-Output-Size"


# One request, decoded: (its luma, the luma's bicubic upscaling: 1 x 1 x H x W in 0..1; the upscaled Cb and Cr).
# A tuple, not a class: TorchServe wants exactly one class in a handler's entry module.
Upscaling = tuple[np.ndarray, np.ndarray, tuple[Image.Image, Image.Image]]


def luma_array(image: Image.Image) -> np.ndarray:
    return (np.asarray(image, dtype=np.float32) / np.float32(255.0))[None, None]


class SuperResolution(ModelHandler):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **ModelHandler.DEFAULTS,
        "scale": 2,  # as trained: the spec's source and this must agree
        "max_pixels": 1_000_000,  # input pixels; the output has scale² as many
        "max_aspect_ratio": MAX_ASPECT_RATIO,  # longer side / shorter side of the input
        "png_compress_level": 1,  # 0-9: fast, larger files at 1
    }
    DYNAMIC_AXES = ((2, 3), (2, 3))  # low and bicubic luma: height and width (one image per call)

    def decode(self, payload: bytes) -> Upscaling:
        image = open_image(payload, int(self.settings["max_pixels"]), float(self.settings["max_aspect_ratio"]))
        self.check_output(*image.size)
        ycbcr = load_image(image, "RGB").convert("YCbCr")
        size = (ycbcr.width * int(self.settings["scale"]), ycbcr.height * int(self.settings["scale"]))
        y, cb, cr = ycbcr.split()
        return (luma_array(y), luma_array(y.resize(size, Image.BICUBIC)),
                (cb.resize(size, Image.BICUBIC), cr.resize(size, Image.BICUBIC)))

    def check_output(self, width: int, height: int) -> None:
        """Refuse an image whose upscaled PNG could exceed max_answer_bytes: deflate adds at most about 0.03 % to
        the raw rows (3 bytes a pixel and a filter byte a row), the chunks a few bytes each."""
        scale, limit = int(self.settings["scale"]), int(self.settings["max_answer_bytes"])
        out_width, out_height = width * scale, height * scale
        bound = (3 * out_width + 1) * out_height * 1001 // 1000 + 4096
        if bound > limit:
            raise InputError("image_too_large", f"image is {width}x{height}: upscaled x{scale} it would be "
                                                f"{out_width}x{out_height}, a PNG of up to {bound:,} bytes; the "
                                                f"answer limit is {limit:,} (max_answer_bytes)", status=413)

    def collate(self, items: list[Upscaling]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(low, bicubic) for low, bicubic, _ in items]

    def forward(self, model, inputs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        return [model(low, bicubic) for low, bicubic in inputs]

    def example_input(self) -> tuple[np.ndarray, np.ndarray]:
        scale = int(self.settings["scale"])
        return np.zeros((1, 1, 16, 16), np.float32), np.zeros((1, 1, 16 * scale, 16 * scale), np.float32)

    def answer(self, outputs: list[np.ndarray], items: list[Upscaling]) -> list[Reply]:
        replies = []
        for output, (_, _, chroma) in zip(outputs, items):
            y = np.round(np.clip(output[0, 0], 0, 1) * np.float32(255)).astype(np.uint8)
            image = Image.merge("YCbCr", (Image.fromarray(y), *chroma)).convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=int(self.settings["png_compress_level"]))
            replies.append(Reply(buffer.getvalue(), "image/png", {SIZE_HEADER: f"{image.width}x{image.height}"}))
        return replies
