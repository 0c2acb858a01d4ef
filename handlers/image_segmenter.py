"""Semantic segmentation: one image per request → the class of every pixel, at the image's own size.

The model takes one whole image (``handlers/vision.py``, ``WholeImageHandler``), by default resized so its shorter
side is ``resize`` (520: torchvision's segmentation models' evaluation size) and normalised with ImageNet's mean and
std, and returns its class scores, 1 x C x h x w at the input's size (torchvision's ``deeplabv3_*``, ``fcn_*`` and
``lraspp_*``: their ``out``; the build exports them so, ``export/tasks.py``). Each pixel's class is the argmax,
resized to the image as sent (upright, its EXIF orientation applied) with nearest-neighbour.

Response, by the request's ``format`` (``/predictions/<model>?format=rle``; default ``format`` setting: png):

* ``png``: ``Content-Type: image/png``, the class map (a palette PNG: each pixel's value is its class index, the
  palette only makes it visible), with ``X-Classes``: each class present → its share of the pixels, as JSON
  (``{"background": 0.81, "cat": 0.19}``), and ``X-Output-Size: <width>x<height>``;
* ``rle``: JSON with the same shares and the map as run lengths, row by row from the top left::

      {"width": 640, "height": 480, "classes": {"background": {"index": 0, "share": 0.81}, ...},
       "runs": [[0, 1520], [15, 32], ...]}

  each run is ``[class index, length]``; the lengths sum to width x height.

Explanations are not offered (400 ``no_explanations``).
"""

from __future__ import annotations

import io
import json
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from handlers.base import Reply
from handlers.vision import IMAGENET_MEAN, IMAGENET_STD, Picture, WholeImageHandler

SHARE_DECIMALS = 6
CLASSES_HEADER = "X-Classes"
SIZE_HEADER = "X-Output-Size"


def palette() -> list[int]:
    """The PASCAL VOC colour map: class i gets a colour from the bits of i, so neighbouring classes differ."""
    colours = []
    for index in range(256):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours += [r, g, b]
    return colours


PALETTE = palette()


def runs(classes: np.ndarray) -> list[list[int]]:
    """A class map as [class, length] runs, row-major."""
    flat = classes.ravel()
    starts = np.flatnonzero(np.diff(flat, prepend=-1))
    lengths = np.diff(np.append(starts, flat.size))
    return [[int(flat[start]), int(length)] for start, length in zip(starts, lengths)]


class ImageSegmenter(WholeImageHandler):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **WholeImageHandler.DEFAULTS,
        "resize": 520,  # the shorter side the model sees
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "format": "png",  # png | rle
        "png_compress_level": 1,
    }
    OPTIONS: ClassVar[dict[str, tuple]] = {"format": ("png", "rle")}

    def answer(self, outputs: list[np.ndarray], items: list[Picture]) -> list[Any]:
        return [self.segmentation(output, item) for output, item in zip(outputs, items)]

    def class_map(self, output: np.ndarray, item: Picture) -> np.ndarray:
        """Each pixel's class at the size of the image as sent (H x W, uint8 for up to 256 classes)."""
        scores = np.asarray(output[0] if isinstance(output, (tuple, list)) else output)[0]
        classes = scores.argmax(axis=0).astype(np.uint8 if scores.shape[0] <= 256 else np.int32)
        if classes.shape != (item.height, item.width):
            mode = "L" if classes.dtype == np.uint8 else "I"
            classes = np.asarray(Image.fromarray(classes, mode).resize((item.width, item.height),
                                                                         Image.Resampling.NEAREST))
        return classes

    def shares(self, classes: np.ndarray) -> dict[str, dict[str, float]]:
        counts = np.bincount(classes.ravel())
        return {self.label(index): {"index": int(index), "share": round(float(count) / classes.size, SHARE_DECIMALS)}
                for index, count in enumerate(counts) if count}

    def segmentation(self, output: np.ndarray, item: Picture) -> Any:
        classes = self.class_map(output, item)
        shares = self.shares(classes)
        if self.option(item, "format") == "rle":
            return {"width": item.width, "height": item.height, "classes": shares, "runs": runs(classes)}
        image = Image.fromarray(classes.astype(np.uint8), "P")
        image.putpalette(PALETTE)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=int(self.settings["png_compress_level"]))
        header = json.dumps({name: value["share"] for name, value in shares.items()}, ensure_ascii=True)
        return Reply(buffer.getvalue(), "image/png", {CLASSES_HEADER: header,
                                                      SIZE_HEADER: f"{item.width}x{item.height}"})

    def top_class(self, answer: Any) -> str | None:
        """The largest class other than the first (background)."""
        if isinstance(answer, Reply):
            shares = json.loads(answer.headers[CLASSES_HEADER])
        else:
            shares = {name: value["share"] for name, value in answer["classes"].items()}
        named = {name: share for name, share in shares.items() if name != self.label(0)}
        return max(named, key=named.get) if named else None
