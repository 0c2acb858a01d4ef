"""Image task layer: one encoded image per request → one normalised CHW float32 array per batch row (numpy).

Input: the bytes of any image PIL reads (JPEG, PNG, WebP, ...; not EPS, which Pillow hands to Ghostscript), in any
mode (grayscale, with alpha, palette, CMYK, 16-bit, ...). EXIF orientation is applied. The image is converted to
``color_mode`` exactly as ``Image.convert`` does (what ``Image.open(f).convert("RGB")`` gives a torchvision pipeline;
note that it clips 16-bit values at 255, it does not rescale them), resized, centre cropped, scaled to [0, 1] and
normalised with ``mean`` / ``std``: the same numbers as the torchvision pipeline the settings describe, computed on
uint8 until the batch is assembled.

Settings (model-config.yaml's ``handler:``), each the counterpart of a torchvision (or timm) eval step:

* ``resize``: an int n resizes the shorter side to n, keeping the aspect ratio (``Resize(n)``); ``[height, width]``
  resizes to exactly that size (``Resize((h, w))``); null or 0 does not resize;
* ``max_size``: the longest the longer side may be after an int ``resize`` (``Resize(n, max_size=m)``); with no
  ``resize``, the longer side is resized to it (v2 ``Resize(None, max_size=m)``); default null;
* ``fit``: with ``resize: [height, width]``, null stretches to that size; ``cover`` keeps the aspect ratio, scaled
  so the image just covers it, ``contain`` so it just fits inside (timm's ``ResizeKeepRatio``, longest 0 and 1);
* ``interpolation``: nearest | bilinear (default) | bicubic | box | hamming | lanczos: the PIL filter torchvision's
  ``Resize`` uses on PIL images for that ``InterpolationMode``;
* ``crop``: an int or ``[height, width]``: the centre crop (``CenterCrop``), which is the model's input size; an
  image smaller than the crop is padded with ``fill`` (0-255, one value or one per channel; default 0 = black, as
  ``CenterCrop``; timm's ``CenterCropOrPad`` pads with the mean colour). Null: the whole image at its own size
  (detection, segmentation): each image is then its own batch of one for the model (``collate`` gives a list, and
  ``forward`` calls the model once per image), so a batch may mix sizes;
* ``color_mode``: RGB or L (``Grayscale()``); ``mean`` and ``std``: one value per channel (``Normalize``);
* ``jpeg_draft``: a JPEG at least four times the resize target is first decoded at a reduced scale (1/2, 1/4 or
  1/8, never below twice the target), for a fraction of the work; ``max_pixels``: the largest image accepted, and the
  largest the resize (and the padding to the crop) may make of it; ``max_aspect_ratio``: the most the longer side may
  be times the shorter (default 32: panoramas and banners pass, 1-pixel strips do not).

Refused with a 4xx, each checked from the header before anything is decoded where it can be: a body that is not an
image (400 ``not_an_image``), a file cut short (400 ``truncated_image``) or otherwise broken, or in a mode that does
not convert to ``color_mode`` (400 ``corrupt_image``; any failure of the decoder on a file it identified, a decoded
size other than the header's included), a side of 0 pixels (400 ``corrupt_image``), more pixels than ``max_pixels``
(413 ``image_too_large``; so is a file that Pillow itself calls a decompression bomb, as the decoder finds out), a
longer side more than ``max_aspect_ratio`` times the shorter (400 ``extreme_aspect_ratio``), a JPEG of more than
``MAX_JPEG_SCANS`` scans (400 ``too_many_scans``: each is decoded over the whole image), a file Pillow would read in
more pieces than its size warrants (400 ``too_many_segments``: chunks, markers, fill bytes, blocks; see
``CountedReads``), and an image the resize would
make larger than ``max_pixels`` (413 ``image_too_large``, from ``ImageTransform.output_size`` in both orientations,
before resizing). Only the first frame of an animation or the first page of a multi-page file is read.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from handlers.base import ModelHandler
from handlers.inputs import InputError

logger = logging.getLogger(__name__)

# A JPEG is decoded at a reduced scale only down to DRAFT_MARGIN x the resize target, so that an antialiased
# resize still does the last step: top-1 then agrees with full decoding on the benchmark's photos.
DRAFT_MARGIN = 2
EXIF_ORIENTATION = 0x0112
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COLOR_MODES = {"RGB": 3, "L": 1}  # color_mode → channels
# interpolation → the PIL filter torchvision's Resize applies to a PIL image for that InterpolationMode
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
FITS = (None, "cover", "contain")  # with resize [h, w]: stretch, or keep the ratio covering / inside it
WHOLE_IMAGE_EXAMPLE = (240, 320)  # (height, width) of the warm-up input of a model that takes whole images
MAX_ASPECT_RATIO = 32  # default of max_aspect_ratio: a 360-degree panorama is 2 to 16 times as wide as high
# A progressive JPEG is decoded once per scan (libjpeg-turbo repeats a scan it is given again): 1,000 scans make a
# 270 kB file of 36 MP take 26 s. Encoders write 10 or so (libjpeg's progressive script: 10; a baseline JPEG: 1).
MAX_JPEG_SCANS = 100
JPEG_SCAN = b"\xff\xda"  # start-of-scan marker; 0xFF in entropy-coded data is always followed by 0x00
# Formats Pillow decodes by running another program: EPS runs Ghostscript on the file's PostScript, which may loop for
# ever. Not read: such a file is not an image to these handlers.
UNREAD_FORMATS = ("EPS",)
# How many reads Pillow may make of a body (``CountedReads``): this many, plus one per BYTES_PER_READ bytes.
READS_BASE = 2_000
BYTES_PER_READ = 512


class CountedReads(io.BytesIO):
    """A body as Pillow reads it, refused once it has been read in more pieces than its size warrants. Pillow walks
    a file's chunks, markers, fill bytes and blocks in Python, a read each, about 10 us apiece: linear, but a 25 MB
    body of empty PNG chunks kept a worker 20 s. A real image is read in far fewer pieces (a PNG's pixel data comes
    in chunks of 8 kB or more, a JPEG's in one); ``READS_BASE`` covers headers and metadata."""

    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.allowed = READS_BASE + len(payload) // BYTES_PER_READ
        self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads > self.allowed:
            raise InputError("too_many_segments", f"the file is read in more pieces (chunks, markers, blocks) than "
                                                  f"its {len(self.getbuffer()):,} bytes warrant: refused after "
                                                  f"{self.allowed:,} reads")
        return super().read(size)


@contextmanager
def decoding(what: str):
    """Pillow at work on a client's file: whatever it raises is that file's fault, so a 4xx naming the problem;
    a size Pillow calls a decompression bomb (in a header read while decoding, an ICO's PNG) is a 413."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (InputError, MemoryError):  # a MemoryError is the machine's, not the file's: bounds came first
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError("image_too_large", f"image refused: {error}", status=413)
    except UnidentifiedImageError:
        raise InputError("not_an_image", f"{what} is not an image format we can read (JPEG, PNG, WebP, GIF, BMP, "
                                         "TIFF, ...)")
    except Exception as error:  # noqa: BLE001 (a decoder fails on a broken file in many ways: struct.error, ...)
        reason = "truncated_image" if "truncated" in str(error).lower() else "corrupt_image"
        raise InputError(reason, f"{what} cannot be decoded: {type(error).__name__}: {error}")


def open_image(payload: bytes, max_pixels: int, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """The image in the bytes, header read only: refused if it is not an image, has no pixels, more than
    max_pixels, or a longer side more than max_aspect_ratio times the shorter."""
    with decoding(f"the body ({len(payload)} bytes)"):
        Image.init()
        image = Image.open(CountedReads(payload), formats=[name for name in Image.ID if name not in UNREAD_FORMATS])
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError("corrupt_image", f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError("image_too_large", f"image is {width}x{height} = {width * height / 1e6:.1f} MP; "
                                            f"the limit is {max_pixels / 1e6:.1f} MP", status=413)
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise InputError("extreme_aspect_ratio", f"image is {width}x{height}: one side is "
                                                 f"{max(width, height) / min(width, height):,.1f} times the other; "
                                                 f"the limit is {max_aspect_ratio:g} (max_aspect_ratio)")
    if image.format in ("JPEG", "MPO") and (scans := payload.count(JPEG_SCAN)) > MAX_JPEG_SCANS:
        raise InputError("too_many_scans", f"the JPEG has {scans:,} scans, each decoded over the whole image; the "
                                           f"limit is {MAX_JPEG_SCANS}")
    return image


def load_image(image: Image.Image, color_mode: str) -> Image.Image:
    """An opened image decoded, EXIF orientation applied, in ``color_mode``; a broken file is a 400, and so is one
    whose decoded size is not its header's (the bounds were checked on the header's)."""
    size = image.size
    with decoding(f"the {image.format} image"):
        image.load()
        if image.size != size:
            raise InputError("corrupt_image", f"the {image.format} image decodes to {image.width}x{image.height}, "
                                              f"not the {size[0]}x{size[1]} its header says")
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        return image if image.mode == color_mode else image.convert(color_mode)  # each would copy the full image


def heat_map(attributions, grid: int) -> list[list[float]]:
    """Attributions over one image (a 1 x C x H x W tensor) → a grid x grid heat map: each cell's share of the total
    absolute attribution (the cells sum to 1), rows top to bottom."""
    import torch

    magnitude = attributions.abs().sum(dim=1, keepdim=True).float()
    cells = torch.nn.functional.adaptive_avg_pool2d(magnitude, min(grid, *magnitude.shape[-2:]))[0, 0]
    cells = cells / cells.sum().clamp(min=1e-12)
    return [[round(v, 5) for v in row] for row in cells.tolist()]


def size_setting(value: Any, name: str) -> int | tuple[int, int]:
    """A size as torchvision takes it: a positive int, or [height, width] ([n] is n)."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
        return int(value)
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be a positive int or [height, width], not {value!r}")


def fill_setting(value: Any, channels: int) -> int | tuple[int, ...]:
    """The padding colour as PIL's Image.new takes it for an image of that many channels."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in values):
        raise ValueError(f"fill must be one int in 0..255 or {channels} of them (one per channel), not {value!r}")
    return int(values[0]) if channels == 1 else tuple(int(v) for v in values)


class ImageTransform:
    """Bytes → uint8 HWC array (decode), and a list of those → normalised NCHW float batch (collate).

    Shared by the handler and by the build, which measures accuracy and parity on exactly what the server computes.
    ``load``, ``resize_image`` and ``crop_image`` are decode's steps, for comparing it step by step with a
    torchvision transform (``export/preprocessing.py``).
    """

    def __init__(self, resize: int | list[int] | None, crop: int | list[int], mean, std, color_mode: str = "RGB",
                 max_pixels: int = 40_000_000, jpeg_draft: bool = True, interpolation: str = "bilinear",
                 max_size: int | None = None, fit: str | None = None, fill: int | list[int] = 0,
                 max_aspect_ratio: float = MAX_ASPECT_RATIO):
        if color_mode not in COLOR_MODES:
            raise ValueError(f"color_mode must be RGB or L, not {color_mode!r}")
        channels = COLOR_MODES[color_mode]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values for color_mode {color_mode}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {interpolation!r}")
        self.resize = None if resize in (None, 0) else size_setting(resize, "resize")
        self.crop = None if crop is None else size_setting(crop, "crop")
        self.crop = self.crop if isinstance(self.crop, tuple) or crop is None else (self.crop, self.crop)  # (h, w)
        self.max_size = None if max_size is None else int(max_size)
        self.fit = fit
        self._check_resize()
        self.color_mode, self.max_pixels, self.channels = color_mode, int(max_pixels), channels
        self.max_aspect_ratio = float(max_aspect_ratio)
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be at least 1, not {max_aspect_ratio!r}")
        self.interpolation = interpolation
        self.jpeg_draft = bool(jpeg_draft)
        self.fill = fill_setting(fill, channels)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, channels, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, channels, 1, 1)

    def _check_resize(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"fit must be null, cover or contain, not {self.fit!r}")
        if self.fit is not None and not isinstance(self.resize, tuple):
            raise ValueError(f"fit {self.fit} needs resize: [height, width], not {self.resize!r}")
        if self.max_size is not None and isinstance(self.resize, tuple):
            raise ValueError("max_size applies to an int resize (the shorter side) or none; drop one of them")
        if self.max_size is not None and isinstance(self.resize, int) and self.max_size <= self.resize:
            raise ValueError(f"max_size ({self.max_size}) must exceed resize ({self.resize}), as in torchvision")

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "ImageTransform":
        """The transform that a model's ``handler:`` settings (defaults filled in) describe."""
        keys = ("resize", "crop", "mean", "std", "color_mode", "max_pixels", "jpeg_draft", "interpolation",
                "max_size", "fit", "fill", "max_aspect_ratio")
        return cls(**{key: settings[key] for key in keys if key in settings})

    def open(self, payload: bytes) -> Image.Image:
        """The image, header read only, refused if it or what the resize (and the padding to the crop) would make
        of it is over the bounds. Its EXIF orientation is not known before decoding a PNG, so both orientations
        are checked (they differ only with ``fit`` or a crop that is not square)."""
        image = open_image(payload, self.max_pixels, self.max_aspect_ratio)
        for seen in (image.size, image.size[::-1]):
            width, height = self.output_size(*seen)
            crop_height, crop_width = self.crop or (0, 0)
            padded = max(width, crop_width) * max(height, crop_height)
            resized = f"image is {image.width}x{image.height}: resized (upright or turned by its EXIF) it would be"
            if min(width, height) < 1:
                raise InputError("extreme_aspect_ratio", f"{resized} {width}x{height}, no pixels left on one side")
            if padded > self.max_pixels:
                raise InputError("image_too_large", f"{resized} {width}x{height} = {padded / 1e6:.1f} MP (padded to "
                                                    f"the crop); the limit is {self.max_pixels / 1e6:.1f} MP",
                                 status=413)
        return image

    def decode(self, payload: bytes) -> np.ndarray:
        image = self.crop_image(self.resize_image(self.load(payload)))
        return np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, self.channels)

    def load(self, payload: bytes) -> Image.Image:
        """The image decoded (a large JPEG at a reduced scale, ``jpeg_draft``), oriented, in ``color_mode``."""
        image = self.open(payload)
        if self.jpeg_draft and image.format == "JPEG" and (self.resize or self.max_size):
            with decoding("the JPEG image"):
                self._draft(image)
        return load_image(image, self.color_mode)

    def _draft(self, image: Image.Image) -> None:
        """A JPEG decodes at 1/2, 1/4 or 1/8 of its size for a fraction of the work: ask for the smallest that keeps
        both sides at or above DRAFT_MARGIN x their size after the resize. The decoded mode is the file's own, so the
        conversion to ``color_mode`` is the same as without drafting."""
        width, height = image.size
        if isinstance(self.resize, int):  # shorter side: max_size can only make the target smaller
            scale = DRAFT_MARGIN * self.resize / min(image.size)
        else:
            rotated = image.getexif().get(EXIF_ORIENTATION, 1) in ROTATED
            seen = (height, width) if rotated else (width, height)
            target = self.output_size(*seen)
            scale = DRAFT_MARGIN * max(target[0] / seen[0], target[1] / seen[1])
        image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of an image of that size after the resize, computed as torchvision's ``Resize`` does
        (timm's ``ResizeKeepRatio`` for ``fit``)."""
        if self.resize is None and self.max_size is None:
            return width, height
        if isinstance(self.resize, tuple):
            target_height, target_width = self.resize
            if self.fit is None:
                return target_width, target_height
            ratios = (height / target_height, width / target_width)
            ratio = max(ratios) if self.fit == "contain" else min(ratios)
            return round(width / ratio), round(height / ratio)
        short, long = (width, height) if width <= height else (height, width)
        if self.resize is None:  # the longer side to max_size
            new_short, new_long = int(self.max_size * short / long), self.max_size
        else:
            new_short, new_long = self.resize, int(self.resize * long / short)
            if self.max_size is not None and new_long > self.max_size:
                new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def resize_image(self, image: Image.Image) -> Image.Image:
        size = self.output_size(*image.size)
        return image if size == image.size else image.resize(size, INTERPOLATIONS[self.interpolation])

    def crop_image(self, image: Image.Image) -> Image.Image:
        """The centre crop, as ``CenterCrop``: an image smaller than the crop is padded with ``fill`` first."""
        if self.crop is None:
            return image
        width, height = image.size
        crop_height, crop_width = self.crop
        if width < crop_width or height < crop_height:
            padded = Image.new(image.mode, (max(width, crop_width), max(height, crop_height)), self.fill)
            padded.paste(image, ((padded.width - width) // 2, (padded.height - height) // 2))
            image, (width, height) = padded, padded.size
        top = int(round((height - crop_height) / 2.0))
        left = int(round((width - crop_width) / 2.0))
        return image.crop((left, top, left + crop_width, top + crop_height))

    def collate(self, items: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        """One NCHW float batch; without a crop, a list of batches of one, each image at its own size."""
        if self.crop is None:
            return [self.normalise(item[None]) for item in items]
        return self.normalise(np.stack(items))

    def normalise(self, images: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)  # NCHW, one copy
        batch /= np.float32(255.0)
        batch -= self.mean
        batch /= self.std
        return batch

    def example_input(self) -> np.ndarray:
        return np.zeros((1, self.channels, *(self.crop or WHOLE_IMAGE_EXAMPLE)), dtype=np.float32)


class ImageHandler(ModelHandler):
    """Task layer for models that take one image per request."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        **ModelHandler.DEFAULTS,
        "resize": 256,
        "crop": 224,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "color_mode": "RGB",
        "max_pixels": 40_000_000,  # the largest image accepted, and the largest the resize may make of it
        "max_aspect_ratio": MAX_ASPECT_RATIO,  # longer side / shorter side
        "jpeg_draft": True,  # decode large JPEGs at a reduced scale (DCT scaling) before resizing
        "interpolation": "bilinear",  # the resize filter: nearest, bilinear, bicubic, box, hamming or lanczos
        "max_size": None,  # the longest the longer side may be after the resize (torchvision's max_size)
        "fit": None,  # with resize [h, w]: null stretches; cover / contain keep the aspect ratio (timm)
        "fill": 0,  # the colour that pads an image smaller than the crop
    }

    def configure(self) -> None:
        self.transform = ImageTransform.from_settings(self.settings)

    def decode(self, payload: bytes) -> np.ndarray:
        return self.transform.decode(payload)

    def collate(self, items: list[np.ndarray]) -> np.ndarray:
        return self.transform.collate(items)

    def example_input(self) -> np.ndarray:
        return self.transform.example_input()

    def forward(self, model, inputs):
        """The model on one batch; on whole images (no crop), once per image: a list of outputs, one each."""
        if isinstance(inputs, list):
            return [super(ImageHandler, self).forward(model, image) for image in inputs]
        return super().forward(model, inputs)



@dataclass
class Picture:
    """One request to a model that takes whole images: the pixels it sees, the size of the image as sent (upright,
    its EXIF orientation applied), and the options the request set."""

    pixels: np.ndarray  # H x W x C uint8, after the resize if the settings ask for one
    width: int
    height: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y): how many pixels of the image as sent one pixel of the model's input covers."""
        return self.width / self.pixels.shape[1], self.height / self.pixels.shape[0]


class WholeImageHandler(ImageHandler):
    """Task layer for models that take a whole image at its own size (detection, segmentation): no crop, by default
    no resize, each image its own call of the model within a batch (``ImageHandler.forward``), and answers given in
    the pixels of the image as sent. Per-request ``OPTIONS`` reach the answer through the ``Picture``."""

    DEFAULTS: ClassVar[dict[str, Any]] = {**ImageHandler.DEFAULTS, "resize": None, "crop": None,
                                          "max_pixels": 16_000_000}
    DYNAMIC_AXES = ((2, 3),)  # one image per call: its height and width vary

    def decode(self, payload: bytes) -> Picture:
        header = self.transform.open(payload)
        turned = header.getexif().get(EXIF_ORIENTATION, 1) in ROTATED
        width, height = header.size[::-1] if turned else header.size
        pixels = self.transform.decode(payload)
        return Picture(pixels, width, height)

    def with_options(self, item: Picture, options: dict[str, Any]) -> Picture:
        return replace(item, options={**item.options, **options})

    def option(self, item: Picture, name: str) -> Any:
        """The request's value of an option, else the model's setting of the same name."""
        return item.options.get(name, self.settings[name])

    def collate(self, items: list[Picture]) -> list[np.ndarray]:
        return self.transform.collate([item.pixels for item in items])
