#!/usr/bin/env python
"""Build model versions into versioned TorchServe archives: archives/<model>.yaml → model_store/<model>_<version>.mar.

For each version: get the weights (its ``source``), export to TorchScript, and to ONNX for a version whose
``runtime`` is ``onnxruntime``; check parity of each export, loaded as the server loads it, with the eager model on
real inputs (refused above 1e-4 max abs); measure held-out accuracy where the source has a held-out set; package the
served file (model.pt or model.onnx), the handlers, labels and model-config with torch-model-archiver, and record the
archive in model_store/manifest.json. An ONNX archive of a model that explains its outputs also carries model.pt:
explanations need gradients, which ONNX Runtime does not compute.

A built version is immutable: rebuilding unchanged input is a no-op; a version whose input (spec, handler code,
weights) changed is refused unless --force. Usage:

    python build_mar.py                          # every version of every model
    python build_mar.py --model digits --version 2.0
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib
import inspect
import json
import logging
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from archives import SPECS_DIR, SpecError, VersionSpec, load_specs
from archives.store import REPO, Manifest, default_store, sha256_file
from export.onnx import OnnxExportError, export_onnx, model_call
from export.parity import ParityError, check_parity
from export.sources import SourceError, source_for
from export.torchscript import export_torchscript
from handlers.base import ModelHandler
from handlers.runtime import RUNTIME_FILES, load_model

logger = logging.getLogger("build_mar")

HANDLERS_DIR = REPO / "handlers"
EVAL_BATCH = 64


class BuildError(RuntimeError):
    """A version that must not be (re)built as asked; the message says why and what to do."""


def handler_class(module_name: str) -> type[ModelHandler]:
    """The one class a module in handlers/ defines, a handler, as TorchServe will find it (it refuses an entry
    module that defines more than one class)."""
    module = importlib.import_module(f"handlers.{module_name}")
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    if len(classes) != 1 or not issubclass(classes[0], ModelHandler):
        raise BuildError(f"handlers/{module_name}.py must define exactly one class, a handler; found {classes}")
    return classes[0]


def resolve_file(reference: str) -> Path:
    """A file a spec names: a repo-relative path, or ``package:<module>/<path>`` inside an installed package."""
    if reference.startswith("package:"):
        module, _, relative = reference.removeprefix("package:").partition("/")
        return Path(importlib.import_module(module).__file__).parent / relative
    return REPO / reference


def labels_path(spec: VersionSpec) -> Path | None:
    return resolve_file(spec.labels) if spec.labels else None


def handler_files() -> list[Path]:
    return sorted(p for p in HANDLERS_DIR.glob("*.py"))


def input_fingerprint(spec: VersionSpec) -> str:
    """What the archive is built from: the spec, the weights' identity, handler code, labels and extra files."""
    source, params = source_for(spec.source)
    digest = hashlib.sha256()
    described = {k: getattr(spec, k) for k in ("model", "version", "handler", "source", "export", "runtime",
                                                "model_config", "labels", "extra_files")}
    digest.update(json.dumps(described, sort_keys=True, default=list).encode())
    digest.update(source.identity(**params).encode())
    files = handler_files() + [p for p in [labels_path(spec)] if p] + [resolve_file(f) for f in spec.extra_files]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def load_served(path: Path, handler: ModelHandler):
    """An exported file loaded as the server will load it, with the model's own settings."""
    return load_model(path, torch.device("cpu"), int(handler.settings["threads"]),
                      bool(handler.settings["optimize_for_inference"]))


def explains(handler: ModelHandler) -> bool:
    return type(handler).explanation is not ModelHandler.explanation


def runtimes_to_ship(spec: VersionSpec, handler: ModelHandler) -> list[str]:
    """The runtimes whose files go into the archive: the version's own, and TorchScript for explanations (they need
    gradients, which ONNX Runtime does not compute)."""
    return list(dict.fromkeys([spec.runtime] + (["torchscript"] if explains(handler) else [])))


def export_model(model, handler: ModelHandler, spec: VersionSpec, example, work: Path,
                 runtimes: list[str]) -> dict[str, Path]:
    """The eager model exported for each runtime into ``work`` (``example``: a collated batch of real inputs);
    {runtime: file}. An ONNX graph that cannot be captured is a BuildError."""
    exported = {}
    for runtime in runtimes:
        path = work / RUNTIME_FILES[runtime]
        if runtime == "torchscript":
            logger.info("%s %s: [2/5] export to TorchScript (%s)", spec.model, spec.version,
                        ", ".join(f"{k}={v}" for k, v in spec.export.items()))
            export_torchscript(model, example, path, **spec.export)
        else:
            logger.info("%s %s: [2/5] export to ONNX (dynamic axes %s)", spec.model, spec.version,
                        handler.DYNAMIC_AXES)
            try:
                export_onnx(model, model_call(model, handler.forward, example), path, handler.DYNAMIC_AXES)
            except OnnxExportError as error:
                raise BuildError(f"{spec.model} {spec.version}: refused: {error}") from None
        exported[runtime] = path
    return exported


def measure_accuracy(model, handler: ModelHandler, evaluation) -> dict:
    payloads, labels = evaluation
    correct = 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(payloads), EVAL_BATCH), desc="held-out accuracy", unit="batch", leave=False,
                                  disable=None):
            batch = handler.collate([handler.decode(p) for p in payloads[start:start + EVAL_BATCH]])
            predicted = handler.forward(model, batch).argmax(dim=1)
            correct += int((predicted == torch.tensor(labels[start:start + EVAL_BATCH])).sum())
    return {"held_out": round(correct / len(labels), 6), "correct": correct, "samples": len(labels)}


def stage_extra_files(spec: VersionSpec, into: Path) -> None:
    """The handlers package and the spec's extra files (a tokenizer): what the handler finds in its model_dir."""
    shutil.copytree(HANDLERS_DIR, into / "handlers", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for reference in spec.extra_files:
        shutil.copy2(resolve_file(reference), into / Path(reference).name)


def stage_labels_and_info(spec: VersionSpec, labels: dict | None, info: dict, into: Path) -> None:
    """index_to_name.json (from the source, else the spec's labels file; models without classes have none) and the
    build record."""
    if labels is None and spec.labels:
        labels = json.loads(labels_path(spec).read_text())
    if labels is not None:
        (into / "index_to_name.json").write_text(json.dumps(labels, indent=1))
    (into / "model_info.json").write_text(json.dumps(info, indent=2))


def archive(spec: VersionSpec, serialized: Path, extra: Path, config: Path, out: Path) -> Path:
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    generate_model_archive(ModelArchiverConfig(
        model_name=spec.model,
        handler=str(HANDLERS_DIR / f"{spec.handler}.py"),
        version=spec.version,
        serialized_file=str(serialized),
        extra_files=str(extra),
        config_file=str(config),
        export_path=str(out),
        force=True,
    ))
    return out / f"{spec.model}.mar"


def build_version(spec: VersionSpec, manifest: Manifest, force: bool = False) -> dict:
    """Build one version into the store, or find it up to date. Returns its manifest entry."""
    name = f"{spec.model} {spec.version}"
    fingerprint = input_fingerprint(spec)
    entry = manifest.get(spec.model, spec.version)
    target = manifest.store / spec.archive_name
    if entry and target.exists() and not force:
        if sha256_file(target) != entry["sha256"]:
            raise BuildError(f"{target} does not match its manifest entry: it was altered after it was built. "
                             f"Rebuild it with --force.")
        if entry["input_fingerprint"] == fingerprint:
            logger.info("%s: up to date (%s)", name, target.name)
            return entry
        raise BuildError(f"{name} is already built from different input (spec, handler code or weights changed). "
                         f"A built version is immutable: add a new version to {spec.model}'s spec, "
                         f"or rebuild this one with --force.")

    started = time.monotonic()
    source, params = source_for(spec.source)
    with tempfile.TemporaryDirectory(prefix=f"build-{spec.model}-") as tmp:
        work = Path(tmp)
        extra = work / "extra"
        stage_extra_files(spec, extra)
        handler = handler_class(spec.handler).from_config(spec.model_config, files=extra)
        logger.info("%s: [1/5] weights from source %s", name, spec.source["type"])
        try:
            built = source.build(handler, **params)
        except SourceError as error:
            raise BuildError(f"{name}: refused: {error}") from None
        items = {sample: handler.decode(payload) for sample, payload in built.samples.items()}
        cases = {f"{sample} (batch of 1)": handler.collate([item]) for sample, item in items.items()}
        cases[f"all {len(items)} samples as one batch"] = handler.collate(list(items.values()))

        exported = export_model(built.model, handler, spec, handler.collate(list(items.values())[:2]), work,
                                runtimes_to_ship(spec, handler))
        serialized = exported[spec.runtime]

        logger.info("%s: [3/5] parity with eager on %d real inputs (%s)", name, len(cases), ", ".join(exported))
        parities = {}
        for runtime, path in exported.items():
            try:
                parities[runtime] = check_parity(built.model, load_served(path, handler), cases, forward=handler.forward)
            except ParityError as error:
                raise BuildError(f"{name}: refused: {runtime}: {error}") from None
            logger.info("%s: %s parity ok, max |exported - eager| = %.2e (%s)", name, runtime,
                        parities[runtime].max_abs_diff, parities[runtime].worst_input)
        parity = parities[spec.runtime]

        accuracy = None
        if built.evaluation is not None:
            logger.info("%s: [4/5] held-out accuracy through the serving preprocessing", name)
            accuracy = measure_accuracy(load_served(serialized, handler), handler, built.evaluation)
            logger.info("%s: held-out accuracy %.4f (%d/%d)", name, accuracy["held_out"], accuracy["correct"],
                        accuracy["samples"])

        logger.info("%s: [5/5] package with torch-model-archiver", name)
        info = {
            "model": spec.model,
            "version": spec.version,
            "description": spec.description,
            "handler": spec.handler,
            "weights": built.weights,
            "export": spec.export,
            "runtime": spec.runtime,
            "parity": parity.as_dict(),
            "accuracy": accuracy,
            "quality": built.quality,
            "input_fingerprint": fingerprint,
            "torch": torch.__version__,
            **({"onnxruntime": metadata.version("onnxruntime")} if spec.runtime == "onnxruntime" else {}),
            "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        stage_labels_and_info(spec, built.labels, info, extra)
        for path in exported.values():
            if path != serialized:  # the TorchScript file an ONNX archive carries for explanations
                shutil.copy2(path, extra / path.name)
        config = work / "model-config.yaml"
        config.write_text(yaml.safe_dump(spec.model_config, sort_keys=False))
        (work / "out").mkdir()
        produced = archive(spec, serialized, extra, config, work / "out")
        manifest.store.mkdir(parents=True, exist_ok=True)
        shutil.move(produced, target)

    entry = {**info, "archive": target.name, "sha256": sha256_file(target), "size_bytes": target.stat().st_size,
             "torch_model_archiver": metadata.version("torch-model-archiver")}
    manifest.record(entry)
    logger.info("%s: built %s (%.1f MB) in %.1f s", name, target.name, entry["size_bytes"] / 1e6,
                time.monotonic() - started)
    return entry


def select(specs, model: str | None, version: str | None) -> list[VersionSpec]:
    if model is None:
        if version is not None:
            raise BuildError("--version needs --model")
        return [v for spec in specs.values() for v in spec.versions.values()]
    if model not in specs:
        raise BuildError(f"no spec for model {model!r}; known: {', '.join(sorted(specs))}")
    versions = specs[model].versions
    if version is None:
        return list(versions.values())
    if version not in versions:
        raise BuildError(f"{model} has no version {version!r} in {specs[model].path.name}; known: {', '.join(versions)}")
    return [versions[version]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="build only this model")
    parser.add_argument("--version", help="build only this version (with --model)")
    parser.add_argument("--force", action="store_true", help="rebuild even if built (breaks immutability: use with care)")
    parser.add_argument("--store", type=Path, default=None, help="model store (default: $MODEL_STORE or model_store/)")
    parser.add_argument("--specs", type=Path, default=SPECS_DIR, help="folder of model specs (default: archives/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for chatty in ("model_archiver", "onnxscript", "onnx_ir"):  # the ONNX exporter logs each graph rewrite
        logging.getLogger(chatty).setLevel(logging.WARNING)

    try:
        manifest = Manifest(args.store or default_store())
        entries = [build_version(v, manifest, args.force) for v in select(load_specs(args.specs), args.model,
                                                                          args.version)]
    except (BuildError, SpecError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"\n{'model':<20} {'version':<8} {'runtime':<12} {'accuracy':>9} {'parity':>9}  {'size':>8}  sha256")
    for e in entries:
        acc = f"{e['accuracy']['held_out']:.4f}" if e["accuracy"] else "-"
        print(f"{e['model']:<20} {e['version']:<8} {e.get('runtime', 'torchscript'):<12} {acc:>9} {e['parity']['max_abs_diff']:>9.1e}  "
              f"{e['size_bytes'] / 1e6:>6.1f}MB  {e['sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
