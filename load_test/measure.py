"""What the benchmark, the footprint and the soak measure with, one of each: the machine's CPU and a process's, memory
(PSS, RSS, private), the wrk runner, a model store of a tool's own and archives with other settings, the report's
figures and plots. One reader each, so that every report counts the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import yaml

from archives.store import Manifest, link_or_copy, replace_file, store_of
from serving.instance import REPO, process_tree, wait_until

RESULTS = REPO / "load_test" / "results"
WRK_SCRIPT = REPO / "load_test" / "wrk.lua"
MODEL_CONFIG = "model-config.yaml"


# --- CPU -----------------------------------------------------------------------------------------------------------


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores since boot."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - times.iowait, sum(times)


def busy_cores(before: tuple[float, float], after: tuple[float, float]) -> float:
    """How many cores the machine kept busy between two ``machine_busy()`` readings."""
    return (after[0] - before[0]) / max(after[1] - before[1], 1e-9) * os.cpu_count()


def settle(idle_cores: float = 0.3, timeout: float = 20.0) -> float:
    """Wait (up to ``timeout``) until the machine is nearly idle: a server keeps working through the requests queued
    when the last run ended. The busy cores last seen (other work on a shared machine may keep it busy)."""
    seen = {"at": machine_busy(), "cores": float(os.cpu_count())}

    def idle() -> bool:
        time.sleep(0.5)
        now = machine_busy()
        seen["cores"], seen["at"] = busy_cores(seen["at"], now), now
        return seen["cores"] < idle_cores

    with contextlib.suppress(TimeoutError):
        wait_until(idle, timeout, "the machine idle", interval=0)
    return seen["cores"]


class CpuUse:
    """The CPU used from its making to ``stop()``: the machine's, in busy cores, and each group of processes', in
    seconds; on a shared machine a run is judged beside what else ran."""

    def __init__(self, **groups: list[int]):
        self.groups, self.machine = groups, machine_busy()
        self.seconds = {name: cpu_seconds(pids) for name, pids in groups.items()}

    def stop(self) -> dict[str, float]:
        """{"machine": busy cores, group: CPU seconds}."""
        return {"machine": busy_cores(self.machine, machine_busy()),
                **{name: cpu_seconds(pids) - self.seconds[name] for name, pids in self.groups.items()}}


def cpu_seconds(pids: Iterable[int]) -> float:
    """User and system CPU seconds the processes used (those gone count nothing)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


# --- memory and processes ------------------------------------------------------------------------------------------


class Memory(NamedTuple):
    """Bytes. PSS divides each shared page among the processes that map it, so the PSS of processes adds up."""

    pss: int
    rss: int
    private: int


def memory(pid: int) -> Memory | None:
    """A process's memory (``/proc/<pid>/smaps_rollup``); None once it is gone or a zombie."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            found = process.memory_full_info()
    except psutil.Error:
        return None
    return Memory(found.pss, found.rss, found.uss)


def tree(roots: Iterable[int]) -> list[int]:
    """``roots`` and every process descended from them."""
    return [process.pid for root in roots for process in process_tree(root)]


# --- load ----------------------------------------------------------------------------------------------------------


def wrk(url: str, files: list[Path], concurrency: int, seconds: float, headers: dict[str, str], timeout: int = 120,
        sample: Callable[[], object] | None = None) -> dict[str, Any]:
    """One wrk run (one thread, closed loop; ``load_test/wrk.lua`` posts the files in turn): its JSON summary, with
    ``seconds``, ``answered`` (wrk counts a non-2xx answer as a request), ``failed`` and ``client_seconds`` (the
    CPU wrk itself used, to report beside the server's). ``sample`` is called every 0.25 s while it runs."""
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", f"{timeout}s",
               "-s", str(WRK_SCRIPT), *(arg for key, value in headers.items() for arg in ("-H", f"{key}: {value}"))]
    before = os.times()
    with subprocess.Popen([*command, url, "--", *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as run:
        if sample:
            wait_until(lambda: sample() or run.poll() is not None, math.inf, "wrk", interval=0.25)
        out, err = run.communicate()
    after = os.times()
    if run.returncode != 0:
        raise RuntimeError(f"wrk failed ({run.returncode}): {err[-500:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    errors = summary["errors"]
    return {**summary, "seconds": summary["duration_us"] / 1e6, "answered": summary["requests"] - errors["status"],
            "failed": sum(errors.values()), "client_seconds": (after.children_user - before.children_user
                                                               + after.children_system - before.children_system)}


# --- model stores and archives -------------------------------------------------------------------------------------


def link_tree(source: Path, target: Path) -> None:
    """``source`` copied as hard links: a file of the copy must be replaced, never written in place."""
    shutil.copytree(source, target, copy_function=lambda a, b: link_or_copy(Path(a), Path(b)))


def model_store(folder: Path, keep: Callable[[dict], bool] = lambda entry: True, source: Manifest | None = None,
                unpacked: bool = False) -> Path:
    """A model store of a tool's own (``archives.store.store_of``): the built versions ``keep`` selects, as hard
    links, with their manifest entries, so that its TorchServes add to it without touching model_store/.
    ``unpacked``: their unpacked folders too, where the source has them, as TorchServe is served them."""
    source = source or Manifest()
    kept = [entry for entry in source.entries() if keep(entry)]
    store_of(folder, [(entry["model"], entry["version"]) for entry in kept], source)
    for entry in kept if unpacked else []:
        if (unpacked_folder := (source.store / entry["archive"]).with_suffix("")).is_dir():
            link_tree(unpacked_folder, folder / unpacked_folder.name)
    return folder


def made(home: Path, command: list[str]) -> Path:
    """``python -m manage COMMAND`` writing into home/specs and building into home/store, as ``make`` runs it (no
    server running): the store."""
    from serving.instance import Instance

    specs, store = home / "specs", home / "store"
    specs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **Instance.fresh(home / "import", store=str(store)).environment()}
    done = subprocess.run([sys.executable, "-m", "manage", *command, "--specs", str(specs)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"manage {' '.join(command[:2])} failed:\n{done.stderr[-3000:]}")
    return store


def quantized_store(spec_file: Path, model: str, version: str, home: Path,
                    min_agreement: float | None = None) -> tuple[Path, str]:
    """``make quantize [MIN_AGREEMENT=..]`` of a built fp32 ONNX Runtime version, into a store of its own (home/store)
    beside it, from a copy of its spec: the store and the INT8 version."""
    store = store_of(home / "store", [(model, version)])
    (home / "specs").mkdir(parents=True)
    shutil.copy2(spec_file, home / "specs" / spec_file.name)
    made(home, ["quantize", model, "--version", version,
                *(["--min-agreement", str(min_agreement)] if min_agreement is not None else [])])
    return store, next(v for v, entry in Manifest(store).models[model].items() if entry.get("quantization"))


def reconfigure(text: str | bytes, settings: dict[str, Any]) -> str:
    """A model-config.yaml with ``settings`` over its own (``handler``'s merged key by key)."""
    config = yaml.safe_load(text)
    if "handler" in settings:
        settings = {**settings, "handler": {**(config.get("handler") or {}), **settings["handler"]}}
    config.update(settings)
    return yaml.safe_dump(config, sort_keys=False)


def rewritten(archive: Path, target: Path, change: Callable[[str, bytes], bytes]) -> Path:
    """A copy of ``archive`` at ``target``, each entry (compressed as it was) through ``change(name, data)``.
    Written beside ``target`` and renamed over it: a hard link to the source stays intact."""
    partial = target.with_name(f".{target.name}.partial")
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(partial, "w") as copy:
        for item in source.infolist():
            copy.writestr(item, change(item.filename, source.read(item)))
    partial.replace(target)
    return target


def reconfigured(archive: Path | str, target: Path, **settings: Any) -> Path:
    """A copy of an archive, or of an unpacked folder, whose model-config.yaml has ``settings`` over its own (a
    registration starts the minWorkers of the model-config, which the management API's initial_workers does not
    override)."""
    if Path(archive).is_dir():
        link_tree(Path(archive), target)
        config = target / MODEL_CONFIG  # a hard link to the store's file: replaced, not written through
        replace_file(config, reconfigure(config.read_text(), settings))
        return target
    return rewritten(Path(archive), target, lambda name, data: reconfigure(data, settings).encode()
                     if name == MODEL_CONFIG else data)


def fmt(value: float | None, digits: int = 0, sign: str = "") -> str:
    """A figure for a report: "-" where there is none; unsigned, never "-0.0" (a clock tick early)."""
    if value is None:
        return "-"
    text = format(value, f"{sign}.{digits}f")
    return text[1:] if text.startswith("-") and not sign and float(text) == 0 else text


# --- the machine ---------------------------------------------------------------------------------------------------


def machine() -> dict:
    """What a report names the machine and the software by."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    from importlib.metadata import version

    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": version("onnxruntime"),
            "torchserve": version("torchserve"), "litserve": version("litserve"), "bentoml": version("bentoml"),
            "ray": version("ray"), "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True,
                                                         check=False).stdout.split()[1],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


@contextmanager
def plotted(path: Path, *grid: int, tight_box: bool = False, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """(figure, axes) of a matplotlib figure (no display needed) written to ``path`` at the end of the block, fitted
    to its contents (``tight_box``: the saved box, as a legend outside the axes needs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(*grid, **subplots)
    yield figure, axes
    if not tight_box:
        figure.tight_layout()
    figure.savefig(path, dpi=110, **({"bbox_inches": "tight"} if tight_box else {}))
    plt.close(figure)
