"""The limit: the served pipeline run in-process, with no server in between.

decode → preprocess → forward → top-k, through the handler's own code (``from_config``: the same decode, collate and
answer TorchServe runs) on the archive's own model file (TorchScript or ONNX), loaded as the worker loads it. Measured for each batch
size, in the two ways of using the cores: one process with all cores as torch threads, or one single-threaded process
per core, all at once. The best of those is the limit a server on this machine is measured against.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import yaml

from handlers import handler_class
from handlers.runtime import load_model


def load_pipeline(archive: Path, threads: int, optimize_for_inference: bool | None = None):
    """The handler (configured from the archive's model-config) and its model, as a TorchServe worker has them
    (``optimize_for_inference``: None as the archive says; False to see what TorchScript does without it)."""
    with zipfile.ZipFile(archive) as mar, tempfile.TemporaryDirectory() as tmp:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        handler = handler_class(Path(manifest["model"]["handler"]).stem).from_config(
            yaml.safe_load(mar.read("model-config.yaml")))
        handler.mapping = json.loads(mar.read("index_to_name.json"))
        serialized = manifest["model"]["serializedFile"]
        mar.extract(serialized, tmp)
        optimize = handler.settings["optimize_for_inference"] if optimize_for_inference is None else optimize_for_inference
        model = load_model(Path(tmp) / serialized, "cpu", threads, bool(optimize))
    return handler, model


def forward_rate(archive: Path, payloads: list[bytes], batch: int, seconds: float, threads: int = 1,
                 optimize_for_inference: bool | None = None) -> float:
    """Images per second through the model's forward alone (inputs decoded and collated beforehand)."""
    handler, model = load_pipeline(archive, threads, optimize_for_inference)
    inputs = handler.collate([handler.decode(p) for p in payloads[:batch]])
    return rate(lambda: handler.forward(model, inputs), batch, seconds)


def rate(step, per_call: int, seconds: float, warmup: int = 10) -> float:
    """Items per second: ``step()`` (``per_call`` items each time) called over and over for ``seconds``, after
    ``warmup`` unmeasured calls (TorchScript's profiling executor optimises over its first calls)."""
    for _ in range(warmup):
        step()
    done, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        step()
        done += per_call
    return done / (time.perf_counter() - begin)


def through(handler, model, payloads: list[bytes]) -> list:
    """Payloads through the handler's own decode, collate, forward and answer, on ``model``."""
    items = [handler.decode(p) for p in payloads]
    return handler.answer(handler.forward(model, handler.collate(items)), items)


def run_batches(handler, model, payloads: list[bytes], batch: int, seconds: float, start_at: float = 0.0) -> tuple[int, float]:
    """Images through the whole pipeline in batches of ``batch`` for ``seconds``: (images, elapsed)."""
    for _ in range(3):  # warm-up: TorchScript optimises on its first calls
        through(handler, model, payloads[:batch])
    time.sleep(max(0.0, start_at - time.time()))  # every process starts its clock at once
    done, position, begin = 0, 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        chunk = [payloads[(position + i) % len(payloads)] for i in range(batch)]
        position += batch
        through(handler, model, chunk)
        done += batch
    return done, time.perf_counter() - begin


def single_image_latency(archive: Path, payloads: list[bytes], threads: int, repeats: int = 3) -> float:
    """Median seconds for one image through the pipeline (over every payload, ``repeats`` times)."""
    handler, model = load_pipeline(archive, threads)
    run_batches(handler, model, payloads, 1, 0.5)
    times = []
    for _ in range(repeats):
        for payload in payloads:
            begin = time.perf_counter()
            through(handler, model, [payload])
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _process(args) -> tuple[int, float]:
    archive, payloads, batch, seconds, start_at = args
    handler, model = load_pipeline(archive, 1)
    return run_batches(handler, model, payloads, batch, seconds, start_at)


def throughput(archive: Path, payloads: list[bytes], batch: int, mode: str, cores: int, seconds: float) -> float:
    """Images per second for one batch size: ``threads`` (one process, ``cores`` threads) or ``processes``
    (``cores`` single-threaded processes started together)."""
    if mode == "threads":
        handler, model = load_pipeline(archive, cores)
        images, elapsed = run_batches(handler, model, payloads, batch, seconds)
        return images / elapsed
    start_at = time.time() + 8.0  # every process loaded and warm before the clock starts
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        results = pool.map(_process, [(archive, payloads, batch, seconds, start_at)] * cores)
    return sum(images for images, _ in results) / max(elapsed for _, elapsed in results)
