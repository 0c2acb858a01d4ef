"""The servers the benchmark compares, each on free loopback ports, started and stopped around its measurements.

* TorchServe through ``serve.sh`` (our archives, and variants of them with other worker, thread and batch settings);
* TorchServe's stock ``image_classifier`` handler over the same TorchScript weights;
* the tutorial-style Flask app (``load_test/flask_app.py``) on the eager model;
* the peers (``load_test/peers.py``: LitServe, BentoML, Ray Serve), started with the helpers here.

Each server's start-up is timed from spawning it to its first correct answer on a real photo, and its memory is the
PSS of its whole process tree.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import requests
import yaml

from archives.store import Manifest
from serving.instance import REPO, free_ports
from serving.instance import Instance as Stack
from serving.torchserve import TorchServe, ready_workers

RAW = {"Content-Type": "application/octet-stream"}  # what wrk sends (load_test/wrk.lua)


@dataclass
class Running:
    """A server being measured: its name, prediction URL, the processes whose trees make it up, and the seconds from
    spawning it to its first correct answer on a real photo."""

    name: str
    url: str
    roots: list[int]
    start_seconds: float
    headers: dict[str, str] = field(default_factory=dict)

    def post(self, body: bytes) -> requests.Response:
        return requests.post(self.url, data=body, headers={**RAW, **self.headers}, timeout=120)


def first_answer(url: str, body: bytes, expected: str, began: float, exited: Callable[[], int | None],
                 timeout: float, log: Path, headers: dict[str, str] | None = None) -> float:
    """Post ``body`` until the server answers: the seconds since ``began`` (``time.perf_counter``) when the answer's
    top class contains ``expected``. Fails on a wrong answer, when ``exited()`` says the server's process is gone, or
    after ``timeout``."""
    while True:
        try:
            response = requests.post(url, data=body, headers={**RAW, **(headers or {})}, timeout=60)
        except requests.RequestException:
            response = None
        if response is not None and response.status_code == 200:
            label = top1(response)
            if expected not in label:
                raise RuntimeError(f"{url}: answered {label!r} first, expected a {expected} (see {log})")
            return time.perf_counter() - began
        if exited() is not None:
            raise RuntimeError(f"{url}: the server exited before answering (see {log})")
        if time.perf_counter() - began > timeout:
            raise RuntimeError(f"{url}: no correct answer after {timeout:.0f} s (see {log})")
        time.sleep(0.05)


def die_with_parent() -> None:
    """For ``Popen(preexec_fn=...)``: the child gets SIGTERM when the benchmark's process dies (killed by a test's
    timeout, say), so that a server started in its own session is not left running (Linux's PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _parents() -> dict[int, int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):  # exited while we looked
            continue
    return parents


def process_tree(roots: list[int]) -> list[int]:
    """``roots`` and every process descended from them, from /proc."""
    parents = _parents()
    found, todo = [], [root for root in roots if root in parents]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return found


def describe(pid: int) -> str:
    """A process by its command line, without paths: the program's and a script's last part only, other arguments
    that name a file left out (Ray names its processes ``ray::...``)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split()
    except OSError:
        return "?"
    kept = [word.rsplit("/", 1)[1] if "/" in word and (index == 0 or word.endswith(".py")) else word
            for index, word in enumerate(words) if "/" not in word or index == 0 or word.endswith(".py")]
    return " ".join(kept)[:90] or "?"


def tree_memory(roots: list[int]) -> dict:
    """PSS (MB, from /proc/<pid>/smaps_rollup) of every process of the trees under ``roots``: the total and each."""
    from load_test.soak import memory

    processes = []
    for pid in process_tree(roots):
        sample = memory(pid)
        if sample is not None:
            processes.append({"pid": pid, "name": describe(pid), "pss_mb": sample["pss_mb"]})
    return {"total_mb": round(sum(p["pss_mb"] for p in processes), 1), "processes": processes}


def _started(pid: int) -> str | None:
    """When a live process started (to tell it from a later one with its pid); None once it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def stop_tree(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a server started in its own session: SIGINT to it (Ctrl+C: each of them shuts its own processes down on
    it), then SIGTERM to its group and every process of its tree still there (some leave the group), then SIGKILL to
    any of those same processes still there."""
    tree = {pid: _started(pid) for pid in process_tree([process.pid])}
    _signal({process.pid: tree.get(process.pid)}, signal.SIGINT)
    if not _gone(tree, timeout, process.poll):
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        _signal(tree, signal.SIGTERM)
        _gone(tree, 10.0, process.poll)
    _signal(tree, signal.SIGKILL)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _signal(tree: dict[int, str | None], sig: int) -> None:
    """``sig`` to each process of ``tree`` (pid → start time) that is still the same process."""
    for pid, started in tree.items():
        if started is not None and _started(pid) == started:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _gone(tree: dict[int, str | None], timeout: float, poll: Callable[[], object] = lambda: None) -> bool:
    """Whether every process of ``tree`` exited within ``timeout`` (``poll`` reaps our own child meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        poll()
        if not any(started is not None and _started(pid) == started for pid, started in tree.items()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


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
    return reconfigured(archive, folder / f"{name}.mar", minWorkers=workers, maxWorkers=workers, batchSize=batch,
                        maxBatchDelay=delay, handler={"threads": threads})


def reconfigured(archive: Path, target: Path, **settings) -> Path:
    """A copy of ``archive`` at ``target`` whose model-config.yaml has ``settings`` over its own (``handler``'s
    merged key by key). Written beside ``target``, then renamed over it: a hard link to the source stays intact."""
    partial = target.with_name(f".{target.name}.partial")
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(partial, "w") as copy:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "model-config.yaml":
                config = yaml.safe_load(data)
                handler = {**(config.get("handler") or {}), **settings.get("handler", {})}
                config.update({**settings, "handler": handler})
                data = yaml.safe_dump(config, sort_keys=False).encode()
            copy.writestr(item, data)
    partial.replace(target)
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
    environment = {**Stack.fresh(home, store=str(store)).environment(), **env}
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
def flask_app(log: Path, probe: bytes, expected: str) -> Iterator[Running]:
    """The Flask baseline on a free port, yielded once it answered ``probe`` correctly (its start-up: from spawning
    it to that answer)."""
    [port] = free_ports(1)
    url = f"http://127.0.0.1:{port}/predict"
    with open(log, "w") as out:
        began = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "load_test.flask_app", "--port", str(port)], cwd=REPO,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=die_with_parent)
        try:
            seconds = first_answer(url, probe, expected, began, process.poll, 120, log)
            yield Running("Flask app", url, [process.pid], seconds)
        finally:
            stop_tree(process)


def single_store(folder: Path, source: Manifest, model: str, version: str) -> Path:
    """A model store holding one built version (a hard link) and a manifest of that version alone."""
    folder.mkdir(parents=True, exist_ok=True)
    entry = source.get(model, version)
    link_or_copy(source.store / entry["archive"], folder / entry["archive"])
    Manifest(folder).record(entry)
    return folder


def ours_roots() -> list[int]:
    """The processes serve.sh started for the current SERVE_HOME (``serving.instance.PID_FILES``); TorchServe's workers
    and nginx's are their children."""
    from serving.instance import Instance as Stack

    return list(Stack.current().pids().values())


@contextmanager
def stock_torchserve(archive: Path, home: Path, probe: bytes, expected: str) -> Iterator[Running]:
    """TorchServe's stock handler as a new user starts it: ``torchserve --start`` with this one archive and
    TorchServe's defaults (a worker per core, batch size 1, no token), on free loopback ports. Yielded once it answered
    ``probe`` correctly, its start-up timed from the command."""
    from serving.instance import read_pid

    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    config = home / "config.properties"
    config.write_text(f"inference_address=http://127.0.0.1:{inference}\n"
                      f"management_address=http://127.0.0.1:{management}\n"
                      f"metrics_address=http://127.0.0.1:{metrics}\n"
                      f"grpc_inference_port={grpc_inference}\ngrpc_management_port={grpc_management}\n"
                      "disable_token_authorization=true\n")
    java = subprocess.run([str(REPO / "serve.sh"), "java"], capture_output=True, text=True, check=True).stdout.strip()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TS_")}, "JAVA_HOME": java,
           "TMPDIR": str(home / "tmp"), "TEMP": str(home / "tmp"), "LOG_LOCATION": str(home / "logs"),
           "METRICS_LOCATION": str(home / "logs")}
    torchserve_cli = str(Path(sys.executable).parent / "torchserve")
    url = f"http://127.0.0.1:{inference}/predictions/stock"
    (home / "logs").mkdir(exist_ok=True)
    with open(home / "logs" / "torchserve.out", "w") as out:  # Java keeps the CLI's output open: a file, not a pipe
        began = time.perf_counter()
        subprocess.run([torchserve_cli, "--start", "--ncs", "--ts-config", str(config), "--model-store",
                        str(archive.parent), "--models", f"stock={archive.name}"], cwd=home, env=env, stdout=out,
                       stderr=subprocess.STDOUT, check=True)
    pid = None
    try:
        deadline = time.monotonic() + 30
        while (pid := read_pid(home / "tmp" / ".model_server.pid")) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid is None:
            raise RuntimeError(f"TorchServe (stock handler) did not start: see {home / 'logs'}")
        seconds = first_answer(url, probe, expected, began, lambda: None if read_pid(
            home / "tmp" / ".model_server.pid") else 1, 300, home / "logs")
        yield Running("stock handler, TorchServe defaults", url, [pid], seconds)
    finally:
        tree = {p: _started(p) for p in process_tree([pid])} if pid else {}
        subprocess.run([torchserve_cli, "--stop"], cwd=home, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        if not _gone(tree, 30.0):
            _signal(tree, signal.SIGKILL)


def top1(response: requests.Response) -> str:
    """The top class of an image_classifier-shaped answer."""
    response.raise_for_status()
    return next(iter(response.json()))
