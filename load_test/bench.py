"""``make bench``: how close our TorchServe gets to this machine's limit, and how far ahead of what users would run
instead, measured in one run with the same inputs and the same load generator.

The parts (docs/performance.md, "The benchmark"): 1. the runtimes, the model's forward pass alone, taking turns over
rounds; 2. the limit, the served pipeline in-process (``load_test/limit.py``); 3. our handler in TorchServe, one
version per runtime: its footprint, concurrency 1 to 64, served against the limit in pairs, then the settings that
matter (workers, threads, batchSize, maxBatchDelay); 4. TorchServe's stock ``image_classifier`` handler with
TorchServe's defaults and with our settings; 5. the tutorial Flask app; 6. the peers (``load_test/peers.py``), each
with its best settings of a sweep, then ours and each peer one after the other: answers checked, latency, memory (PSS
of the process tree) and the time from spawning the server to its first correct answer; 7. the same on the default
version quantized to INT8 as a user does it (``make quantize``), ours and every peer serving that one file.

The load generator is wrk (``load_test.measure.wrk``: one thread, closed loop), its own CPU reported beside the
machine's. Output under ``load_test/results/``: ``bench.md``, ``bench.json`` and the plots (``bench_report.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import requests
import yaml

from archives import load_specs
from archives.store import Manifest, store_of
from load_test import bench_report, inputs, limit, peers, servers
from load_test.bench_report import INT8_MIN_AGREEMENT, MODEL, RUNTIMES, SWEEP_CONCURRENCY, markdown, plots
from load_test.measure import RESULTS, CpuUse, machine, memory, model_store, quantized_store, settle, wrk

CONCURRENCY = (1, 4, 16, 64)
BATCHES = (1, 2, 4, 8)
ROUNDS = 3  # interleaved repeats of the comparisons the host's drift would otherwise skew
# (workers, threads per worker, batchSize, maxBatchDelay ms): the server settings swept for our handler
GRID = ((2, 1, 1, 0), (2, 1, 2, 1), (2, 1, 2, 5), (2, 1, 4, 1), (2, 1, 4, 2), (2, 1, 8, 5), (1, 2, 1, 0), (1, 2, 4, 2),
        (4, 1, 1, 0))
PEER_CONCURRENCY = (1, 16, 64)
PROBE = ("chelsea@1", "cat")  # the photo a starting server must answer, and what its top class must name
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


def warm_up(url: str, files: list[Path], concurrency: int, seconds: float, headers: dict[str, str]) -> None:
    """A short unrecorded run, on an idle machine."""
    settle(timeout=SETTLE_TIMEOUT)
    wrk(url, files, concurrency, max(1, round(seconds / 4)), headers)


def drive(server: str, url: str, files: list[Path], concurrency: int, seconds: float,
          headers: dict[str, str], frontend: int | None = None) -> Point:
    """One wrk run (after a short unrecorded warm-up at the same concurrency), each on an idle machine."""
    warm_up(url, files, concurrency, seconds, headers)
    settle(timeout=SETTLE_TIMEOUT)
    cpu = CpuUse(frontend=[frontend] if frontend else [])
    run = wrk(url, files, concurrency, seconds, headers)
    used, elapsed, latency = cpu.stop(), run["seconds"], run["latency_us"]
    return Point(server, concurrency, run["answered"] / elapsed, latency["p50"] / 1e3, latency["p90"] / 1e3,
                 latency["p99"] / 1e3, run["requests"], run["failed"], run["client_seconds"] / elapsed,
                 used["machine"], used["frontend"] / elapsed if frontend else None)


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
    peer with its best settings, one after the other (``head_to_head``); then the stock handler's start-up and memory
    (TorchServe started with it alone). ``stock_server`` and ``flask`` (``running``, ``memory``, ``server``): the
    baselines as measured in sections 4 and 5, whose req/s and latency the Peers table repeats. 7. The same head to
    head on the version's INT8 file (``int8_head_to_head``)."""
    probe = (photos[PROBE[0]], PROBE[1])
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

    rows = head_to_head(bench, store_of(tmp / "alone", [(MODEL, version)], manifest), version, archive, chosen,
                        settings_name(*shipped), tmp / "serve-alone", photos, files)

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
    return {"grid": [s.name() for s in grid], "sweep": sweep, "rows": rows, "wins": bench_report.peer_wins(rows),
            "goals": bench_report.peer_goals(rows), "points": [asdict(p) for p in bench.peer_points],
            "int8": int8_head_to_head(bench, version, chosen, settings_name(*shipped), tmp / "int8", photos, files)}


def head_to_head(bench: Bench, store: Path, version: str, archive: Path, chosen: dict, shipped: str, home: Path,
                 photos: dict[str, bytes], files: list[Path]) -> list[dict]:
    """Ours (serve.sh with ``store``, serving ``version`` of MODEL as its default) and each peer with its ``chosen``
    settings on ``archive``, the same version's file, one after the other: their rows of the Peers table."""
    probe, reference, logs = (photos[PROBE[0]], PROBE[1]), reference_answers(archive, photos), bench.out / "peers"
    began = time.perf_counter()
    with servers.torchserve(store, home) as (ts, _):
        ours = servers.Running(f"ours ({MODEL} {version})", f"{ts.inference_url}/predictions/{MODEL}/{version}",
                               list(ts.instance.pids().values()), 0.0, servers.bearer(ts))
        ours.start_seconds = servers.first_answer(ours, *probe, began, lambda: None, 60, ts.instance.log_dir)
        rows = [bench.measure(ours, shipped, "ours", files, photos, reference)]
    for peer in peers.PEERS:
        with peers.serve(peer, chosen[peer], archive, logs, *probe) as running:
            rows.append(bench.measure(running, chosen[peer].name(peer), "peer", files, photos, reference))
    return rows


def int8_head_to_head(bench: Bench, version: str, chosen: dict, shipped: str, home: Path, photos: dict[str, bytes],
                      files: list[Path]) -> dict:
    """7. The version quantized to INT8 as a user does it (``make quantize``, ``measure.quantized_store``), into a
    store of its own; then ours (serving that version alone) and each peer with the settings its fp32 sweep chose, all
    on that INT8 file (``head_to_head``): their rows, goals and the gate's figures."""
    store, int8 = quantized_store(load_specs()[MODEL].path, MODEL, version, home, INT8_MIN_AGREEMENT)
    entry = Manifest(store).get(MODEL, int8)
    gate = entry["quantization"]
    bench.log(f"INT8: {MODEL} {int8} made from {version}: {gate['agreeing']}/{gate['samples']} top-1 agreement, "
              f"min_agreement {gate['min_allowed']}")
    alone = store_of(home / "alone", [(MODEL, int8)], Manifest(store))  # ours serves the INT8 version alone
    rows = head_to_head(bench, alone, int8, alone / entry["archive"], chosen, shipped, home / "serve", photos, files)
    return {"version": int8, "from_version": version, "gate": {k: gate[k] for k in (
        "agreement", "agreeing", "samples", "min_allowed", "tie_gap", "compared_on", "max_drop")},
            "rows": rows, "wins": bench_report.peer_wins(rows), "goals": bench_report.peer_goals(rows)}


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


def worker_load_ms(ts, name: str) -> list[float]:
    """TorchServe's own WorkerLoadTime of each worker of model ``name`` (start of the process to READY)."""
    text = requests.get(f"{ts.metrics_url}/metrics", timeout=30).text
    pattern = re.compile(rf'^WorkerLoadTime{{WorkerName="W-\d+-{re.escape(name)}_[^"]*".*}} (\S+)$', re.MULTILINE)
    return [float(value) for value in pattern.findall(text)]


def footprint(ts, archive: Path, name: str, workers: int, photos: dict[str, bytes], headers: dict[str, str]) -> dict:
    """Archive size; wall time to register ``archive`` alone on an idle server (to every worker READY) and
    TorchServe's WorkerLoadTime; each worker's RSS after answering every photo."""
    settle(timeout=SETTLE_TIMEOUT)
    began = time.perf_counter()
    servers.register(ts, archive, name, initial_workers=workers)
    register_seconds = time.perf_counter() - began
    for body in list(photos.values()) * workers:
        requests.post(f"{ts.inference_url}/predictions/{name}", data=body, headers=headers, timeout=60).raise_for_status()
    pids = [worker["pid"] for worker in ts.versions(name)[0]["workers"]]
    result = {"archive_mb": archive.stat().st_size / 1e6, "register_seconds": register_seconds,
              "worker_load_ms": max(worker_load_ms(ts, name)),
              "worker_rss_mib": max(memory(pid).rss / 2**20 for pid in pids)}
    servers.unregister(ts, name)
    return result


def run(seconds: float, quick: bool, out: Path) -> dict:
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
        store = model_store(Path(tmp) / "store", source=manifest)
        stock = servers.stock_archive(archives["torchscript"], store)

        # 3 and 4a: our handler on each runtime and the stock handler under TorchServe's defaults, in one TorchServe
        with servers.torchserve(store, Path(tmp) / "serve") as (ts, start_seconds):
            bench.log(f"serve.sh start: every model READY in {start_seconds:.1f} s")
            headers = servers.bearer(ts)
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
                bench.sweep(names[runtime], url, files, headers, frontend=ts.instance.frontend_pid())

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
            headers = servers.bearer(ts)
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
