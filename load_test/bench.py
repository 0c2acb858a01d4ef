"""``make bench``: how close our TorchServe gets to this machine's limit, and how far ahead of what users would run
instead, measured in one run with the same inputs and the same load generator.

1. the runtimes: the model's forward pass alone, one thread, on TorchScript (with and without
   optimize_for_inference) and on ONNX Runtime, taking turns over several rounds;
2. the limit: the served pipeline in-process (``load_test/limit.py``) on each runtime, each batch size, threads or
   processes;
3. our handler in TorchServe, one version per runtime, with the shipped settings: each version's footprint (archive,
   load time, worker memory), then concurrency 1, 4, 16, 64; served against the in-process limit in pairs (each served
   run right after an in-process run); then the settings that matter (workers, threads per worker, batchSize,
   maxBatchDelay) at concurrency 16 on the default version;
4. TorchServe's stock ``image_classifier`` handler on the same TorchScript weights: with TorchServe's defaults (what
   a new user gets: a worker per core, batch size 1, torch's own thread count) and with our settings;
5. the tutorial Flask app on the eager model;
6. the peers users compare us with, LitServe, BentoML and Ray Serve (``load_test/peers.py``), each on our pipeline
   (the same ONNX Runtime model, preprocessing and answers), each with its best settings of a sweep (workers and
   dynamic batching) at concurrency 16; then, one after the other, ours (serve.sh with this one version), each peer:
   answers checked on every photo, concurrency 1, 16 and 64, memory (PSS of the whole process tree) and the time
   from spawning the server to its first correct answer; the same start-up and memory for the stock handler and
   the Flask app.

The load generator is wrk (C, one thread, closed loop: ``concurrency`` connections each sending the next photo as soon
as the last answer arrived); its own CPU use is measured and reported next to the machine's. Output under
``load_test/results/``: ``bench.md`` (tables, targets, machine), ``bench.json``, ``throughput.png``, ``latency.png``,
``peers.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from archives import load_specs
from archives.store import Manifest
from load_test import inputs, limit, peers, servers
from serving.instance import REPO, Instance

RESULTS = REPO / "load_test" / "results"
WRK_SCRIPT = REPO / "load_test" / "wrk.lua"
MODEL = "efficientnet_lite0"
CONCURRENCY = (1, 4, 16, 64)
BATCHES = (1, 2, 4, 8)
SWEEP_CONCURRENCY = 16
ROUNDS = 3  # interleaved repeats of the comparisons the host's drift would otherwise skew
RUNTIMES = {"torchscript": "TorchScript", "onnxruntime": "ONNX Runtime"}
# (workers, threads per worker, batchSize, maxBatchDelay ms): the server settings swept for our handler
GRID = ((2, 1, 1, 0), (2, 1, 2, 1), (2, 1, 2, 5), (2, 1, 4, 2), (2, 1, 8, 5), (1, 2, 1, 0), (1, 2, 4, 2), (4, 1, 1, 0))
PEER_CONCURRENCY = (1, 16, 64)
PROBE = ("chelsea@1", "cat")  # the photo a starting server must answer, and what its top class must name
# the Peers table's figures: (key, label, unit, +1 where more is better / -1 where less is)
FIGURES = (("rps_c16", "req/s at c16", "req/s", 1), ("rps_c64", "req/s at c64", "req/s", 1),
           ("p50_c1_ms", "p50 at c1", "ms", -1), ("p99_c1_ms", "p99 at c1", "ms", -1),
           ("p50_c16_ms", "p50 at c16", "ms", -1), ("p99_c16_ms", "p99 at c16", "ms", -1),
           ("memory_mb", "memory", "MB", -1), ("start_seconds", "start to first answer", "s", -1))
P50_MARGIN_MS = 2.0  # the goal: ours within this of the best p50 at concurrency 1
SETTLE_TIMEOUT = 60.0  # how long a run waits for the machine to go idle (--quick: 5 s, it tests the harness)


@dataclass
class Point:
    server: str
    concurrency: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    failed: int
    client_cores: float  # CPU the load generator used, in cores
    machine_cores: float  # CPU the whole machine used, in cores
    frontend_cores: float | None = None  # CPU TorchServe's Java frontend used (its Python workers not included)


def settings_name(workers: int, threads: int, batch: int, delay: int) -> str:
    return f"{workers} workers x {threads} threads, batch {batch}, delay {delay} ms"


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def process_seconds(pid: int) -> float:
    """CPU seconds (user + system) one process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ts_pid() -> int:
    """The pid of the TorchServe frontend that serve.sh started for the current SERVE_HOME."""
    return int((Instance.current().home / "tmp" / ".model_server.pid").read_text().strip())


def settle(idle_cores: float = 0.3, timeout: float | None = None) -> None:
    """Wait until the machine is idle: a server keeps working through the requests queued when the last run ended."""
    deadline = time.monotonic() + (SETTLE_TIMEOUT if timeout is None else timeout)
    previous = machine_busy()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = machine_busy()
        if (current[0] - previous[0]) / (current[1] - previous[1]) * os.cpu_count() < idle_cores:
            return
        previous = current


def wrk(url: str, files: list[Path], concurrency: int, seconds: float, headers: dict[str, str]) -> str:
    """One wrk run: its JSON summary line (load_test/wrk.lua)."""
    command = ["wrk", "-t1", f"-c{concurrency}", "--timeout", "120s", "-s", str(WRK_SCRIPT), f"-d{seconds:g}s"]
    for key, value in headers.items():
        command += ["-H", f"{key}: {value}"]
    run = subprocess.run([*command, url, "--", *map(str, files)], capture_output=True, text=True, check=True)
    return run.stdout


def warm_up(url: str, files: list[Path], concurrency: int, seconds: float, headers: dict[str, str]) -> None:
    """A short unrecorded run, on an idle machine."""
    settle()
    wrk(url, files, concurrency, max(1, round(seconds / 4)), headers)


def drive(server: str, url: str, files: list[Path], concurrency: int, seconds: float,
          headers: dict[str, str], frontend: int | None = None) -> Point:
    """One wrk run (after a short unrecorded warm-up at the same concurrency), each on an idle machine."""
    warm_up(url, files, concurrency, seconds, headers)
    settle()
    before, busy_before = os.times(), machine_busy()
    frontend_before = process_seconds(frontend) if frontend else 0.0
    output = wrk(url, files, concurrency, seconds, headers)
    after, busy_after = os.times(), machine_busy()
    frontend_used = process_seconds(frontend) - frontend_before if frontend else None
    summary = json.loads(output.strip().splitlines()[-1])
    elapsed = summary["duration_us"] / 1e6
    errors = summary["errors"]
    failed = errors["status"] + errors["timeout"] + errors["connect"] + errors["read"] + errors["write"]
    client = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    busy = (busy_after[0] - busy_before[0]) / (busy_after[1] - busy_before[1]) * os.cpu_count()
    latency = summary["latency_us"]
    return Point(server, concurrency, (summary["requests"] - errors["status"]) / elapsed, latency["p50"] / 1e3,
                 latency["p90"] / 1e3, latency["p99"] / 1e3, summary["requests"], failed, client / elapsed, busy,
                 None if frontend_used is None else frontend_used / elapsed)


class Bench:
    def __init__(self, seconds: float, quick: bool, out: Path):
        self.seconds, self.quick, self.out = seconds, quick, out
        self.concurrency = CONCURRENCY[:2] if quick else CONCURRENCY
        self.points: list[Point] = []
        self.settings: list[Point] = []
        self.peer_points: list[Point] = []
        self.started = time.monotonic()

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f} s] {message}", flush=True)

    def sweep(self, server: str, url: str, files: list[Path], headers: dict[str, str],
              frontend: int | None = None) -> None:
        # a full-length unrecorded run first: workers' TorchScript and the Java frontend's JIT settle
        drive(server, url, files, self.concurrency[-1], self.seconds, headers)
        for concurrency in self.concurrency:
            point = drive(server, url, files, concurrency, self.seconds, headers, frontend)
            self.points.append(point)
            self.log(f"{server}, concurrency {concurrency}: {point.rps:.1f} req/s, p50 {point.p50_ms:.0f} ms, "
                     f"p99 {point.p99_ms:.0f} ms, {point.failed} failed, client {point.client_cores:.2f} cores")


    def measure(self, running: servers.Running, settings: str, kind: str, files: list[Path],
                photos: dict[str, bytes], reference: dict[str, dict]) -> dict:
        """A row of the Peers table: answers checked on every photo, concurrency 1, 16 and 64 (--quick: 1 and 16),
        then memory."""
        same_answers(running, photos, reference)
        points = {}
        for concurrency in PEER_CONCURRENCY[:2] if self.quick else PEER_CONCURRENCY:
            points[concurrency] = drive(running.name, running.url, files, concurrency, self.seconds, running.headers)
            self.peer_points.append(points[concurrency])
            self.log(f"{running.name} ({settings}), concurrency {concurrency}: {points[concurrency].rps:.1f} req/s, "
                     f"p50 {points[concurrency].p50_ms:.1f} ms, p99 {points[concurrency].p99_ms:.1f} ms, "
                     f"{points[concurrency].failed} failed")
        memory = servers.tree_memory(running.roots)
        self.log(f"{running.name}: start to first answer {running.start_seconds:.1f} s, memory "
                 f"{memory['total_mb']:.0f} MB PSS in {len(memory['processes'])} processes")
        return peer_row(running, settings, kind, {c: asdict(p) for c, p in points.items()}, memory)


def peer_row(running: servers.Running, settings: str, kind: str, points: dict[int, dict], memory: dict) -> dict:
    def figure(concurrency: int, key: str) -> float | None:
        return points[concurrency][key] if concurrency in points else None

    return {"server": running.name, "kind": kind, "settings": settings,
            "rps_c16": figure(16, "rps"), "rps_c64": figure(64, "rps"),
            "p50_c1_ms": figure(1, "p50_ms"), "p99_c1_ms": figure(1, "p99_ms"),
            "p50_c16_ms": figure(16, "p50_ms"), "p99_c16_ms": figure(16, "p99_ms"),
            "failed": sum(p["failed"] for p in points.values()), "memory_mb": memory["total_mb"],
            "processes": memory["processes"], "start_seconds": running.start_seconds}


def reference_answers(archive: Path, photos: dict[str, bytes]) -> dict[str, dict]:
    """What our handler answers for each photo, in-process (``load_test.limit.through``), one at a time."""
    handler, model = limit.load_pipeline(archive, 1)
    return {name: limit.through(handler, model, [body])[0] for name, body in photos.items()}


def same_answers(running: servers.Running, photos: dict[str, bytes], reference: dict[str, dict],
                 tolerance: float = 1e-4) -> None:
    """A server answers every photo as our handler does in-process: the same top-5 labels, each probability within
    ``tolerance`` (a batch can move the last digits)."""
    check_answers(running.post, photos)
    for name, body in photos.items():
        response = running.post(body)
        response.raise_for_status()
        answer, expected = response.json(), reference[name]
        if set(answer) != set(expected) or max(abs(answer[k] - expected[k]) for k in expected) > tolerance:
            raise RuntimeError(f"{running.name}: {name} answered {answer}; our handler answers {expected}")


def compare_peers(bench: Bench, archive: Path, manifest: Manifest, version: str, shipped: tuple, stock: Path,
                  stock_server: str, flask: dict, tmp: Path, photos: dict[str, bytes], files: list[Path]) -> dict:
    """6. Each peer's settings swept at concurrency 16; then ours (serve.sh with a store of this one version) and each
    peer with its best settings, one after the other; then the stock handler's start-up and memory (TorchServe
    started with it alone). ``stock_server`` and ``flask`` (``running``, ``memory``, ``server``): the baselines as
    measured in sections 4 and 5, whose req/s and latency the Peers table repeats."""
    probe = (photos[PROBE[0]], PROBE[1])
    reference = reference_answers(archive, photos)
    grid = peers.QUICK_GRID if bench.quick else peers.grid()
    logs = bench.out / "peers"
    sweep, chosen = {}, {}
    for peer, name in peers.PEERS.items():
        sweep[name] = []
        for setting in grid if len(grid) > 1 else []:  # one setting (--quick): nothing to choose
            with peers.serve(peer, setting, archive, logs, *probe) as running:
                point = drive(f"{name}, {setting.name(peer)}", running.url, files, SWEEP_CONCURRENCY, bench.seconds,
                              {})
            sweep[name].append({"settings": setting.name(peer), **asdict(setting), **asdict(point)})
            bench.log(f"sweep, {point.server}: {point.rps:.1f} req/s, p50 {point.p50_ms:.1f} ms, "
                      f"{point.failed} failed (started in {running.start_seconds:.1f} s)")
        chosen[peer] = max(grid, key=lambda s: next(((p["failed"] == 0, p["rps"]) for p in sweep[name]
                                                     if p["settings"] == s.name(peer)), (False, 0.0)))
        bench.log(f"{name}: best settings {chosen[peer].name(peer)}")

    rows = []
    store = servers.single_store(tmp / "alone", manifest, MODEL, version)
    began = time.perf_counter()
    with servers.torchserve(store, tmp / "serve-alone") as (ts, _):
        headers = {"Authorization": f"Bearer {ts.token('inference')}"}
        url = f"{ts.inference_url}/predictions/{MODEL}"
        seconds = servers.first_answer(url, *probe, began, lambda: None, 60, Path(os.environ["LOG_DIR"]), headers)
        ours = servers.Running(f"ours ({MODEL} {version})", url, servers.ours_roots(), seconds, headers)
        rows.append(bench.measure(ours, settings_name(*shipped), "ours", files, photos, reference))
    for peer, name in peers.PEERS.items():
        with peers.serve(peer, chosen[peer], archive, logs, *probe) as running:
            rows.append(bench.measure(running, chosen[peer].name(peer), "peer", files, photos, reference))

    with servers.stock_torchserve(stock, tmp / "stock-alone", *probe) as running:
        check_answers(running.post, photos)
        warm_up(running.url, files, SWEEP_CONCURRENCY, bench.seconds, {})
        memory = servers.tree_memory(running.roots)
        bench.log(f"{running.name}: start to first answer {running.start_seconds:.1f} s, memory "
                  f"{memory['total_mb']:.0f} MB PSS")
    # the baselines' req/s and latency: from their runs in the served table
    for baseline in ({"running": running, "memory": memory, "server": stock_server}, flask):
        points = {p.concurrency: asdict(p) for p in bench.points if p.server == baseline["server"]}
        settings = baseline["server"].removeprefix(baseline["running"].name).strip(", ")
        settings = settings[1:-1] if settings.startswith("(") and settings.endswith(")") else settings
        rows.append(peer_row(baseline["running"], settings, "baseline", points, baseline["memory"]))
    return {"grid": [s.name() for s in grid], "sweep": sweep, "rows": rows, "wins": peer_wins(rows),
            "goals": peer_goals(rows), "points": [asdict(p) for p in bench.peer_points]}


def peer_wins(rows: list[dict]) -> list[str]:
    """One line per figure where a peer beats ours."""
    ours = next(row for row in rows if row["kind"] == "ours")
    lines = []
    for row in rows:
        if row["kind"] != "peer":
            continue
        for key, label, unit, sign in FIGURES:
            if row[key] is not None and ours[key] is not None and sign * (row[key] - ours[key]) > 0:
                lines.append(f"{row['server']} wins {label} by {abs(row[key] - ours[key]):.1f} {unit} "
                             f"({row[key]:.1f} against ours {ours[key]:.1f})")
    return lines


def peer_goals(rows: list[dict]) -> list[dict]:
    """Ours against the peers: ahead of every peer on throughput and start-up, within P50_MARGIN_MS of the best p50
    at concurrency 1."""
    ours = next(row for row in rows if row["kind"] == "ours")
    others = [row for row in rows if row["kind"] == "peer"]
    goals = []
    for key, label, unit, sign in FIGURES:
        if key not in ("rps_c16", "rps_c64", "start_seconds") or ours[key] is None:  # c64: not in --quick
            continue
        best = max(others, key=lambda row: sign * row[key])
        goals.append({"goal": f"ours ahead of every peer on {label}",
                      "measured": f"ours {ours[key]:.1f} {unit}, best peer {best['server']} {best[key]:.1f} {unit}",
                      "met": sign * (ours[key] - best[key]) > 0})
    best = min([ours, *others], key=lambda row: row["p50_c1_ms"])
    goals.append({"goal": f"ours within {P50_MARGIN_MS:g} ms of the best p50 at c1",
                  "measured": f"ours {ours['p50_c1_ms']:.1f} ms, best {best['server']} {best['p50_c1_ms']:.1f} ms "
                              f"({ours['p50_c1_ms'] - best['p50_c1_ms']:+.1f} ms)",
                  "met": ours["p50_c1_ms"] - best["p50_c1_ms"] <= P50_MARGIN_MS})
    return goals


def check_answers(post, photos: dict[str, bytes]) -> None:
    """A server answers the real photos with their classes before it is measured."""
    for name, expected in (("chelsea@1", "cat"), ("coffee@1", "espresso")):
        label = servers.top1(post(photos[name]))
        if expected not in label:
            raise RuntimeError(f"{name}: answered {label!r}, expected a {expected}")


def runtime_versions(spec) -> dict[str, str]:
    """The model's first version on each runtime, the default version's runtime first."""
    default = spec.versions[spec.default_version]
    found = {default.runtime: default.version}
    for version in spec.versions.values():
        found.setdefault(version.runtime, version.version)
    return found


def rss_mib(pid: int) -> float:
    """A process's resident memory, from /proc."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def worker_load_ms(ts, name: str) -> list[float]:
    """TorchServe's own WorkerLoadTime of each worker of model ``name`` (start of the process to READY)."""
    import requests

    text = requests.get(f"{ts.metrics_url}/metrics", timeout=30).text
    pattern = re.compile(rf'^WorkerLoadTime{{WorkerName="W-\d+-{re.escape(name)}_[^"]*".*}} (\S+)$', re.MULTILINE)
    return [float(value) for value in pattern.findall(text)]


def footprint(ts, archive: Path, name: str, workers: int, photos: dict[str, bytes], headers: dict[str, str]) -> dict:
    """Archive size; wall time to register ``archive`` alone on an idle server (to every worker READY) and
    TorchServe's WorkerLoadTime; each worker's RSS after answering every photo."""
    import requests

    settle()
    began = time.perf_counter()
    servers.register(ts, archive, name, initial_workers=workers)
    register_seconds = time.perf_counter() - began
    for body in list(photos.values()) * workers:
        requests.post(f"{ts.inference_url}/predictions/{name}", data=body, headers=headers, timeout=60).raise_for_status()
    pids = [worker["pid"] for worker in ts.versions(name)[0]["workers"]]
    result = {"archive_mb": archive.stat().st_size / 1e6, "register_seconds": register_seconds,
              "worker_load_ms": max(worker_load_ms(ts, name)), "worker_rss_mib": max(rss_mib(pid) for pid in pids)}
    servers.unregister(ts, name)
    return result


def run(seconds: float, quick: bool, out: Path) -> dict:
    import requests

    global SETTLE_TIMEOUT
    SETTLE_TIMEOUT = 5.0 if quick else 60.0
    bench = Bench(seconds, quick, out)
    cores = os.cpu_count()
    rounds = 1 if quick else ROUNDS
    out.mkdir(parents=True, exist_ok=True)
    photos = inputs.photos()
    files = inputs.write(photos, out / "inputs")
    payloads = list(photos.values())
    manifest = Manifest()
    spec = load_specs()[MODEL]
    versions = runtime_versions(spec)
    archives = {runtime: manifest.verify(MODEL, version)[0] for runtime, version in versions.items()}
    default = next(iter(versions))  # the default version's runtime
    settings = {runtime: archive_settings(archive) for runtime, archive in archives.items()}
    shipped = settings[default]

    # 1. the model's forward alone on each runtime, one thread, one image; the runtimes take turns, round after
    # round, so that the host's drift falls on all of them alike
    variants = {"TorchScript, traced and frozen": ("torchscript", False),
                "TorchScript + optimize_for_inference (served)": ("torchscript", None),
                "ONNX Runtime": ("onnxruntime", None)}
    variants = {name: v for name, v in variants.items() if v[0] in archives}
    forward = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (runtime, optimize) in variants.items():
            forward[name].append(limit.forward_rate(archives[runtime], payloads, 1, seconds / 2, 1, optimize))
    for name, rates in forward.items():
        bench.log(f"forward alone, 1 thread, batch 1, {name}: {statistics.median(rates):.1f} img/s (rounds: "
                  + ", ".join(f"{r:.1f}" for r in rates) + ")")

    # 2. the limit on each runtime
    limits = {runtime: {"threads": {}, "processes": {}} for runtime in archives}
    best = {}
    for runtime, archive in archives.items():
        for batch in BATCHES[:1] if quick else BATCHES:
            for mode, values in limits[runtime].items():
                values[batch] = limit.throughput(archive, payloads, batch, mode, cores, seconds)
                bench.log(f"limit, {RUNTIMES[runtime]}, {mode}, batch {batch}: {values[batch]:.1f} img/s")
        best[runtime] = max(((mode, batch) for mode in limits[runtime] for batch in limits[runtime][mode]),
                            key=lambda key: limits[runtime][key[0]][key[1]])

    names = {runtime: f"ours, {RUNTIMES[runtime]} ({MODEL} {version}): TorchServe, {settings_name(*settings[runtime])}"
             for runtime, version in versions.items()}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        store = servers.bench_store(Path(tmp) / "store", manifest)
        stock = servers.stock_archive(archives["torchscript"], store)

        # 3 and 4a: our handler on each runtime and the stock handler under TorchServe's defaults, in one TorchServe
        with servers.torchserve(store, Path(tmp) / "serve") as (ts, start_seconds):
            bench.log(f"serve.sh start: every model READY in {start_seconds:.1f} s")
            headers = {"Authorization": f"Bearer {ts.token('inference')}"}
            footprints = {}
            for runtime, archive in archives.items():
                footprints[runtime] = footprint(ts, archive, f"footprint_{runtime}", settings[runtime][0], photos,
                                                headers)
                bench.log(f"footprint, {RUNTIMES[runtime]}: " + ", ".join(f"{k} {v:.1f}"
                                                                          for k, v in footprints[runtime].items()))
            # this machine's speed drifts (shared host): in-process references are taken right beside the served
            # points they are compared with, while TorchServe idles
            single = {runtime: {t: limit.single_image_latency(archive, payloads, t) * 1e3 for t in sorted({1, cores})}
                      for runtime, archive in archives.items()}
            for runtime, version in versions.items():
                url = f"{ts.inference_url}/predictions/{MODEL}/{version}"
                check_answers(lambda body: requests.post(url, data=body, headers=headers, timeout=60), photos)
                bench.log(f"in-process single image, {RUNTIMES[runtime]}: "
                          + ", ".join(f"{t} thread(s) {ms:.1f} ms" for t, ms in single[runtime].items()))
                bench.sweep(names[runtime], url, files, headers, frontend=ts_pid())

            # served against the limit, paired: each served run right after an in-process run of the limit
            pairs = []
            url = f"{ts.inference_url}/predictions/{MODEL}/{versions[default]}"
            for _ in range(rounds):
                in_process = limit.throughput(archives[default], payloads, best[default][1], best[default][0], cores,
                                              seconds)
                served = drive(names[default], url, files, SWEEP_CONCURRENCY, seconds, headers)
                pairs.append({"limit": in_process, "served": served.rps})
                bench.log(f"paired: limit {in_process:.1f} img/s, served {served.rps:.1f} req/s "
                          f"({served.rps / in_process:.2f} x)")

            for setting in GRID[:1] if quick else GRID:
                name = "sweep_" + "_".join(map(str, setting))
                servers.register(ts, servers.variant(archives[default], store, name, *setting), name)
                point = drive(settings_name(*setting), f"{ts.inference_url}/predictions/{name}", files,
                              SWEEP_CONCURRENCY, seconds, headers)
                bench.settings.append(point)
                servers.unregister(ts, name)
                bench.log(f"{point.server}, concurrency {SWEEP_CONCURRENCY}: {point.rps:.1f} req/s, "
                          f"p50 {point.p50_ms:.0f} ms")

            servers.register(ts, stock, "stock", initial_workers=cores)  # a new user's TorchServe: a worker per core
            check_answers(lambda body: ts.predict("stock", body), photos)
            stock_server = f"stock handler, TorchServe defaults ({cores} workers x torch's {cores} threads, batch 1)"
            bench.sweep(stock_server, f"{ts.inference_url}/predictions/stock", files, headers)
            servers.unregister(ts, "stock")

        # 4b: the stock handler with our settings; its only way to one torch thread per worker is OMP_NUM_THREADS
        with servers.torchserve(store, Path(tmp) / "serve-omp1", OMP_NUM_THREADS="1") as (ts, _):
            headers = {"Authorization": f"Bearer {ts.token('inference')}"}
            servers.register(ts, stock, "stock", initial_workers=shipped[0], batch_size=shipped[2],
                             max_batch_delay=shipped[3])
            check_answers(lambda body: ts.predict("stock", body), photos)
            bench.sweep(f"stock handler, our settings ({settings_name(*shipped)})",
                        f"{ts.inference_url}/predictions/stock", files, headers)

        # 5. the Flask app
        with servers.flask_app(out / "flask.log", photos[PROBE[0]], PROBE[1]) as running:
            check_answers(running.post, photos)
            flask = {"running": running, "server": f"{running.name}, eager model (tutorial)"}
            bench.sweep(flask["server"], running.url, files, {})
            flask["memory"] = servers.tree_memory(running.roots)

        # 6. the peers, and every server's start-up and memory
        peer_results = compare_peers(bench, archives[default], manifest, versions[default], shipped, stock,
                                     stock_server, flask, Path(tmp), photos, files)

    return {
        "machine": machine(),
        "seconds_per_point": seconds,
        "inputs": {name: len(body) for name, body in photos.items()},
        "shipped": dict(zip(("workers", "threads", "batch_size", "max_batch_delay_ms"), shipped)),
        "versions": versions,
        "default_runtime": default,
        "forward": forward,
        "limit": {runtime: {mode: {str(b): v for b, v in values.items()} for mode, values in modes.items()}
                  for runtime, modes in limits.items()},
        "paired": pairs,
        "single_image_ms": {runtime: {str(t): v for t, v in values.items()} for runtime, values in single.items()},
        "footprint": footprints,
        "serve_start_seconds": start_seconds,
        "servers": [asdict(p) for p in bench.points],
        "settings": [asdict(p) for p in bench.settings],
        "ours": names,
        "peers": peer_results,
    }


def archive_settings(archive: Path) -> tuple[int, int, int, int]:
    """(workers, threads per worker, batchSize, maxBatchDelay) from the model-config.yaml inside an archive."""
    with zipfile.ZipFile(archive) as mar:
        config = yaml.safe_load(mar.read("model-config.yaml"))
    return config["minWorkers"], config["handler"]["threads"], config["batchSize"], config["maxBatchDelay"]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    from importlib.metadata import version

    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": version("onnxruntime"),
            "torchserve": version("torchserve"), "litserve": version("litserve"), "bentoml": version("bentoml"),
            "ray": version("ray"), "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True,
                                                                        check=False).stdout.split()[1],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# --- the report ------------------------------------------------------------------------------------------------------


def saturated(points: list[dict], server: str) -> float:
    """Throughput at saturation: the best at concurrency 16 or more, where every server has work queued (in a
    short run, the highest concurrency measured)."""
    own = [p for p in points if p["server"] == server]
    loaded = [p for p in own if p["concurrency"] >= SWEEP_CONCURRENCY] or own[-1:]
    return max(p["rps"] for p in loaded)


def at(points: list[dict], server: str, concurrency: int) -> dict:
    own = [p for p in points if p["server"] == server]
    return next((p for p in own if p["concurrency"] == concurrency), own[-1])


def limit_best(results: dict, runtime: str) -> float:
    return max(v for values in results["limit"][runtime].values() for v in values.values())


def targets(results: dict) -> list[tuple[str, str, str, bool]]:
    """(target, measured, goal, met) for the efficientnet_lite0 targets."""
    points, default = results["servers"], results["default_runtime"]
    ours = results["ours"][default]
    stock_default, stock_ours, flask = [name for name in dict.fromkeys(p["server"] for p in points)
                                        if name not in results["ours"].values()]
    forward = {name: statistics.median(rates) for name, rates in results["forward"].items()}
    ours_best = saturated(points, ours)
    single = results["single_image_ms"][default][str(results["shipped"]["threads"])]
    p50 = at(points, ours, 1)["p50_ms"]
    paired = statistics.median(pair["served"] / pair["limit"] for pair in results["paired"])
    rows = []
    if "ONNX Runtime" in forward:
        for name, rate in forward.items():
            if name != "ONNX Runtime":
                rows.append((f"forward, 1 thread: ONNX Runtime / {name}", forward["ONNX Runtime"] / rate, 3.0))
    rows += [
        (f"served at concurrency {SWEEP_CONCURRENCY} / in-process limit ({RUNTIMES[default]}), median of "
         f"{len(results['paired'])} paired runs", paired, 0.95),
        ("ours / stock handler under TorchServe's defaults, at saturation",
         ours_best / max(saturated(points, stock_default), 1e-9), 20.0),
        ("ours / stock handler under our settings, at saturation", ours_best / saturated(points, stock_ours), 1.3),
        ("ours / Flask app at concurrency 16", at(points, ours, 16)["rps"] / at(points, flask, 16)["rps"], 3.0),
    ]
    table = [(name, f"{value:.2f} x", f">= {goal:g} x", value >= goal) for name, value, goal in rows]
    table.append((f"p50 at concurrency 1 - in-process single image ({results['shipped']['threads']} thread)",
                  f"{p50 - single:+.1f} ms ({p50:.1f} vs {single:.1f})", "<= 5 ms", p50 - single <= 5))
    start = results["serve_start_seconds"]
    table.append(("serve.sh start to every model READY", f"{start:.1f} s", "<= 10 s", start <= 10))
    return table


def markdown(results: dict) -> str:
    m, runtimes = results["machine"], list(results["limit"])
    footprint_keys = (("archive_mb", "archive MB"), ("register_seconds", "register to READY, s"),
                      ("worker_load_ms", "WorkerLoadTime, ms"), ("worker_rss_mib", "worker RSS after warm-up, MiB"))
    lines = [
        f"# Benchmark: {MODEL}, served on {m['cores']} cores",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Linux {m['kernel']}; Python {m['python']}, "
        f"torch {m['torch']}, ONNX Runtime {m.get('onnxruntime', '-')}, TorchServe {m['torchserve']}; load generator "
        f"wrk {m['wrk']} (1 thread, closed loop); {results['seconds_per_point']:g} s per point after a warm-up; "
        f"{m['date']}.",
        f"Inputs: {len(results['inputs'])} real photos (6 photos at 0.5x, 1x, 2.5x: "
        f"{min(results['inputs'].values()) // 1000}-{max(results['inputs'].values()) // 1000} kB JPEG), "
        "the same bytes in the same order for every server.",
        "Versions: " + ", ".join(f"{RUNTIMES[r]} {v}" for r, v in results["versions"].items())
        + f"; the default is {results['versions'][results['default_runtime']]}.",
        "",
        "## Targets",
        "",
        "| target | measured | goal | met |",
        "| --- | --- | --- | --- |",
        *(f"| {name} | {value} | {goal} | {'yes' if met else '**no**'} |" for name, value, goal, met in targets(results)),
        "",
        "## Runtimes: the forward pass alone, 1 thread, batch 1 (images per second, runtimes taking turns)",
        "",
        "| model file and runtime | median | rounds |",
        "| --- | ---: | --- |",
        *(f"| {name} | {statistics.median(rates):.1f} | {', '.join(f'{r:.1f}' for r in rates)} |"
          for name, rates in results["forward"].items()),
        "",
        "## Runtimes: footprint (the version registered alone on an idle TorchServe)",
        "",
        "| | " + " | ".join(RUNTIMES[r] for r in runtimes) + " |",
        "| --- |" + " ---: |" * len(runtimes),
        *(f"| {label} | " + " | ".join(f"{results['footprint'][r][key]:.1f}" for r in runtimes) + " |"
          for key, label in footprint_keys),
        "",
        "## Served: requests per second and latency by concurrency",
        "",
        "CPU in cores: the load generator's own, the whole machine's, and (for ours) TorchServe's Java frontend's.",
        "",
        "| server | concurrency | req/s | p50 ms | p90 ms | p99 ms | failed | load generator | machine | frontend |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {p['server']} | {p['concurrency']} | {p['rps']:.1f} | {p['p50_ms']:.1f} | {p['p90_ms']:.1f} | "
          f"{p['p99_ms']:.1f} | {p['failed']} | {p['client_cores']:.2f} | {p['machine_cores']:.2f} | "
          f"{'-' if p.get('frontend_cores') is None else format(p['frontend_cores'], '.2f')} |"
          for p in results["servers"]),
        "",
        f"## Served against the limit, paired ({RUNTIMES[results['default_runtime']]}, concurrency "
        f"{SWEEP_CONCURRENCY}; each served run right after an in-process run)",
        "",
        "| round | in-process limit, img/s | served, req/s | ratio |",
        "| ---: | ---: | ---: | ---: |",
        *(f"| {i + 1} | {pair['limit']:.1f} | {pair['served']:.1f} | {pair['served'] / pair['limit']:.2f} |"
          for i, pair in enumerate(results["paired"])),
        "",
        f"## Server settings for our handler ({RUNTIMES[results['default_runtime']]}), at concurrency "
        f"{SWEEP_CONCURRENCY}",
        "",
        "| settings | req/s | p50 ms | p99 ms | failed |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {p['server']} | {p['rps']:.1f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['failed']} |"
          for p in results["settings"]),
        "",
        "## The limit: the same pipeline in-process (decode, preprocess, forward, top-k), images per second",
        "",
        "| batch | " + " | ".join(f"{RUNTIMES[r]}: 1 process x {m['cores']} threads | {RUNTIMES[r]}: {m['cores']} "
                                  f"processes x 1 thread" for r in runtimes) + " |",
        "| ---: |" + " ---: | ---: |" * len(runtimes),
        *(f"| {batch} | " + " | ".join(f"{results['limit'][r]['threads'][batch]:.1f} | "
                                       f"{results['limit'][r]['processes'][batch]:.1f}" for r in runtimes) + " |"
          for batch in results["limit"][runtimes[0]]["threads"]),
        "",
        "Single image in-process (median over the inputs): "
        + "; ".join(f"{RUNTIMES[r]}: " + ", ".join(f"{t} thread(s) {ms:.1f} ms" for t, ms in values.items())
                    for r, values in results["single_image_ms"].items()) + ".",
        "",
        "![throughput](throughput.png)",
        "",
        "![latency](latency.png)",
        "",
    ]
    if results.get("peers"):
        lines += peers_markdown(results)
    return "\n".join(lines)


def peers_markdown(results: dict) -> list[str]:
    compared = results["peers"]
    rows = compared["rows"]

    def number(value: float | None, spec: str = ".1f") -> str:
        return "-" if value is None else format(value, spec)

    def pair(row: dict, concurrency: int) -> str:
        p50, p99 = row[f"p50_c{concurrency}_ms"], row[f"p99_c{concurrency}_ms"]
        return "-" if p50 is None else f"{p50:.1f} / {p99:.1f}"

    lines = [
        "## Peers: LitServe, BentoML and Ray Serve on our pipeline",
        "",
        f"Each peer serves {MODEL} {results['versions'][results['default_runtime']]} on ONNX Runtime through our "
        "handler's own decode, collate, forward and answer (`load_test/peers.py`: the same preprocessing, the same "
        "answers, checked on every photo against our handler in-process), with the settings that gave it the most "
        f"req/s at concurrency {SWEEP_CONCURRENCY} in the sweep below; the same photos, the same wrk. Ours is "
        "`serve.sh start` with a store of this one version, measured through the front door, right before the peers. "
        "Memory: PSS of every process of the server after its runs (the processes are listed below). Start: from "
        "spawning the server (`serve.sh start`, `torchserve --start`, the app's command) to its first correct answer "
        f"on a real photo. The stock handler's and the Flask app's req/s and latency are their runs in the served "
        "table above; their start and memory are measured the same way as the others'.",
        "",
        "| server | chosen settings | req/s c16 | req/s c64 | p50 / p99 c1, ms | p50 / p99 c16, ms | memory MB PSS | "
        "start to first answer, s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {row['server']} | {row['settings']} | {number(row['rps_c16'])} | {number(row['rps_c64'])} | "
          f"{pair(row, 1)} | {pair(row, 16)} | {row['memory_mb']:.0f} | {row['start_seconds']:.1f} |" for row in rows),
        "",
        *(["Where a peer beats ours:", "", *(f"- {line}" for line in compared["wins"])] if compared["wins"]
          else ["No peer beats ours on any of these figures."]),
        "",
        "| goal | measured | met |",
        "| --- | --- | --- |",
        *(f"| {goal['goal']} | {goal['measured']} | {'yes' if goal['met'] else '**no**'} |"
          for goal in compared["goals"]),
        "",
        "What each server's memory counts (PSS, MB):",
        "",
        *(f"- {row['server']}: " + ", ".join(f"{count} x {name} {mb:.0f}" if count > 1 else f"{name} {mb:.0f}"
                                            for name, count, mb in process_groups(row["processes"]))
          for row in rows),
        "",
    ]
    if any(compared["sweep"].values()):
        lines += [
            f"Sweep at concurrency {SWEEP_CONCURRENCY}, each setting on a fresh start (workers x ONNX Runtime threads "
            "each; batching with the peer's own dynamic batching):",
            "",
            "| peer | settings | req/s | p50 ms | p99 ms | failed |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
            *(f"| {peer} | {p['settings']} | {p['rps']:.1f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['failed']} |"
              for peer, points in compared["sweep"].items() for p in points),
            "",
        ]
    return [*lines, "![peers](peers.png)", ""]


def process_groups(processes: list[dict]) -> list[tuple[str, int, float]]:
    """Processes grouped by what they are: (name, count, PSS MB), largest first."""
    groups: dict[str, list[float]] = {}
    for process in processes:
        words = process["name"].split()
        if words[0].startswith("python"):
            rest = [w for w in words[1:] if not w.startswith("-")]
            code = words[words.index("-c") + 1:] if "-c" in words else []
            name = (words[words.index("-m") + 1] if "-m" in words  # python -m module
                    else f"{code[1]} (python -c)" if code[:1] == ["from"] and len(code) > 1  # multiprocessing's
                    else (rest or ["python"])[0])  # python script.py
        elif words[0].endswith(":"):  # nginx: master process ...
            name = " ".join(words[:2])
        else:
            name = words[0].split("(")[0].rstrip("-0123456789") or words[0]
        groups.setdefault(name, []).append(process["pss_mb"])
    return sorted(((name, len(mb), sum(mb)) for name, mb in groups.items()), key=lambda group: -group[2])


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results["servers"]
    names = list(dict.fromkeys(p["server"] for p in points))

    figure, axis = plt.subplots(figsize=(9, 5.5))
    for name in names:
        own = [p for p in points if p["server"] == name]
        axis.plot([p["concurrency"] for p in own], [p["rps"] for p in own], marker="o", label=name)
    for runtime, style in zip(results["limit"], (":", "-.")):
        best = limit_best(results, runtime)
        axis.axhline(best, color="black", linestyle=style, label=f"in-process limit, {RUNTIMES[runtime]} ({best:.0f} img/s)")
    axis.set(xscale="log", xlabel="concurrent clients", ylabel="requests per second",
             title=f"{MODEL}: throughput on {results['machine']['cores']} cores")
    axis.set_xticks(sorted({p["concurrency"] for p in points}), labels=sorted({p["concurrency"] for p in points}))
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "throughput.png", dpi=110)

    figure, axis = plt.subplots(figsize=(9, 5.5))
    for index, name in enumerate(names):
        own = [p for p in points if p["server"] == name]
        color = f"C{index}"
        x = [p["concurrency"] for p in own]
        axis.plot(x, [p["p50_ms"] for p in own], marker="o", color=color, label=f"{name}: p50")
        axis.plot(x, [p["p99_ms"] for p in own], marker="^", linestyle="--", color=color, label="p99")
    axis.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency (ms)",
             title=f"{MODEL}: latency, p50 (solid) and p99 (dashed)")
    axis.set_xticks(sorted({p["concurrency"] for p in points}), labels=sorted({p["concurrency"] for p in points}))
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(out / "latency.png", dpi=110)

    if results.get("peers"):
        peers_plot(results["peers"]["rows"], out / "peers.png")


def peers_plot(rows: list[dict], path: Path) -> None:
    """The Peers table as bars: throughput, latency, memory, start-up; ours first, in the first colour."""
    import matplotlib.pyplot as plt

    names = [row["server"].split(" (")[0].replace(", TorchServe defaults", "\n(TorchServe defaults)") for row in rows]
    panels = (("requests per second (more is better)", (("rps_c16", "c16"), ("rps_c64", "c64"))),
              ("latency, ms (less is better)", (("p50_c1_ms", "p50 c1"), ("p99_c1_ms", "p99 c1"),
                                                ("p50_c16_ms", "p50 c16"), ("p99_c16_ms", "p99 c16"))),
              ("memory, MB PSS of every process (less is better)", (("memory_mb", "memory"),)),
              ("start to first correct answer, s (less is better)", (("start_seconds", "start"),)))
    figure, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    for axis, (title, series) in zip(axes.flat, panels):
        width = 0.8 / len(series)
        for index, (key, label) in enumerate(series):
            xs = [i + (index - (len(series) - 1) / 2) * width for i in range(len(rows))]
            values = [row[key] if row[key] is not None else float("nan") for row in rows]
            bars = axis.bar(xs, values, width, label=label if len(series) > 1 else None,
                            color=[f"C{index}" if len(series) > 1 else ("C0" if row["kind"] == "ours" else "C7")
                                   for row in rows])
            axis.bar_label(bars, labels=["-" if row[key] is None else f"{row[key]:.0f}" if row[key] >= 10
                                         else f"{row[key]:.1f}" for row in rows], fontsize=7, padding=1)
        axis.set_xticks(range(len(rows)), labels=names, fontsize=8, rotation=20, ha="right")
        axis.set_title(title, fontsize=10)
        axis.set_yscale("log" if title.startswith("latency") else "linear")
        axis.grid(axis="y", alpha=0.3)
        if len(series) > 1:
            axis.legend(fontsize=8)
    figure.suptitle(f"{MODEL}: ours against LitServe, BentoML and Ray Serve on the same pipeline; "
                    "stock handler and Flask app for reference", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per point")
    parser.add_argument("--quick", action="store_true", help="a short run of every part (the harness test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = run(args.seconds, args.quick, args.out)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2))
    (args.out / "bench.md").write_text(markdown(results))
    plots(results, args.out)
    print()
    print((args.out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
