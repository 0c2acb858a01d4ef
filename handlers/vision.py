"""Image task layer: one encoded image per request → one normalised CHW float tensor per batch row.

Input: the bytes of any image PIL reads (JPEG, PNG, WebP, ...). EXIF orientation is applied. The image is converted to
``color_mode``, its shorter side resized to ``resize`` (bilinear, as torchvision's ``Resize`` on PIL images; a JPEG at
least four times that size is first decoded at a reduced scale, ``jpeg_draft``), centre
cropped to ``crop`` (as ``CenterCrop``), scaled to [0, 1] and normalised with ``mean`` / ``std``: the same numbers as
the usual torchvision pipeline, computed on uint8 until the batch is assembled.

Refused with a 4xx: a body that is not an image (400 ``not_an_image``), a file cut short (400 ``truncated_image``) or
otherwise broken (400 ``corrupt_image``), more pixels than ``max_pixels`` (413 ``image_too_large``, checked from the
header before anything is decoded).
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from handlers.base import InputError, ModelHandler

logger = logging.getLogger(__name__)

# A JPEG is decoded at a reduced scale only down to DRAFT_MARGIN x the resize target, so that an antialiased
# resize still does the last step: top-1 then agrees with full decoding on the benchmark's photos.
DRAFT_MARGIN = 2
EXIF_ORIENTATION = 0x0112
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def open_image(payload: bytes, max_pixels: int) -> Image.Image:
    """The image in the bytes, header read only: refused if it is not an image or has more than max_pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(payload))
    except UnidentifiedImageError:
        raise InputError("not_an_image", f"the body ({len(payload)} bytes) is not an image format we can read "
                                         "(JPEG, PNG, WebP, GIF, BMP, TIFF, ...)")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError("image_too_large", f"image refused: {error}", status=413)
    width, height = image.size
    if width * height > max_pixels:
        raise InputError("image_too_large", f"image is {width}x{height} = {width * height / 1e6:.1f} MP; "
                                            f"the limit is {max_pixels / 1e6:.1f} MP", status=413)
    if width == 0 or height == 0:
        raise InputError("corrupt_image", f"image has no pixels ({width}x{height})")
    return image


def load_image(image: Image.Image, color_mode: str) -> Image.Image:
    """An opened image decoded, EXIF orientation applied, in ``color_mode``; a broken file is a 400."""
    try:
        image.load()
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        return image if image.mode == color_mode else image.convert(color_mode)  # each would copy the full image
    except (OSError, SyntaxError, ValueError) as error:
        reason = "truncated_image" if "truncated" in str(error) else "corrupt_image"
        raise InputError(reason, f"the {image.format} image cannot be decoded: {error}")


def heat_map(attributions: torch.Tensor, grid: int) -> list[list[float]]:
    """Attributions over one image (1 x C x H x W) → a grid x grid heat map: each cell's share of the total
    absolute attribution (the cells sum to 1), rows top to bottom."""
    magnitude = attributions.abs().sum(dim=1, keepdim=True).float()
    cells = torch.nn.functional.adaptive_avg_pool2d(magnitude, min(grid, *magnitude.shape[-2:]))[0, 0]
    cells = cells / cells.sum().clamp(min=1e-12)
    return [[round(v, 5) for v in row] for row in cells.tolist()]


class ImageTransform:
    """Bytes → uint8 HWC tensor (decode), and a list of those → normalised NCHW float batch (collate).

    Shared by the handler and by the build, which measures accuracy and parity on exactly what the server computes.
    """

    def __init__(self, resize: int, crop: int, mean, std, color_mode: str = "RGB", max_pixels: int = 40_000_000,
                 jpeg_draft: bool = True):
        if color_mode not in ("RGB", "L"):
            raise ValueError(f"color_mode must be RGB or L, not {color_mode!r}")
        channels = 3 if color_mode == "RGB" else 1
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values for color_mode {color_mode}")
        self.resize, self.crop, self.color_mode, self.max_pixels = int(resize), int(crop), color_mode, int(max_pixels)
        self.channels = channels
        self.jpeg_draft = bool(jpeg_draft)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "ImageTransform":
        """The transform that a model's ``handler:`` settings (defaults filled in) describe."""
        keys = ("resize", "crop", "mean", "std", "color_mode", "max_pixels", "jpeg_draft")
        return cls(**{key: settings[key] for key in keys})

    def open(self, payload: bytes) -> Image.Image:
        return open_image(payload, self.max_pixels)

    def decode(self, payload: bytes) -> torch.Tensor:
        image = self.open(payload)
        if self.jpeg_draft and image.format == "JPEG":
            # A JPEG decodes at 1/2, 1/4 or 1/8 of its size for a fraction of the work: take the smallest that keeps
            # the shorter side at or above DRAFT_MARGIN x ``resize``.
            scale = DRAFT_MARGIN * self.resize / min(image.size)
            image.draft(self.color_mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image = load_image(image, self.color_mode)
        image = self._resize_shorter_side(image)
        image = self._center_crop(image)
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.reshape(self.crop, self.crop, self.channels).copy())

    def _resize_shorter_side(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        if short == self.resize:
            return image
        new_long = int(self.resize * long / short)
        size = (self.resize, new_long) if width <= height else (new_long, self.resize)
        return image.resize(size, Image.BILINEAR)

    def _center_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width < self.crop or height < self.crop:  # only when resize < crop: pad like torchvision would
            padded = Image.new(image.mode, (max(width, self.crop), max(height, self.crop)))
            padded.paste(image, ((padded.width - width) // 2, (padded.height - height) // 2))
            image, (width, height) = padded, padded.size
        top = int(round((height - self.crop) / 2.0))
        left = int(round((width - self.crop) / 2.0))
        return image.crop((left, top, left + self.crop, top + self.crop))

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        batch = torch.stack(items).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        return batch.sub_(self.mean).div_(self.std).contiguous()

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, self.channels, self.crop, self.crop)


class ImageHandler(ModelHandler):
    """Task layer for models that take one image per request."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        **ModelHandler.DEFAULTS,
        "resize": 256,
        "crop": 224,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "color_mode": "RGB",
        "max_pixels": 40_000_000,
        "jpeg_draft": True,  # decode large JPEGs at a reduced scale (DCT scaling) before resizing
    }

    def configure(self) -> None:
        self.transform = ImageTransform.from_settings(self.settings)

    def decode(self, payload: bytes) -> torch.Tensor:
        return self.transform.decode(payload)

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        return self.transform.collate(items)

    def example_input(self) -> torch.Tensor:
        return self.transform.example_input()

