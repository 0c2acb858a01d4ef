"""The health checker behind the front door's ``/health/live`` and ``/health/ready``, and the keeper of its keys.

TorchServe's own ``/ping`` needs the inference key, says Healthy for minutes while a worker keeps dying and its
restarts back off, and does not count a model that failed to load. Load balancers and probes need better, without a
key. This process (started and stopped by serve.sh, ``python -m manage health``) polls TorchServe's management API
every ``interval`` seconds and answers the front door from what it saw last:

* ``GET /live``: 200 while TorchServe's frontend answers (its last answer is at most ``stale`` seconds old), else 503;
* ``GET /ready``: 200 when every version that receives traffic (each model's default, and every version in an A/B
  split) has its minimum workers (at least one) READY and has not lost ``flapping`` (2) workers within ``window``
  (30) seconds; else 503 naming what is missing. A version whose worker keeps dying is reported at its first death
  (its only worker is not READY while TorchServe restarts it) and stays not ready while it is READY between deaths,
  until 30 s pass without one. A death between two polls (0.5 s apart) that TorchServe repairs before the next one
  can be missed; a worker that keeps dying cannot hide for long. It is also 503 while serve.sh holds the instance
  (``held``): from ``serve.sh drain`` on (a pod's preStop hook), so load balancers stop sending work, and while a
  start applies its A/B splits, so no request sees the defaults alone.

Both answer JSON: ``{"ready": false, "versions": {"digits/2.0": {"ready": 0, "min": 1, "deaths": 2, ...}}}``.

It also keeps the front door's keys current: when TorchServe's key file changes (a renewal) or a key expires, nginx
is rendered again and reloaded (``Proxy.sync_keys``); and it counts what the front door answered, from its access log
(``DoorLog``), for Prometheus: ``GET /metrics`` here, ``/metrics/front_door`` on the front door's metrics port.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from manage.client import (
    READY,
    REPO,
    QuietHandler,
    ServeError,
    TorchServe,
    health_address,
    loopback_server,
    minimum_workers,
    ready_workers,
    serve_home,
    server_alive,
)

logger = logging.getLogger("health")


@dataclass
class VersionHealth:
    """What the checker knows of one registered version: its workers' pids by worker id, and recent deaths."""

    pids: dict[str, int] = field(default_factory=dict)  # worker id → its process, as last seen
    dead: set[int] = field(default_factory=set)  # processes whose death is counted
    deaths: deque = field(default_factory=deque)  # monotonic times a worker's process died
    ready: int = 0
    minimum: int = 1
    states: list[str] = field(default_factory=list)
    ready_pids: set[int] = field(default_factory=set)

    def observe(self, info: dict[str, Any], now: float, window: float) -> None:
        """A death is a READY worker's process seen no longer READY (TorchServe says UNLOADING while it restarts
        the worker), or replaced by another process; each process dies once."""
        workers = info.get("workers", [])
        pids = {str(w["id"]): int(w.get("pid") or -1) for w in workers}
        for w in workers:
            worker, pid = str(w["id"]), pids[str(w["id"])]
            before = self.pids.get(worker)
            gone = before if before is not None and before > 0 and before != pid else None
            down = pid if w["status"] != READY and pid in self.ready_pids else None
            for process in (gone, down):
                if process is not None and process not in self.dead:
                    self.dead.add(process)
                    self.deaths.append(now)
        self.pids = pids
        self.ready_pids = {int(w.get("pid") or -1) for w in workers if w["status"] == READY}
        while self.deaths and self.deaths[0] < now - window:
            self.deaths.popleft()
        self.ready = ready_workers(info)
        self.minimum = minimum_workers(info)
        self.states = [w["status"] for w in workers]


# One line of the front door's access log (proxy/nginx.conf's log_format "front").
LOG_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>/\S*) [^"]*" (?P<status>\d{3}) (?P<seconds>[\d.]+) '
                      r'version=(?P<version>\S*) upstream=\S* retried=(?P<retried>\S*)')
# v2: the Open Inference Protocol (manage/v2.py); each element of a v2 infer is also one of its predictions lines
APIS = ("predictions", "explanations", "v2", "ping", "health", "ab", "metrics", "models")


class DoorLog:
    """What the front door answered, counted from its access log as it grows: requests and their seconds by
    endpoint, model, the version that answered, status and whether it was retried. Labels name only registered
    models and versions (anything else is ``other``), so a client cannot grow the label space."""

    def __init__(self, path) -> None:
        self.path = path
        try:
            self.offset = path.stat().st_size  # count from now: the log outlives a restart
        except OSError:
            self.offset = 0
        self.requests: Counter = Counter()
        self.seconds: Counter = Counter()

    def read(self, known: set[tuple[str, str]]) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size < self.offset:  # rotated or truncated
            self.offset = 0
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            text = log.read(size - self.offset)
        complete = text.rfind(b"\n") + 1
        self.offset += complete
        models = {model for model, _ in known}
        for line in text[:complete].decode("utf-8", "replace").splitlines():
            match = LOG_LINE.search(line)
            if match:
                labels = self.labels(match, models, known)
                self.requests[labels] += 1
                self.seconds[labels] += float(match["seconds"])

    @staticmethod
    def labels(match: re.Match, models: set[str], known: set[tuple[str, str]]) -> tuple[str, ...]:
        parts = match["path"].split("?")[0].split("/")
        api = parts[1] if len(parts) > 1 and parts[1] in APIS else "other"
        model = parts[2] if api in ("predictions", "explanations") and len(parts) > 2 else ""
        if api == "v2" and len(parts) > 3 and parts[2] == "models":  # /v2/models/<model>[/versions/<v>]/...
            model = parts[3]
        model = model if not model or model in models else "other"
        version = match["version"] if (model, match["version"]) in known else ""
        return api, model, version, match["status"], "true" if match["retried"] == "true" else "false"

    def exposition(self) -> str:
        names = ("api", "model", "version", "status", "retried")
        lines = []
        for metric, kind, help_text, values in (
                ("frontdoor_requests_total", "counter", "Requests the front door answered.", self.requests),
                ("frontdoor_request_seconds_total", "counter", "Seconds the front door took to answer them.",
                 self.seconds)):
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
            for labels, value in sorted(values.items()):
                label_text = ",".join(f'{name}="{label}"' for name, label in zip(names, labels))
                lines.append(f"{metric}{{{label_text}}} {value:g}")
        return "\n".join(lines) + "\n"


def held() -> str | None:
    """Why serve.sh holds this instance not ready, if it does: ``serve.sh drain`` (a pod's preStop hook: stopping),
    or a start that has A/B splits still to apply. The reason is the text of ``SERVE_HOME/not-ready``."""
    try:
        return (serve_home() / "not-ready").read_text().strip() or "held not ready by serve.sh"
    except FileNotFoundError:
        return None


class Checker:
    """Polls TorchServe; ``live()`` and ``ready()`` answer from the last poll."""

    def __init__(self, interval: float = 0.5, window: float = 30.0, flapping: int = 2, stale: float = 10.0,
                 defaults_every: int = 5):
        from manage.proxy import Proxy

        self.ts = TorchServe(timeout=5)
        self.proxy = Proxy()
        self.interval, self.window, self.flapping, self.stale = interval, window, flapping, stale
        self.defaults_every = defaults_every
        self.versions: dict[tuple[str, str], VersionHealth] = {}
        self.defaults: dict[str, str] = {}
        self.polls = 0
        self.answered_at: float | None = None
        self.error = "not polled yet"
        self.keys_seen: tuple[float, str] | None = None
        self.lock = threading.Lock()
        self.door = DoorLog(Path(os.environ.get("LOG_DIR", REPO / "logs")) / "proxy-access.log")

    # --- polling ----------------------------------------------------------------------------------------------------

    def poll(self) -> None:
        now = time.monotonic()
        try:
            registered = self.ts.registered()
            if self.polls % self.defaults_every == 0 or set(self.defaults) != {m for m, _ in registered}:
                self.defaults = self.ts.defaults(registered)
        except ServeError as error:
            with self.lock:
                self.error = str(error)
            return
        with self.lock:
            for key in list(self.versions):
                if key not in registered:
                    del self.versions[key]
            for key, info in registered.items():
                self.versions.setdefault(key, VersionHealth()).observe(info, now, self.window)
            self.answered_at, self.error = now, ""
            self.polls += 1
            self.door.read(set(registered))

    def metrics(self) -> str:
        with self.lock:
            return self.door.exposition()

    def sync_keys(self) -> None:
        """Reload the front door when the key file changed or the soonest expiry has passed. With CLIENT_KEYS_FILE,
        clients never hold TorchServe's inference key, so TorchServe's is renewed here before it expires."""
        if os.environ.get("CLIENT_KEYS_FILE"):
            try:
                self.ts.token("inference")  # renews it within TOKEN_MARGIN of its expiry
            except ServeError as error:
                logger.warning("could not renew TorchServe's inference key: %s", error)
        key_file = self.ts.key_file
        try:
            stamp = (key_file.stat().st_mtime, time.strftime("%Y-%m-%dT%H:%M", time.gmtime()))
        except OSError:
            return
        if stamp != self.keys_seen:  # the file changed, or a minute went by (keys expire by the minute)
            try:
                if self.proxy.sync_keys():
                    logger.info("front door reloaded with TorchServe's new keys")
                self.keys_seen = stamp
            except ServeError as error:
                logger.warning("could not render the front door's keys: %s", error)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.poll()
                self.sync_keys()
            except Exception:  # a surprise is logged, and the next poll tries again: the probes must keep answering
                logger.exception("poll failed")
            stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    # --- answers ----------------------------------------------------------------------------------------------------

    def live(self) -> tuple[bool, dict[str, Any]]:
        with self.lock:
            age = None if self.answered_at is None else time.monotonic() - self.answered_at
            alive = server_alive() and age is not None and age <= self.stale
            return alive, {"live": alive, "last_answer_s": None if age is None else round(age, 1),
                           "error": self.error or None}

    def traffic(self) -> set[tuple[str, str]]:
        """The versions that receive traffic: each model's default and every version of its A/B split."""
        versions = {(model, version) for model, version in self.defaults.items()}
        for model, route in self.proxy.routes().models.items():
            versions |= {(model, version) for version in route["split"]}
        return versions

    def ready(self) -> tuple[bool, dict[str, Any]]:
        alive, live = self.live()
        traffic = self.traffic()
        with self.lock:
            report, missing = {}, []
            for model, version in sorted(traffic):
                health = self.versions.get((model, version))
                if health is None:
                    missing.append(f"{model} {version} is not registered")
                    continue
                entry = {"ready": health.ready, "min": health.minimum, "deaths": len(health.deaths),
                         "workers": health.states}
                report[f"{model}/{version}"] = entry
                if health.ready < health.minimum:
                    missing.append(f"{model} {version}: {health.ready} of {health.minimum} workers READY")
                if len(health.deaths) >= self.flapping:
                    missing.append(f"{model} {version}: {len(health.deaths)} workers died in the last "
                                   f"{self.window:g} s")
        reason = held()
        if reason:
            missing.insert(0, reason)
        ready = alive and not missing
        if not alive:
            missing.insert(0, f"TorchServe is not answering: {live['error'] or 'no answer yet'}")
        return ready, {"ready": ready, "versions": report, "not_ready": missing}


def serve(checker: Checker, address: str) -> ThreadingHTTPServer:
    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/metrics":
                payload = checker.metrics().encode()
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            answers = {"/live": checker.live, "/ready": checker.ready}
            if self.path in answers:
                ok, body = answers[self.path]()
            else:
                ok, body = False, {"code": 404, "error": "not_found", "message": "/live or /ready"}
            payload = (json.dumps(body) + "\n").encode()
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            self.send_response(HTTPStatus.NOT_FOUND if self.path not in answers else status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(payload)

        do_HEAD = do_GET


    return loopback_server(address, Handler)


def main() -> None:
    """Run until SIGTERM: poll in one thread, answer in the others."""
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    checker = Checker()
    stop = threading.Event()
    server = serve(checker, health_address())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    logger.info("answering at %s", health_address())
    checker.run(stop)
    server.shutdown()
