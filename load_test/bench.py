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
5. the tutorial Flask app on the eager model.

The load generator is wrk (C, one thread, closed loop: ``concurrency`` connections each sending the next photo as soon
as the last answer arrived); its own CPU use is measured and reported next to the machine's. Output under
``load_test/results/``: ``bench.md`` (tables, targets, machine), ``bench.json``, ``throughput.png``, ``latency.png``.
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
from load_test import inputs, limit, servers
from manage.client import REPO, serve_home

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
    return int((serve_home() / "tmp" / ".model_server.pid").read_text().strip())


def settle(idle_cores: float = 0.3, timeout: float = 60.0) -> None:
    """Wait until the machine is idle: a server keeps working through the requests queued when the last run ended."""
    deadline = time.monotonic() + timeout
    previous = machine_busy()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = machine_busy()
        if (current[0] - previous[0]) / (current[1] - previous[1]) * os.cpu_count() < idle_cores:
            return
        previous = current


def drive(server: str, url: str, files: list[Path], concurrency: int, seconds: float,
          headers: dict[str, str], frontend: int | None = None) -> Point:
    """One wrk run (after a short unrecorded warm-up at the same concurrency), each on an idle machine."""
    command = ["wrk", "-t1", f"-c{concurrency}", "--timeout", "120s", "-s", str(WRK_SCRIPT)]
    for key, value in headers.items():
        command += ["-H", f"{key}: {value}"]
    tail = [url, "--", *map(str, files)]
    settle()
    subprocess.run([*command, f"-d{max(1, round(seconds / 4))}s", *tail], capture_output=True, check=True)
    settle()
    before, busy_before = os.times(), machine_busy()
    frontend_before = process_seconds(frontend) if frontend else 0.0
    run = subprocess.run([*command, f"-d{seconds:g}s", *tail], capture_output=True, text=True, check=True)
    after, busy_after = os.times(), machine_busy()
    frontend_used = process_seconds(frontend) - frontend_before if frontend else None
    summary = json.loads(run.stdout.strip().splitlines()[-1])
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
            bench.sweep(f"stock handler, TorchServe defaults ({cores} workers x torch's {cores} threads, batch 1)",
                        f"{ts.inference_url}/predictions/stock", files, headers)
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
    with servers.flask_app(out / "flask.log") as url:
        check_answers(lambda body: requests.post(url, data=body, timeout=60), photos)
        bench.sweep("Flask app, eager model (tutorial)", url, files, {})

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
            "torchserve": version("torchserve"), "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True,
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
    return "\n".join(lines)


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
