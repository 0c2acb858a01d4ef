"""The footprint's part 4: the frontend's CPU. wrk (one thread, 16 connections, closed loop) against digits and
efficientnet_lite0, through the front door and straight to TorchServe's inference port: the Java process's CPU time
(and per thread) per answered request and its share of all the CPU the machine used; then TorchServe settings that
might cut it, each on a fresh TorchServe (digits 2.0 only), the settings taking turns round after round; and
TorchServe's access log without and with its line per prediction, in turns within one TorchServe (log4j re-reading a
copy of log4j2.xml), the same JVM measured with and without the line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from archives.store import Manifest
from load_test import inputs
from load_test.footprint_start import CLK_TCK, MB, Demo, started
from load_test.measure import CpuUse, cpu_seconds, memory, model_store, settle, wrk
from serving.instance import REPO, Instance, wait_until

CONCURRENCY = 16
IDLE_SECONDS = 3.0  # the frontend's CPU at rest, measured before each loaded run
JIT_CHUNK_S, JIT_MAX_S, JIT_QUIET_CORES = 3.0, 60.0, 0.02  # JIT warm-up: chunks of load until its threads are quiet
CPU_MODELS = ("digits", "efficientnet_lite0")
VARIANT_STORE = (("digits", "2.0"),)  # what the fresh TorchServes of the settings experiment serve
ACCESS_TURNS = 4  # the access log with and without predictions in one JVM, this many times each


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
    vmargs = Instance.current().properties().get("vmargs", "")
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
    for arg, name in (("-XX:TieredStopAtLevel=1", "C2 too (no -XX:TieredStopAtLevel=1)"),
                      ("-Dio.netty.allocator.type=unpooled", "netty's pooled buffers (its default)")):
        if arg in vmargs.split():
            found.append((name, f"vmargs without {arg}", {},
                          {"vmargs": lambda value, arg=arg: " ".join(a for a in value.split() if a != arg)}))
    if vmargs:
        found.append(("the JVM's defaults (no vmargs)", ("config.properties without vmargs (G1, C1 and C2, "
                      "heap from 1/64 of memory)"), {}, {"vmargs": None}))
    else:
        found.append(("vmargs=-XX:+UseSerialGC", "vmargs=-XX:+UseSerialGC", {}, {"vmargs": "-XX:+UseSerialGC"}))
    return found


def thread_seconds(pid: int) -> dict[str, tuple[str, float]]:
    """Thread id → (name, CPU seconds) of every thread of a process (the name only /proc has)."""
    threads = {}
    for thread in psutil.Process(pid).threads():
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/task/{thread.id}/comm").read_text().strip()
            threads[str(thread.id)] = (name, thread.user_time + thread.system_time)
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


def jit_threads(pid: int) -> dict[str, float]:
    """Thread id → CPU seconds of the JVM's JIT compiler threads (the JVM starts and stops them as it needs)."""
    return {tid: used for tid, (name, used) in thread_seconds(pid).items() if thread_group(name) == "JIT compilers"}


def warm_jit(demo: Demo, url: str, files: list[Path]) -> dict[str, float]:
    """Load (unmeasured) until the JIT compilers are nearly quiet: a fresh JVM compiles the request path during its
    first thousands of requests. Quiet: under JIT_QUIET_CORES over a chunk, and none of its threads ended in it (an
    ending compiler thread takes its count with it)."""
    java, headers, began, last = demo.java(), demo.headers(), time.monotonic(), {}

    def quiet() -> bool:
        before = jit_threads(java)
        wrk(url, files, CONCURRENCY, JIT_CHUNK_S, headers, timeout=60)
        after = jit_threads(java)
        last["rate"] = sum(used - before.get(tid, 0.0) for tid, used in after.items()) / JIT_CHUNK_S
        return last["rate"] < JIT_QUIET_CORES and set(before) <= set(after)

    with contextlib.suppress(TimeoutError):
        wait_until(quiet, JIT_MAX_S, "the JIT compilers quiet", interval=0)
    return {"seconds": time.monotonic() - began, "last_jit_cores": last["rate"]}


def loaded_run(demo: Demo, url: str, files: list[Path], seconds: float, warm_seconds: float) -> dict[str, Any]:
    """One loaded run: a short unrecorded warm-up, the frontend's CPU at rest, then ``seconds`` of wrk; the CPU every
    part of the demo used during it."""
    headers = demo.headers()
    if warm_seconds > 0:
        wrk(url, files, CONCURRENCY, warm_seconds, headers, timeout=60)
    background = settle()
    java, nginx, health = demo.java(), demo.nginx(), [pid for pid in [demo.health()] if pid]
    workers = [w["pid"] for w in demo.workers()]
    at_rest = cpu_seconds([java])
    time.sleep(IDLE_SECONDS)
    idle_cores = (cpu_seconds([java]) - at_rest) / IDLE_SECONDS

    cpu, before = CpuUse(java=[java], nginx=nginx, workers=workers, health=health), thread_seconds(java)
    seen = dict(before)  # each thread's CPU when last seen: the JVM ends threads (JIT compilers) as it goes
    summary = wrk(url, files, CONCURRENCY, seconds, headers, timeout=60,
                  sample=lambda: seen.update(thread_seconds(java)))
    used, after = cpu.stop(), thread_seconds(java)
    seen.update(after)
    elapsed, answered = summary["seconds"], summary["answered"]
    java_used, machine = used["java"], used["machine"]
    groups: dict[str, float] = {}
    for tid, (name, spent) in seen.items():
        previous = before.get(tid, (name, 0.0))[1]
        groups[thread_group(name)] = groups.get(thread_group(name), 0.0) + spent - previous
    unseen = java_used - sum(groups.values())  # threads that ended between two samples took their count with them
    if unseen > 2 / CLK_TCK:
        groups["threads that ended unseen"] = unseen
    per_request = java_used * 1e3 / max(answered, 1)
    return {
        "requests": answered, "failed": summary["failed"], "rps": answered / elapsed, "seconds": elapsed,
        "p50_ms": summary["latency_us"]["p50"] / 1e3, "p99_ms": summary["latency_us"]["p99"] / 1e3,
        "java_ms_per_request": per_request,
        "java_ms_per_request_steady": (java_used - groups.get("JIT compilers", 0.0)) * 1e3 / max(answered, 1),
        "java_ms_per_request_net": (java_used - idle_cores * elapsed) * 1e3 / max(answered, 1),
        "java_cores": java_used / elapsed, "java_idle_cores": idle_cores,
        "java_share": java_used / elapsed / max(machine, 1e-9),
        "machine_cores": machine, "background_cores_before": background,
        "cores": {"frontend (Java)": java_used / elapsed, "workers": used["workers"] / elapsed,
                  "nginx": used["nginx"] / elapsed, "health checker": used["health"] / elapsed,
                  "wrk": summary["client_seconds"] / elapsed},
        "threads_ms_per_request": {group: spent * 1e3 / max(answered, 1) for group, spent in
                                   sorted(groups.items(), key=lambda item: -item[1]) if spent > 0},
        "async_logger_thread": any(name.startswith("Log4j2-TF") for name, _ in after.values()),
        "netty_threads": sum(name.startswith("epollEventLoop") for name, _ in after.values()),
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


def frontend_cpu(demo: Demo, files: dict[str, list[Path]], seconds: float,
                 log: Callable[[str], None]) -> list[dict[str, Any]]:
    """digits and efficientnet_lite0 (their default versions), through the front door and straight to TorchServe."""
    registered = {model for model, _ in demo.ts.registered()}
    paths = {"front door": demo.instance.front, "TorchServe directly": demo.instance.torchserve("inference")}
    runs = []
    for model in CPU_MODELS:
        if model not in registered:
            continue
        for path, base in paths.items():
            url, sent = f"{base}/predictions/{model}", files["digits" if model == "digits" else "photos"]
            jit = warm_jit(demo, url, sent)
            point = loaded_run(demo, url, sent, seconds, 0)
            point.update(model=model, path=path, jit_warm_up=jit)
            runs.append(point)
            log(f"  {model}, {path}: {point['rps']:.0f} req/s, frontend {point['java_ms_per_request']:.3f} ms CPU "
                f"per request ({point['java_cores']:.2f} cores, {point['java_share']:.0%} of the machine's "
                f"{point['machine_cores']:.2f})")
    return runs


def collector_cost(demo: Demo, runs: int = 3) -> dict[str, Any]:
    """The system metrics collector TorchServe forks every metric_time_interval (60 s): its CPU per run, measured by
    running the same command, in the same folder, on the same worker pids."""
    spec = importlib.util.find_spec("ts")
    home = Path(spec.origin).parent.parent
    pids = ",".join(str(w["pid"]) for w in demo.workers()) + "\n"
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
    store = model_store(tmp / "store-digits", lambda e: (e["model"], e["version"]) in VARIANT_STORE, manifest, True)
    results = {name: {"how": how, "runs": []} for name, how, _, _ in chosen}
    for round_ in range(rounds):
        # each round in another order (rotated), so that no setting always runs first or after the same one
        shift = round_ * max(1, len(chosen) // rounds)
        for index, (name, how, env, config) in enumerate(chosen[shift:] + chosen[:shift]):
            home = tmp / f"v{round_}-{index}"
            environment = dict(env)
            if config:
                environment["TS_CONFIG_FILE"] = str(config_copy(home / "conf", config))
            with started(Instance.fresh(home, store=store, **environment), watch=False) as demo:
                url = f"{demo.instance.front}/predictions/digits"
                jit = warm_jit(demo, url, files["digits"])
                point = loaded_run(demo, url, files["digits"], seconds, 0)
                point["jit_warm_up"] = jit
                point["java_pss_mb"] = memory(demo.java()).pss / MB
                point["start_s"] = demo.start["serve_sh_seconds"]
                point["access_log_lines"] = count_lines(demo.log_dir / "access_log.log")
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


def count_lines(path: Path, containing: str = "") -> int:
    """A log's lines (those with ``containing`` in them); 0 before it is written."""
    if not path.exists():
        return 0
    with open(path, errors="replace") as log:
        return sum(containing in line for line in log)


def access_log_switched(tmp: Path, manifest: Manifest, files: list[Path], seconds: float, turns: int,
                        log: Callable[[str], None]) -> dict[str, Any]:
    """TorchServe's access log as log4j2.xml has it (predictions left out) and logging every request, in turns within
    one JVM (log4j re-reads a copy of its configuration while TorchServe runs): the same JIT-compiled code, the same
    worker, only the per-request line differs. digits 2.0 through the front door; each turn in the other order."""
    root = log_root(tmp / "root")
    set_access_log(root, False)
    store = model_store(tmp / "store-access", lambda e: (e["model"], e["version"]) in VARIANT_STORE, manifest, True)
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    with started(Instance.fresh(tmp / "access", store=store), watch=False, root=root) as demo:
        url = f"{demo.instance.front}/predictions/digits"
        access_log = demo.log_dir / "access_log.log"
        warm_jit(demo, url, files)
        for turn in range(turns):
            for every in (False, True) if turn % 2 == 0 else (True, False):
                set_access_log(root, every)

                def taken(every: bool = every) -> bool:  # log4j has taken the change: predictions are logged, or not
                    before = count_lines(access_log, "/predictions/")
                    wrk(url, files, 2, 1, demo.headers(), timeout=60)
                    time.sleep(1.2)
                    return (count_lines(access_log, "/predictions/") > before) == every

                with contextlib.suppress(TimeoutError):
                    wait_until(taken, 30, "log4j taking the change", interval=0)
                before = count_lines(access_log, "/predictions/")
                point = loaded_run(demo, url, files, seconds, 2.0)
                point["lines"] = count_lines(access_log, "/predictions/") - before
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
