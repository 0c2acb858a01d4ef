"""The served preprocessing proven to compute what the user's transform computes, on real images.

* ``compare(handler, transform, model, payloads)``: both pipelines on the same real images, the transform on
  ``Image.open(...).convert("RGB")`` (EXIF orientation applied, as the server applies it), the server's through
  ``handler.decode`` and ``handler.collate``: ``{"images", "top1_agreement", "mean_abs_diff", "max_abs_diff"}``
  (differences in the model's input units; ``handler`` is an image handler, e.g. ``ImageClassifier.from_config``;
  ``model`` any callable taking an NCHW float batch and returning one row of scores per image). Top-1 agreement below
  ``min_agreement``, or outputs of another shape, raise ``PreprocessingError`` naming the first step where the two
  part, found by ``first_difference`` on the worst image: the transform run step by step, each step's size and
  pixels (back in 0..255) against the server's image at the same stage (decoded, resized, cropped), then the values
  the model gets (named at Normalize); a stage differs when its pixels differ by more than STAGE_TOLERANCE on average.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from handlers.runtime import numpy_model
from handlers.vision import ImageTransform

from export.preprocessing import (
    MIN_PIXEL_AGREEMENT,
    SETTING_KEYS,
    STAGE_TOLERANCE,
    PreprocessingError,
    Reading,
    Step,
    flatten,
    kind,
    read_step,
    settings_from_transform,
)

logger = logging.getLogger(__name__)

def reference_image(payload: bytes, mode: str) -> Image.Image:
    """The image as a torchvision user opens it (``Image.open(f).convert("RGB")``), EXIF orientation applied as
    the server applies it."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(payload))).convert(mode)


def input_mode(transform: Any, handler: Any) -> str:
    """The mode the transform starts from: RGB, or L for a grayscale model whose transform does not convert."""
    grayscale = any(kind(step.transform)[1] == "Grayscale" for step in flatten(transform))
    return "L" if handler.settings.get("color_mode") == "L" and not grayscale else "RGB"


def compare(handler: Any, transform: Callable, model: Callable, payloads: dict[str, bytes],
            min_agreement: float = 0.99) -> dict[str, Any]:
    """Run the transform and the handler's decode + collate on the same images, and the model on both: the share of
    images whose top-1 agrees, and the mean and max abs difference of the model's inputs."""
    if not payloads:
        raise PreprocessingError("compare needs at least one image; pass real photos as {name: bytes}")
    mode = input_mode(transform, handler)
    names = list(payloads)
    agreed, differences = [], []
    for name in names:
        expected = run_transform(transform, reference_image(payloads[name], mode), name)
        collated = handler.collate([handler.decode(payloads[name])])
        served = torch.from_numpy(collated[0][0] if isinstance(collated, list) else collated[0])  # whole images
        if expected.shape != served.shape:
            where = first_difference(handler, transform, payloads[name])
            raise PreprocessingError(f"the served preprocessing differs from your transform on {name} {where}; "
                                     f"{_hint(handler, transform)}")
        agreed.append(bool(same_answer(model, expected, served)))
        differences.append((expected - served).abs())
    agree = torch.tensor(agreed)
    result = {"images": len(names), "top1_agreement": float(agree.float().mean()),
              "mean_abs_diff": float(torch.cat([d.flatten() for d in differences]).mean()),
              "max_abs_diff": float(max(float(d.max()) for d in differences))}
    logger.info("preprocessing compared on %d images: %s", len(names), result)
    if result["top1_agreement"] < min_agreement:
        per_image = torch.tensor([float(d.mean()) for d in differences]).masked_fill(agree, -1.0)
        worst = names[int(per_image.argmax())]
        where = first_difference(handler, transform, payloads[worst])
        raise PreprocessingError(
            f"the served preprocessing differs from your transform on {worst} {where}; top-1 agreed on "
            f"{int(agree.sum())} of {len(names)} images ({result['top1_agreement']:.2f} < {min_agreement:g}); "
            f"{_hint(handler, transform)}")
    return result


def run_transform(transform: Callable, image: Image.Image, name: str) -> torch.Tensor:
    """The user's transform on one image, as a float tensor; its own failure named."""
    try:
        return transform(image).float()
    except Exception as error:  # the user's code: say which image and what it raised
        raise PreprocessingError(f"your transform fails on {name} opened in mode {image.mode}: "
                                 f"{type(error).__name__}: {' '.join(str(error).split())[:200]}; set the handler's "
                                 "color_mode to the mode it takes (RGB, or L with Grayscale() in the transform)")


def same_answer(model: Callable, expected: torch.Tensor, served: torch.Tensor) -> bool:
    """Whether the model answers both inputs (C x H x W) alike: the same top class, or for a model of class maps
    (N x classes x H x W) the same class on at least ``MIN_PIXEL_AGREEMENT`` of the pixels."""
    model = numpy_model(model)
    first, second = (np.asarray(model(x[None].numpy())).argmax(1) for x in (expected, served))
    return bool((first == second).mean() >= (MIN_PIXEL_AGREEMENT if first.ndim == 3 else 1.0))


def _hint(handler: Any, transform: Any) -> str:
    """What to change: the settings the transform means that the handler does not have."""
    try:
        wanted = settings_from_transform(transform)
    except PreprocessingError as error:
        return f"and the transform cannot be served as it is: {error}"
    have = ImageTransform.from_settings({**wanted, **handler.settings})
    mine = ImageTransform.from_settings(wanted)
    changed = [f"{key}: {wanted[key]}" for key in SETTING_KEYS if _setting(have, key) != _setting(mine, key)]
    if changed:
        return "your transform means " + ", ".join(changed) + ": set that in the handler settings"
    if getattr(have, "jpeg_draft", False):
        return "the settings agree; try jpeg_draft: false"
    return "the settings agree"


def _setting(transform: ImageTransform, key: str) -> Any:
    value = getattr(transform, key)
    return value.flatten().tolist() if isinstance(value, np.ndarray) else value


@dataclass
class Snapshot:
    step: Step | None  # None: the image before the first step
    pixels: np.ndarray | None  # H x W x C in 0..255, or None where it is not comparable (after Normalize)
    stage: str  # decoded, resized or cropped
    normalizes: bool = False


def first_difference(handler: Any, transform: Any, payload: bytes) -> str:
    """Where the two pipelines part on one image: "at step 1, Resize(256, interpolation=bicubic): ..."."""
    image = reference_image(payload, input_mode(transform, handler))
    expected = run_transform(transform, image, "the image")
    actual = torch.from_numpy(handler.collate([handler.decode(payload)])[0])
    served = getattr(handler, "transform", None)
    if not isinstance(served, ImageTransform):
        return "in the tensor the model gets"
    stages = _served_stages(served, payload)
    drafted = stages["decoded"].size != image.size
    note = " (the server decoded this large JPEG at a reduced scale, jpeg_draft)" if drafted else ""
    snapshots = _user_snapshots(transform, image)
    for snapshot in snapshots:
        found = _stage_difference(snapshot, stages[snapshot.stage], drafted)
        if found:
            return f"{_where(snapshot)}: {found}{note if snapshot.stage != 'decoded' else ''}"
    if expected.shape != actual.shape:
        return f"in the tensor the model gets: {tuple(expected.shape)} where the server gives {tuple(actual.shape)}"
    levels = ((expected - actual).abs() * torch.from_numpy(served.std[0]) * 255.0).mean()
    culprit = next((s for s in reversed(snapshots) if s.normalizes), snapshots[-1])
    return (f"{_where(culprit)}: the values the model gets differ by {float(levels):.2f} levels of 255 on average "
            f"while the pixels before it agree{note}")


def _where(snapshot: Snapshot) -> str:
    if snapshot.step is None:
        return "when decoding, before the transform's first step"
    return f"at step {snapshot.step.number}, {snapshot.step.label}"


def _served_stages(served: ImageTransform, payload: bytes) -> dict[str, Image.Image]:
    decoded = served.load(payload)
    resized = served.resize_image(decoded)
    return {"decoded": decoded, "resized": resized, "cropped": served.crop_image(resized)}


def _user_snapshots(transform: Any, image: Image.Image) -> list[Snapshot]:
    """The transform run step by step: after each step, its pixels back in 0..255 where they can be."""
    reading = Reading()
    snapshots = [Snapshot(None, _pixels(image, reading), "decoded")]
    value, readable = image, True
    for step in flatten(transform):
        value = step.transform(value)
        try:
            read_step(step, reading)
        except PreprocessingError:  # a step the server cannot do: its values and the next ones are not comparable
            readable = False
        normalizes = kind(step.transform)[1] == "Normalize"
        pixels = _pixels(value, reading) if readable and (normalizes or not reading.normalized) else None
        snapshots.append(Snapshot(step, pixels, reading.stage, normalizes))
    return snapshots


def _pixels(value: Any, reading: Reading) -> np.ndarray | None:
    if isinstance(value, Image.Image):
        array = np.asarray(value, dtype=np.float64)
        return array.reshape(*array.shape[:2], -1)
    if not isinstance(value, torch.Tensor) or value.ndim != 3:
        return None
    chw = value.double().numpy()
    scale = np.asarray(reading.scale, dtype=np.float64).reshape(-1, 1, 1)
    shift = np.asarray(reading.shift, dtype=np.float64).reshape(-1, 1, 1)
    return ((chw - shift) / scale).transpose(1, 2, 0)


def _stage_difference(snapshot: Snapshot, stage: Image.Image, drafted: bool) -> str | None:
    """How a snapshot of the transform differs from the server's image at the same stage; None: it does not (or
    they cannot be compared: different channels, a drafted decode before its resize, values after Normalize)."""
    if snapshot.pixels is None or (drafted and snapshot.stage == "decoded"):
        return None
    served = np.asarray(stage, dtype=np.float64)
    served = served.reshape(*served.shape[:2], -1)
    mine = snapshot.pixels
    if mine.shape[:2] != served.shape[:2]:
        return (f"it makes {mine.shape[1]}x{mine.shape[0]} images where the server makes "
                f"{served.shape[1]}x{served.shape[0]}")
    if mine.shape[2] != served.shape[2]:
        return None
    difference = np.abs(np.clip(mine, 0, 255) - served)
    if difference.mean() <= STAGE_TOLERANCE:
        return None
    return (f"its pixels differ from the server's by {difference.mean():.2f} levels of 255 on average "
            f"(max {difference.max():.0f})")
