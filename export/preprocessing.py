"""A user's torchvision eval transform, read as the image handler's settings, and proven to match what is served.

The served preprocessing is data: the ``handler:`` settings of a model's spec, applied by ``handlers/vision.py``'s
``ImageTransform`` (PIL + numpy: decode → resize → centre crop → uint8; the batch → float, normalised). People train
with a torchvision transform; this module reads that transform into those settings, and checks on real images that
the server computes what the transform computes.

* ``load_transform("module:name", code)``: the transform a spec names: a ``Compose`` (or any transform object), or a
  function returning one, called with no arguments; the module is imported from the folder ``code`` (on
  ``sys.path`` only while importing, a same-named module evicted from ``sys.modules`` first) or from the installed
  packages.
* ``settings_from_transform(transform)``: the settings it means: ``resize``, ``max_size``, ``fit``,
  ``interpolation``, ``crop``, ``fill``, ``color_mode``, ``mean``, ``std``. Read: torchvision's transforms (v1 and
  v2): Resize, CenterCrop, ToTensor, PILToTensor, ConvertImageDtype, ToImage, ToDtype, ToPureTensor, Identity,
  Grayscale(1), RGB, Normalize, Compose (nested too) and the weights' presets (``ResNet50_Weights.DEFAULT
  .transforms()``); timm's MaybeToTensor, MaybePILToTensor, ToTensor, ResizeKeepRatio and CenterCropOrPad. Steps on
  tensors (v2's ``ToImage()`` first) are read as the same step on the PIL image; their results differ by rounding
  only (``compare`` measures it). A step that cannot be served is refused, naming it and its position: random
  augmentations, code (``Lambda``, classes of one's own), steps the server does not do or does in another order.
* ``settings_from_timm(model)``: the settings of timm's own eval transform for the model's pretrained config
  (``resolve_data_config`` → ``create_transform(is_training=False)``; resize = floor(crop / crop_pct)).
* ``describe_steps(transform)``: one line per step, numbered as the messages number them.
* ``compare`` and ``first_difference``: ``export/preprocessing_parity.py``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from handlers.vision import ImageTransform

logger = logging.getLogger(__name__)

# A stage of the two pipelines "differs" when its pixels differ by more than this on average (levels of 255):
# resizing a tensor instead of the PIL image stays below 0.3, a different filter or a drafted JPEG is well above.
STAGE_TOLERANCE = 0.5
MIN_PIXEL_AGREEMENT = 0.999  # a segmenter's class maps on both inputs agree on this share of pixels
SETTING_KEYS = ("resize", "max_size", "fit", "interpolation", "crop", "fill", "color_mode", "mean", "std")
# InterpolationMode's value, or a PIL filter number → the served interpolation setting (on a PIL image)
INTERPOLATION_NAMES = {"nearest-exact": "nearest", 0: "nearest", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming",
                       1: "lanczos"}
TENSOR_INTERPOLATIONS = ("bilinear", "bicubic", "lanczos", "nearest-exact")  # resized on tensors like on PIL images
RANDOM_STEPS = {"ColorJitter", "AutoAugment", "RandAugment", "TrivialAugmentWide", "AugMix", "GaussianBlur",
                "GaussianNoise", "ElasticTransform", "JPEG", "ScaleJitter", "MixUp", "CutMix"}
CONTAINERS = {("torchvision", "Compose"), ("torch", "Sequential")}
LIBRARIES = ("torchvision", "timm")  # whose classes are read by name; any other class is the user's own code
NO_OPS = {("torchvision", "ToPureTensor"), ("torchvision", "Identity"), ("torch", "Identity")}


class PreprocessingError(ValueError):
    """A transform that cannot be served, or a served preprocessing that does not match it."""


# --- loading ----------------------------------------------------------------------------------------------------


def load_transform(reference: str, code: Path | None = None) -> Callable:
    """The transform ``"module:name"`` names: the object, or what the function of that name returns."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise PreprocessingError(f"transform {reference!r} is not module:name; name a Compose, or a function "
                                 "returning one, as package.module:name")
    found = _import(module_name, code)
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise PreprocessingError(f"{module_name} has no {attribute}; name a Compose, or a function returning one")
        found = getattr(found, part)
    if inspect.isfunction(found) or inspect.ismethod(found) or inspect.isclass(found):
        found = _call(found, reference)
    if not callable(found):
        raise PreprocessingError(f"{reference} is a {type(found).__name__}, not a transform; name a Compose, or a "
                                 "function returning one")
    return found


def _import(module_name: str, code: Path | None):
    if code is None:
        return _import_module(module_name, "the installed packages")
    folder = Path(code).resolve()
    if not folder.is_dir():
        raise PreprocessingError(f"the code folder {code} does not exist; give the folder that holds {module_name}")
    top = module_name.split(".")[0]
    for name in [name for name in sys.modules if name == top or name.startswith(top + ".")]:
        del sys.modules[name]  # a same-named module imported before, from elsewhere
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    try:
        return _import_module(module_name, str(code))
    finally:
        sys.path.remove(str(folder))


def _import_module(module_name: str, where: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise PreprocessingError(f"cannot import {module_name} from {where}: {error}; check the name and the folder")
    except Exception as error:  # the user's module failed while importing: name it and its error
        raise PreprocessingError(f"importing {module_name} from {where} failed: {type(error).__name__}: {error}")


def _call(function: Callable, reference: str):
    try:
        return function()
    except Exception as error:  # the user's function: name it and what it raised
        hint = "name a function that takes no arguments, or the Compose itself" if isinstance(error, TypeError) \
            else "fix the function so that it returns the evaluation transform"
        raise PreprocessingError(f"{reference}() failed: {type(error).__name__}: {error}; {hint}")


# --- the steps --------------------------------------------------------------------------------------------------


@dataclass
class Step:
    number: int  # 1-based, over the flattened transform
    transform: Any
    label: str

    def refuse(self, why: str) -> PreprocessingError:
        return PreprocessingError(f"step {self.number} of the transform, {self.label}, {why}")


def kind(step: Any) -> tuple[str, str]:
    """(top package, class name) of a step: torchvision's v1 and v2 classes share names."""
    return type(step).__module__.split(".")[0], type(step).__name__


def flatten(transform: Any) -> list[Step]:
    """The steps of a transform, nested Compose (and nn.Sequential) opened, torchvision's presets spelled out."""
    parts = _parts(transform)
    return [Step(number, part, label) for number, (part, label) in enumerate(parts, start=1)]


def _parts(transform: Any) -> list[tuple[Any, str]]:
    if kind(transform) in CONTAINERS:
        children = transform.transforms if hasattr(transform, "transforms") else list(transform)
        return [part for child in children for part in _parts(child)]
    if kind(transform) == ("torchvision", "ImageClassification"):
        return [(step, f"{label_of(step)} (in {type(transform).__name__})") for step in _preset_steps(transform)]
    return [(transform, label_of(transform))]


def _preset_steps(preset: Any) -> list:
    """torchvision's ImageClassification preset (``weights.transforms()``) as the steps its forward() runs."""
    from torchvision import transforms as T

    return [T.Resize(preset.resize_size, preset.interpolation, antialias=preset.antialias),
            T.CenterCrop(preset.crop_size), T.PILToTensor(), T.ConvertImageDtype(torch.float),
            T.Normalize(preset.mean, preset.std)]


def interpolation_of(step: Any) -> str:
    """A step's interpolation as torchvision's InterpolationMode value ("bicubic", "nearest-exact", ...)."""
    mode = step.interpolation
    if isinstance(mode, int):
        return INTERPOLATION_NAMES.get(mode, str(mode))
    return getattr(mode, "value", str(mode))


def _numbers(values: Any) -> str:
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]"


def _crop_text(size: Any) -> str:
    size = list(size) if isinstance(size, (list, tuple)) else [size]
    return str(size[0]) if len(set(size)) == 1 else f"({size[0]}, {size[1]})"


def _resize_text(size: Any) -> str:
    size = list(size) if isinstance(size, (list, tuple)) else [size]
    return str(size[0]) if len(size) == 1 else f"({size[0]}, {size[1]})"


def label_of(step: Any) -> str:
    """One readable line for a step: its class and what matters of its arguments."""
    family, name = kind(step)
    if name in ("Resize", "ResizeKeepRatio") and family in ("torchvision", "timm"):
        size = "None" if step.size is None else _resize_text(step.size)
        extra = f", max_size={step.max_size}" if getattr(step, "max_size", None) else ""
        extra += ", antialias=False" if getattr(step, "antialias", True) is False else ""
        extra += f", longest={step.longest:g}" if name == "ResizeKeepRatio" else ""
        return f"{name}({size}, interpolation={interpolation_of(step)}{extra})"
    if name in ("CenterCrop", "CenterCropOrPad") and family in ("torchvision", "timm"):
        return f"{name}({_crop_text(step.size)})"
    if name == "Normalize" and family == "torchvision":
        return f"Normalize(mean={_numbers(step.mean)}, std={_numbers(step.std)})"
    if name == "Lambda":
        return f"Lambda({getattr(step.lambd, '__name__', '...')})"
    text = " ".join(repr(step).split())
    if " object at 0x" in text or len(text) > 80:
        text = f"{name}(...)"
    return text


def describe_steps(transform: Any) -> list[str]:
    """One line per step, numbered as the messages number them: ``"1. Resize(256, interpolation=bilinear)"``."""
    return [f"{step.number}. {step.label}" for step in flatten(transform)]


# --- reading a transform into settings ------------------------------------------------------------------------


@dataclass
class Reading:
    """What the steps read so far mean; values are ``scale * pixel + shift`` per channel (pixel in 0..255)."""

    form: str = "image"  # what the next step receives: image (PIL), uint8 (tensor) or float (tensor)
    scale: np.ndarray = field(default_factory=lambda: np.ones(1))
    shift: np.ndarray = field(default_factory=lambda: np.zeros(1))
    normalized: bool = False
    stage: str = "decoded"  # how far the geometry went: decoded → resized → cropped
    settings: dict[str, Any] = field(default_factory=lambda: {
        "resize": None, "max_size": None, "fit": None, "interpolation": "bilinear", "crop": None, "fill": 0,
        "color_mode": "RGB"})


def settings_from_transform(transform: Any, whole_images: bool = False) -> dict[str, Any]:
    """The ``handler:`` settings a transform means; PreprocessingError names a step that cannot be served.
    ``whole_images``: the model takes each image at its own size (a segmenter), so no crop is needed."""
    reading = Reading()
    for step in flatten(transform):
        read_step(step, reading)
    return finish(reading, whole_images)


def read_step(step: Step, reading: Reading) -> None:
    """Fold one step into the reading, or refuse it."""
    family, name = kind(step.transform)
    if name.startswith("Random") or name in RANDOM_STEPS:
        raise step.refuse("cannot be served: random augmentations belong to training; pass your evaluation transform")
    if (family, name) in NO_OPS:
        return
    reader = READERS.get((family, name)) if family in LIBRARIES else None
    if reader is not None:
        reader(step, reading)
    elif family in LIBRARIES and name != "Lambda":
        raise step.refuse("cannot be served: the served preprocessing resizes, crops the centre, converts to "
                          "grayscale and normalises, nothing else; drop it, or serve a model that does it itself")
    else:
        raise step.refuse("is code the served preprocessing cannot reproduce; express it with torchvision's "
                          "Resize, CenterCrop, Grayscale, ToTensor and Normalize, or drop it")


def _read_resize(step: Step, reading: Reading) -> None:
    _check_geometry(step, reading, "Resize")
    resize = step.transform
    size = None if resize.size is None else (list(resize.size) if isinstance(resize.size, (list, tuple))
                                             else [resize.size])
    reading.settings["resize"] = None if size is None else size[0] if len(size) == 1 else size
    reading.settings["max_size"] = getattr(resize, "max_size", None)
    _read_interpolation(step, reading, getattr(resize, "antialias", True))
    reading.stage = "resized"


def _read_keep_ratio(step: Step, reading: Reading) -> None:
    resize = step.transform
    if (resize.random_scale_prob or resize.random_aspect_prob
            or isinstance(resize.interpolation, (list, tuple))):
        raise step.refuse("cannot be served: random augmentations belong to training; pass your evaluation transform")
    if resize.longest not in (0.0, 1.0):
        raise step.refuse(f"cannot be served: longest={resize.longest:g} blends the two sides; the server keeps the "
                          "ratio covering (longest=0) or inside (longest=1) the size")
    _check_geometry(step, reading, "ResizeKeepRatio")
    reading.settings.update(resize=list(resize.size), fit="contain" if resize.longest else "cover")
    _read_interpolation(step, reading, True)
    reading.stage = "resized"


def _check_geometry(step: Step, reading: Reading, what: str) -> None:
    if reading.stage != "decoded":
        raise step.refuse(f"cannot be served: the server resizes once, before it crops; put one {what} first")
    if reading.normalized:
        raise step.refuse("cannot be served: the server resizes before it normalises; move it before Normalize")


def _read_interpolation(step: Step, reading: Reading, antialias: bool | None) -> None:
    mode = interpolation_of(step.transform)
    if reading.form != "image":
        if mode not in TENSOR_INTERPOLATIONS:
            hint = "; use NEAREST_EXACT, which picks the pixels PIL's nearest picks" if mode == "nearest" else ""
            raise step.refuse(f"cannot be served: {mode} on a tensor does not compute what PIL computes{hint}, or "
                              "resize the PIL image (before ToTensor / ToImage)")
        if mode != "nearest-exact" and not antialias:
            raise step.refuse("cannot be served: a tensor resized without antialiasing aliases where PIL does not; "
                              "set antialias=True, or resize the PIL image (before ToTensor / ToImage)")
        if reading.form == "float" and mode != "bilinear":
            logger.warning("step %d, %s, resizes a float tensor: its %s overshoots are not clipped there, the "
                           "server clips them to 0..255; compare() measures the difference", step.number,
                           step.label, mode)
    if mode not in INTERPOLATION_NAMES.values() and mode not in INTERPOLATION_NAMES:
        raise step.refuse(f"cannot be served: interpolation {mode} is not one the server has")
    reading.settings["interpolation"] = INTERPOLATION_NAMES.get(mode, mode)


def _read_crop(step: Step, reading: Reading) -> None:
    name = kind(step.transform)[1]
    if reading.stage == "cropped":
        raise step.refuse("cannot be served: the server crops once; keep one CenterCrop")
    size = list(step.transform.size)
    if reading.normalized and not _no_padding(reading.settings, size):
        raise step.refuse("cannot be served: after Normalize its padding is not black; move it before Normalize")
    fill = getattr(step.transform, "fill", 0)
    if name == "CenterCropOrPad" and (step.transform.padding_mode != "constant" or fill and reading.form == "float"):
        raise step.refuse("cannot be served: the server pads with one colour on the PIL image; pad with a constant "
                          "fill before ToTensor")
    reading.settings.update(crop=size, fill=list(fill) if isinstance(fill, (list, tuple)) else fill)
    reading.stage = "cropped"


def _no_padding(settings: dict, crop: list[int]) -> bool:
    """Whether every image is at least the crop after the resize already read (so a crop never pads)."""
    resize = settings["resize"]
    if isinstance(resize, int) and settings["max_size"] is None:
        return resize >= max(crop)
    return isinstance(resize, list) and settings["fit"] != "contain" and resize[0] >= crop[0] and resize[1] >= crop[1]


def _read_grayscale(step: Step, reading: Reading) -> None:
    if getattr(step.transform, "num_output_channels", 1) != 1:
        raise step.refuse("cannot be served: the server's grayscale has one channel; use Grayscale(1) and a "
                          "one-channel model, or keep RGB")
    if reading.normalized:
        raise step.refuse("cannot be served: grayscale after Normalize mixes normalised channels; move it first")
    reading.settings["color_mode"] = "L"


def _read_rgb(step: Step, reading: Reading) -> None:
    if reading.settings["color_mode"] == "L":
        raise step.refuse("cannot be served: three copies of a grayscale channel are not a served color_mode; "
                          "drop Grayscale or this step")


def _read_to_tensor(step: Step, reading: Reading) -> None:
    """ToTensor (torchvision's, timm's MaybeToTensor): a PIL image → float in [0, 1]."""
    if reading.form != "image":
        if kind(step.transform) == ("timm", "MaybeToTensor"):
            return
        raise step.refuse("cannot be served: it takes a PIL image and gets a tensor; drop it or move it first")
    reading.form, reading.scale = "float", reading.scale / 255.0


def _read_pil_to_tensor(step: Step, reading: Reading) -> None:
    """PILToTensor, v2 ToImage, timm's MaybePILToTensor: a PIL image → uint8 tensor (a tensor passes as it is)."""
    if reading.form != "image":
        if kind(step.transform)[1] in ("ToImage", "MaybePILToTensor"):
            return
        raise step.refuse("cannot be served: it takes a PIL image and gets a tensor; drop it or move it first")
    reading.form = "uint8"


def _read_timm_to_tensor(step: Step, reading: Reading) -> None:
    """timm's ToTensor: a PIL image → a tensor of its dtype, values not rescaled (0..255)."""
    if reading.form != "image":
        raise step.refuse("cannot be served: it takes a PIL image and gets a tensor; drop it or move it first")
    reading.form = "float" if step.transform.dtype.is_floating_point else "uint8"


def _read_dtype(step: Step, reading: Reading) -> None:
    """ConvertImageDtype (scales) and v2 ToDtype (scales if scale=True)."""
    transform = step.transform
    dtype = transform.dtype
    if isinstance(dtype, dict):
        from torchvision import tv_tensors

        dtype = next((dtype[key] for key in (tv_tensors.Image, torch.Tensor, "others") if key in dtype), None)
    scale = getattr(transform, "scale", True)
    if dtype is None or reading.form == "image" and kind(transform)[1] == "ToDtype":
        return  # v2's ToDtype passes a PIL image through
    if reading.form == "image":
        raise step.refuse("cannot be served: it takes a tensor and gets a PIL image; add PILToTensor() before it")
    if not dtype.is_floating_point:
        if reading.form == "uint8" and dtype == torch.uint8:
            return
        raise step.refuse(f"cannot be served: converting to {dtype} rounds what the server keeps exact; convert to "
                          "float")
    if reading.form == "uint8" and scale:
        reading.scale = reading.scale / 255.0
    reading.form = "float"


def _read_normalize(step: Step, reading: Reading) -> None:
    if reading.form != "float":
        raise step.refuse("cannot be served: Normalize needs a float tensor; put ToTensor() (or v2.ToImage() and "
                          "v2.ToDtype(torch.float32, scale=True)) before it")
    mean = np.asarray(torch.as_tensor(step.transform.mean, dtype=torch.float64))
    std = np.asarray(torch.as_tensor(step.transform.std, dtype=torch.float64))
    if (std <= 0).any():
        raise step.refuse("cannot be served: its std must be positive")
    reading.scale, reading.shift = reading.scale / std, (reading.shift - mean) / std
    reading.normalized = True


READERS: dict[tuple[str, str], Callable[[Step, Reading], None]] = {
    ("torchvision", "Resize"): _read_resize,
    ("timm", "ResizeKeepRatio"): _read_keep_ratio,
    ("torchvision", "CenterCrop"): _read_crop,
    ("timm", "CenterCropOrPad"): _read_crop,
    ("torchvision", "Grayscale"): _read_grayscale,
    ("torchvision", "RGB"): _read_rgb,
    ("torchvision", "ToTensor"): _read_to_tensor,
    ("timm", "MaybeToTensor"): _read_to_tensor,
    ("torchvision", "PILToTensor"): _read_pil_to_tensor,
    ("torchvision", "ToImage"): _read_pil_to_tensor,
    ("timm", "MaybePILToTensor"): _read_pil_to_tensor,
    ("timm", "ToTensor"): _read_timm_to_tensor,
    ("torchvision", "ConvertImageDtype"): _read_dtype,
    ("torchvision", "ToDtype"): _read_dtype,
    ("torchvision", "Normalize"): _read_normalize,
}


def finish(reading: Reading, whole_images: bool = False) -> dict[str, Any]:
    """The settings, once every step is read: the crop the model sees, mean and std in the server's terms."""
    settings = dict(reading.settings)
    if reading.form == "image":
        raise PreprocessingError("the transform ends with a PIL image, not a tensor; add ToTensor() (and Normalize) "
                                 "as the model was trained with")
    if settings["crop"] is None and not whole_images:
        if not isinstance(settings["resize"], list) or settings["fit"] is not None:
            raise PreprocessingError("the transform makes images of varying size (no CenterCrop after a resize that "
                                     "keeps the aspect ratio); the server batches one size: add a CenterCrop")
        settings["crop"] = list(settings["resize"])
    settings["mean"], settings["std"] = _mean_std(reading, 1 if settings["color_mode"] == "L" else 3)
    settings["crop"] = None if settings["crop"] is None else _compact(settings["crop"])
    settings["fill"] = _compact(settings["fill"])
    try:
        ImageTransform.from_settings(settings)
    except ValueError as error:
        raise PreprocessingError(f"the transform's settings cannot be served: {error}")
    return {key: settings[key] for key in SETTING_KEYS}


def _mean_std(reading: Reading, channels: int) -> tuple[list[float], list[float]]:
    """value = scale * pixel + shift = (pixel / 255 - mean) / std, per channel."""
    scale, shift = np.broadcast_arrays(reading.scale, reading.shift)
    if len(scale) not in (1, channels):
        raise PreprocessingError(f"Normalize has {len(scale)} values of mean and std but the images have "
                                 f"{channels} channel(s); give one value per channel")
    std = 1.0 / (255.0 * scale)
    mean = -shift * std
    rounded = [[float(str(np.float32(v))) + 0.0 for v in np.broadcast_to(values, (channels,))]  # + 0.0: no -0.0
               for values in (mean, std)]
    return rounded[0], rounded[1]


def _compact(value: Any) -> Any:
    """[n, n] → n; a list of one value repeated → the value."""
    if isinstance(value, (list, tuple)) and len(set(value)) == 1:
        return int(value[0])
    return list(value) if isinstance(value, tuple) else value


def settings_from_timm(model: torch.nn.Module) -> dict[str, Any]:
    """The settings of timm's own eval transform for the model (its pretrained config: input size, interpolation,
    crop_pct, mean, std)."""
    from timm.data import create_transform, resolve_data_config

    if not (getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)):
        raise PreprocessingError(f"the {type(model).__name__} model has no timm pretrained config; pass its "
                                 "evaluation transform instead")
    config = resolve_data_config({}, model=model)
    if config["input_size"][0] != 3:
        raise PreprocessingError(f"timm's config is for {config['input_size'][0]} input channels and its transform "
                                 "makes RGB; pass your evaluation transform (with Grayscale()) instead")
    return settings_from_transform(create_transform(**config, is_training=False))
