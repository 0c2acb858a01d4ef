"""INT8 versions of a model, gated on the user's own held-out data (``make quantize``, ``QUANTIZE=int8`` on ``make
import``). A spec says "this version is version X quantized" (archives/__init__.py)::

    "1.2":
      source: {type: version, version: "1.1"}
      quantize: {mode: static, max_drop: 0.01, calibration: path/to/images}

and the build (build_mar.py) makes it from X's fp32 ONNX file: X's own ``model.onnx`` out of its archive in the store
where X is built on ONNX Runtime from the same source (``fp32_from_store``), else exported from that source as any
ONNX version is, parity-checked against the eager model either way. The INT8 file is served by the same
``handlers/runtime.py`` ONNX Runtime path as any ONNX version: no torch in the worker.

* **static** (image classifiers, convolutional): ``quantize_static``, QDQ format, per-channel int8 weights, uint8
  activations whose ranges (MinMax) are calibrated on the calibration set as the server computes it: each input
  decoded, collated and fed exactly as the handler feeds the model (``Feeds``). The set: ``calibration`` (a folder of
  images, or a .csv / .jsonl / .txt of texts), else the version's ``eval`` set, else its source's own held-out set,
  else the sample inputs; at most ``CALIBRATION_LIMIT``, spread evenly over it. Its digest is recorded.
* **dynamic** (transformer encoders: text classifiers, sentence embeddings): ``quantize_dynamic``, per-channel int8
  weights of every MatMul with constant weights; activations are quantized per batch at run time.

Weights are quantized on 7 bits (``reduce_range``) in both modes. Measured here: ONNX Runtime 1.31's uint8 x int8
kernels on an AMD EPYC that lists ``avx512_vnni`` among its CPU flags add pairs of products into int16 and saturate (a
MatMulInteger of 255 x 127 over 2 elements answers 32,767, not 64,770). With 8-bit weights efficientnet_lite0's logits
kept a cosine of 0.94 to fp32 and the top-1 of 6 of the 10 sample photos; with 7-bit weights 0.98 and 9 of 10, what
the same QDQ graph computes in float. minilm's mean cosine: 0.990 with 8-bit weights, 0.992 with 7-bit. On another
host (an AMD EPYC with AVX-512, VNNI and bf16) 8-bit weights did not saturate and kept slightly more top-1s
(docs/reference/figures.md, "INT8 versions"); 7 bits is the setting that is safe on both.

**The gate** (``judge``), on one held-out set for both versions (the eval set, else the source's own held-out set,
else the samples), both measured in the same run: refused when the INT8 version's first figure (top-1) is more than
``max_drop`` below the fp32 version's, when its top-1 agrees with fp32's on under ``min_agreement`` of the inputs
(classifiers), or when the mean cosine of its embeddings to fp32's is under ``min_cosine`` (embeddings); each is a
setting of the version (``GATE_DEFAULTS``: 0.98 and 0.99). The refusal gives every figure: fp32, INT8, drop, agreement
or cosine, the thresholds, and where the top-1s differ, how far apart fp32 itself scored the two classes
(``tie_gap``): a flip between two classes fp32 scores 0.02 apart is a near-tie, one between classes 0.5 apart is not.

The build record and the manifest keep ``quantization``: both figures, the drop, the agreement or cosine, the
calibration set (name, samples, sha256), both files' sizes, and the in-process speed of both (``speed``: inputs per
second through decode, collate, forward and answer at the served batch size and threads, the two measured in
alternate rounds of one run, the best round of each) and their ratio. The version's ``parity`` is its fp32 file's,
checked against the eager model before quantizing; the INT8 file's distance from fp32 is ``max_abs_diff`` here.

``make bench-quantize`` (``load_test/quantized.py``) measures these figures for efficientnet_lite0, minilm and the
example project's ResNet-18 (export/example_project.py) in one run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from archives import DEFAULT_MAX_DROP, GATE_DEFAULTS, resolve_file
from archives.store import Manifest
from handlers.runtime import ONNX_FILE

logger = logging.getLogger(__name__)

MODES = {"image_classifier": "static", "text_classifier": "dynamic", "sentence_embedding": "dynamic"}
EMBEDDINGS = ("sentence_embedding",)  # handlers whose outputs are compared by cosine, not by top-1
CALIBRATION_LIMIT = 256  # inputs calibrated on, spread evenly over the set
CALIBRATION_BATCH = 4  # inputs per calibration batch
COMPARE_BATCH = 16
SPEED_ROUNDS, SPEED_SECONDS = 3, 0.5  # alternate rounds of each model, seconds each
SKIPPED = {".DS_Store", "Thumbs.db"}


class QuantizeError(RuntimeError):
    """A version that cannot be quantized as its spec says, or that its gate refuses; the message gives the
    figures."""


def mode_for(handler: str, given: str | None = None) -> str:
    """The spec's mode, else the handler's: static for image classifiers, dynamic for text models."""
    if handler not in MODES:
        raise QuantizeError(f"quantize: {handler} models are not quantized here; image classifiers (static) and "
                            f"text models (dynamic) are: {', '.join(MODES)}")
    return given or MODES[handler]


def version_block(version: str, fp32, max_drop: float | None, calibration: str | None,
                  **gate: float | None) -> list[str]:
    """The lines of a version that is ``fp32`` (a VersionSpec) quantized, as ``make quantize`` adds them to its spec;
    ``gate``: min_agreement, min_cosine where given."""
    import yaml

    settings = {"mode": mode_for(fp32.handler), "max_drop": DEFAULT_MAX_DROP if max_drop is None else max_drop,
                **{key: value for key, value in gate.items() if value is not None},
                **({"calibration": calibration} if calibration else {})}

    def flow(value) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix(
            "...").strip()

    description = f"{fp32.version} quantized to INT8 ({settings['mode']}), {time.strftime('%Y-%m-%d')}"
    return [f'  "{version}":',
            f"    description: {flow(description)}",
            f"    source: {flow({'type': 'version', 'version': fp32.version})}",
            f"    quantize: {flow(settings)}",
            "    # export/quantize.py: refused where it drops more than max_drop, or strays from fp32's answers"]


# --- the calibration set ---------------------------------------------------------------------------------------


@dataclass
class Calibration:
    name: str
    payloads: list[bytes]

    def record(self) -> dict:
        digest = hashlib.sha256()
        for payload in self.payloads:
            digest.update(hashlib.sha256(payload).digest())
        return {"name": self.name, "samples": len(self.payloads), "sha256": digest.hexdigest()}


def read_inputs(path: Path) -> list[bytes]:
    """A calibration set as the bytes a client sends: every file under a folder (images, any layout), or each text
    of a .csv (column ``text``), a .jsonl (``{"text": ...}``) or a .txt (one a line)."""
    if path.is_dir():
        return [p.read_bytes() for p in sorted(path.rglob("*"))
                if p.is_file() and p.name not in SKIPPED and not p.name.startswith(".")]
    if not path.is_file():
        raise QuantizeError(f"calibration set {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".csv":
            return [row["text"].encode() for row in csv.DictReader(text.splitlines())]
        if path.suffix == ".jsonl":
            return [str(json.loads(line)["text"]).encode() for line in text.splitlines() if line.strip()]
    except (ValueError, KeyError, TypeError) as error:  # not UTF-8, not JSON, no "text"
        raise QuantizeError(f"calibration set {path}: expected texts under 'text': {type(error).__name__}: "
                            f"{str(error)[:200]}") from None
    return [line.encode() for line in text.splitlines() if line.strip()]


def calibration_set(settings: dict, held_out: tuple[list[bytes], str] | None, samples: dict[str, bytes]) -> Calibration:
    """The spec's ``calibration``, else the held-out set, else the samples: at most CALIBRATION_LIMIT, spread evenly
    (an ImageFolder's classes all take part)."""
    if settings.get("calibration"):
        payloads, name = read_inputs(resolve_file(settings["calibration"])), settings["calibration"]
    elif held_out is not None:
        payloads, name = held_out
    else:
        payloads, name = list(samples.values()), "the sample inputs"
    if not payloads:
        raise QuantizeError(f"calibration set {name} holds no inputs")
    count = min(CALIBRATION_LIMIT, len(payloads))
    return Calibration(str(name), [payloads[i * len(payloads) // count] for i in range(count)])


def identity(handler: str, settings: dict) -> str:
    """What a quantized version is made with, beyond its spec: the quantizer's version and the calibration files
    (QuantizeError first where the handler's models are not quantized here)."""
    mode_for(handler, settings.get("mode"))
    calibration = settings.get("calibration")
    files = Calibration("", read_inputs(resolve_file(calibration))).record()["sha256"] if calibration else ""
    return f"onnxruntime {metadata.version('onnxruntime')} calibration {files}"


class Feeds:
    """Stands in for the model inside the handler's ``forward`` and keeps what it is fed, by input name: the arrays
    the server would give the model."""

    def __init__(self, names: list[str]):
        self.names, self.fed = names, []

    def __call__(self, *arrays):
        self.fed.append(dict(zip(self.names, (np.ascontiguousarray(a) for a in arrays))))


def calibration_reader(handler, names: list[str], payloads: list[bytes]):
    """An ONNX Runtime CalibrationDataReader over the payloads, decoded and collated by the served handler."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(payloads), CALIBRATION_BATCH))

        def get_next(self):
            start = next(self.batches, None)
            if start is None:
                return None
            feeds = Feeds(names)
            handler.forward(feeds, handler.collate([handler.decode(p) for p in payloads[start:start + CALIBRATION_BATCH]]))
            return feeds.fed[0]

    return Reader()


def quantize_file(fp32: Path, int8: Path, mode: str, handler, calibration: Calibration | None) -> dict:
    """``fp32`` quantized into ``int8``; how, for the record."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    how = {"mode": mode, "per_channel": True, "reduce_range": True, "weights": "int8"}
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(max(quiet, logging.ERROR))  # the quantizer's advice goes to the root logger
    try:
        if mode == "dynamic":
            quantize_dynamic(str(fp32), str(int8), per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)
            return {**how, "activations": "uint8, ranges per batch at run time"}
        graph = onnx.load(str(fp32), load_external_data=False).graph
        names = [i.name for i in graph.input if i.name not in {init.name for init in graph.initializer}]
        quantize_static(str(fp32), str(int8), calibration_reader(handler, names, calibration.payloads),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return {**how, "format": "QDQ", "activations": "uint8, MinMax ranges from the calibration set",
                "calibration": calibration.record()}
    except QuantizeError:
        raise
    except Exception as error:  # the quantizer's own failure on this graph or these inputs, named
        raise QuantizeError(f"ONNX Runtime could not quantize the model ({mode}): {type(error).__name__}: "
                            f"{' '.join(str(error).split())[:300]}") from None
    finally:
        logging.getLogger().setLevel(quiet)


def fp32_from_store(manifest: Manifest, model: str, version: str, source: dict, into: Path) -> dict[str, Path]:
    """``{"onnxruntime": file}``: the fp32 version's own model.onnx out of its archive (sha256 checked), where it is
    built on ONNX Runtime from ``source``; empty where it is not (then the build exports it)."""
    entry = manifest.get(model, version)
    if not entry or entry.get("runtime") != "onnxruntime" or entry.get("source") != source \
            or entry.get("quantization"):
        return {}
    try:
        archive, _ = manifest.verify(model, version)
    except ValueError as error:
        logger.warning("%s %s: %s: the fp32 ONNX file is exported from the source instead", model, version, error)
        return {}
    with zipfile.ZipFile(archive) as mar:
        (into / "fp32_from_store.onnx").write_bytes(mar.read(ONNX_FILE))
    logger.info("%s %s: the fp32 ONNX file from %s", model, version, archive.name)
    return {"onnxruntime": into / "fp32_from_store.onnx"}


def quantize(spec, handler, fp32: Path, int8: Path, held_out: tuple[list[bytes], str] | None,
             samples: dict[str, bytes]) -> dict:
    """The build's step: ``fp32`` (the version's source, parity-checked) quantized into ``int8`` as the spec says."""
    mode = mode_for(spec.handler, spec.quantize.get("mode"))
    calibration = calibration_set(spec.quantize, held_out, samples) if mode == "static" else None
    logger.info("%s %s: quantize %s %s to INT8 (%s%s)", spec.model, spec.version, spec.model, spec.quantize["version"],
                mode, f", calibrated on {len(calibration.payloads)} inputs of {calibration.name}" if calibration else "")
    started = time.monotonic()
    how = quantize_file(fp32, int8, mode, handler, calibration)
    return {"from_version": spec.quantize["version"], **how, "seconds": round(time.monotonic() - started, 1),
            "onnxruntime": metadata.version("onnxruntime")}


# --- comparing the two, and the gate ---------------------------------------------------------------------------


def first_array(outputs) -> np.ndarray:
    return np.asarray(outputs[0] if isinstance(outputs, (tuple, list)) else outputs, dtype=np.float32)


def compare(handler, fp32, int8, payloads: list[bytes], embeddings: bool) -> dict:
    """The two models on the same inputs through the served pipeline: top-1 agreement (and, recorded, not gated, how
    far the served scores moved: a calibration of black images kept this project's ResNet-18's top-1 on all 18 eval
    photos while moving a score from 0.59 to 0.85), or the cosine of each embedding to fp32's."""
    ours, theirs = [], []
    for start in range(0, len(payloads), COMPARE_BATCH):
        batch = handler.collate([handler.decode(p) for p in payloads[start:start + COMPARE_BATCH]])
        theirs.append(first_array(handler.forward(fp32, batch)))
        ours.append(first_array(handler.forward(int8, batch)))
    a, b = np.concatenate(theirs), np.concatenate(ours)
    figures = {"max_abs_diff": round(float(np.abs(a - b).max(initial=0.0)), 6)}
    if embeddings:
        cosine = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        return {"cosine": round(float(cosine.mean()), 6), "min_cosine": round(float(cosine.min()), 6),
                "samples": len(a), **figures}
    scores, picked = softmax(a), b.argmax(axis=1)
    agree = a.argmax(axis=1) == picked
    shift = np.abs(scores - softmax(b)).max(axis=1)  # the largest change of any served score, per input
    gaps = scores.max(axis=1) - scores[np.arange(len(a)), picked]  # fp32's own score of its top-1 over INT8's pick
    return {"agreement": round(float(agree.mean()), 6), "agreeing": int(agree.sum()), "samples": len(a),
            "tie_gap": round(float(gaps[~agree].max(initial=0.0)), 6),
            "score_shift": {"mean": round(float(shift.mean()), 6), "max": round(float(shift.max()), 6)}, **figures}


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def speed(handler, models: dict[str, Any], payloads: list[bytes], batch: int, stages: str = "pipeline") -> dict:
    """Inputs per second of each model at ``batch`` (the served batch size), in alternate rounds of one run, the best
    round of each: through decode, collate, forward and answer (``pipeline``), or forward alone on batches collated
    beforehand (``model``). ``speedup``: the second model's against the first's."""
    chunks = [[payloads[(i * batch + j) % len(payloads)] for j in range(batch)]
              for i in range(max(1, len(payloads) // batch))]
    ready = [([handler.decode(p) for p in chunk]) for chunk in chunks]
    collated = [handler.collate(items) for items in ready]

    def one(model, index: int) -> None:
        if stages == "model":
            handler.forward(model, collated[index])
            return
        items = [handler.decode(p) for p in chunks[index]]
        handler.answer(handler.forward(model, handler.collate(items)), items)

    best = {name: 0.0 for name in models}
    for name, model in models.items():  # warm-up
        one(model, 0)
    for _ in range(SPEED_ROUNDS):
        for name, model in models.items():
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < SPEED_SECONDS:
                one(model, done % len(chunks))
                done += 1
            best[name] = max(best[name], done * batch / (time.perf_counter() - started))
    first, second = list(models)[:2]
    return {"batch": batch, "stages": stages, **{k: round(v, 1) for k, v in best.items()},
            "speedup": round(best[second] / best[first], 3)}


def refusal(figures: dict) -> str | None:
    """Why the gate refuses, or None."""
    reasons = []
    if figures.get("drop") is not None and figures["drop"] > figures["max_drop"] + 1e-12:
        reasons.append(f"{figures['metric']} drops {figures['drop']:.4f} > max_drop {figures['max_drop']:g}")
    if "agreement" in figures and figures["agreement"] < figures["min_allowed"]:
        reasons.append(f"top-1 agreement with fp32 {figures['agreement']:.4f} < min_agreement "
                       f"{figures['min_allowed']:g}")
    if "cosine" in figures and figures["cosine"] < figures["min_allowed"]:
        reasons.append(f"mean cosine to fp32 {figures['cosine']:.4f} < min_cosine {figures['min_allowed']:g}")
    return "; ".join(reasons) or None


def summary_line(figures: dict) -> str:
    """Every figure of the gate on one line."""
    held = (f"{figures['metric']} fp32 {figures['fp32']:.4f}, int8 {figures['int8']:.4f}, drop {figures['drop']:.4f} "
            f"(max_drop {figures['max_drop']:g}); " if figures.get("drop") is not None else
            f"no held-out figure (max_drop {figures['max_drop']:g}); ")
    ties = (f"; where they differ, fp32 scored INT8's pick at most {figures['tie_gap']:.3f} below its own"
            if figures.get("agreeing", figures["samples"]) < figures["samples"] else "")
    compared = (f"top-1 agreement {figures['agreement']:.4f} ({figures['agreeing']}/{figures['samples']}, "
                f"min_agreement {figures['min_allowed']:g}{ties})" if "agreement" in figures else
                f"mean cosine {figures['cosine']:.4f} (min {figures['min_cosine']:.4f}, {figures['samples']} inputs, "
                f"min_cosine {figures['min_allowed']:g})")
    return f"{held}{compared} on {figures['compared_on']}"


def judge(spec, handler, fp32, int8, fp32_accuracy: dict | None, int8_accuracy: dict | None,
          held_out: tuple[list[bytes], str] | None, samples: dict[str, bytes], files: tuple[Path, Path]) -> dict:
    """The INT8 version against its fp32 version on the same set, in one run: the record, or QuantizeError with
    every figure where the gate refuses it."""
    payloads, compared_on = held_out or (list(samples.values()), "the sample inputs")
    figures: dict[str, Any] = {"max_drop": float(spec.quantize.get("max_drop", DEFAULT_MAX_DROP)),
                               "compared_on": compared_on}
    if fp32_accuracy is not None and int8_accuracy is not None:
        figures.update(metric=fp32_accuracy["metric"], fp32=fp32_accuracy["held_out"], int8=int8_accuracy["held_out"],
                       drop=round(fp32_accuracy["held_out"] - int8_accuracy["held_out"], 6),
                       eval_set=fp32_accuracy["eval_set"])
    embeddings = spec.handler in EMBEDDINGS
    figures.update(compare(handler, fp32, int8, payloads, embeddings))
    threshold = "min_cosine" if embeddings else "min_agreement"
    figures["min_allowed"] = float(spec.quantize.get(threshold, GATE_DEFAULTS[threshold]))
    why = refusal(figures)
    if why:
        raise QuantizeError(f"INT8 refused: {why}. Figures: {summary_line(figures)}")
    logger.info("%s %s: INT8 gate passed: %s", spec.model, spec.version, summary_line(figures))
    sizes = {"fp32": files[0].stat().st_size, "int8": files[1].stat().st_size}
    figures["size_bytes"] = {**sizes, "ratio": round(sizes["int8"] / sizes["fp32"], 3)}
    figures["speed"] = speed(handler, {"fp32": fp32, "int8": int8}, payloads, int(spec.model_config.get("batchSize", 1)))
    logger.info("%s %s: %.1f MB → %.1f MB; in-process %s/s at batch %d: fp32 %.1f, int8 %.1f (x%.2f)", spec.model,
                spec.version, sizes["fp32"] / 1e6, sizes["int8"] / 1e6, "texts" if spec.handler.startswith(
                    ("text", "sentence")) else "img", figures["speed"]["batch"], figures["speed"]["fp32"],
                figures["speed"]["int8"], figures["speed"]["speedup"])
    return figures
