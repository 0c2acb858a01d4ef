#!/usr/bin/env python
"""Build model versions into versioned TorchServe archives: archives/<model>.yaml → model_store/<model>_<version>.mar.

For each version: get the weights (its ``source``), export to TorchScript, and to ONNX for a version whose
``runtime`` is ``onnxruntime``; check parity of each export, loaded as the server loads it, with the eager model on
real inputs (refused above 1e-4 max abs); for a version that is another one quantized, quantize that one's fp32 ONNX
file and gate it against fp32 on the same held-out set (export/quantize.py); measure held-out accuracy where the source
has a held-out set; package the served file (model.pt or model.onnx), the handlers, labels and model-config with
torch-model-archiver, and record the archive in model_store/manifest.json. An ONNX archive of a model that explains
its outputs also carries model.pt: explanations need gradients, which ONNX Runtime does not compute.

A built version is immutable: rebuilding unchanged input is a no-op; a version whose input (spec, handler code,
weights) changed is refused unless --force. Builds may run at the same time into one store: each archive is written
under a unique name in the store and renamed into place with its manifest entry (archives/store.py). Usage:

    python build_mar.py                          # every version of every model
    python build_mar.py --model digits --version 2.0
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

import torch
import yaml

from archives import SPECS_DIR, SpecError, VersionSpec, check_model_name, check_version, load_specs, resolve_file
from archives.store import REPO, Manifest, default_store, sha256_file, temporary_beside
from export import configure_logging
from export.accuracy import MEASURES, classification
from export.architecture import ArchitectureError
from export.checkpoint import CheckpointError
from export.datasets import DataError, as_mapping, read_eval, read_labels
from export.huggingface import HuggingFaceError
from export.onnx import OnnxExportError, export_onnx, model_call
from export.parity import ParityError, arrays_of, check_parity
from export.preprocessing import PreprocessingError, load_transform
from export.preprocessing_parity import compare
from export import quantize
from export.sources import SourceError, source_for
from export.tasks import TaskError, served_module, task_of_handler
from export.torchscript import export_torchscript
import handlers
from handlers.base import BUILD_RECORD, ModelHandler, Reply, encode_answer
from handlers.runtime import RUNTIME_FILES, load_model, numpy_model

logger = logging.getLogger("build_mar")

HANDLERS_DIR = REPO / "handlers"
WORKER_CHECK = REPO / "export" / "worker_check.py"
EVAL_SAMPLES = 8  # images of the user's eval set (one per class) that join the parity check and the worker check
ANSWER_TOLERANCE = 1e-5  # the worker's answers against the build's own, same runtime and threads
# What a user's input or files can get wrong: refused with one line, never a traceback.
USER_ERRORS = (SourceError, DataError, CheckpointError, ArchitectureError, HuggingFaceError, PreprocessingError,
               OnnxExportError, TaskError, quantize.QuantizeError)


class BuildError(RuntimeError):
    """A version that must not be (re)built as asked; the message says why and what to do. ``found_labels``: the
    label order the eval set showed, where that is why (``export/accuracy.py``)."""

    def __init__(self, message: str, found_labels: list[str] | None = None):
        super().__init__(message)
        self.found_labels = found_labels


def handler_class(module_name: str) -> type[ModelHandler]:
    """The handler class of handlers/<module_name>.py (``handlers.handler_class``); BuildError if it has none."""
    try:
        return handlers.handler_class(module_name)
    except TypeError as error:
        raise BuildError(str(error)) from None


def handler_files() -> list[Path]:
    return sorted(p for p in HANDLERS_DIR.glob("*.py"))


def spec_labels(spec: VersionSpec) -> dict | None:
    """The labels the spec names (a list of names or a file), as an index → name map."""
    if spec.labels is None:
        return None
    return as_mapping(spec.labels) if isinstance(spec.labels, list) else read_labels(resolve_file(spec.labels))


def source_files(spec: VersionSpec) -> dict[str, Path]:
    """Files the archive carries for the handler: the spec's extra files and the source's own (a tokenizer)."""
    source, params = source_for(spec.source)
    files = {Path(reference).name: resolve_file(reference) for reference in spec.extra_files}
    return {**files, **(source.files(**params) if source.files else {})}


def input_fingerprint(spec: VersionSpec) -> str:
    """What the archive is built from: the spec, the weights' identity, handler code, labels and extra files."""
    source, params = source_for(spec.source)
    digest = hashlib.sha256()
    described = {k: getattr(spec, k) for k in ("model", "version", "handler", "source", "export", "runtime",
                                                "model_config", "labels", "extra_files", "eval", "min_accuracy",
                                                "transform")}
    digest.update(json.dumps(described, sort_keys=True, default=list).encode())
    digest.update(source.identity(**params).encode())
    if spec.quantize:  # its settings, the quantizer's version and the calibration files
        digest.update(json.dumps(spec.quantize, sort_keys=True).encode())
        digest.update(quantize.identity(spec.handler, spec.quantize).encode())
    labels = [resolve_file(spec.labels)] if isinstance(spec.labels, str) else []
    for path in handler_files() + labels + list(source_files(spec).values()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def load_served(path: Path, handler: ModelHandler):
    """An exported file loaded as the server will load it, with the model's own settings."""
    return load_model(path, "cpu", int(handler.settings["threads"]),
                      bool(handler.settings["optimize_for_inference"]))


def explains(handler: ModelHandler) -> bool:
    return type(handler).explanation is not ModelHandler.explanation


def runtimes_to_ship(spec: VersionSpec, handler: ModelHandler, model) -> list[str]:
    """The runtimes whose files go into the archive: the version's own, and TorchScript for explanations (they need
    gradients, which ONNX Runtime does not compute) where the model is a torch module to export."""
    extra = ["torchscript"] if explains(handler) and isinstance(model, torch.nn.Module) else []
    return list(dict.fromkeys([spec.runtime] + extra))


def export_model(model, handler: ModelHandler, spec: VersionSpec, example, work: Path,
                 runtimes: list[str], shipped: dict[str, Path] | None = None) -> dict[str, Path]:
    """The eager model exported for each runtime into ``work`` (``example``: a collated batch of real inputs);
    {runtime: file}. A file the user gave for a runtime (``shipped``) goes as it is. An ONNX graph that cannot be
    captured is a BuildError."""
    exported, shipped = {}, shipped or {}
    for runtime in runtimes:
        path = work / RUNTIME_FILES[runtime]
        if runtime in shipped:
            logger.info("%s %s: [2/6] %s file shipped as it is (%s)", spec.model, spec.version, runtime,
                        shipped[runtime].name)
            shutil.copy2(shipped[runtime], path)
        elif not isinstance(model, torch.nn.Module):
            raise BuildError(f"{spec.model} {spec.version}: refused: the model came as a file for "
                             f"{', '.join(shipped)}; it cannot be served on {runtime}")
        elif runtime == "torchscript":
            logger.info("%s %s: [2/6] export to TorchScript (%s)", spec.model, spec.version,
                        ", ".join(f"{k}={v}" for k, v in spec.export.items()))
            export_torchscript(model, model_call(model, handler.forward, example), path, **spec.export)
        else:
            logger.info("%s %s: [2/6] export to ONNX (dynamic axes %s)", spec.model, spec.version,
                        handler.DYNAMIC_AXES)
            try:
                export_onnx(model, model_call(model, handler.forward, example), path, handler.DYNAMIC_AXES)
            except OnnxExportError as error:
                raise BuildError(f"{spec.model} {spec.version}: refused: {error}") from None
        exported[runtime] = path
    return exported


def evaluation_of(spec: VersionSpec, labels: dict | None,
                  own: tuple[list[bytes], list[int]] | None = None) -> tuple[list[bytes], list[int], str] | None:
    """A classifier's held-out set: the spec's ``eval`` (its classes mapped onto the labels by name), else the
    source's ``own``."""
    if spec.eval is not None:
        if labels is None:
            raise SourceError(f"eval {spec.eval} needs labels to map its classes onto; the model has none")
        data = read_eval(resolve_file(spec.eval))
        return data.payloads, data.indices(labels), spec.eval
    if own is not None:
        payloads, indices = own
        return payloads, list(indices), f"{spec.source['type']} held-out set"
    return None


def measure(spec: VersionSpec, served, handler: ModelHandler, labels: dict | None,
            own: tuple[list[bytes], list[int]] | None = None) -> dict | None:
    """The version's held-out figures for its task (``export/accuracy.py``) on the spec's ``eval``, or for a
    classifier on its source's ``own`` held-out set; None where there is neither."""
    task = task_of_handler(spec.handler)
    if task in MEASURES:
        return None if spec.eval is None else MEASURES[task](served, handler, resolve_file(spec.eval), labels)
    evaluation = evaluation_of(spec, labels, own)
    return None if evaluation is None else classification(served, handler, *evaluation, labels)


def eval_samples(spec: VersionSpec, labels: dict | None) -> dict[str, bytes]:
    """A few of the user's own held-out inputs (one per class for a classifier), which join the parity check and
    the worker check."""
    if spec.eval is None:
        return {}
    task = task_of_handler(spec.handler)
    if task in MEASURES:
        data = read_eval(resolve_file(spec.eval), task)
        return {f"eval {i}": payload for i, payload in enumerate(data.payloads[:EVAL_SAMPLES])}
    payloads, indices, _ = evaluation_of(spec, labels)
    firsts = {index: payload for payload, index in zip(payloads, indices)}
    return {f"eval class {index}": payload for index, payload in list(firsts.items())[:EVAL_SAMPLES]}


def against_default(spec: VersionSpec, default: VersionSpec | None, manifest: Manifest, served, handler,
                    labels: dict | None, own: dict | None) -> dict | None:
    """A new version measured on the default version's evaluation set too, beside the default's own figure."""
    if default is None or default.version == spec.version:
        return None
    if default.eval is None or default.eval == spec.eval:
        # the same set as this version's, or the default's source's own held-out set: the digests tell which
        accuracy = own
    else:
        accuracy = measure(default, served, handler, labels)
    if accuracy is None:
        return None
    theirs = manifest.accuracy_on(spec.model, default.version, accuracy["eval_set"]["sha256"])
    return {"version": default.version, "accuracy": accuracy, "default_held_out": theirs,
            "difference": None if theirs is None else round(accuracy["held_out"] - theirs, 6)}


def check_labels(spec: VersionSpec, labels: dict | None, outputs) -> None:
    """The labels must name every output: as many labels as a classifier has outputs (or a segmenter classes); a
    detector's labels must name every label index it answers."""
    if labels is None:
        return
    [first, *rest] = arrays_of(outputs)
    if task_of_handler(spec.handler) == "detection":
        found = int(rest[0].max(initial=-1)) if rest else -1
        if found >= len(labels):
            raise BuildError(f"{spec.model} {spec.version}: refused: the detector answers label {found} but the "
                             f"labels name only {len(labels)} (0 to {len(labels) - 1})")
        return
    if first.ndim not in (2, 4) or first.shape[1] != len(labels):
        raise BuildError(f"{spec.model} {spec.version}: refused: the labels name {len(labels)} classes but the "
                         f"model has {first.shape[1] if first.ndim in (2, 4) else tuple(first.shape)} outputs")


def check_preprocessing(spec: VersionSpec, handler: ModelHandler, served, payloads: dict[str, bytes]) -> dict | None:
    """The served preprocessing against the user's own evaluation transform, on real images."""
    if spec.transform is None:
        return None
    code = spec.transform.get("code")
    transform = load_transform(spec.transform["name"], resolve_file(code) if code else None)
    result = compare(handler, transform, served, payloads)
    logger.info("%s %s: served preprocessing vs %s on %d images: top-1 agreement %.3f, mean |diff| %.2e", spec.model,
                spec.version, spec.transform["name"], result["images"], result["top1_agreement"],
                result["mean_abs_diff"])
    return result


def answer_bytes(answer) -> tuple[str, bytes]:
    """An answer as TorchServe sends it: (content type, body)."""
    reply = answer if isinstance(answer, Reply) else Reply(answer)
    return reply.content_type, encode_answer(reply.body)


def same_answer(expected: bytes, served: bytes, tolerance: float = ANSWER_TOLERANCE) -> bool:
    """Byte-equal, or JSON with the same structure and numbers within ``tolerance``."""
    if expected == served:
        return True
    try:
        a, b = json.loads(expected), json.loads(served)
    except ValueError:
        return False

    def close(x, y) -> bool:
        if isinstance(x, dict) and isinstance(y, dict):
            return list(x) == list(y) and all(close(x[k], y[k]) for k in x)
        if isinstance(x, list) and isinstance(y, list):
            return len(x) == len(y) and all(close(i, j) for i, j in zip(x, y))
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            return abs(x - y) <= tolerance
        return x == y

    return close(a, b)


def check_served(spec: VersionSpec, archive_path: Path, handler: ModelHandler, served,
                 samples: dict[str, bytes]) -> dict:
    """Extract the archive, load it in a separate interpreter as a TorchServe worker does (TorchServe's own loader,
    nothing of this repository or of the user's code on the path) and check that it answers every sample as the
    build computed it."""
    expected = {}
    for name, payload in samples.items():
        item = handler.decode(payload)
        [answer] = handler.answer(handler.forward(served, handler.collate([item])), [item])
        expected[name] = answer_bytes(answer)
    with tempfile.TemporaryDirectory(prefix="worker-") as folder:
        with zipfile.ZipFile(archive_path) as mar:
            mar.extractall(folder)
        job = {"model_dir": folder, "requests": [{"body": base64.b64encode(p).decode(),
                                                  "headers": {"content-type": "application/octet-stream"}}
                                                 for p in samples.values()]}
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-I", str(WORKER_CHECK)], input=json.dumps(job), capture_output=True,
                             text=True, cwd=folder, timeout=600)
        seconds = time.monotonic() - started
    if run.returncode != 0:
        last = [line for line in run.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise BuildError(f"{spec.model} {spec.version}: refused: the archive does not load as a TorchServe worker "
                         f"loads it: {last[0][:400]}")
    for name, answer in zip(samples, json.loads(run.stdout)):
        body = base64.b64decode(answer["body"])
        content_type, wanted = expected[name]
        if answer["status"] != 200 or answer["content_type"] != content_type or not same_answer(wanted, body):
            raise BuildError(f"{spec.model} {spec.version}: refused: loaded as a worker, the archive answers {name} "
                             f"with HTTP {answer['status']} {body[:160]!r}; the build computed {wanted[:160]!r}")
    return {"requests": len(samples), "identical": True, "seconds": round(seconds, 2)}


def stage_extra_files(spec: VersionSpec, into: Path) -> None:
    """The handlers package and the files the handler reads (a tokenizer): what it finds in its model_dir."""
    shutil.copytree(HANDLERS_DIR, into / "handlers", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "site"))
    for name, path in source_files(spec).items():
        shutil.copy2(path, into / name)


def archive(spec: VersionSpec, serialized: Path, extra: Path, config: Path, out: Path, target: Path) -> Path:
    """torch-model-archiver's archive (made in ``out``), written to ``target`` with every entry stored."""
    made = run_archiver(out, model_name=spec.model, handler=str(HANDLERS_DIR / f"{spec.handler}.py"),
                        version=spec.version, serialized_file=str(serialized), extra_files=str(extra),
                        config_file=str(config))
    return stored(made, target)


def run_archiver(out: Path, **settings: str) -> Path:
    """torch-model-archiver with ``settings`` (its ``ModelArchiverConfig``), the archive made in ``out``.

    The archiver stages its files in ``tempfile.gettempdir()/<model name>`` and deletes that folder first and last:
    two builds of one model at once (two imports, numbered apart) would empty each other's staging and ship an
    archive without its handler. So it stages inside ``out``, the caller's own folder."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    shared, tempfile.tempdir = tempfile.tempdir, str(out)  # a build runs in one thread; restored below
    try:
        generate_model_archive(ModelArchiverConfig(export_path=str(out), force=True, **settings))
    finally:
        tempfile.tempdir = shared
    return out / f"{settings['model_name']}.mar"


def stored(path: Path, target: Path) -> Path:
    """The archive rewritten into ``target`` with every entry stored, not deflated. TorchServe extracts each archive
    on its frontend's main thread, one after another, before its APIs answer: inflating minilm's 166 MB took 2-3 s
    of that, and weights compress by under 10 %."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as packed:
        for item in source.infolist():
            entry = zipfile.ZipInfo(item.filename, item.date_time)
            entry.external_attr = item.external_attr
            packed.writestr(entry, source.read(item), compress_type=zipfile.ZIP_STORED)
    return target


def gate(spec: VersionSpec, accuracy: dict | None, measured: str) -> None:
    """The version's first figure against its ``min_accuracy``; measured on the eager model before the export (a
    quick refusal), then on the exported one, which is what is recorded and served."""
    name = f"{spec.model} {spec.version}"
    if accuracy is not None:
        logger.info("%s: held-out %s %.4f%s on %d samples (%s)", name, accuracy["metric"], accuracy["held_out"],
                    f", top-5 {accuracy['top5']:.4f}" if "top5" in accuracy else "", accuracy["samples"], measured)
    if spec.min_accuracy is None:
        return
    if accuracy is None:
        raise BuildError(f"{name}: refused: min_accuracy {spec.min_accuracy} needs an eval set to measure on")
    if accuracy["held_out"] < spec.min_accuracy:
        raise BuildError(f"{name}: refused: {accuracy['metric']} {accuracy['held_out']:.4f} on "
                         f"{accuracy['eval_set']['name']} ({accuracy['samples']} samples) is under min_accuracy "
                         f"{spec.min_accuracy:g} ({measured})")


def chosen_settings(model_config: dict, accuracy: dict | None) -> dict:
    """The archive's model-config: the spec's, with what the build chose on the eval set (a multi-label model's
    thresholds, where its spec says ``thresholds: f1``)."""
    handler = dict(model_config.get("handler") or {})
    if accuracy and handler.get("thresholds") == "f1":
        handler["thresholds"] = accuracy["thresholds"]
    return {**model_config, "handler": handler} if handler else dict(model_config)


def refused(spec: VersionSpec, error: Exception) -> BuildError:
    return BuildError(f"{spec.model} {spec.version}: refused: {error}", getattr(error, "found", None))


def build_version(spec: VersionSpec, manifest: Manifest, force: bool = False,
                  default: VersionSpec | None = None) -> dict:
    """Build one version into the store, or find it up to date. Returns its manifest entry. ``default``: the
    model's default version, whose evaluation set a new version is measured on too."""
    name = f"{spec.model} {spec.version}"
    try:
        fingerprint = input_fingerprint(spec)
    except USER_ERRORS as error:
        raise refused(spec, error) from None
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
        try:
            stage_extra_files(spec, extra)
            handler = handler_class(spec.handler).from_config(spec.model_config, files=extra)
            logger.info("%s: [1/6] weights from source %s", name, spec.source["type"])
            built = source.build(handler, **params)
            built.model = served_module(built.model, task_of_handler(spec.handler), handler.example_input())
            labels = spec_labels(spec) or built.labels
            handler.mapping = labels  # as the worker reads them from index_to_name.json
            samples = {**built.samples, **eval_samples(spec, labels)}  # the user's own data joins the parity check
        except USER_ERRORS as error:
            raise refused(spec, error) from None
        items = {sample: handler.decode(payload) for sample, payload in samples.items()}
        cases = {f"{sample} (batch of 1)": handler.collate([item]) for sample, item in items.items()}
        cases[f"all {len(items)} samples as one batch"] = handler.collate(list(items.values()))
        eager = numpy_model(built.model)  # called with numpy arrays, as the served runtimes are
        check_labels(spec, labels, handler.forward(eager, next(iter(cases.values()))))
        first = None
        if not built.shipped and not spec.quantize:  # the eager model first: what the gates refuse, before its export
            try:
                first = measure(spec, eager, handler, labels, built.evaluation)
            except USER_ERRORS as error:
                raise refused(spec, error) from None
            gate(spec, first, "eager model")

        shipped = {**(built.shipped or {}), **(quantize.fp32_from_store(manifest, spec.model, spec.quantize["version"],
                                                                        spec.source, work) if spec.quantize else {})}
        exported = export_model(built.model, handler, spec, handler.collate(list(items.values())[:2]), work,
                                runtimes_to_ship(spec, handler, built.model), shipped)
        serialized = exported[spec.runtime]

        logger.info("%s: [3/6] parity with eager on %d real inputs (%s)", name, len(cases), ", ".join(exported))
        parities = {}
        for runtime, path in exported.items():
            try:
                parities[runtime] = check_parity(eager, load_served(path, handler), cases, forward=handler.forward,
                                                 detections=task_of_handler(spec.handler) == "detection")
            except ParityError as error:
                raise BuildError(f"{name}: refused: {runtime}: {error}") from None
            logger.info("%s: %s parity ok, max |exported - eager| = %.2e (%s)", name, runtime,
                        parities[runtime].max_abs_diff, parities[runtime].worst_input)
        parity = parities[spec.runtime]
        if spec.quantize:  # the fp32 ONNX file, its parity checked, quantized into the served file (export/quantize.py)
            fp32_file = serialized.replace(work / "fp32.onnx")
            try:
                evaluation = evaluation_of(spec, labels, built.evaluation)
                held_out = None if evaluation is None else (evaluation[0], evaluation[2])  # inputs, the set's name
                quantization = quantize.quantize(spec, handler, fp32_file, serialized, held_out, samples)
            except USER_ERRORS as error:
                raise refused(spec, error) from None
        served = load_served(serialized, handler)

        logger.info("%s: [4/6] preprocessing and held-out accuracy through the served pipeline", name)
        try:
            images = {name: p for name, p in samples.items() if name.startswith("eval")} or built.samples
            preprocessing = check_preprocessing(spec, handler, served, images)
            accuracy = measure(spec, served, handler, labels, built.evaluation)
            compared = against_default(spec, default, manifest, served, handler, labels, accuracy)
            if spec.quantize:
                fp32 = load_served(fp32_file, handler)
                quantization.update(quantize.judge(spec, handler, fp32, served, measure(
                    spec, fp32, handler, labels, built.evaluation), accuracy, held_out, samples,
                    (fp32_file, serialized)))
        except USER_ERRORS as error:
            raise refused(spec, error) from None
        if accuracy is not None and first is not None:
            accuracy["eager"] = first["held_out"]  # the same figure before the export: what the export changed
        gate(spec, accuracy, "exported model")
        model_config = chosen_settings(spec.model_config, accuracy)
        handler.settings.update(model_config.get("handler") or {})

        logger.info("%s: [5/6] package with torch-model-archiver", name)
        info = {
            "model": spec.model,
            "version": spec.version,
            "description": spec.description,
            "handler": spec.handler,
            "source": spec.source,
            "weights": built.weights,
            "export": spec.export,
            "runtime": spec.runtime,
            **({"runtime_reason": spec.runtime_reason} if spec.runtime_reason else {}),
            "handler_settings": handler.settings,
            "preprocessing_check": preprocessing,
            "parity": parity.as_dict(),
            "accuracy": accuracy,
            "against_default": compared,
            **({"quantization": quantization} if spec.quantize else {}),
            "quality": built.quality,
            "input_fingerprint": fingerprint,
            "torch": torch.__version__,
            **({"onnxruntime": metadata.version("onnxruntime")} if spec.runtime == "onnxruntime" else {}),
            "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if labels is not None:
            (extra / "index_to_name.json").write_text(json.dumps(labels, indent=1))
        (extra / BUILD_RECORD).write_text(json.dumps(info, indent=2))
        for path in exported.values():
            if path != serialized:  # the TorchScript file an ONNX archive carries for explanations
                shutil.copy2(path, extra / path.name)
        config = work / "model-config.yaml"
        config.write_text(yaml.safe_dump(model_config, sort_keys=False))
        (work / "out").mkdir()
        manifest.store.mkdir(parents=True, exist_ok=True)
        staged = temporary_beside(target)  # in the store: renamed into place, never copied across file systems
        try:
            archive(spec, serialized, extra, config, work / "out", staged)
            logger.info("%s: [6/6] load the archive as a TorchServe worker and answer %d samples", name,
                        len(samples))
            info["worker_check"] = check_served(spec, staged, handler, served, samples)
            entry = {**info, "archive": target.name, "sha256": sha256_file(staged),
                     "size_bytes": staged.stat().st_size,
                     "torch_model_archiver": metadata.version("torch-model-archiver")}
            manifest.record(entry, archive=staged)
        finally:
            staged.unlink(missing_ok=True)
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
    configure_logging()

    try:
        if args.model is not None:
            check_model_name(args.model)
        if args.version is not None:
            check_version(args.version)
        specs = load_specs(args.specs)
        entries = build(specs, select(specs, args.model, args.version), Manifest(args.store or default_store()),
                        args.force)
    except (BuildError, SpecError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n" + summary(entries))
    return 0


def build(specs, versions: list[VersionSpec], manifest: Manifest, force: bool = False) -> list[dict]:
    """Build versions, each model's default first: the others are measured against it."""
    defaults = {name: spec.versions[spec.default_version] for name, spec in specs.items()}
    ordered = sorted(versions, key=lambda v: v.version != defaults[v.model].version)
    return [build_version(v, manifest, force, defaults[v.model]) for v in ordered]


def summary(entries: list[dict]) -> str:
    """The build records as a table: one line per version."""
    lines = [f"{'model':<20} {'version':<8} {'runtime':<12} {'held-out':>17} {'top-5':>7} {'parity':>9}  "
             f"{'size':>8}  sha256"]
    for e in entries:
        accuracy = e["accuracy"] or {}
        first = f"{accuracy.get('metric', 'top1')} {accuracy['held_out']:.4f}" if "held_out" in accuracy else "-"
        top5 = f"{accuracy['top5']:.4f}" if "top5" in accuracy else "-"
        lines.append(f"{e['model']:<20} {e['version']:<8} {e['runtime']:<12} {first:>17} {top5:>7} "
                     f"{e['parity']['max_abs_diff']:>9.1e}  {e['size_bytes'] / 1e6:>6.1f}MB  {e['sha256'][:16]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
