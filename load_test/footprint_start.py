"""The footprint's part 1: the demo's start-up, from the spawn of ``serve.sh start`` to every version READY.

A stack (``serving.instance.Instance``) with every archive of the model store, on free ports with its own home and
logs, timed from the spawn of serve.sh, and watched while it starts: a thread polls TorchServe's management API and
``/ping`` every POLL_SECONDS, so that each version's READY moment is known. TorchServe's logs (``ts_log.log``,
``model_log.log``) and /proc (when each process started) give the breakdown: serve.sh before the JVM, the JVM up to
its first log line, each archive's registration, each worker from its spawn to Python up, the load command, the
handler's "ready on" line (imports, model load and warm-up) and READY in the API.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from archives.store import Manifest
from load_test.servers import bearer
from serving.instance import REPO, Instance, ServeError
from serving.torchserve import TorchServe, minimum_workers, ready_workers

CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL_SECONDS = 0.1  # the start-up watcher's polling period
MB = 1e6


def clocks() -> tuple[float, float, float]:
    """Now, on the three clocks a timeline is read from: the wall clock (TorchServe's logs), seconds since boot (when
    a process started, in /proc/<pid>/stat) and ``time.perf_counter`` (what this process times)."""
    return time.time(), time.clock_gettime(time.CLOCK_BOOTTIME), time.perf_counter()


def started_at(pid: int) -> float:
    """When a process started, in seconds since boot: /proc's own clock ticks (psutil's create_time adds them to a
    boot time rounded to the second, too coarse for a timeline)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]) / CLK_TCK


# --- TorchServe's logs ---------------------------------------------------------------------------------------------

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3}) \[(\w+)\s*\] (\S+) (\S+) - (.*)$")
WORKER_THREAD = re.compile(r"^W-(\d+)-(.+)-(stdout|stderr)$")
HANDLER_READY = re.compile(r"^(\w+) ready on (\S+) \(([^)]*)\)")


def log_lines(path: Path) -> Iterator[tuple[float, str, str]]:
    """(wall-clock time, thread, message) of each line of a TorchServe log (log4j2.xml's pattern, local time)."""
    if not path.exists():
        return
    with open(path, errors="replace") as log:
        for line in log:
            if match := LOG_LINE.match(line.rstrip("\n")):
                when = dt.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S,%f").timestamp()
                yield when, match.group(3), match.group(5)


def frontend_events(log_dir: Path, since: float = 0.0) -> dict[str, Any]:
    """From ts_log.log: the first line, each archive's registration (start and end) and the APIs' bind times."""
    events: dict[str, Any] = {"first_line": None, "registrations": [], "bound": {}, "loaded": []}
    pending = None
    for when, _, message in log_lines(log_dir / "ts_log.log"):
        if when < since:
            continue
        if events["first_line"] is None:
            events["first_line"] = when
        if message.startswith("Loading initial models: "):
            pending = (message.split(": ", 1)[1].strip(), when)
        elif message.startswith("Model ") and message.endswith(" loaded."):
            model = message[len("Model "):-len(" loaded.")]
            events["loaded"].append((model, when))
            if pending:
                events["registrations"].append({"archive": pending[0], "model": model, "start": pending[1],
                                                "end": when})
                pending = None
        elif " API bind to: " in message:
            events["bound"][message.split(" API bind to: ")[0].strip()] = when
    return events


def logged(log_dir: Path, since: float = 0.0) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """What TorchServe logged from ``since`` (wall clock): its frontend's events and its workers'."""
    return frontend_events(log_dir, since), worker_events(log_dir, since)


def worker_events(log_dir: Path, since: float = 0.0) -> dict[str, dict[str, Any]]:
    """From model_log.log, for each worker (by its id, the W-<id>- of TorchServe's names): its version's name
    ("<model>_<version>"), its first line (Python up: the worker's socket is listening), the load command it received
    ("model_name: ..."), the handler's "<Class> ready on <device> (<runtime>)" line."""
    workers: dict[str, dict[str, Any]] = {}
    for when, thread, message in log_lines(log_dir / "model_log.log"):
        match = WORKER_THREAD.match(thread)
        if not match or when < since:
            continue
        worker = workers.setdefault(match.group(1), {"name": match.group(2), "python_up": when, "load": None,
                                                     "ready_logged": None, "handler": None, "runtime": None})
        if message.startswith("model_name: ") and worker["load"] is None:
            worker["load"] = when
        ready = HANDLER_READY.match(message)
        if ready and worker["ready_logged"] is None:
            worker["ready_logged"], worker["handler"], worker["runtime"] = when, ready.group(1), ready.group(3)
    return workers


# --- one TorchServe, started and watched ---------------------------------------------------------------------------


class Watcher(threading.Thread):
    """Polls TorchServe's management API (every registered version, its workers) and /ping every POLL_SECONDS while it
    starts; records when each version, each worker, the API and /ping were first seen, and first seen READY."""

    def __init__(self, instance: Instance, began: float):
        super().__init__(daemon=True)
        self.began, self.ts = began, TorchServe(instance, timeout=2)
        self.inference = instance.torchserve("inference")
        self.done = threading.Event()
        self.seen: dict[str, Any] = {"versions": {}, "workers": {}, "api_first": None, "ping_first": None,
                                     "ping_healthy": None, "polls": 0}

    def poll(self) -> None:
        seen = self.seen
        seen["polls"] += 1
        try:
            registered = self.ts.registered()
        except (ServeError, requests.RequestException, ValueError, KeyError):
            return
        now = time.perf_counter() - self.began
        seen["api_first"] = seen["api_first"] or now
        for (model, version), info in registered.items():
            record = seen["versions"].setdefault(f"{model} {version}", {"seen": now, "ready": None})
            if record["ready"] is None and ready_workers(info) >= minimum_workers(info):
                record["ready"] = now
            for worker in info.get("workers", []):
                state = seen["workers"].setdefault(worker["id"], {"version": f"{model} {version}", "seen": now,
                                                                  "ready": None})
                if state["ready"] is None and worker["status"] == "READY":
                    state["ready"] = now
        try:
            answer = requests.get(f"{self.inference}/ping", timeout=2, headers=bearer(self.ts))
        except (ServeError, requests.RequestException):
            return
        now = time.perf_counter() - self.began
        seen["ping_first"] = seen["ping_first"] or now
        if seen["ping_healthy"] is None and answer.status_code == 200:
            seen["ping_healthy"] = now

    def run(self) -> None:
        while not self.done.is_set():
            self.poll()
            self.done.wait(POLL_SECONDS)

    def stop(self) -> dict[str, Any]:
        self.done.set()
        self.join(timeout=10)
        self.poll()  # the state serve.sh left
        return self.seen


@dataclass
class Demo:
    """A started stack: its client and its start (``serve_sh_seconds``, ``output``, ``wall`` and ``boot``: the clocks
    at the spawn of serve.sh, ``watch``: what the Watcher saw)."""

    instance: Instance
    ts: TorchServe
    start: dict[str, Any]

    @property
    def log_dir(self) -> Path:
        return self.instance.log_dir

    def java(self) -> int:
        return self.instance.frontend_pid()

    def health(self) -> int | None:
        return self.instance.pids().get("health checker")

    def nginx(self) -> list[int]:
        """nginx's master, then its workers."""
        master, *workers = [p.pid for p in self.instance.processes().get("nginx master", [])] or [None]
        return [master, *sorted(workers)] if master else []

    def workers(self) -> list[dict[str, Any]]:
        """Every worker: id, pid, status, model, version."""
        return [{**worker, "model": model, "version": version}
                for (model, version), info in self.ts.registered().items() for worker in info.get("workers", [])]

    def headers(self) -> dict[str, str]:
        return bearer(self.ts)


@contextmanager
def started(instance: Instance, watch: bool = True, root: Path = REPO) -> Iterator[Demo]:
    """``instance`` started for the block (``root``: the folder whose serve.sh runs), timed from the spawn of serve.sh
    and, with ``watch``, watched while it starts; stopped after."""
    wall, boot, began = clocks()
    watcher = Watcher(instance, began)
    if watch:
        watcher.start()
    try:
        with instance.started(root=root) as start:
            record = {"serve_sh_seconds": start.seconds, "output": start.output, "wall": wall, "boot": boot}
            if watch:
                record["watch"] = watcher.stop()
            yield Demo(instance, TorchServe(instance, timeout=300), record)
    finally:
        watcher.done.set()


# --- the timeline --------------------------------------------------------------------------------------------------


def start_timeline(demo: Demo, manifest: Manifest) -> dict[str, Any]:
    """Every start-up event in seconds after serve.sh was spawned, per version and per worker, and the phases
    between them."""
    start = demo.start
    wall, boot, watch = start["wall"], start["boot"], start["watch"]

    def since_wall(t: float | None) -> float | None:
        return None if t is None else t - wall

    def since_boot(pid: int | None) -> float | None:
        try:
            return None if pid is None else started_at(pid) - boot
        except OSError:
            return None

    by_archive = {name: (entry["model"], entry["version"]) for entry in manifest.entries()
                  for name in (entry["archive"], Path(entry["archive"]).stem)}
    frontend, workers = logged(demo.log_dir)
    nginx = demo.nginx()
    events = {
        "serve_sh_returned": start["serve_sh_seconds"],
        "java_spawned": since_boot(demo.java()),
        "first_log_line": since_wall(frontend["first_line"]),
        "first_registration": since_wall(frontend["registrations"][0]["start"]) if frontend["registrations"] else None,
        "apis_bound": since_wall(max(frontend["bound"].values())) if frontend["bound"] else None,
        "api_first_answer": watch["api_first"],
        "ping_first_answer": watch["ping_first"],
        "ping_healthy": watch["ping_healthy"],
        "health_checker_spawned": since_boot(demo.health()),
        "nginx_spawned": since_boot(nginx[0] if nginx else None),
    }
    versions: dict[str, dict[str, Any]] = {}
    for entry in manifest.entries():
        versions[f"{entry['model']} {entry['version']}"] = {
            "model": entry["model"], "version": entry["version"], "runtime": entry.get("runtime"),
            "archive_mb": (manifest.store / entry["archive"]).stat().st_size / MB, "registration": None,
            "ready": (watch["versions"].get(f"{entry['model']} {entry['version']}") or {}).get("ready"),
            "workers": []}
    for registration in frontend["registrations"]:
        model, version = by_archive.get(registration["archive"], (registration["model"], "?"))
        if f"{model} {version}" in versions:
            versions[f"{model} {version}"]["registration"] = (since_wall(registration["start"]),
                                                              since_wall(registration["end"]))
            versions[f"{model} {version}"]["served_from"] = (
                "archive" if registration["archive"].endswith(".mar") else "unpacked folder")
    for worker in sorted(demo.workers(), key=lambda w: int(w["id"])):
        key = f"{worker['model']} {worker['version']}"
        log = workers.get(worker["id"], {})
        polled = watch["workers"].get(worker["id"], {})
        versions.setdefault(key, {"model": worker["model"], "version": worker["version"], "runtime": None,
                                  "archive_mb": None, "registration": None, "ready": None, "workers": []})
        versions[key]["workers"].append({
            "id": worker["id"], "pid": worker["pid"], "spawned": since_boot(worker["pid"]),
            "python_up": since_wall(log.get("python_up")), "load_command": since_wall(log.get("load")),
            "handler_ready": since_wall(log.get("ready_logged")), "handler": log.get("handler"),
            "logged_runtime": log.get("runtime"), "ready_polled": polled.get("ready")})
    ready = [v["ready"] for v in versions.values()]
    handler_ready = [w["handler_ready"] for v in versions.values() for w in v["workers"]]
    return {
        "serve_sh_seconds": start["serve_sh_seconds"],
        "all_ready_s": max(ready) if ready and None not in ready else None,
        "all_handlers_ready_s": max(handler_ready) if handler_ready and None not in handler_ready else None,
        "events": events,
        "versions": versions,
        "polls": watch["polls"],
        "workers": sum(len(v["workers"]) for v in versions.values()),
        "serve_output": start["output"][-2000:],
    }
