"""The servers the benchmark compares, each on free loopback ports, started and stopped around its measurements.

* TorchServe through ``serve.sh`` (our archives, and variants of them with other worker, thread and batch settings);
* TorchServe's stock ``image_classifier`` handler over the same TorchScript weights;
* the tutorial-style Flask app (``load_test/flask_app.py``) on the eager model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import requests
import yaml

from archives.store import Manifest
from manage.client import REPO, TorchServe, free_ports, instance_env, ready_workers


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def bench_store(folder: Path, source: Manifest) -> Path:
    """A model store for the benchmark: every built archive (hard links) and the manifest, beside which the
    variants and the stock archive are written."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in source.entries():
        link_or_copy(source.store / entry["archive"], folder / entry["archive"])
    shutil.copy2(source.store / "manifest.json", folder / "manifest.json")
    return folder


def variant(archive: Path, folder: Path, name: str, workers: int, threads: int, batch: int, delay: int) -> Path:
    """A copy of ``archive`` whose model-config.yaml has other worker, thread and batching settings."""
    target = folder / f"{name}.mar"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(target, "w") as copy:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "model-config.yaml":
                config = yaml.safe_load(data)
                config.update(minWorkers=workers, maxWorkers=workers, batchSize=batch, maxBatchDelay=delay)
                config["handler"]["threads"] = threads
                data = yaml.safe_dump(config, sort_keys=False).encode()
            copy.writestr(item, data)
    return target


def stock_archive(archive: Path, folder: Path, name: str = "stock") -> Path:
    """TorchServe's stock ``image_classifier`` handler with our archive's TorchScript weights and labels, packaged
    the way TorchServe's examples do (no model-config: TorchServe's defaults)."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    with zipfile.ZipFile(archive) as mar, tempfile.TemporaryDirectory() as tmp:
        mar.extract("model.pt", tmp)
        mar.extract("index_to_name.json", tmp)
        generate_model_archive(ModelArchiverConfig(
            model_name=name, handler="image_classifier", version="1.0", serialized_file=f"{tmp}/model.pt",
            extra_files=f"{tmp}/index_to_name.json", export_path=str(folder), force=True))
    return folder / f"{name}.mar"


def register(ts: TorchServe, archive: Path, name: str, **params: int) -> None:
    """Register an archive of the store under ``name``; returns when its workers are up."""
    ts.register(archive.name, model_name=name, **params)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # synchronous registration returns with the workers started, not READY
        info = ts.versions(name)[0]
        if info.get("workers") and ready_workers(info) == len(info["workers"]):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{name}: workers not READY after 120 s")


def unregister(ts: TorchServe, name: str) -> None:
    ts.management("DELETE", f"/models/{name}")


@contextmanager
def torchserve(store: Path, home: Path, **env: str) -> Iterator[tuple[TorchServe, float]]:
    """TorchServe started by serve.sh with ``store`` on free ports: (client, seconds until every model was READY)."""
    environment = {**instance_env(home), "MODEL_STORE": str(store), **env}
    with mock.patch.dict(os.environ, environment):  # serve.sh, the client and python -m manage all read it
        began = time.perf_counter()
        started = subprocess.run([str(REPO / "serve.sh"), "start"], capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - began
        if started.returncode != 0:
            raise RuntimeError(f"serve.sh start failed:\n{started.stdout}\n{started.stderr}")
        try:
            yield TorchServe(timeout=120), seconds
        finally:
            subprocess.run([str(REPO / "serve.sh"), "stop"], capture_output=True, check=False)


@contextmanager
def flask_app(log: Path) -> Iterator[str]:
    """The Flask baseline on a free port: its prediction URL."""
    [port] = free_ports(1)
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "load_test.flask_app", "--port", str(port)], cwd=REPO,
                                   stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).raise_for_status()
                    break
                except requests.RequestException:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the Flask app did not start: see {log}") from None
                    time.sleep(0.2)
            yield f"http://127.0.0.1:{port}/predict"
        finally:
            process.terminate()
            process.wait(timeout=30)


def top1(response: requests.Response) -> str:
    """The top class of an image_classifier-shaped answer."""
    response.raise_for_status()
    return next(iter(response.json()))
