"""``python -m load_test.footprint``: start-up, memory and the frontend's CPU of the demo, measured and printed against
their targets.

1. start-up: a fresh TorchServe (``serve.sh start`` on free ports, its own SERVE_HOME and LOG_DIR) with every archive of
   the model store, timed from the spawn of ``serve.sh``. While it starts, a thread polls TorchServe's management API
   and its ``/ping`` every 0.1 s, so that each version's READY moment is known; TorchServe's logs (``ts_log.log``,
   ``model_log.log``) and /proc (the start time of every process) give the breakdown: serve.sh before the JVM, the JVM
   up to its first log line, each archive's registration (extraction), each worker from its process spawn to Python
   up, the load command, the handler's "ready on" line (imports, model load and warm-up) and READY in the API;
2. memory: after a few real requests to every version (through the front door, with the inference key), the PSS
   (``/proc/<pid>/smaps_rollup``) of every process of the demo: the frontend's JVM, each worker (mapped to its version
   by the management API's ``workers[].pid``), nginx (master and workers) and the health checker; for each worker
   whether torch (``libtorch_cpu``) and ONNX Runtime are mapped into it, and the runtime its version is built for;
3. register → READY: one version registered alone (1 worker) into the running demo, until its worker is READY,
   repeated; the ONNX Runtime version of efficientnet_lite0 and, for comparison, its TorchScript version (from the
   unpacked folder, as ``manage register`` does, and the ONNX Runtime version from its .mar too);
4. the frontend's CPU: wrk (one thread, 16 connections, closed loop) against digits and efficientnet_lite0, through
   the front door and straight to TorchServe's inference port: the Java process's CPU time (``/proc/<pid>/stat``,
   and per thread) per answered request and its share of all the CPU the machine used; then TorchServe settings
   that might cut it, each on a fresh TorchServe (digits 2.0 only), the settings taking turns round after round; and
   TorchServe's access log without and with its line per prediction, in turns within one TorchServe (log4j
   re-reading a copy of log4j2.xml), the same JVM measured with and without the line.

``--quick`` skips part 4 and repeats part 3 once (the harness test). Output in ``load_test/results/`` (or ``--out``):
``footprint.md``, ``footprint.json``, ``footprint_timeline.png``, ``footprint_pss.png`` and, with part 4,
``footprint_cpu.png``. ``run()`` and ``markdown()`` are what a caller (``bench.py``) uses.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self
from unittest import mock

import requests
import yaml

from archives.store import Manifest
from load_test import inputs
from serving.instance import REPO, ServeError
from serving.instance import Instance as Stack
from serving.torchserve import TorchServe, minimum_workers, ready_workers

RESULTS = REPO / "load_test" / "results"
WRK_SCRIPT = REPO / "load_test" / "wrk.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL_SECONDS = 0.1  # the start-up watcher's polling period
REQUESTS_PER_WORKER = 4  # warm-up requests per worker of every version
CONCURRENCY = 16
IDLE_SECONDS = 3.0  # the frontend's CPU at rest, measured before each loaded run
JIT_CHUNK_S, JIT_MAX_S, JIT_QUIET_CORES = 3.0, 60.0, 0.02  # JIT warm-up: chunks of load until its threads are quiet
REGISTERED = (("efficientnet_lite0", "1.1"), ("efficientnet_lite0", "1.0"))  # part 3: the target, then the comparison
CPU_MODELS = ("digits", "efficientnet_lite0")
VARIANT_STORE = (("digits", "2.0"),)  # what the fresh TorchServes of the settings experiment serve
ACCESS_TURNS = 4  # part 4c: the access log with and without predictions in one JVM, this many times each
MB = 1e6

# Targets on this project's 2-core machine.
START_TARGET_S = 10.0
REGISTER_TARGET_S = 1.5
ONNX_WORKER_TARGET_MB = 150.0
TOTAL_TARGET_MB = 1500.0

# The settings tried against the frontend's CPU per request: (name, how it is set, environment, config.properties
# lines). TS_<KEY> variables override config.properties (enable_envvars_config) for the keys TorchServe reads after
# the file; vmargs is read by TorchServe's Python launcher, so it gets a copy of the file (the launcher and the
# frontend both take TS_CONFIG_FILE over --ts-config). async_logging=true (config.properties) is read before the
# environment and after log4j has started, which leaves it without effect (the run reports whether an async logger
# thread exists); log4j's own switch to asynchronous loggers is the JVM property tried here.
ASYNC_LOGGERS = "-Dlog4j2.contextSelector=org.apache.logging.log4j.core.async.AsyncLoggerContextSelector"


def variants() -> list[tuple[str, str, dict[str, str], dict[str, Any]]]:
    """The settings tried, relative to config.properties and log4j2.xml as they are now. A config.properties value
    may be a function of the file's value (None: the key is left out)."""
    from serving.instance import Instance as Stack

    vmargs = Stack.current().properties().get("vmargs", "")
    found = [
        ("shipped", "config.properties and log4j2.xml as they are", {}, {}),
        ("number_of_netty_threads=1", "TS_NUMBER_OF_NETTY_THREADS=1", {"TS_NUMBER_OF_NETTY_THREADS": "1"}, {}),
        ("number_of_netty_threads=2", "TS_NUMBER_OF_NETTY_THREADS=2", {"TS_NUMBER_OF_NETTY_THREADS": "2"}, {}),
        ("netty_client_threads=1", "TS_NETTY_CLIENT_THREADS=1", {"TS_NETTY_CLIENT_THREADS": "1"}, {}),
        ("netty_client_threads=2", "TS_NETTY_CLIENT_THREADS=2", {"TS_NETTY_CLIENT_THREADS": "2"}, {}),
        ("access log of every request", "ACCESS_LOG_SKIP=none (log4j2.xml)", {"ACCESS_LOG_SKIP": "none"}, {}),
        ("access log off", "ACCESS_LOG_LEVEL=off (log4j2.xml)", {"ACCESS_LOG_LEVEL": "off"}, {}),
        ("asynchronous loggers", f"vmargs + {ASYNC_LOGGERS}", {},
         {"vmargs": lambda value: f"{value or ''} {ASYNC_LOGGERS}".strip()}),
        ("metrics_mode=log", "TS_METRICS_MODE=log", {"TS_METRICS_MODE": "log"}, {}),
        ("prefer_direct_buffer=true", "TS_PREFER_DIRECT_BUFFER=true", {"TS_PREFER_DIRECT_BUFFER": "true"}, {}),
    ]
    if "-XX:TieredStopAtLevel=1" in vmargs:
        found.append(("C2 too (no -XX:TieredStopAtLevel=1)", "vmargs without -XX:TieredStopAtLevel=1", {},
                      {"vmargs": lambda value: " ".join(a for a in value.split() if a != "-XX:TieredStopAtLevel=1")}))
    if vmargs:
        found.append(("the JVM's defaults (no vmargs)", ("config.properties without vmargs (G1, C1 and C2, "
                      "heap from 1/64 of memory)"), {}, {"vmargs": None}))
    else:
        found.append(("vmargs=-XX:+UseSerialGC", "vmargs=-XX:+UseSerialGC", {}, {"vmargs": "-XX:+UseSerialGC"}))
    return found


def say(message: str) -> None:
    print(message, flush=True)


# --- /proc ---------------------------------------------------------------------------------------------------------


def boot_clock() -> float:
    """Seconds since boot, the clock of a process's start time in /proc/<pid>/stat."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def stat_fields(path: str) -> list[str]:
    """The fields of a /proc stat file after the command name (field 3, the state, is index 0)."""
    return Path(path).read_text().rpartition(")")[2].split()


def started_at(pid: int) -> float:
    """When a process started, in seconds since boot."""
    return int(stat_fields(f"/proc/{pid}/stat")[19]) / CLK_TCK


def cpu_seconds(pid: int, children: bool = False) -> float:
    """CPU seconds (user + system) a process used; ``children``: those of the children it waited for."""
    fields = stat_fields(f"/proc/{pid}/stat")
    first = 13 if children else 11
    return (int(fields[first]) + int(fields[first + 1])) / CLK_TCK


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (OSError, IndexError):
            pass
    return total


def thread_seconds(pid: int) -> dict[str, tuple[str, float]]:
    """Thread id → (name, CPU seconds) of every thread of a process."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = stat_fields(str(task / "stat"))
        except OSError:
            continue
        threads[task.name] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return threads


def thread_group(name: str) -> str:
    """The JVM's threads by what they do (Linux keeps the first 15 characters of a Java thread's name)."""
    if name.startswith(("epollEventLoop", "nioEventLoop")):
        return "netty event loops (HTTP, worker sockets)"
    if name.startswith("W-"):
        return "worker threads (W-*: batching, worker stdout/stderr readers)"
    if "Compiler" in name:
        return "JIT compilers"
    if name.startswith(("GC ", "G1 ", "VM Thread")) or "GC" in name:
        return "garbage collector, VM"
    if name.startswith("Log4j"):
        return "log4j"
    return "other"


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def busy_cores(before: tuple[float, float], after: tuple[float, float]) -> float:
    return (after[0] - before[0]) / max(after[1] - before[1], 1e-9) * os.cpu_count()


def settle(idle_cores: float = 0.3, timeout: float = 20.0) -> float:
    """Wait (up to ``timeout``) until the machine is nearly idle; returns the busy cores last seen (other work on a
    shared machine may keep it busy)."""
    deadline = time.monotonic() + timeout
    previous = machine_busy()
    cores = float(os.cpu_count())
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = machine_busy()
        cores = busy_cores(previous, current)
        if cores < idle_cores:
            break
        previous = current
    return cores


def memory_mb(pid: int) -> tuple[float, float]:
    """(PSS, RSS) of a process in MB, from /proc/<pid>/smaps_rollup."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            values[parts[0].rstrip(":")] = int(parts[1]) * 1024 / MB
    return values["Pss"], values["Rss"]


def mapped_libraries(pid: int) -> dict[str, bool]:
    """Whether torch (libtorch_cpu) and ONNX Runtime are mapped into a process."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {"torch": "libtorch_cpu" in maps, "onnxruntime": "onnxruntime" in maps}


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(stat_fields(f"/proc/{entry.name}/stat")[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


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
            match = LOG_LINE.match(line.rstrip("\n"))
            if match:
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


# --- one TorchServe ------------------------------------------------------------------------------------------------


class Watcher(threading.Thread):
    """Polls TorchServe's management API (every registered version, its workers) and /ping every POLL_SECONDS while it
    starts; records when each version, each worker, the API and /ping were first seen, and first seen READY."""

    def __init__(self, began: float):
        super().__init__(daemon=True)
        self.began = began
        self.ts = TorchServe(timeout=2)
        self.inference = Stack.current().torchserve("inference")
        self.done = threading.Event()
        self.versions: dict[str, dict[str, Any]] = {}
        self.workers: dict[str, dict[str, Any]] = {}
        self.api_first: float | None = None
        self.ping_first: float | None = None
        self.ping_healthy: float | None = None
        self.polls = 0

    def now(self) -> float:
        return time.perf_counter() - self.began

    def poll(self) -> None:
        self.polls += 1
        try:
            registered = self.ts.registered()
        except (ServeError, requests.RequestException, ValueError, KeyError):
            return
        seen = self.now()
        if self.api_first is None:
            self.api_first = seen
        for (model, version), info in registered.items():
            record = self.versions.setdefault(f"{model} {version}", {"seen": seen, "ready": None})
            if record["ready"] is None and ready_workers(info) >= minimum_workers(info):
                record["ready"] = seen
            for worker in info.get("workers", []):
                state = self.workers.setdefault(worker["id"], {"version": f"{model} {version}", "seen": seen,
                                                               "ready": None})
                if state["ready"] is None and worker["status"] == "READY":
                    state["ready"] = seen
        try:
            answer = requests.get(f"{self.inference}/ping", timeout=2,
                                  headers={"Authorization": f"Bearer {self.ts.token('inference')}"})
        except (ServeError, requests.RequestException):
            return
        seen = self.now()
        if self.ping_first is None:
            self.ping_first = seen
        if self.ping_healthy is None and answer.status_code == 200:
            self.ping_healthy = seen

    def run(self) -> None:
        while not self.done.is_set():
            self.poll()
            self.done.wait(POLL_SECONDS)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)
        self.poll()  # the state serve.sh left


class Instance:
    """``serve.sh start`` of ``store`` with its own SERVE_HOME, LOG_DIR and free ports, timed and watched; ``serve.sh
    stop`` at the end. ``env``: more environment (TS_<KEY> overrides, ACCESS_LOG_LEVEL, TS_CONFIG_FILE); ``root``: the
    folder whose serve.sh runs (``log_root``: this repository seen through links, with a log4j2.xml of its own)."""

    def __init__(self, home: Path, store: Path, env: dict[str, str] | None = None, watch: bool = True,
                 root: Path = REPO):
        self.home, self.store, self.watch, self.root = home, store, watch, root
        self.env = {**Stack.fresh(home, store=str(store)).environment(), **(env or {})}
        self.patch = mock.patch.dict(os.environ, self.env)  # serve.sh, the client and python -m manage all read it
        self.start: dict[str, Any] = {}
        self.ts: TorchServe | None = None
        self.log_dir = Path(self.env["LOG_DIR"])

    def __enter__(self) -> Self:
        self.patch.start()
        try:
            self._start()
        except BaseException:
            self._stop()
            self.patch.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._stop()
        finally:
            self.patch.stop()

    def _start(self) -> None:
        wall, boot, began = time.time(), boot_clock(), time.perf_counter()
        watcher = Watcher(began) if self.watch else None
        if watcher:
            watcher.start()
        run = subprocess.run([str(self.root / "serve.sh"), "start"], capture_output=True, text=True, timeout=600,
                             check=False)
        seconds = time.perf_counter() - began
        if watcher:
            watcher.stop()
        if run.returncode != 0:
            raise RuntimeError(f"serve.sh start failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        self.ts = TorchServe(timeout=300)
        self.start = {"serve_sh_seconds": seconds, "output": run.stdout, "wall": wall, "boot": boot}
        if watcher:
            self.start["watch"] = {"versions": watcher.versions, "workers": watcher.workers,
                                   "api_first": watcher.api_first, "ping_first": watcher.ping_first,
                                   "ping_healthy": watcher.ping_healthy, "polls": watcher.polls}

    def _stop(self) -> None:
        subprocess.run([str(self.root / "serve.sh"), "stop"], capture_output=True, text=True, timeout=300, check=False)

    # the processes of the demo
    def java(self) -> int:
        return int((Stack.current().home / "tmp" / ".model_server.pid").read_text().strip())

    def health(self) -> int | None:
        return Stack.current().pids().get("health checker")

    def nginx(self) -> list[int]:
        from serving.front_door import Proxy

        master = Proxy().master()
        return [master, *children(master)] if master else []

    def workers(self) -> list[dict[str, Any]]:
        """Every worker: id, pid, status, model, version."""
        found = []
        for (model, version), info in self.ts.registered().items():
            for worker in info.get("workers", []):
                found.append({**worker, "model": model, "version": version})
        return found

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.ts.token('inference')}"}


def link_tree(source: Path, target: Path) -> None:
    """``source`` copied as hard links (a file of the copy must be replaced, never written in place)."""
    from load_test.servers import link_or_copy

    shutil.copytree(source, target, copy_function=lambda a, b: link_or_copy(Path(a), Path(b)))


def model_store(folder: Path, manifest: Manifest, keep: Callable[[dict], bool] = lambda entry: True) -> Path:
    """A model store of its own, as model_store/ is: the built archives ``keep`` selects, their unpacked folders where
    the store has them (hard links) and their manifest entries; this script's TorchServes add to it without touching
    model_store/."""
    from load_test.servers import link_or_copy

    folder.mkdir(parents=True, exist_ok=True)
    own = Manifest(folder)
    for entry in manifest.entries():
        if keep(entry):
            archive = manifest.store / entry["archive"]
            link_or_copy(archive, folder / archive.name)
            if archive.with_suffix("").is_dir():
                link_tree(archive.with_suffix(""), folder / archive.with_suffix("").name)
            own.models.setdefault(entry["model"], {})[entry["version"]] = entry
    own.save()
    return folder


def one_worker_folder(store: Path, model: str, version: str) -> Path | None:
    """A copy (hard links) of a version's unpacked folder, what ``manage register`` registers, whose
    model-config.yaml asks for one worker; None where the store serves archives, not folders."""
    own = Manifest(store)
    if not hasattr(own, "unpacked"):
        return None
    source = own.unpacked(model, version)
    target = store / f"footprint-{model}_{version}-1w"
    link_tree(source, target)
    config_file = target / "model-config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config.update(minWorkers=1, maxWorkers=1)
    config_file.unlink()  # a hard link to the store's file: replaced, not written through
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def one_worker_archive(archive: Path, target: Path) -> Path:
    """A copy of ``archive`` (same model name, version and bytes, each entry compressed as it was) whose
    model-config.yaml asks for one worker: a registration of the archive itself starts its minWorkers, which the
    management API's initial_workers does not override."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(target, "w") as copy:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "model-config.yaml":
                config = yaml.safe_load(data)
                config.update(minWorkers=1, maxWorkers=1)
                data = yaml.safe_dump(config, sort_keys=False).encode()
            copy.writestr(item, data)
    return target


# --- 1. start-up ---------------------------------------------------------------------------------------------------


def start_timeline(instance: Instance, manifest: Manifest) -> dict[str, Any]:
    """Every start-up event in seconds after serve.sh was spawned, per version and per worker, and the phases
    between them."""
    start = instance.start
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
    frontend = frontend_events(instance.log_dir)
    logged = worker_events(instance.log_dir)
    workers = instance.workers()
    nginx = instance.nginx()
    events = {
        "serve_sh_returned": start["serve_sh_seconds"],
        "java_spawned": since_boot(instance.java()),
        "first_log_line": since_wall(frontend["first_line"]),
        "first_registration": since_wall(frontend["registrations"][0]["start"]) if frontend["registrations"] else None,
        "apis_bound": since_wall(max(frontend["bound"].values())) if frontend["bound"] else None,
        "api_first_answer": watch["api_first"],
        "ping_first_answer": watch["ping_first"],
        "ping_healthy": watch["ping_healthy"],
        "health_checker_spawned": since_boot(instance.health()),
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
    for worker in sorted(workers, key=lambda w: int(w["id"])):
        key = f"{worker['model']} {worker['version']}"
        log = logged.get(worker["id"], {})
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


PHASE_COLORS = {
    "serve.sh: archives checked (sha256, unpacked), Java chosen": "#9e9e9e",
    "serve.sh: waits until every version is READY": "#d9d9d9",
    "serve.sh: sets defaults, renders and starts the front door": "#616161",
    "front door: waits until it answers ready": "#212121",
    "JVM start to its first log line": "#d62728",
    "config, plugins, metrics": "#9467bd",
    "versions registered one by one": "#8c564b",
    "APIs bound": "#e377c2",
    "registration (archive extracted, or unpacked folder linked)": "#c49c94",
    "worker not spawned yet": "#dbdb8d",
    "Python start-up, TorchServe worker imports": "#17becf",
    "connect, load command": "#1f77b4",
    "handler: imports, model load, warm-up": "#ff7f0e",
    "until the API poll sees READY (the API binds after the last registration)": "#98df8a",
}


def phases(timeline: dict[str, Any]) -> list[dict[str, Any]]:
    """The start-up as (row, phase, start, end) bars: serve.sh and the JVM, then each version and its workers."""
    e = timeline["events"]
    bars = []

    def bar(row: str, phase: str, start: float | None, end: float | None) -> None:
        if start is not None and end is not None and end >= start:
            bars.append({"row": row, "phase": phase, "start": start, "end": end})

    bar("serve.sh", "serve.sh: archives checked (sha256, unpacked), Java chosen", 0.0, e["java_spawned"])
    bar("serve.sh", "serve.sh: waits until every version is READY", e["java_spawned"], timeline["all_ready_s"])
    bar("serve.sh", "serve.sh: sets defaults, renders and starts the front door", timeline["all_ready_s"],
        e["nginx_spawned"])
    bar("serve.sh", "front door: waits until it answers ready", e["nginx_spawned"], e["serve_sh_returned"])
    bar("frontend (JVM)", "JVM start to its first log line", e["java_spawned"], e["first_log_line"])
    bar("frontend (JVM)", "config, plugins, metrics", e["first_log_line"], e["first_registration"])
    registrations = [v["registration"] for v in timeline["versions"].values() if v["registration"]]
    if registrations:
        bar("frontend (JVM)", "versions registered one by one", registrations[0][0],
            max(end for _, end in registrations))
        bar("frontend (JVM)", "APIs bound", max(end for _, end in registrations), e["apis_bound"])
    for key, version in timeline["versions"].items():
        if version["registration"]:
            bar(key, "registration (archive extracted, or unpacked folder linked)", *version["registration"])
        for worker in version["workers"]:
            row = f"{key} W-{worker['id']}"
            registered = version["registration"][1] if version["registration"] else None
            bar(row, "worker not spawned yet", registered, worker["spawned"])
            bar(row, "Python start-up, TorchServe worker imports", worker["spawned"], worker["python_up"])
            bar(row, "connect, load command", worker["python_up"], worker["load_command"])
            bar(row, "handler: imports, model load, warm-up", worker["load_command"], worker["handler_ready"])
            bar(row, "until the API poll sees READY (the API binds after the last registration)",
                worker["handler_ready"], worker["ready_polled"])
    return bars


# --- 2. warm-up and memory -----------------------------------------------------------------------------------------


def warm_up(instance: Instance, manifest: Manifest) -> dict[str, Any]:
    """REQUESTS_PER_WORKER real requests per worker to every version, through the front door, as many at a time as the
    version has workers: how many answered 200, and the first other answer of each version."""
    headers = instance.headers()
    handlers = {(e["model"], e["version"]): e.get("handler", "") for e in manifest.entries()}
    counts: dict[str, dict[str, Any]] = {}
    for (model, version), info in sorted(instance.ts.registered().items()):
        bodies = inputs.requests_for(model, handlers.get((model, version), ""))
        workers = max(1, len(info.get("workers", [])))
        url = f"{Stack.current().front}/predictions/{model}/{version}"

        def send(index: int, bodies=bodies, url=url) -> tuple[int, str]:
            body, kind = bodies[index % len(bodies)]
            answer = requests.post(url, data=body, headers={**headers, "Content-Type": kind}, timeout=120)
            return answer.status_code, answer.text[:200]

        with ThreadPoolExecutor(workers) as pool:
            answers = list(pool.map(send, range(REQUESTS_PER_WORKER * workers)))
        failed = [(status, text) for status, text in answers if status != 200]
        counts[f"{model} {version}"] = {"requests": len(answers), "ok": len(answers) - len(failed),
                                        "first_failure": " ".join(f"HTTP {failed[0][0]}: {failed[0][1]}".split())
                                        if failed else None}
    return counts


def memory(instance: Instance, manifest: Manifest) -> dict[str, Any]:
    """PSS and RSS of every process of the demo; for the workers, their version, its runtime and the libraries
    mapped into them."""
    runtimes = {(e["model"], e["version"]): e.get("runtime") for e in manifest.entries()}
    processes = [{"name": "frontend (Java)", "kind": "frontend", "pid": instance.java()}]
    for worker in sorted(instance.workers(), key=lambda w: (w["model"], w["version"], int(w["id"]))):
        processes.append({"name": f"worker {worker['model']} {worker['version']} (W-{worker['id']})", "kind": "worker",
                          "pid": worker["pid"], "model": worker["model"], "version": worker["version"],
                          "runtime": runtimes.get((worker["model"], worker["version"])), "status": worker["status"]})
    nginx = instance.nginx()
    for index, pid in enumerate(nginx):
        processes.append({"name": "nginx master" if index == 0 else f"nginx worker {index}", "kind": "nginx",
                          "pid": pid})
    helpers = Stack.current().pids()
    if pid := helpers.get("health checker"):
        processes.append({"name": "health checker (python -m manage health)", "kind": "health", "pid": pid})
    if pid := helpers.get("v2 gateway"):
        processes.append({"name": "v2 gateway (python -m manage v2)", "kind": "gateway", "pid": pid})
    for process in processes:
        process["pss_mb"], process["rss_mb"] = memory_mb(process["pid"])
        process.update(mapped_libraries(process["pid"]))
    onnx = [p for p in processes if p["kind"] == "worker" and p.get("runtime") == "onnxruntime"]
    largest = max(onnx, key=lambda p: p["pss_mb"]) if onnx else None
    by_kind = {}
    for process in processes:
        by_kind[process["kind"]] = by_kind.get(process["kind"], 0.0) + process["pss_mb"]
    return {"processes": processes, "total_pss_mb": sum(p["pss_mb"] for p in processes),
            "total_rss_mb": sum(p["rss_mb"] for p in processes), "by_kind_pss_mb": by_kind,
            "largest_onnx_worker": largest and {"name": largest["name"], "pss_mb": largest["pss_mb"]}}


# --- 3. register → READY -------------------------------------------------------------------------------------------


def wait_ready(ts: TorchServe, model: str, version: str, timeout: float = 300.0, period: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = ts.management("GET", f"/models/{model}/{version}")[0]
        if info.get("workers") and ready_workers(info) >= minimum_workers(info):
            return
        time.sleep(period)
    raise RuntimeError(f"{model} {version}: not READY after {timeout:g} s")


def registration(instance: Instance, model: str, version: str, probe: Path, repeats: int,
                 log: Callable[[str], None], settle_timeout: float = 10.0) -> dict[str, Any]:
    """Register ``probe`` (``model`` ``version``, one worker) into the running demo, after unregistering the version,
    and time it until its worker is READY; ``repeats`` times. The demo is left as it was."""
    ts = instance.ts
    default = ts.default_version(model)
    others = [v["modelVersion"] for v in ts.versions(model) if v["modelVersion"] != version]
    archive = next(e["archive"] for e in Manifest(instance.store).entries()
                   if e["model"] == model and e["version"] == version)
    if (instance.store / Path(archive).stem).is_dir():
        archive = Path(archive).stem  # the demo serves the unpacked folder
    if default == version and others:
        ts.set_default(model, others[0])  # TorchServe refuses to unregister the default while other versions exist
    ts.unregister(model, version)
    runs = []
    try:
        for _ in range(repeats):
            settle(timeout=settle_timeout)
            wall, boot, began = time.time(), boot_clock(), time.perf_counter()
            ts.register(probe.name)
            returned = time.perf_counter() - began
            wait_ready(ts, model, version)
            seconds = time.perf_counter() - began
            [info] = ts.management("GET", f"/models/{model}/{version}")
            pid = info["workers"][0]["pid"]
            frontend = frontend_events(instance.log_dir, since=wall)
            logged = worker_events(instance.log_dir, since=wall)
            worker = next((w for w in logged.values() if w["name"] == f"{model}_{version}"), {})
            loaded = next((when for name, when in frontend["loaded"] if name == model), None)

            def since(t: float | None, wall: float = wall) -> float | None:
                return None if t is None else t - wall

            runs.append({"seconds": seconds, "request_returned": returned,
                         "extracted": since(loaded), "spawned": started_at(pid) - boot,
                         "python_up": since(worker.get("python_up")), "load_command": since(worker.get("load")),
                         "handler_ready": since(worker.get("ready_logged")), "ready_polled": seconds,
                         "torch_in_worker": mapped_libraries(pid)["torch"]})
            log(f"  register {probe.name} ({model} {version}) → READY: {seconds:.2f} s")
            ts.unregister(model, version)
    finally:
        ts.register(archive)  # the demo's own archive and workers again
        wait_ready(ts, model, version)
        if default == version:
            ts.set_default(model, version)
    values = [run["seconds"] for run in runs]
    median = statistics.median(values)
    return {"model": model, "version": version, "seconds": values, "median": median,
            "median_run": min(runs, key=lambda run: abs(run["seconds"] - median)), "runs": runs}


# --- 4. the frontend's CPU -----------------------------------------------------------------------------------------


def wrk(url: str, files: list[Path], headers: dict[str, str], seconds: float, concurrency: int = CONCURRENCY,
        sample: Callable[[], None] | None = None) -> dict[str, Any]:
    """One wrk run (load_test/wrk.lua: the files in turn); ``sample`` is called every 0.25 s while it runs."""
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "60s",
               "-s", str(WRK_SCRIPT)]
    for key, value in headers.items():
        command += ["-H", f"{key}: {value}"]
    with subprocess.Popen([*command, url, "--", *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as run:
        while sample and run.poll() is None:
            sample()
            time.sleep(0.25)
        out, err = run.communicate()
    if run.returncode != 0:
        raise RuntimeError(f"wrk failed ({run.returncode}): {err[-500:]}")
    return json.loads(out.strip().splitlines()[-1])


def jit_threads(pid: int) -> dict[str, float]:
    """Thread id → CPU seconds of the JVM's JIT compiler threads (the JVM starts and stops them as it needs)."""
    return {tid: used for tid, (name, used) in thread_seconds(pid).items() if thread_group(name) == "JIT compilers"}


def warm_jit(instance: Instance, url: str, files: list[Path]) -> dict[str, float]:
    """Load (unmeasured) until the JIT compilers are nearly quiet: a fresh JVM compiles the request path during its
    first thousands of requests. Quiet: under JIT_QUIET_CORES over a chunk, and none of its threads ended in it (an
    ending compiler thread takes its count with it)."""
    java, headers = instance.java(), instance.headers()
    began = time.monotonic()
    while True:
        before = jit_threads(java)
        wrk(url, files, headers, JIT_CHUNK_S)
        after = jit_threads(java)
        rate = sum(used - before.get(tid, 0.0) for tid, used in after.items()) / JIT_CHUNK_S
        if (rate < JIT_QUIET_CORES and set(before) <= set(after)) or time.monotonic() - began > JIT_MAX_S:
            return {"seconds": time.monotonic() - began, "last_jit_cores": rate}


def measure(instance: Instance, url: str, files: list[Path], seconds: float, warm_seconds: float) -> dict[str, Any]:
    """One loaded run: a short unrecorded warm-up, the frontend's CPU at rest, then ``seconds`` of wrk; the CPU every
    part of the demo used during it."""
    headers = instance.headers()
    if warm_seconds > 0:
        wrk(url, files, headers, warm_seconds)
    background = settle()
    java = instance.java()
    nginx, health = instance.nginx(), instance.health()
    workers = [w["pid"] for w in instance.workers()]
    at_rest = cpu_seconds(java)
    time.sleep(IDLE_SECONDS)
    idle_cores = (cpu_seconds(java) - at_rest) / IDLE_SECONDS
    before = {"java": cpu_seconds(java), "nginx": cpu_of(nginx), "workers": cpu_of(workers),
              "health": cpu_of([health] if health else []), "threads": thread_seconds(java),
              "machine": machine_busy(), "client": os.times()}
    seen = dict(before["threads"])  # each thread's CPU when last seen: the JVM ends threads (JIT compilers) as it goes

    def sample() -> None:
        seen.update(thread_seconds(java))

    summary = wrk(url, files, headers, seconds, sample=sample)
    after = {"java": cpu_seconds(java), "nginx": cpu_of(nginx), "workers": cpu_of(workers),
             "health": cpu_of([health] if health else []), "threads": thread_seconds(java),
             "machine": machine_busy(), "client": os.times()}
    seen.update(after["threads"])
    elapsed = summary["duration_us"] / 1e6
    errors = summary["errors"]
    answered = summary["requests"] - errors["status"]
    failed = sum(errors.values())
    java_used = after["java"] - before["java"]
    machine = busy_cores(before["machine"], after["machine"])
    client = ((after["client"].children_user - before["client"].children_user)
              + (after["client"].children_system - before["client"].children_system))
    groups: dict[str, float] = {}
    for tid, (name, used) in seen.items():
        previous = before["threads"].get(tid, (name, 0.0))[1]
        groups[thread_group(name)] = groups.get(thread_group(name), 0.0) + used - previous
    unseen = java_used - sum(groups.values())  # threads that ended between two samples took their count with them
    if unseen > 2 / CLK_TCK:
        groups["threads that ended unseen"] = unseen
    per_request = java_used * 1e3 / max(answered, 1)
    return {
        "requests": answered, "failed": failed, "rps": answered / elapsed, "seconds": elapsed,
        "p50_ms": summary["latency_us"]["p50"] / 1e3, "p99_ms": summary["latency_us"]["p99"] / 1e3,
        "java_ms_per_request": per_request,
        "java_ms_per_request_steady": (java_used - groups.get("JIT compilers", 0.0)) * 1e3 / max(answered, 1),
        "java_ms_per_request_net": (java_used - idle_cores * elapsed) * 1e3 / max(answered, 1),
        "java_cores": java_used / elapsed, "java_idle_cores": idle_cores,
        "java_share": java_used / elapsed / max(machine, 1e-9),
        "machine_cores": machine, "background_cores_before": background,
        "cores": {"frontend (Java)": java_used / elapsed,
                  "workers": (after["workers"] - before["workers"]) / elapsed,
                  "nginx": (after["nginx"] - before["nginx"]) / elapsed,
                  "health checker": (after["health"] - before["health"]) / elapsed,
                  "wrk": client / elapsed},
        "threads_ms_per_request": {group: used * 1e3 / max(answered, 1) for group, used in
                                   sorted(groups.items(), key=lambda item: -item[1]) if used > 0},
        "async_logger_thread": any(name.startswith("Log4j2-TF") for name, _ in after["threads"].values()),
        "netty_threads": sum(name.startswith("epollEventLoop") for name, _ in after["threads"].values()),
    }


def cpu_files(folder: Path) -> dict[str, list[Path]]:
    """What wrk sends: held-out digits (PNG) to digits, the photos at three sizes (JPEG) to the others."""
    digits = folder / "digits"
    digits.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, body in enumerate(inputs.digits()[:24]):
        paths.append(digits / f"{index}.png")
        paths[-1].write_bytes(body)
    return {"digits": paths, "photos": inputs.write(inputs.photos(), folder / "photos")}


def frontend_cpu(instance: Instance, files: dict[str, list[Path]], seconds: float,
                 log: Callable[[str], None]) -> list[dict[str, Any]]:
    """digits and efficientnet_lite0 (their default versions), through the front door and straight to TorchServe."""
    registered = {model for model, _ in instance.ts.registered()}
    paths = {"front door": Stack.current().front, "TorchServe directly": Stack.current().torchserve("inference")}
    runs = []
    for model in CPU_MODELS:
        if model not in registered:
            continue
        for path, base in paths.items():
            url, sent = f"{base}/predictions/{model}", files["digits" if model == "digits" else "photos"]
            jit = warm_jit(instance, url, sent)
            point = measure(instance, url, sent, seconds, 0)
            point.update(model=model, path=path, jit_warm_up=jit)
            runs.append(point)
            log(f"  {model}, {path}: {point['rps']:.0f} req/s, frontend {point['java_ms_per_request']:.3f} ms CPU "
                f"per request ({point['java_cores']:.2f} cores, {point['java_share']:.0%} of the machine's "
                f"{point['machine_cores']:.2f})")
    return runs


def collector_cost(instance: Instance, runs: int = 3) -> dict[str, Any]:
    """The system metrics collector TorchServe forks every metric_time_interval (60 s): its CPU per run, measured by
    running the same command, in the same folder, on the same worker pids."""
    spec = importlib.util.find_spec("ts")
    home = Path(spec.origin).parent.parent
    pids = ",".join(str(w["pid"]) for w in instance.workers()) + "\n"
    used = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "ts/metrics/metric_collector.py", "--gpu", "0"], input=pids, cwd=home,
                       capture_output=True, text=True, timeout=60, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {"cpu_seconds_per_run": statistics.median(used), "runs": used}


def config_copy(folder: Path, overrides: dict[str, Any]) -> Path:
    """config.properties with ``overrides``: key → its new value, a function of its value (None where it has none),
    or None to leave the key out."""
    lines, done = [], set()
    for line in (REPO / "config.properties").read_text().splitlines():
        key, _, value = line.partition("=")
        key = key.strip()
        if not line.lstrip().startswith("#") and key in overrides:
            new = overrides[key](value.strip()) if callable(overrides[key]) else overrides[key]
            if new is not None:
                lines.append(f"{key}={new}")
            done.add(key)
        else:
            lines.append(line)
    for key, change in overrides.items():
        value = change(None) if callable(change) and key not in done else change
        if key not in done and value is not None:
            lines.append(f"{key}={value}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


def settings_experiment(tmp: Path, manifest: Manifest, files: dict[str, list[Path]], seconds: float, rounds: int,
                        log: Callable[[str], None], chosen=None) -> dict[str, Any]:
    """Each setting on a fresh TorchServe serving digits 2.0, the settings taking turns (A, B, C, ..., B, C, ..., A):
    the frontend's CPU per request at concurrency 16 through the front door, once the JIT has warmed up. Compared
    on the steady-state figure (the JIT compiler threads left out: their work is a fresh JVM's, done once)."""
    chosen = chosen or variants()
    store = model_store(tmp / "store-digits", manifest,
                        lambda e: (e["model"], e["version"]) in VARIANT_STORE)
    results = {name: {"how": how, "runs": []} for name, how, _, _ in chosen}
    for round_ in range(rounds):
        # each round in another order (rotated), so that no setting always runs first or after the same one
        shift = round_ * max(1, len(chosen) // rounds)
        for index, (name, how, env, config) in enumerate(chosen[shift:] + chosen[:shift]):
            home = tmp / f"v{round_}-{index}"
            environment = dict(env)
            if config:
                environment["TS_CONFIG_FILE"] = str(config_copy(home / "conf", config))
            with Instance(home, store, environment, watch=False) as instance:
                url = f"{Stack.current().front}/predictions/digits"
                jit = warm_jit(instance, url, files["digits"])
                point = measure(instance, url, files["digits"], seconds, 0)
                point["jit_warm_up"] = jit
                point["java_pss_mb"] = memory_mb(instance.java())[0]
                point["start_s"] = instance.start["serve_sh_seconds"]
                point["access_log_lines"] = line_count(instance.log_dir / "access_log.log")
            results[name]["runs"].append(point)
            log(f"  round {round_ + 1}, {name}: {point['java_ms_per_request_steady']:.3f} ms per request without "
                f"the JIT ({point['java_ms_per_request']:.3f} with it), {point['rps']:.0f} req/s, frontend "
                f"{point['java_cores']:.2f} cores, Java PSS {point['java_pss_mb']:.0f} MB")
    base_runs = [r["java_ms_per_request_steady"] for r in results["shipped"]["runs"]]
    base = statistics.median(base_runs)
    for name, result in results.items():
        values = [r["java_ms_per_request_steady"] for r in result["runs"]]
        result["ms_per_request"] = values
        result["ms_per_request_with_jit"] = [r["java_ms_per_request"] for r in result["runs"]]
        result["median"] = statistics.median(values)
        result["vs_shipped"] = result["median"] / base - 1
        result["java_pss_mb"] = statistics.median(r["java_pss_mb"] for r in result["runs"])
        result["rps"] = statistics.median(r["rps"] for r in result["runs"])
        if name == "shipped":
            result["verdict"] = "reference"
        elif len(values) > 1 and max(values) < min(base_runs):
            result["verdict"] = "lower in every round"
        elif len(values) > 1 and min(values) > max(base_runs):
            result["verdict"] = "higher in every round"
        else:
            result["verdict"] = "no clear change"
    return results


def log_root(folder: Path) -> Path:
    """This repository seen through links, but for log4j2.xml: a copy that log4j re-reads every second
    (``monitorInterval``), so that one TorchServe can have a logger switched while it runs."""
    folder.mkdir(parents=True)
    for entry in REPO.iterdir():
        if entry.name not in ("log4j2.xml", ".git"):
            (folder / entry.name).symlink_to(entry)
    return folder


SKIP_LOOKUP = re.compile(r"\$\{env:ACCESS_LOG_SKIP:-[^}]*\}")


def set_access_log(root: Path, every_request: bool) -> None:
    """The copy of log4j2.xml in ``root``: as log4j2.xml is, or logging every request (ACCESS_LOG_SKIP=none)."""
    text = (REPO / "log4j2.xml").read_text().replace("<Configuration>", '<Configuration monitorInterval="1">', 1)
    if every_request:
        text = SKIP_LOOKUP.sub("none", text)
    staged = root / "log4j2.xml.new"
    staged.write_text(text)
    staged.replace(root / "log4j2.xml")  # log4j never reads half a file


def inference_lines(path: Path) -> int:
    """The access log's lines for predictions."""
    if not path.exists():
        return 0
    with open(path, errors="replace") as log:
        return sum("/predictions/" in line for line in log)


def access_log_switched(tmp: Path, manifest: Manifest, files: list[Path], seconds: float, turns: int,
                        log: Callable[[str], None]) -> dict[str, Any]:
    """TorchServe's access log as log4j2.xml has it (predictions left out) and logging every request, in turns within
    one JVM (log4j re-reads a copy of its configuration while TorchServe runs): the same JIT-compiled code, the same
    worker, only the per-request line differs. digits 2.0 through the front door; each turn in the other order."""
    root = log_root(tmp / "root")
    set_access_log(root, False)
    store = model_store(tmp / "store-access", manifest, lambda e: (e["model"], e["version"]) in VARIANT_STORE)
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    with Instance(tmp / "access", store, watch=False, root=root) as instance:
        url = f"{Stack.current().front}/predictions/digits"
        access_log = instance.log_dir / "access_log.log"
        warm_jit(instance, url, files)
        for turn in range(turns):
            for every in (False, True) if turn % 2 == 0 else (True, False):
                set_access_log(root, every)
                deadline = time.monotonic() + 30
                while True:  # until log4j has taken the change: predictions are logged, or not
                    before = inference_lines(access_log)
                    wrk(url, files, instance.headers(), 1, concurrency=2)
                    time.sleep(1.2)
                    if (inference_lines(access_log) > before) == every or time.monotonic() > deadline:
                        break
                before = inference_lines(access_log)
                point = measure(instance, url, files, seconds, 2.0)
                point["lines"] = inference_lines(access_log) - before
                runs[every].append(point)
                log(f"  turn {turn + 1}, {'every request logged' if every else 'predictions not logged'}: "
                    f"{point['java_ms_per_request_steady']:.3f} ms per request ({point['rps']:.0f} req/s, "
                    f"{point['lines']} prediction lines)")
    skipped = [r["java_ms_per_request_steady"] for r in runs[False]]
    every = [r["java_ms_per_request_steady"] for r in runs[True]]
    differences = [b - a for a, b in zip(skipped, every, strict=True)]
    return {"off": skipped, "on": every, "differences": differences,
            "median_difference": statistics.median(differences), "median_off": statistics.median(skipped),
            "median_on": statistics.median(every), "lines_on": [r["lines"] for r in runs[True]],
            "lines_off": [r["lines"] for r in runs[False]]}


def line_count(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


# --- the run -------------------------------------------------------------------------------------------------------


def run(out: Path = RESULTS, quick: bool = False, seconds: float = 10.0, rounds: int = 3, repeats: int = 3,
        log: Callable[[str], None] = say, settings: list[str] | None = None) -> dict[str, Any]:
    """Parts 1-4 (``quick``: without 4, part 3 once); the results as a dict (``markdown()`` renders it).
    ``settings``: the names of the variants() to try (default all; "shipped" is always tried)."""
    from load_test.bench import machine

    began = time.monotonic()

    def step(message: str) -> None:
        log(f"[{time.monotonic() - began:6.1f} s] {message}")

    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest()
    if not manifest.entries():
        raise SystemExit(f"no archives in {manifest.store}: build them first with make archive")
    repeats = 1 if quick else repeats
    results: dict[str, Any] = {"machine": machine(), "quick": quick, "seconds_per_run": seconds, "rounds": rounds,
                               "repeats": repeats, "concurrency": CONCURRENCY}
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp_name:
        tmp = Path(tmp_name)
        store = model_store(tmp / "store", manifest)
        own = Manifest(store)
        probes = {}  # what is registered, by the name its row gets: as manage register does it, and from the .mar
        for model, version in REGISTERED:
            if own.get(model, version):
                folder = one_worker_folder(store, model, version)
                if folder:
                    probes[f"{model} {version}"] = (model, version, folder, "unpacked folder (linked)")
                if not folder or (model, version) == REGISTERED[0]:
                    archive = one_worker_archive(store / own.get(model, version)["archive"],
                                                 store / f"footprint-{model}_{version}-1w.mar")
                    probes[f"{model} {version}" + (" (.mar)" if folder else "")] = (
                        model, version, archive, ".mar archive (extracted by TorchServe)")
        files = None if quick else cpu_files(tmp / "inputs")
        step(f"1. serve.sh start: {len(own.entries())} versions from {manifest.store}")
        with Instance(tmp / "demo", store) as demo:
            timeline = start_timeline(demo, own)
            results["start"] = timeline
            step(f"   every version READY {fmt(timeline['all_ready_s'])} s after the spawn of serve.sh (it returned "
                 f"after {timeline['serve_sh_seconds']:.1f} s, {timeline['workers']} workers)")
            step("2. warm-up: real requests to every version, then PSS of every process")
            results["warmup"] = warm_up(demo, own)
            for key, answers in results["warmup"].items():
                if answers["first_failure"]:
                    step(f"   warm-up of {key}: {answers['requests'] - answers['ok']} of {answers['requests']} "
                         f"requests failed, first: {answers['first_failure'][:160]}")
            time.sleep(1.0)
            results["memory"] = memory(demo, own)
            step(f"   total PSS {results['memory']['total_pss_mb']:.0f} MB")
            if not quick:
                step(f"4a. the frontend's CPU, concurrency {CONCURRENCY}, {seconds:g} s per run")
                results["cpu"] = {"baseline": frontend_cpu(demo, files, seconds, log)}
            step("3. register → READY, one worker")
            results["register"] = {}
            for key, (model, version, probe, form) in probes.items():
                results["register"][key] = registration(demo, model, version, probe, repeats, log,
                                                        2.0 if quick else 10.0)
                results["register"][key]["form"] = form
            results["collector"] = collector_cost(demo)
        if not quick:
            step(f"4b. frontend settings, each on a fresh TorchServe (digits 2.0), {rounds} rounds in turns")
            chosen = [v for v in variants() if v[0] == "shipped" or settings is None or v[0] in settings]
            results["cpu"]["settings"] = settings_experiment(tmp, manifest, files, seconds, rounds, log, chosen)
            step(f"4c. TorchServe's access log without and with predictions, in turns within one TorchServe, "
                 f"{ACCESS_TURNS} turns")
            results["cpu"]["access_log"] = access_log_switched(tmp, manifest, files["digits"], seconds, ACCESS_TURNS,
                                                               log)
    results["targets"] = targets(results)
    results["duration_s"] = time.monotonic() - began
    return results


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # a clock tick early is not "-0.00"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, each with its measured figure; then the figures reported without a target (goal None)."""
    start, mem = results["start"], results["memory"]
    register = results.get("register", {}).get("efficientnet_lite0 1.1")
    largest = mem["largest_onnx_worker"]
    rows = [
        {"target": f"serve.sh start → every version READY ({len(start['versions'])} versions, {start['workers']} "
                   f"workers; management API polled every {POLL_SECONDS:g} s)",
         "value": start["all_ready_s"], "unit": "s", "goal": START_TARGET_S},
        {"target": "register → READY, efficientnet_lite0 1.1 (ONNX Runtime), 1 worker, median of "
                   f"{len(register['seconds']) if register else 0}",
         "value": register and register["median"], "unit": "s", "goal": REGISTER_TARGET_S},
        {"target": "ONNX Runtime worker PSS after warm-up, the largest"
                   + (f" ({largest['name']})" if largest else ""),
         "value": largest and largest["pss_mb"], "unit": "MB", "goal": ONNX_WORKER_TARGET_MB},
        {"target": "the whole demo's PSS (frontend + every worker + nginx + health checker + v2 gateway)",
         "value": mem["total_pss_mb"], "unit": "MB", "goal": TOTAL_TARGET_MB},
        {"target": "serve.sh start returns (front door ready)", "value": start["serve_sh_seconds"], "unit": "s",
         "goal": None},
    ]
    digits = next((r for r in (results.get("cpu") or {}).get("baseline", [])
                   if r["model"] == "digits" and r["path"] == "front door"), None)
    rows.append({"target": f"frontend CPU per request, digits through the front door, concurrency {CONCURRENCY}",
                 "value": digits and digits["java_ms_per_request"], "unit": "ms", "goal": None})
    rows.append({"target": "frontend's share of the machine's CPU under that load",
                 "value": digits and digits["java_share"] * 100, "unit": "%", "goal": None})
    for row in rows:
        row["met"] = None if row["goal"] is None or row["value"] is None else row["value"] <= row["goal"]
    return rows


# --- the report ----------------------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    m, start, mem = results["machine"], results["start"], results["memory"]
    lines = [
        f"# Footprint: start-up, memory and the frontend's CPU, on {m['cores']} cores",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Linux {m['kernel']}; Python {m['python']}, "
        f"torch {m['torch']}, ONNX Runtime {m.get('onnxruntime', '-')}, TorchServe {m['torchserve']}; {m['date']}"
        + ("; quick run (no CPU experiments, one registration each)" if results["quick"] else "") + ".",
        "The machine may be shared with other work: timings vary from run to run, compare within one run.",
        "",
        "## Targets",
        "",
        "| target | measured | goal | met |",
        "| --- | ---: | --- | --- |",
    ]
    for row in results["targets"]:
        value = measured(row)
        goal = "(reported)" if row["goal"] is None else f"<= {row['goal']:g} {row['unit']}"
        met = "-" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['target']} | {value} | {goal} | {met} |")

    e = start["events"]
    lines += [
        "",
        "## Start-up timeline (seconds after serve.sh was spawned)",
        "",
        "| event | s |",
        "| --- | ---: |",
        *(f"| {label} | {fmt(e[key], 2)} |" for key, label in (
            ("java_spawned", "JVM spawned (TorchServe's launcher, after serve.sh checked every archive)"),
            ("first_log_line", "frontend's first log line"),
            ("first_registration", "first archive registration begins"),
            ("apis_bound", "APIs bound (after every archive is registered)"),
            ("api_first_answer", "management API first answered the poller"),
            ("ping_first_answer", "/ping first answered"),
            ("ping_healthy", "/ping first answered 200"),
            ("health_checker_spawned", "health checker spawned"),
            ("nginx_spawned", "front door (nginx) spawned"),
            ("serve_sh_returned", "serve.sh returned"))),
        f"| every version READY (API poll) | {fmt(start['all_ready_s'], 2)} |",
        f"| every handler's \"ready on\" line | {fmt(start['all_handlers_ready_s'], 2)} |",
        "",
        ("Per version: the registration (on the frontend's main thread, one version after the other: an archive is "
        "extracted, an unpacked folder linked); per worker: process spawned (/proc), Python up (its first log line: "
        "socket listening), load "
        "command received, the handler's \"ready on\" line (handler imports, model load and warm-up), READY first "
        "seen by the poller. The management API only answers once every archive is registered, so a worker READY "
        "before that is seen READY then."),
        "",
        ("| version | runtime | archive MB | served from | registration | worker | spawned | Python up | load cmd | "
        "handler ready | READY (API) | torch? |"),
        "| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    torch_of = {p["pid"]: p.get("torch") for p in mem["processes"]}
    for key, version in start["versions"].items():
        registration = version["registration"]
        reg = f"{registration[0]:.2f} → {registration[1]:.2f}" if registration else "-"
        for worker in version["workers"]:
            torch = torch_of.get(worker["pid"])
            lines.append(
                f"| {key} | {version['runtime'] or '-'} | {fmt(version['archive_mb'])} | "
                f"{version.get('served_from', '-')} | {reg} | W-{worker['id']} | "
                f"{fmt(worker['spawned'], 2)} | {fmt(worker['python_up'], 2)} | {fmt(worker['load_command'], 2)} | "
                f"{fmt(worker['handler_ready'], 2)} | {fmt(worker['ready_polled'], 2)} | "
                f"{'-' if torch is None else ('yes' if torch else 'no')} |")
    lines += ["", "![start-up timeline](footprint_timeline.png)", ""]

    lines += [
        "## Memory after warm-up (PSS: each shared page divided among the processes that map it; MB = 10^6 bytes)",
        "",
        "Warm-up: " + ", ".join(f"{key} {w['ok']}/{w['requests']}" for key, w in results["warmup"].items())
        + " real requests answered 200, through the front door."
        + "".join(f" **{key}: {w['requests'] - w['ok']} failed**, first: `{w['first_failure'][:120]}`."
                  for key, w in results["warmup"].items() if w["first_failure"]),
        "",
        "| process | pid | runtime | torch loaded | ONNX Runtime loaded | PSS MB | RSS MB |",
        "| --- | ---: | --- | --- | --- | ---: | ---: |",
        *(f"| {p['name']} | {p['pid']} | {p.get('runtime') or '-'} | {'yes' if p['torch'] else 'no'} | "
          f"{'yes' if p['onnxruntime'] else 'no'} | {p['pss_mb']:.1f} | {p['rss_mb']:.1f} |" for p in mem["processes"]),
        f"| **total** | | | | | **{mem['total_pss_mb']:.1f}** | {mem['total_rss_mb']:.1f} |",
        "",
        "By kind: " + ", ".join(f"{kind} {value:.0f} MB" for kind, value in mem["by_kind_pss_mb"].items()) + ".",
        "",
        "![PSS per process](footprint_pss.png)",
        "",
        "## Register → READY (one version into the running demo, 1 worker)",
        "",
        ("Each time: the version unregistered (another version made the default first), then a synchronous "
        "registration of a copy of it (hard links) whose model-config asks for one worker, until the worker is "
        "READY (polled every 20 ms): its unpacked folder, as `manage register` does, and for comparison its .mar. "
        "Breakdown of the median run, seconds after the request: registration done (archive extracted or folder "
        "linked), worker spawned, Python up, load command, handler ready, READY."),
        "",
        ("| version | runtime | registered from | median s | all runs s | registered | spawned | Python up | load cmd "
        "| handler ready | torch in worker |"),
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    runtimes = {key: v["runtime"] for key, v in start["versions"].items()}
    for key, reg in results.get("register", {}).items():
        run_ = reg["median_run"]
        version_key = f"{reg['model']} {reg['version']}"
        lines.append(f"| {version_key} | {runtimes.get(version_key) or '-'} | {reg.get('form', '-')} | "
                     f"{reg['median']:.2f} | "
                     f"{', '.join(f'{s:.2f}' for s in reg['seconds'])} | {fmt(run_['extracted'], 2)} | "
                     f"{fmt(run_['spawned'], 2)} | {fmt(run_['python_up'], 2)} | {fmt(run_['load_command'], 2)} | "
                     f"{fmt(run_['handler_ready'], 2)} | {'yes' if run_['torch_in_worker'] else 'no'} |")
    collector = results.get("collector")
    if collector:
        lines += ["", (f"The system metrics collector (a Python process TorchServe forks every metric_time_interval, "
                      f"60 s by default): {collector['cpu_seconds_per_run'] * 1e3:.0f} ms of CPU per run (median of "
                      f"{len(collector['runs'])}), {collector['cpu_seconds_per_run'] / 60:.2%} of one core at one run "
                      "a minute.")]
    cpu = results.get("cpu")
    if cpu:
        lines += cpu_markdown(cpu, results)
    return "\n".join(lines) + "\n"


def cpu_markdown(cpu: dict[str, Any], results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        (f"## The frontend's CPU under load (wrk, 1 thread, {results['concurrency']} connections, "
        f"{results['seconds_per_run']:g} s per run, after the JIT's warm-up)"),
        "",
        ("Frontend = TorchServe's Java process (utime + stime from /proc, every thread); without JIT = its JIT "
        "compiler threads left out (still compiling after the warm-up: a fresh JVM's cost, not the requests'); "
        "net of rest = minus what it uses at rest (the health checker polls its management API twice a second). "
        "Share = its CPU over all the CPU the machine used. Cores: CPU seconds per second."),
        "",
        ("| model | path | req/s | p50 ms | p99 ms | frontend ms/request | without JIT | net of rest | frontend cores "
        "| share | machine cores | workers | nginx | wrk |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in cpu["baseline"]:
        c = r["cores"]
        lines.append(f"| {r['model']} | {r['path']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['java_ms_per_request']:.3f} | {r['java_ms_per_request_steady']:.3f} | "
                     f"{r['java_ms_per_request_net']:.3f} | {r['java_cores']:.2f} | "
                     f"{r['java_share']:.0%} | {r['machine_cores']:.2f} | {c['workers']:.2f} | {c['nginx']:.2f} | "
                     f"{c['wrk']:.2f} |")
    groups = list(dict.fromkeys(g for r in cpu["baseline"] for g in r["threads_ms_per_request"]))
    lines += ["", "The frontend's CPU per request by thread (ms):", "",
              "| model | path | " + " | ".join(groups) + " |", "| --- | --- |" + " ---: |" * len(groups)]
    for r in cpu["baseline"]:
        lines.append(f"| {r['model']} | {r['path']} | "
                     + " | ".join(f"{r['threads_ms_per_request'].get(g, 0.0):.3f}" for g in groups) + " |")
    settings = cpu.get("settings")
    if settings:
        lines += [
            "",
            (f"## Frontend settings, each on a fresh TorchServe (digits 2.0, through the front door), "
            f"{results['rounds']} rounds in turns"),
            "",
            ("Frontend CPU per request without its JIT compiler threads (after a warm-up until they are nearly quiet), "
            "each round; verdict: lower (higher) than the shipped settings in every round, or not."),
            "",
            ("| setting | how | frontend ms/request, each round | median | vs shipped | req/s | frontend PSS MB | "
            "verdict |"),
            "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for name, s in settings.items():
            lines.append(f"| {name} | {s['how']} | {', '.join(f'{v:.3f}' for v in s['ms_per_request'])} | "
                         f"{s['median']:.3f} | {s['vs_shipped']:+.0%} | {s['rps']:.0f} | {s['java_pss_mb']:.0f} | "
                         f"{s['verdict']} |")
        shipped = settings["shipped"]["runs"][0]
        from serving.instance import Instance as Stack

        asynchronous = Stack.current().properties().get("async_logging", "unset")
        lines += ["", (f"Shipped: an async logger thread {'is' if shipped['async_logger_thread'] else 'is not'} "
                      f"running (async_logging={asynchronous} in config.properties); {shipped['netty_threads']} "
                      "netty event-loop threads."), "", "![frontend CPU per request by setting](footprint_cpu.png)"]
    access = cpu.get("access_log")
    if access:
        more = sum(d > 0 for d in access["differences"])
        lines += [
            "", "## TorchServe's access log without and with predictions, within one TorchServe", "",
            ("One TorchServe (digits 2.0, through the front door), log4j re-reading a copy of log4j2.xml while it "
             "runs: predictions left out of the access log (log4j2.xml as shipped) and every request logged "
             "(ACCESS_LOG_SKIP=none), in turns, each turn in the other order; frontend CPU per request without the "
             "JIT, ms."),
            "", "| turn | predictions not logged | every request logged | difference |",
            "| ---: | ---: | ---: | ---: |",
            *(f"| {i + 1} | {a:.3f} | {b:.3f} | {b - a:+.3f} |"
              for i, (a, b) in enumerate(zip(access["off"], access["on"], strict=False))),
            "",
            (f"Medians: {access['median_off']:.3f} ms without, {access['median_on']:.3f} ms with every request "
             f"logged; difference: median {access['median_difference']:+.3f} ms, higher with every request logged in "
             f"{more} of {len(access['differences'])} turns. Prediction lines written: "
             f"{', '.join(map(str, access['lines_on']))} with, {', '.join(map(str, access['lines_off']))} without."),
        ]
    return lines


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    bars = phases(results["start"])
    rows = list(dict.fromkeys(bar["row"] for bar in bars))
    figure, axis = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.5))
    for bar in bars:
        axis.barh(rows.index(bar["row"]), bar["end"] - bar["start"], left=bar["start"], height=0.7,
                  color=PHASE_COLORS.get(bar["phase"], "black"), label=bar["phase"])
    for key, version in results["start"]["versions"].items():
        if version["ready"] is not None:
            axis.plot(version["ready"], rows.index(key) if key in rows else 0, marker="|", color="black",
                      markersize=12)
    axis.axvline(START_TARGET_S, color="red", linestyle="--", linewidth=1, label=f"target {START_TARGET_S:g} s")
    if results["start"]["all_ready_s"]:
        axis.axvline(results["start"]["all_ready_s"], color="black", linestyle=":", linewidth=1,
                     label="every version READY")
    axis.set_yticks(range(len(rows)), labels=rows, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("seconds after serve.sh was spawned")
    axis.set_title("serve.sh start: where the time goes")
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axis.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.grid(axis="x", alpha=0.3)
    written.append(out / "footprint_timeline.png")
    figure.savefig(written[-1], dpi=110, bbox_inches="tight")
    plt.close(figure)

    processes = results["memory"]["processes"]
    figure, axis = plt.subplots(figsize=(10, 0.3 * len(processes) + 1.8))
    kind_colors = {"frontend": "C0", "worker": "C1", "nginx": "C2", "health": "C3", "gateway": "C5"}
    for index, process in enumerate(processes):
        color = kind_colors[process["kind"]]
        if process["kind"] == "worker" and process.get("runtime") == "onnxruntime":
            color = "C4"
        axis.barh(index, process["pss_mb"], color=color, hatch="//" if process.get("torch") else None)
        axis.text(process["pss_mb"], index, f" {process['pss_mb']:.0f}", va="center", fontsize=7)
    axis.axvline(ONNX_WORKER_TARGET_MB, color="red", linestyle="--", linewidth=1,
                 label=f"ONNX Runtime worker target {ONNX_WORKER_TARGET_MB:g} MB")
    from matplotlib.patches import Patch

    handles = [Patch(color="C0", label="frontend (Java)"), Patch(color="C1", label="worker, TorchScript"),
               Patch(color="C4", label="worker, ONNX Runtime"), Patch(color="C2", label="nginx"),
               Patch(color="C3", label="health checker"), Patch(color="C5", label="v2 gateway"),
               Patch(facecolor="white", edgecolor="black", hatch="//", label="torch loaded")]
    axis.set_yticks(range(len(processes)), labels=[p["name"] for p in processes], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("PSS, MB")
    axis.set_title(f"PSS after warm-up: {results['memory']['total_pss_mb']:.0f} MB in all (target "
                   f"{TOTAL_TARGET_MB:g} MB)")
    axis.legend(handles=[*axis.get_legend_handles_labels()[0], *handles], fontsize=7, loc="lower right")
    written.append(out / "footprint_pss.png")
    figure.savefig(written[-1], dpi=110, bbox_inches="tight")
    plt.close(figure)

    settings = (results.get("cpu") or {}).get("settings")
    if settings:
        names = list(settings)
        figure, axis = plt.subplots(figsize=(10, 0.4 * len(names) + 1.8))
        for index, name in enumerate(names):
            axis.barh(index, settings[name]["median"], color="C0" if name != "shipped" else "C7")
            axis.plot(settings[name]["ms_per_request"], [index] * len(settings[name]["ms_per_request"]), "k.")
        axis.axvline(settings["shipped"]["median"], color="black", linestyle=":", linewidth=1)
        axis.set_yticks(range(len(names)), labels=names, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel("frontend CPU per request without the JIT, ms (bars: median; dots: each round)")
        axis.set_title("TorchServe frontend settings, digits through the front door, concurrency 16")
        written.append(out / "footprint_cpu.png")
        figure.savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close(figure)
    return written


def measured(row: dict[str, Any]) -> str:
    if row["value"] is None:
        return "not measured"
    return f"{row['value']:.{3 if row['unit'] == 'ms' else 1}f} {row['unit']}"


def targets_table(results: dict[str, Any]) -> str:
    lines = []
    for row in results["targets"]:
        value = measured(row)
        goal = "(reported)" if row["goal"] is None else f"<= {row['goal']:g} {row['unit']}"
        met = "" if row["met"] is None else ("met" if row["met"] else "NOT MET")
        lines.append(f"{row['target'][:100]:<100} {value:>14} {goal:>14} {met}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="no CPU experiments, one registration each")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per loaded run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the settings experiment")
    parser.add_argument("--repeats", type=int, default=3, help="registrations timed per version")
    parser.add_argument("--settings", help="comma-separated names of the frontend settings to try (default: all): "
                        + ", ".join(name for name, *_ in variants()))
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.settings.split(",")] if args.settings else None
    unknown = set(chosen or ()) - {name for name, *_ in variants()}
    if unknown:
        parser.error(f"unknown settings: {', '.join(sorted(unknown))}")
    results = run(args.out, args.quick, args.seconds, args.rounds, args.repeats, settings=chosen)
    (args.out / "footprint.json").write_text(json.dumps(results, indent=2))
    plots(results, args.out)
    (args.out / "footprint.md").write_text(markdown(results))
    print()
    print(targets_table(results))
    print(f"\nwritten: {args.out / 'footprint.md'}, footprint.json and the plots (in {results['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
