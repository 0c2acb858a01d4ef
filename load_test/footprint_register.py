"""The footprint's part 3: register → READY, one version registered alone (1 worker) into the running demo, until
its worker is READY, repeated: the ONNX Runtime version of efficientnet_lite0 and, for comparison, its TorchScript
version, each from its unpacked folder as ``manage register`` registers it, and the ONNX Runtime version from its .mar.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from archives.store import Manifest
from load_test.footprint_memory import mapped_libraries
from load_test.footprint_start import Demo, clocks, logged, started_at
from load_test.measure import reconfigured, settle
from serving.instance import wait_until
from serving.torchserve import TorchServe, minimum_workers, ready_workers

REGISTERED = (("efficientnet_lite0", "1.1"), ("efficientnet_lite0", "1.0"))  # the target, then the comparison


def probes(store: Path) -> dict[str, tuple[str, str, Path, str]]:
    """What is registered, by the name its row gets: (model, version, what, how). Copies (hard links) whose
    model-config.yaml asks for one worker: a registration starts the model-config's minWorkers, which the management
    API's initial_workers does not override."""
    own, one = Manifest(store), {"minWorkers": 1, "maxWorkers": 1}
    found = {}
    for model, version in REGISTERED:
        if entry := own.get(model, version):
            folder = reconfigured(own.unpacked(model, version), store / f"footprint-{model}_{version}-1w", **one)
            found[f"{model} {version}"] = (model, version, folder, "unpacked folder (linked)")
            if (model, version) == REGISTERED[0]:
                archive = reconfigured(store / entry["archive"], store / f"footprint-{model}_{version}-1w.mar", **one)
                found[f"{model} {version} (.mar)"] = (model, version, archive, ".mar archive (extracted by TorchServe)")
    return found


def wait_ready(ts: TorchServe, model: str, version: str, timeout: float = 300.0) -> None:
    def ready() -> bool:
        info = ts.management("GET", f"/models/{model}/{version}")[0]
        return bool(info.get("workers")) and ready_workers(info) >= minimum_workers(info)

    wait_until(ready, timeout, f"{model} {version} READY", interval=0.02)


def registration(demo: Demo, model: str, version: str, probe: Path, repeats: int,
                 log: Callable[[str], None], settle_timeout: float = 10.0) -> dict[str, Any]:
    """Register ``probe`` (``model`` ``version``, one worker) into the running demo, after unregistering the version,
    and time it until its worker is READY; ``repeats`` times. The demo is left as it was."""
    ts = demo.ts
    default = ts.default_version(model)
    others = [v["modelVersion"] for v in ts.versions(model) if v["modelVersion"] != version]
    archive = next(e["archive"] for e in Manifest(demo.instance.store).entries()
                   if e["model"] == model and e["version"] == version)
    if (demo.instance.store / Path(archive).stem).is_dir():
        archive = Path(archive).stem  # the demo serves the unpacked folder
    if default == version and others:
        ts.set_default(model, others[0])  # TorchServe refuses to unregister the default while other versions exist
    ts.unregister(model, version)
    runs = []
    try:
        for _ in range(repeats):
            settle(timeout=settle_timeout)
            wall, boot, began = clocks()
            ts.register(probe.name)
            returned = time.perf_counter() - began
            wait_ready(ts, model, version)
            seconds = time.perf_counter() - began
            [info] = ts.management("GET", f"/models/{model}/{version}")
            pid = info["workers"][0]["pid"]
            frontend, workers = logged(demo.log_dir, since=wall)
            worker = next((w for w in workers.values() if w["name"] == f"{model}_{version}"), {})
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
