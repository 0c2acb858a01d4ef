"""The peers users compare us with, LitServe, BentoML and Ray Serve, serving what our TorchServe serves.

Each peer runs the same ONNX Runtime ``efficientnet_lite0`` (1.1) with the same preprocessing and the same answers as
our handler, through one shared wrapper (``Pipeline``): ``load_test.limit.load_pipeline`` (our handler configured
from the archive, and the model on its runtime) and the handler's own decode, collate, forward and answer, as
``load_test.limit.through`` calls them. The body of a request is the photo's raw bytes, as for ours; the answer is our
JSON (top-5 label → probability).

The apps (``load_test/peer_apps/``) are one small module per peer, each in its framework's own idiom:

* LitServe: a ``LitAPI`` on ``LitServer`` (``workers_per_device``, ``max_batch_size`` / ``batch_timeout``);
* BentoML: a ``@bentoml.service`` (``workers``) with one ``@bentoml.api`` (``batchable=True, max_batch_size``),
  started by ``bentoml serve``;
* Ray Serve: a ``@serve.deployment`` (``num_replicas``, ``max_ongoing_requests`` raised from its default, below)
  whose ``__call__`` awaits a ``@serve.batch`` method, on a local Ray started by the app (raylet, GCS, dashboard,
  Serve's controller and HTTP proxy, the replicas).

Their settings reach them in the environment (``PEER_SETTINGS``, JSON). ``serve(peer, settings, ...)`` starts one
on a free port and yields when it answered a real photo correctly (the time from spawning it to that answer is its
start-up), and stops its whole process tree afterwards.

This module is imported by the apps, so it imports nothing heavy at its top (the bench side imports its helpers when
called).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = "PEER_SETTINGS"
PEERS = {"litserve": "LitServe", "bentoml": "BentoML", "ray": "Ray Serve"}
WAIT_MS = 2.0  # how long a batch waits to fill (LitServe's batch_timeout, Ray Serve's batch_wait_timeout_s)
# BentoML's window is adaptive (it learns how long a batch takes); its max_latency_ms is a latency budget past which
# queued requests are refused with 503, not a wait: set where no run here reaches it
BENTOML_MAX_LATENCY_MS = 60_000
# Ray Serve's default max_ongoing_requests (5 per replica) makes its proxy back off and retry while every replica holds
# 5: at 16 and 64 clients its throughput fell to 45.6 and 16.9 req/s (2 replicas) against 74.7 and 61.6 with room
# for every client. The other servers queue without such a bound (TorchServe: job_queue_size 1000), so Ray's is raised
RAY_MAX_ONGOING_REQUESTS = 100
START_TIMEOUT = 240.0


@dataclass(frozen=True)
class Settings:
    """One peer's settings: worker processes (replicas), ONNX Runtime intra-op threads in each, and dynamic batching
    (``batch`` 1: off; else the largest batch and how long a batch waits to fill)."""

    workers: int
    threads: int
    batch: int = 1
    wait_ms: float = 0.0

    def name(self, peer: str = "") -> str:
        """E.g. ``2 x 1 thread, batch 4, wait 2 ms`` (workers x threads each); BentoML's wait is its own (adaptive)."""
        wait = "adaptive wait" if peer == "bentoml" else f"wait {self.wait_ms:g} ms"
        batching = "batching off" if self.batch == 1 else f"batch {self.batch}, {wait}"
        return f"{self.workers} x {self.threads} thread{'s' if self.threads > 1 else ''}, {batching}"


def grid() -> list[Settings]:
    """The sweep for 2 cores: 1 or 2 workers of one thread each, or 1 worker of 2 threads; batching off, or up to 2
    or 4 with a short wait."""
    return [Settings(workers, threads, batch, WAIT_MS if batch > 1 else 0.0)
            for workers, threads in ((1, 1), (2, 1), (1, 2)) for batch in (1, 2, 4)]


QUICK_GRID = [Settings(1, 1, 2, WAIT_MS)]  # --quick: one setting, batching on, so the batching path is exercised


# --- the app side: what every peer app calls ----------------------------------------------------------------------


def app_settings() -> tuple[Settings, dict]:
    """The settings a peer app was started with, and the rest (archive, port, ...)."""
    given = json.loads(os.environ[ENV])
    fields = {key: given.pop(key) for key in ("workers", "threads", "batch", "wait_ms")}
    return Settings(**fields), given


class Pipeline:
    """Our handler's own steps on the archive's model, as ``load_test.limit.through`` runs them: one list of request
    bodies (raw photo bytes) in, one answer (label → probability, top 5) per body out. Warmed up as our worker is
    before it reports READY."""

    def __init__(self, archive: str | Path, threads: int):
        from load_test.limit import load_pipeline, through

        self.handler, self.model = load_pipeline(Path(archive), threads)
        self.through = through
        for _ in range(int(self.handler.settings.get("warmup_runs", 0))):
            self.handler.forward(self.model, self.handler.example_input())

    def __call__(self, bodies: list[bytes]) -> list:
        return self.through(self.handler, self.model, list(bodies))

    def one(self, body: bytes):
        return self([body])[0]


# --- the bench side: start, stop, measure ---------------------------------------------------------------------------


def command(peer: str, port: int) -> list[str]:
    if peer == "bentoml":
        return [str(Path(sys.executable).parent / "bentoml"), "serve", "load_test.peer_apps.bentoml_app:Classifier",
                "--host", "127.0.0.1", "--port", str(port), "--working-dir", str(REPO)]
    return [sys.executable, "-m", f"load_test.peer_apps.{peer}_app"]


@contextmanager
def serve(peer: str, settings: Settings, archive: Path, folder: Path, probe: bytes, expected: str):
    """``peer`` with ``settings`` on a free loopback port, its output in ``folder/<peer>.log``: yields a
    ``servers.Running`` once it answered ``probe`` with ``expected`` in its top class; stops its process tree after."""
    from load_test import servers
    from serving.instance import free_ports

    [port] = free_ports(1)
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{peer}-"))  # Ray's sockets need a short path
    given = {**asdict(settings), "archive": str(archive), "port": port, "scratch": str(scratch)}
    env = {**os.environ, ENV: json.dumps(given), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
           # no network here: their usage reports off; BentoML's home in the scratch folder
           "BENTOML_HOME": str(scratch / "bentoml"), "BENTOML_DO_NOT_TRACK": "True", "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        with servers.spawned(PEERS[peer], command(peer, port), f"http://127.0.0.1:{port}/predict",
                             folder / f"{peer}.log", probe, expected, START_TIMEOUT, env=env) as running:
            yield running
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
