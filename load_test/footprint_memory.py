"""The footprint's part 2: the demo's memory after a few real requests to every version, process by process.

PSS, so that the processes add up (a shared page is divided among those that map it); for each worker its version,
the runtime it is built for, and whether torch (``libtorch_cpu``) and ONNX Runtime are mapped into it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from archives.store import Manifest
from load_test import inputs
from load_test.footprint_start import MB, Demo
from load_test.measure import memory as memory_of

REQUESTS_PER_WORKER = 4  # warm-up requests per worker of every version


def mapped_libraries(pid: int) -> dict[str, bool]:
    """Whether torch (libtorch_cpu) and ONNX Runtime are mapped into a process."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {"torch": "libtorch_cpu" in maps, "onnxruntime": "onnxruntime" in maps}


def warm_up(demo: Demo, manifest: Manifest) -> dict[str, Any]:
    """REQUESTS_PER_WORKER real requests per worker to every version, through the front door, as many at a time as the
    version has workers: how many answered 200, and the first other answer of each version."""
    headers = demo.headers()
    handlers = {(e["model"], e["version"]): e.get("handler", "") for e in manifest.entries()}
    counts: dict[str, dict[str, Any]] = {}
    for (model, version), info in sorted(demo.ts.registered().items()):
        bodies = inputs.requests_for(model, handlers.get((model, version), ""))
        workers = max(1, len(info.get("workers", [])))
        url = f"{demo.instance.front}/predictions/{model}/{version}"

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


def memory(demo: Demo, manifest: Manifest) -> dict[str, Any]:
    """PSS and RSS of every process of the demo; for the workers, their version, its runtime and the libraries
    mapped into them."""
    runtimes = {(e["model"], e["version"]): e.get("runtime") for e in manifest.entries()}
    processes = [{"name": "frontend (Java)", "kind": "frontend", "pid": demo.java()}]
    for worker in sorted(demo.workers(), key=lambda w: (w["model"], w["version"], int(w["id"]))):
        processes.append({"name": f"worker {worker['model']} {worker['version']} (W-{worker['id']})", "kind": "worker",
                          "pid": worker["pid"], "model": worker["model"], "version": worker["version"],
                          "runtime": runtimes.get((worker["model"], worker["version"])), "status": worker["status"]})
    for index, pid in enumerate(demo.nginx()):
        processes.append({"name": "nginx master" if index == 0 else f"nginx worker {index}", "kind": "nginx",
                          "pid": pid})
    helpers = demo.instance.pids()
    if pid := helpers.get("health checker"):
        processes.append({"name": "health checker (python -m manage health)", "kind": "health", "pid": pid})
    if pid := helpers.get("v2 gateway"):
        processes.append({"name": "v2 gateway (python -m manage v2)", "kind": "gateway", "pid": pid})
    for process in processes:
        found = memory_of(process["pid"])
        process["pss_mb"], process["rss_mb"] = found.pss / MB, found.rss / MB
        process.update(mapped_libraries(process["pid"]))
    onnx = [p for p in processes if p["kind"] == "worker" and p.get("runtime") == "onnxruntime"]
    largest = max(onnx, key=lambda p: p["pss_mb"]) if onnx else None
    by_kind: dict[str, float] = {}
    for process in processes:
        by_kind[process["kind"]] = by_kind.get(process["kind"], 0.0) + process["pss_mb"]
    return {"processes": processes, "total_pss_mb": sum(p["pss_mb"] for p in processes),
            "total_rss_mb": sum(p["rss_mb"] for p in processes), "by_kind_pss_mb": by_kind,
            "largest_onnx_worker": largest and {"name": largest["name"], "pss_mb": largest["pss_mb"]}}
