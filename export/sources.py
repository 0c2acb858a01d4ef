"""Where each model's weights come from. A spec names a source under ``source: {type: ..., <params>}``.

A source has two calls, and optionally a third:
* ``identity(**params) -> str``: cheap and content-based (hashes, parameters); the build fingerprints it to tell an
  unchanged version from a changed one without rebuilding;
* ``build(preprocess, **params) -> Built``: the eager model in eval mode, its labels, real sample inputs (encoded as a
  client sends them) for the parity check, a held-out set where accuracy can be measured, and any other figures of
  quality the source measured itself (``quality``: super-resolution's PSNR). ``preprocess`` is the
  model's handler configured from its spec (``decode``, ``collate``), so training sees what the server computes.
* ``files(**params) -> {name: path}``: files the handler reads from the archive (a tokenizer), staged before the
  handler is configured.

A user's own model comes in through the generic sources (``make import`` writes them into a spec):
``checkpoint`` (weights in any of the shapes people save, plus an architecture: ``torchvision:<name>``,
``timm:<name>`` or ``<module>:<class or factory>``), ``torchscript`` and ``onnx`` (a file served as it is), and
``huggingface`` (a ``save_pretrained`` folder). Sources that train at build time (digits, super-resolution) are
written here as two functions and listed in SOURCES.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from archives import resolve_file
from archives.store import sha256_file
from export import digits as digits_model
from export import super_resolution
from export.samples import encode, photo, samples_for
from handlers.runtime import numpy_model

logger = logging.getLogger(__name__)


@dataclass
class Built:
    model: torch.nn.Module
    weights: str  # where the weights came from, for people
    labels: dict[str, str] | None  # index_to_name.json, unless the spec names a labels file
    samples: dict[str, bytes]  # name → encoded real input
    evaluation: tuple[list[bytes], list[int]] | None = None  # held-out inputs and their labels
    quality: dict | None = None  # other held-out figures the source measured (PSNR), recorded in the build record
    shipped: dict[str, Path] | None = None  # runtime → a user's serialized file, shipped as it is, not exported


class SourceError(RuntimeError):
    """A model the source cannot build as its spec says, or built but must not archive (it failed its own quality
    gate); the message says which and why."""


# --- digits: a small CNN trained here on scikit-learn's digits --------------------------------------------------


def digits_cnn_identity(epochs: int, learning_rate: float, batch_size: int = 64, seed: int = 0) -> str:
    params = dict(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed)
    return f"DigitsCNN trained on scikit-learn {metadata.version('scikit-learn')} digits with {params}"


def digits_cnn_build(preprocess, epochs: int, learning_rate: float, batch_size: int = 64, seed: int = 0) -> Built:
    images, labels = digits_model.digit_images()
    train_idx, test_idx = digits_model.split(labels)
    inputs = torch.from_numpy(preprocess.collate([image[..., None] for image in images[train_idx]]))
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


# --- espcn: super-resolution trained here on scikit-image's photos ----------------------------------------------


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
    per_photo, runnable = {}, numpy_model(model)
    for name, (high, payload) in photos.items():
        item = preprocess.decode(payload)
        [reply] = preprocess.answer(preprocess.forward(runnable, preprocess.collate([item])), [item])
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


# --- a user's model: checkpoint + architecture, TorchScript or ONNX file, Hugging Face folder -------------------


def _code_identity(code: str | None) -> str:
    """The user's Python files an architecture is imported from (the top level of ``code``)."""
    if not code:
        return ""
    files = sorted(resolve_file(code).glob("*.py"))
    return " code " + " ".join(f"{f.name}:{sha256_file(f)[:16]}" for f in files)


def _short_sha(file: Path) -> str:
    """A user's file's content, as the build record's ``weights`` line names it."""
    return f"sha256 {sha256_file(file)[:16]}"


def checkpoint_identity(path: str, arch: str | None = None, args: dict | None = None, entry: str | None = None,
                        code: str | None = None, unsafe_pickle: bool = False) -> str:
    return (f"checkpoint sha256:{sha256_file(resolve_file(path))} arch {arch} args {sorted((args or {}).items())} "
            f"entry {entry} unsafe_pickle {bool(unsafe_pickle)}" + _code_identity(code))


def checkpoint_model(path: str, arch: str | None = None, args: dict | None = None, entry: str | None = None,
                     code: str | None = None, unsafe_pickle: bool = False) -> tuple[torch.nn.Module, str]:
    """The eager model: the architecture built with ``args`` and the checkpoint's weights loaded into it (or a
    pickled whole module, where allowed), and a line saying where its weights came from."""
    from export import architecture
    from export.checkpoint import load_weights, read_checkpoint

    file = resolve_file(path)
    folder = resolve_file(code) if code else None
    checkpoint = read_checkpoint(file, allow_pickle=bool(unsafe_pickle), entry=entry,
                                 code=folder if unsafe_pickle else None)
    taken = f" ({checkpoint.entry})" if checkpoint.entry else ""
    if checkpoint.module is not None:
        return checkpoint.module.eval(), f"{file.name}{taken}: a pickled {type(checkpoint.module).__name__} module"
    if not arch:
        raise SourceError(f"{file.name} holds weights only: name the architecture (ARCH=torchvision:<name>, "
                          "timm:<name> or <module>:<Class>)")
    model = architecture.create(arch, args, folder)
    report = load_weights(model, checkpoint.state, name=arch)
    prefix = f", prefix {report['prefix']!r} stripped" if report.get("prefix") else ""
    return model.eval(), f"{file.name}{taken} into {arch}{prefix}"


def checkpoint_build(preprocess, path: str, **params) -> Built:
    model, weights = checkpoint_model(path, **params)
    return Built(model=model, weights=f"{weights}, {_short_sha(resolve_file(path))}", labels=None,
                 samples=samples_for(preprocess))


def file_identity(path: str) -> str:
    return f"sha256:{sha256_file(resolve_file(path))}"


def torchscript_build(preprocess, path: str) -> Built:
    file = resolve_file(path)
    model = torch.jit.load(str(file), map_location="cpu").eval()
    return Built(model=model, weights=f"TorchScript {file.name}, {_short_sha(file)}", labels=None,
                 samples=samples_for(preprocess), shipped={"torchscript": file})


def onnx_build(preprocess, path: str) -> Built:
    from export.onnx import OnnxReference

    file = resolve_file(path)
    return Built(model=OnnxReference(file), weights=f"ONNX {file.name}, {_short_sha(file)}",
                 labels=None, samples=samples_for(preprocess), shipped={"onnxruntime": file})


def huggingface_identity(path: str, task: str) -> str:
    from export import huggingface

    return f"{task} {huggingface.identity(resolve_file(path))}"


def huggingface_build(preprocess, path: str, task: str) -> Built:
    from export import huggingface

    folder = resolve_file(path)
    return Built(model=huggingface.load(folder, task), weights=f"Hugging Face {task} from {folder.name}/",
                 labels=huggingface.labels_of(folder) if task == "text_classification" else None,
                 samples=samples_for(preprocess))


def huggingface_files(path: str, task: str) -> dict[str, Path]:
    from export import huggingface

    return {"tokenizer.json": huggingface.tokenizer_file(resolve_file(path))}


@dataclass(frozen=True)
class Source:
    identity: Callable[..., str]
    build: Callable[..., Built]
    files: Callable[..., dict[str, Path]] | None = None


SOURCES: dict[str, Source] = {
    "digits_cnn": Source(digits_cnn_identity, digits_cnn_build),
    "espcn": Source(espcn_identity, espcn_build),
    "checkpoint": Source(checkpoint_identity, checkpoint_build),
    "torchscript": Source(file_identity, torchscript_build),
    "onnx": Source(file_identity, onnx_build),
    "huggingface": Source(huggingface_identity, huggingface_build, huggingface_files),
}


def source_for(config: dict[str, Any]) -> tuple[Source, dict]:
    """The source a version's ``source:`` block names, and its parameters."""
    params = dict(config)
    kind = params.pop("type", None)
    if kind not in SOURCES:
        raise ValueError(f"unknown source type {kind!r}; known: {sorted(SOURCES)}")
    return SOURCES[kind], params
