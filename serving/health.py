"""The health checker behind the front door's ``/health/live`` and ``/health/ready``, and the keeper of its keys.

TorchServe's own ``/ping`` needs the inference key, says Healthy for minutes while a worker keeps dying and its
restarts back off, and does not count a model that failed to load. Load balancers and probes need better, without a
key. This process (started and stopped by serve.sh, ``python -m manage health``) polls TorchServe's management API
every ``interval`` seconds (``STARTING_INTERVAL`` until every version is ready the first time, which serve.sh start
waits for) and answers the front door from what it saw last:

* ``GET /live``: 200 while TorchServe's frontend answers (its last answer is at most ``stale`` seconds old), else 503;
* ``GET /ready``: 200 when every version that receives traffic (each model's default, and every version in an A/B
  split) has its minimum workers (at least one) READY and has not lost ``flapping`` (2) workers within ``window``
  (30) seconds; else 503 naming what is missing. A version whose worker keeps dying is reported at its first death
  (its only worker is not READY while TorchServe restarts it) and stays not ready while it is READY between deaths,
  until 30 s pass without one. A death between two polls (0.5 s apart) that TorchServe repairs before the next one
  can be missed; a worker that keeps dying cannot hide for long. It is also 503 while serve.sh holds the instance
  (``held``): from ``serve.sh drain`` on (a pod's preStop hook), so load balancers stop sending work, and while a
  start applies its A/B splits, so no request sees the defaults alone.

Both answer JSON: ``{"ready": false, "versions": {"digits/2.0": {"ready": 0, "min": 1, "deaths": 2, ...}}}``. They
need no key, but name models and versions only to a caller with one: the front door's ``/health/`` location sends
``X-Inference-Key-Ok`` (nginx's ``$inference_key_ok``, 1 or 0; a client's own header of that name is replaced), and a
caller without a key is told whether it is ready and why in general terms only (``{"ready": false, "not_ready":
["1 version that takes traffic is not ready"]}``). A caller on loopback that did not come through the front door
(serve.sh's ``wait-front``, the v2 gateway) sends no such header and is told everything.

It also keeps the front door's keys current: when TorchServe's key file changes (a renewal) or a key expires, nginx
is rendered again and reloaded (``Proxy.sync_keys``); it counts what the front door answered, from its access log
(``DoorLog``), for Prometheus: ``GET /metrics`` here, ``/metrics/front_door`` on the front door's metrics port; and,
every ``ROTATE_SECONDS`` in a thread of its own (whether TorchServe answers or not), it rotates the logs nobody else
bounds (``serving/logs.py``): nginx's two, renamed and reopened (USR1), and ``torchserve.out``, copied and truncated.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily

from serving.instance import Instance, ServeError
from serving.logs import (
    ACCESS_LOG,
    CONSOLE_LOG,
    ERROR_LOG,
    ROTATE_SECONDS,
    copy_truncate,
    log_dir,
    rotate_renamed,
    toolkit_caps,
    truncate_stuck,
)
from serving.loopback import QuietHandler, loopback_server
from serving.torchserve import READY, TorchServe, minimum_workers, ready_workers

logger = logging.getLogger("health")
# Set by the front door's /health/ location to nginx's $inference_key_ok: "1" when the caller's key passed, "0" when
# not (serving/nginx.conf.j2); absent when a caller on loopback asks the checker directly.
KEY_HEADER = "X-Inference-Key-Ok"


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


# One line of the front door's access log (serving/nginx.conf.j2's log_format "front"). upstream is "-/-" when nginx
# answered itself (a 401, 405 or 413, a client that stalled), else the status and time of what it passed it on to.
LOG_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>/\S*) [^"]*" (?P<status>\d{3}) (?P<seconds>[\d.]+) '
                      r'version=(?P<version>\S*) upstream=(?P<upstream>.*?) retried=(?P<retried>\S*)')
# v2: the Open Inference Protocol (serving/v2.py); each element of a v2 infer is also one of its predictions lines
APIS = ("predictions", "explanations", "v2", "ping", "health", "ab", "metrics", "models")
LABELS = ("api", "model", "version", "status", "retried")


class Tail:
    """One file of the access log, read through a descriptor of its own as it grows: complete lines only, and it
    stays readable after nginx's file is renamed away by a rotation."""

    def __init__(self, path: Path, at_end: bool) -> None:
        self.file = open(path, "rb")  # held open across reads: close() closes it
        stat = os.fstat(self.file.fileno())
        self.inode = stat.st_ino
        self.offset = stat.st_size if at_end else 0

    def read(self) -> bytes:
        size = os.fstat(self.file.fileno()).st_size
        if size < self.offset:  # truncated
            self.offset = 0
        self.file.seek(self.offset)
        text = self.file.read(size - self.offset)
        complete = text.rfind(b"\n") + 1
        self.offset += complete
        return text[:complete]

    def close(self) -> None:
        self.file.close()


class DoorLog:
    """What the front door answered, counted from its access log as it grows: requests and their seconds by
    endpoint, model, the version that answered, status and whether it was retried; and, of those, the requests it
    passed on (``forwarded``: to TorchServe, the v2 gateway or the health checker, which on /predictions and
    /explanations it does only after the key check), the ones the autoscaler counts: a stranger's 401 is not load.
    Labels name only registered models and versions (anything else is ``other``), so a client cannot grow the label
    space.

    Rotation: the file being read is held open, so when the health checker renames it away the lines nginx's workers
    still write into it (until they reopen) are read from it before the new file; a further rotation waits until
    that file has stopped growing (``settled``), so no file is left unread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.current = self._open(at_end=True)  # count from now: the log outlives a restart
        self.previous: Tail | None = None
        self.previous_grew = False
        self.requests: Counter = Counter()
        self.seconds: Counter = Counter()
        self.forwarded: Counter = Counter()
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def _open(self, at_end: bool) -> Tail | None:
        try:
            return Tail(self.path, at_end)
        except FileNotFoundError:
            return None

    @property
    def settled(self) -> bool:
        """Whether the file rotated last has stopped growing: nginx writes only into the current one."""
        return self.previous is None or not self.previous_grew

    def lines(self) -> bytes:
        """The complete lines written since the last call, oldest first, across a rotation."""
        text = b""
        if self.previous is not None:
            text = self.previous.read()
            self.previous_grew = bool(text)
        try:
            inode = self.path.stat().st_ino
        except FileNotFoundError:
            inode = None
        if self.current is None:
            self.current = self._open(at_end=False)  # it appeared: every line of it is new
        elif inode != self.current.inode:  # renamed away: read to its end, then the new file from its start
            tail = self.current.read()
            text += tail
            if self.previous is not None:
                self.previous.close()
            self.previous, self.previous_grew = self.current, bool(tail)
            self.current = self._open(at_end=False)
        if self.current is not None:
            text += self.current.read()
        return text

    def rewind_previous(self) -> None:
        """The file rotated last was emptied in place (nginx kept writing into it): read it from its start."""
        if self.previous is not None:
            self.previous.offset = 0

    def count(self, text: bytes, known: set[tuple[str, str]]) -> None:
        models = {model for model, _ in known}
        for line in text.decode("utf-8", "replace").splitlines():
            match = LOG_LINE.search(line)
            if match:
                labels = self.labels(match, models, known)
                self.requests[labels] += 1
                self.seconds[labels] += float(match["seconds"])
                if not match["upstream"].startswith("-"):
                    self.forwarded[labels] += 1

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

    def collect(self) -> Iterator[CounterMetricFamily]:
        """prometheus_client's collector protocol: the counts as counters, labels escaped by the library."""
        for metric, help_text, values in (
                ("frontdoor_requests", "Requests the front door answered.", self.requests),
                ("frontdoor_request_seconds", "Seconds the front door took to answer them.", self.seconds),
                ("frontdoor_forwarded_requests",
                 "Requests the front door passed on, after the key check where one is needed (not its own 401, "
                 "405, 413).", self.forwarded)):
            family = CounterMetricFamily(metric, help_text, labels=LABELS)
            for labels, value in sorted(values.items()):
                family.add_metric(labels, value)
            yield family

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


def held(instance: Instance) -> str | None:
    """Why serve.sh holds this instance not ready, if it does: ``serve.sh drain`` (a pod's preStop hook: stopping),
    or a start that has A/B splits still to apply. The reason is the text of ``SERVE_HOME/not-ready``."""
    try:
        return (instance.home / "not-ready").read_text().strip() or "held not ready by serve.sh"
    except FileNotFoundError:
        return None


STARTING_INTERVAL = 0.1  # s between polls until every version is ready the first time


class Checker:
    """Polls TorchServe; ``live()`` and ``ready()`` answer from the last poll."""

    def __init__(self, interval: float = 0.5, window: float = 30.0, flapping: int = 2, stale: float = 10.0,
                 defaults_every: int = 5):
        from serving.front_door import Proxy

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
        self.logs = log_dir()
        self.caps = toolkit_caps()
        self.door = DoorLog(self.logs / ACCESS_LOG)

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
        starting = True  # until ready the first time, polled every STARTING_INTERVAL: serve.sh start waits on it
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.poll()
                self.sync_keys()
                starting = starting and not self.ready(detailed=False)[0]
            except Exception:  # a surprise is logged, and the next poll tries again: the probes must keep answering
                logger.exception("poll failed")
            interval = min(self.interval, STARTING_INTERVAL) if starting else self.interval
            stop.wait(max(0.0, interval - (time.monotonic() - started)))

    # --- the logs ---------------------------------------------------------------------------------------------------

    def tend_logs(self) -> None:
        """Count the access log's new lines (labelled by the versions the last poll saw), then rotate each log that
        has reached its size: nginx's by renaming them (the access log once the last rotated file has settled) and
        USR1 to nginx's master (a renamed one nginx kept writing past its bound is emptied), torchserve.out by
        copying and truncating it."""
        text = self.door.lines()
        with self.lock:
            self.door.count(text, set(self.versions))
        for name in (ACCESS_LOG, ERROR_LOG):
            stuck = truncate_stuck(self.logs / name, self.caps[name])
            if stuck and name == ACCESS_LOG:
                self.door.rewind_previous()
            if stuck:
                logger.warning("%s.1 grew to %d bytes after its rotation: nginx's workers did not reopen %s (as "
                               "root they run as nobody: can they reach %s?); emptied it in place", name, stuck,
                               name, self.logs)
            if name == ACCESS_LOG and not self.door.settled:
                continue
            size = rotate_renamed(self.logs / name, self.caps[name], self.reopen_nginx_logs)
            if size:
                logger.info("rotated %s at %d bytes", name, size)
        size = copy_truncate(self.logs / CONSOLE_LOG, self.caps[CONSOLE_LOG])
        if size:
            logger.info("rotated %s at %d bytes (copied, then truncated)", CONSOLE_LOG, size)

    def reopen_nginx_logs(self) -> None:
        master = self.proxy.master()
        if master is None:
            return  # not running: it creates its logs when it starts
        try:
            os.kill(master, signal.SIGUSR1)
        except ProcessLookupError:
            logger.info("nginx (pid %d) stopped before it reopened its logs", master)

    def keep_logs(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tend_logs()
            except Exception:  # logged; the next round tries again: a full disk must not stop the probes
                logger.exception("tending the logs failed")
            stop.wait(ROTATE_SECONDS)

    # --- answers ----------------------------------------------------------------------------------------------------

    def live(self, detailed: bool = True) -> tuple[bool, dict[str, Any]]:
        """``detailed``: with TorchServe's last error (it can name a model); for a caller with the inference key."""
        with self.lock:
            age = None if self.answered_at is None else time.monotonic() - self.answered_at
            alive = self.ts.instance.alive() and age is not None and age <= self.stale
            body = {"live": alive, "last_answer_s": None if age is None else round(age, 1)}
            if detailed:
                body["error"] = self.error or None
            return alive, body

    def traffic(self) -> set[tuple[str, str]]:
        """The versions that receive traffic: each model's default and every version of its A/B split."""
        versions = {(model, version) for model, version in self.defaults.items()}
        for model, route in self.proxy.routes().models.items():
            versions |= {(model, version) for version in route["split"]}
        return versions

    def ready(self, detailed: bool = True) -> tuple[bool, dict[str, Any]]:
        """``detailed``: naming each version and what it lacks; else only how many versions are not ready."""
        alive, live = self.live()
        traffic = self.traffic()
        with self.lock:
            report, missing, lacking = {}, [], 0
            for model, version in sorted(traffic):
                health = self.versions.get((model, version))
                lacking += health is None or health.ready < health.minimum or len(health.deaths) >= self.flapping
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
        reason = held(self.ts.instance)
        general = [reason] if reason else []  # serve.sh's words: draining, applying the splits
        ready = alive and not missing and not general
        if not alive:
            general.insert(0, "TorchServe is not answering" + (f": {live['error'] or 'no answer yet'}" if detailed
                                                                else ""))
        if detailed:
            return ready, {"ready": ready, "versions": report, "not_ready": general + missing}
        if lacking:
            many = lacking > 1
            general.append(f"{lacking} {'versions that take' if many else 'version that takes'} traffic "
                           f"{'are' if many else 'is'} not ready (a caller with the inference key is told which)")
        return ready, {"ready": ready, "not_ready": general}


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
            key_ok = self.headers.get(KEY_HEADER)
            if self.path in answers:
                ok, body = answers[self.path](detailed=key_ok is None or key_ok == "1")
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
    """Run until SIGTERM: poll in one thread, tend the logs in another, answer in the others. Its own log is set up
    by ``python -m manage health`` (``serving.logs.log_to_file``)."""
    checker = Checker()
    stop = threading.Event()
    address = checker.ts.instance.health
    server = serve(checker, address)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    threading.Thread(target=checker.keep_logs, args=(stop,), daemon=True, name="logs").start()
    logger.info("answering at %s", address)
    checker.run(stop)
    server.shutdown()
