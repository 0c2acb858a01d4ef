"""The servers the benchmark compares, each on free loopback ports, started and stopped around its measurements.

* TorchServe through ``serve.sh`` (our archives, and variants of them with other worker, thread and batch settings);
* TorchServe's stock ``image_classifier`` handler over the same TorchScript weights;
* the tutorial-style Flask app (``load_test/flask_app.py``) on the eager model;
* the peers (``load_test/peers.py``: LitServe, BentoML, Ray Serve), started with the helpers here.

Each server's start-up is timed from spawning it to its first correct answer on a real photo, and its memory is the
PSS of its whole process tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from load_test.measure import memory, reconfigured, tree
from serving.instance import (
    REPO,
    Instance,
    free_ports,
    process_tree,
    read_pid,
    wait_until,
)
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

    def post(self, body: bytes, timeout: float = 120) -> requests.Response:
        return requests.post(self.url, data=body, headers={**RAW, **self.headers}, timeout=timeout)


def first_answer(server: Running, body: bytes, expected: str, began: float, exited: Callable[[], int | None],
                 timeout: float, log: Path) -> float:
    """Post ``body`` until the server answers: the seconds since ``began`` (``time.perf_counter``) when the answer's
    top class contains ``expected``. Fails on a wrong answer, when ``exited()`` says the server's process is gone, or
    ``timeout`` seconds after ``began``."""
    def answered() -> bool:
        try:
            response = server.post(body, timeout=60)
        except requests.RequestException:
            response = None
        if response is not None and response.status_code == 200:
            if expected not in (label := top1(response)):
                raise RuntimeError(f"{server.url}: answered {label!r} first, expected a {expected} (see {log})")
            return True
        if exited() is not None:
            raise RuntimeError(f"{server.url}: the server exited before answering (see {log})")
        return False

    wait_until(answered, timeout - (time.perf_counter() - began), f"{server.url}: a correct answer (see {log})", 0.05)
    return time.perf_counter() - began


def die_with_parent() -> None:
    """For ``Popen(preexec_fn=...)``: the child gets SIGTERM when the benchmark's process dies (killed by a test's
    timeout, say), so that a server started in its own session is not left running (Linux's PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def describe(pid: int) -> str:
    """A process by its command line, without paths: the program's and a script's last part only, other arguments
    that name a file left out (Ray names its processes ``ray::...``)."""
    try:
        words = " ".join(psutil.Process(pid).cmdline()).split()
    except psutil.Error:
        return "?"
    kept = [word.rsplit("/", 1)[1] if "/" in word and (index == 0 or word.endswith(".py")) else word
            for index, word in enumerate(words) if "/" not in word or index == 0 or word.endswith(".py")]
    return " ".join(kept)[:90] or "?"


def tree_memory(roots: list[int]) -> dict:
    """PSS (MB) of every process of the trees under ``roots``: the total and each."""
    processes = [{"pid": pid, "name": describe(pid), "pss_mb": round(found.pss / 1e6, 2)}
                 for pid in tree(roots) if (found := memory(pid))]
    return {"total_mb": round(sum(p["pss_mb"] for p in processes), 1), "processes": processes}


def running(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` that still run (a zombie has exited; its parent has not reaped it yet)."""
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def gone(processes: list[psutil.Process], seconds: float, reap: Callable[[], object] = lambda: None) -> bool:
    """Whether every one of ``processes`` exited within ``seconds`` (``reap`` reaps our own child meanwhile)."""
    def stopped() -> bool:
        reap()
        return not running(processes)

    try:
        return wait_until(stopped, seconds, "the server's processes exiting", 0.2)
    except TimeoutError:
        return False


def send(processes: list[psutil.Process], sig: int) -> None:
    """``sig`` to each of ``processes`` that still runs: never to a later process that took a pid of theirs."""
    for process in running(processes):
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)


def stop_tree(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a server started in its own session: SIGINT to it (Ctrl+C: each of them shuts its own processes down on
    it), then SIGTERM to its group and every process of its tree still there (some leave the group), then SIGKILL to
    any of those same processes still there."""
    processes = process_tree(process.pid)
    send(processes[:1], signal.SIGINT)
    if not gone(processes, timeout, process.poll):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        send(processes, signal.SIGTERM)
        gone(processes, 10.0, process.poll)
    send(processes, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def variant(archive: Path, folder: Path, name: str, workers: int, threads: int, batch: int, delay: int) -> Path:
    """A copy of ``archive`` whose model-config.yaml has other worker, thread and batching settings."""
    return reconfigured(archive, folder / f"{name}.mar", minWorkers=workers, maxWorkers=workers, batchSize=batch,
                        maxBatchDelay=delay, handler={"threads": threads})


def stock_archive(archive: Path, folder: Path, name: str = "stock") -> Path:
    """TorchServe's stock ``image_classifier`` handler with our archive's TorchScript weights and labels, packaged
    the way TorchServe's examples do (no model-config: TorchServe's defaults)."""
    from build_mar import run_archiver  # the build's own packaging; torch loads only where a stock archive is made

    with zipfile.ZipFile(archive) as mar, tempfile.TemporaryDirectory() as tmp:
        mar.extract("model.pt", tmp)
        mar.extract("index_to_name.json", tmp)
        return run_archiver(folder, model_name=name, handler="image_classifier", version="1.0",
                            serialized_file=f"{tmp}/model.pt", extra_files=f"{tmp}/index_to_name.json")


def register(ts: TorchServe, archive: Path, name: str, **params: int) -> None:
    """Register an archive of the store under ``name``; returns when its workers are READY (a synchronous
    registration returns with them started, not READY)."""
    ts.register(archive.name, model_name=name, **params)

    def ready() -> bool:
        info = ts.versions(name)[0]
        return bool(info.get("workers")) and ready_workers(info) == len(info["workers"])

    wait_until(ready, 120, f"{name}: every worker READY", 0.2)


def bearer(ts: TorchServe) -> dict[str, str]:
    """The headers a client sends TorchServe's inference API (or the front door) with."""
    return {"Authorization": f"Bearer {ts.token('inference')}"}


def unregister(ts: TorchServe, name: str) -> None:
    ts.management("DELETE", f"/models/{name}")


@contextmanager
def torchserve(store: Path, home: Path, **settings: str) -> Iterator[tuple[TorchServe, float]]:
    """TorchServe started by serve.sh with ``store`` on free ports (``settings``: more of its environment): its
    client, and the seconds until every model was READY."""
    with (instance := Instance.fresh(home, store=store, **settings)).started() as start:
        yield TorchServe(instance, timeout=120), start.seconds


@contextmanager
def spawned(name: str, command: list[str], url: str, log: Path, probe: bytes, expected: str, timeout: float,
            **popen) -> Iterator[Running]:
    """``command`` started in its own session, its output in ``log``: yields it once it answered ``probe`` with
    ``expected`` in its top class (its start-up: from the spawn to that answer); stops its process tree after."""
    with open(log, "w") as out:
        began = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=die_with_parent, **popen)
        try:
            server = Running(name, url, [process.pid], 0.0)
            server.start_seconds = first_answer(server, probe, expected, began, process.poll, timeout, log)
            yield server
        finally:
            stop_tree(process)


def flask_app(log: Path, probe: bytes, expected: str) -> AbstractContextManager[Running]:
    """The Flask baseline on a free port."""
    [port] = free_ports(1)
    return spawned("Flask app", [sys.executable, "-m", "load_test.flask_app", "--port", str(port)],
                   f"http://127.0.0.1:{port}/predict", log, probe, expected, 120)


@contextmanager
def stock_torchserve(archive: Path, home: Path, probe: bytes, expected: str) -> Iterator[Running]:
    """TorchServe's stock handler as a new user starts it: ``torchserve --start`` with this one archive and
    TorchServe's defaults (a worker per core, batch size 1, no token), on free loopback ports. Yielded once it answered
    ``probe`` correctly, its start-up timed from the command."""
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
    torchserve_cli, pid_file = str(Path(sys.executable).parent / "torchserve"), home / "tmp" / ".model_server.pid"
    (home / "logs").mkdir(exist_ok=True)
    with open(home / "logs" / "torchserve.out", "w") as out:  # Java keeps the CLI's output open: a file, not a pipe
        began = time.perf_counter()
        subprocess.run([torchserve_cli, "--start", "--ncs", "--ts-config", str(config), "--model-store",
                        str(archive.parent), "--models", f"stock={archive.name}"], cwd=home, env=env, stdout=out,
                       stderr=subprocess.STDOUT, check=True)
    pid = None
    try:
        pid = wait_until(lambda: read_pid(pid_file), 30, f"TorchServe (stock handler) starting (see {home / 'logs'})",
                         0.05)
        server = Running("stock handler, TorchServe defaults", f"http://127.0.0.1:{inference}/predictions/stock",
                         [pid], 0.0)
        server.start_seconds = first_answer(server, probe, expected, began, lambda: None if read_pid(pid_file) else 1,
                                            300, home / "logs")
        yield server
    finally:
        processes = process_tree(pid) if pid else []
        subprocess.run([torchserve_cli, "--stop"], cwd=home, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        if not gone(processes, 30.0):
            send(processes, signal.SIGKILL)


def top1(response: requests.Response) -> str:
    """The top class of an image_classifier-shaped answer."""
    response.raise_for_status()
    return next(iter(response.json()))
