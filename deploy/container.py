"""``make image-check``: the built image run with podman exactly as its Deployment says, and checked as the kubelet
and a client would check it.

    python -m deploy image-check [--image NAME:TAG] [--model M[,M...]]

For each model the image serves (``--model``: some of them), its Deployment is rendered from the image's own versions
(``deploy/kubernetes.py``, as ``make deploy`` writes it) and one container runs with exactly that Deployment's
``command`` (replacing the image's entrypoint, as Kubernetes does), environment, user and group, read-only root
filesystem, ``/tmp`` as a tmpfs of the emptyDir's ``sizeLimit``, the A/B ConfigMap and the client-keys Secret
mounted read-only where it mounts them (the Secret's file readable by the pod's fsGroup only), capabilities dropped,
no privilege escalation, its CPU (at most this machine's cores) and memory limits; its container ports published on
loopback. Then:

* cold start: from ``podman run`` to the first 200 of the readiness probe's path (polled every 0.1 s), and when a
  kubelet probing every ``periodSeconds`` would have seen it;
* probes: the startup probe passes within ``periodSeconds × failureThreshold``, then readiness and liveness answer
  200 within their ``timeoutSeconds``, on their paths and named ports as the manifest gives them;
* predictions: each model's real requests (``load_test.inputs.requests_for``: photos, texts) through the published
  port answer exactly as the same archive answers outside the container (``export/worker_check.py``, TorchServe's
  own loader and the handler, in this checkout's environment): same status, same JSON (to 1e-5), same bytes;
* the Open Inference Protocol: tritonclient over REST (the published 8080) and gRPC (8083) answers what /predictions
  answers, element by element (``serving/v2_protocol.KINDS`` maps one onto the other);
* an explanation request: its answer, and that the worker still predicts afterwards;
* the first container stops as a pod does: the ``preStop`` hook (``serve.sh drain``, through ``podman exec``; the
  readiness probe must say 503 and liveness 200 meanwhile, and requests keep being answered), then SIGTERM with
  requests in flight: every one answered, the container exits 0 within ``terminationGracePeriodSeconds`` counted
  from the hook's start;
* the last container loses its TorchServe to ``kill -9`` (inside, by its pid file): the container must exit non-zero
  (so the kubelet restarts it), and soon.

What a real cluster does beyond this: pulls the image from a registry, schedules and spreads pods over nodes,
enforces the CPU limit through the CFS quota (here: ``--cpus``, at most this machine's cores), mounts the Secret and
ConfigMap through the kubelet, routes a Service's traffic with kube-proxy, and restarts a container that exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import yaml

from archives import load_specs
from deploy import build, podman
from deploy.plan import DeployError, default_image
from deploy.answers import check_explanation, check_predictions, check_v2
from deploy.pod import CheckFailed, Pod, deployments


# --- stopping ----------------------------------------------------------------------------------------------------


class Load:
    """Requests sent one after another in a few threads until stopped: what a pod being stopped still receives."""

    def __init__(self, pod: Pod, body: bytes, content_type: str, threads: int = 2):
        self.pod, self.body, self.content_type = pod, body, content_type
        self.stop = threading.Event()
        self.statuses: dict[str, int] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                status = str(self.pod.post(f"/predictions/{self.pod.model}", self.body, self.content_type).status_code)
            except requests.RequestException as error:
                status = type(error).__name__
                if self.stop.is_set():
                    break
            with self.lock:
                self.statuses[status] = self.statuses.get(status, 0) + 1

    def finish(self) -> dict[str, int]:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        return dict(self.statuses)


def pre_stop_and_terminate(pod: Pod, handler: str) -> dict[str, Any]:
    """The kubelet's stop: the preStop hook, then SIGTERM, within terminationGracePeriodSeconds from the hook's
    start; requests keep coming until SIGTERM, and those in flight then must be answered."""
    from load_test.inputs import requests_for

    body, content_type = requests_for(pod.model, handler)[0]
    grace = pod.spec["terminationGracePeriodSeconds"]
    hook = pod.container["lifecycle"]["preStop"]["exec"]["command"]
    load = Load(pod, body, content_type)
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(pod.exec, *hook, timeout=grace)
        time.sleep(1.0)
        readiness, _ = pod.probe("readinessProbe")
        liveness, _ = pod.probe("livenessProbe")
        hook_result = running.result()
    hook_seconds = time.monotonic() - started
    during = load.finish()
    if hook_result.returncode != 0:
        raise CheckFailed(f"{pod.model}: preStop {' '.join(hook)} exited {hook_result.returncode}: "
                          f"{hook_result.stderr.strip()[-300:]}")
    if readiness != 503 or liveness != 200:
        raise CheckFailed(f"{pod.model}: while draining, readiness answered {readiness} (503 expected) and liveness "
                          f"{liveness} (200 expected)")
    if set(during) != {"200"}:
        raise CheckFailed(f"{pod.model}: requests during the drain: {during}")
    with ThreadPoolExecutor(4) as pool:  # requests in flight when SIGTERM arrives
        flight = [pool.submit(pod.post, f"/predictions/{pod.model}", body, content_type, 60) for _ in range(4)]
        time.sleep(0.05)
        terminated = time.monotonic()
        code = pod.terminate(max(1.0, grace - (terminated - started)))
        answered = []
        for future in flight:
            try:
                answered.append(str(future.result().status_code))
            except requests.RequestException as error:
                answered.append(type(error).__name__)
    stopped = time.monotonic()
    if code is None:
        raise CheckFailed(f"{pod.model}: still running {grace} s after the preStop hook started (the grace period): "
                          f"the kubelet would SIGKILL it\n{pod.logs()}")
    if code != 0:
        raise CheckFailed(f"{pod.model}: exited {code} on SIGTERM (0 expected):\n{pod.logs()}")
    if set(answered) != {"200"}:
        raise CheckFailed(f"{pod.model}: requests in flight at SIGTERM got {answered}")
    return {"pre_stop_seconds": round(hook_seconds, 1), "readiness_while_draining": readiness,
            "liveness_while_draining": liveness, "requests_while_draining": during,
            "in_flight_at_sigterm": answered, "exit_code": code,
            "sigterm_to_exit_seconds": round(stopped - terminated, 1),
            "total_seconds": round(stopped - started, 1), "grace_seconds": grace}


def kill_torchserve(pod: Pod) -> dict[str, Any]:
    """``kill -9`` of TorchServe's frontend inside the container: it must exit non-zero."""
    pod.kill_torchserve()
    started = time.monotonic()
    code = pod.wait_exit(60)
    if code is None:
        raise CheckFailed(f"{pod.model}: still running 60 s after TorchServe was killed:\n{pod.logs()}")
    if code == 0:
        raise CheckFailed(f"{pod.model}: exited 0 after TorchServe was killed: the kubelet would not restart it")
    return {"exit_code": code, "exit_seconds": round(time.monotonic() - started, 1)}


# --- the whole check -------------------------------------------------------------------------------------------------


def check(name: str | None = None, models: list[str] | None = None, log: Callable[[str], None] = print,
          work: Path | None = None) -> dict[str, Any]:
    """Run and check every Deployment of image ``name`` (see the module's docstring); the figures. CheckFailed
    (an AssertionError) on the first check that does not hold."""
    name = name or default_image()
    reason = podman.missing_tools(need_base=False)
    if reason:
        raise DeployError(reason)
    facts = build.image_facts(name)
    rendered = deployments(name, models)
    specs = load_specs()
    work = Path(work or tempfile.mkdtemp(prefix="image-check-"))
    results: dict[str, Any] = {"image": name, "size_bytes": facts["size"], "torch": facts["torch"], "pods": {}}
    log(f"image-check {name} ({facts['size'] / build.MB:.0f} MB; {facts['torch']}): "
        f"{', '.join(rendered)}")
    order = list(rendered)
    if len(order) == 1:
        order = order * 2  # one container to stop with SIGTERM, another to kill
    for index, model in enumerate(order):
        deployment, config_map = rendered[model]
        (work / model).mkdir(parents=True, exist_ok=True)
        (work / model / "deployment.yaml").write_text(yaml.safe_dump(deployment, sort_keys=False, width=120))
        handler = specs[model].handler if model in specs else "generic"
        versions = [v["version"] for v in facts["versions"] if v["model"] == model]
        pod = Pod(model, deployment, config_map, work / model / str(index), "image-check-key-" + os.urandom(12).hex())
        result: dict[str, Any] = {}
        try:
            pod.start(index)
            result["cold_start"] = pod.cold_start()
            log(f"{model}: podman run → live {result['cold_start']['live_seconds']} s, ready "
                f"{result['cold_start']['ready_seconds']} s (a kubelet probing every "
                f"{deployment['spec']['template']['spec']['containers'][0]['readinessProbe']['periodSeconds']} s sees "
                f"it ready at {result['cold_start']['kubelet_ready_seconds']} s)")
            result["timeline"] = pod.timeline()
            log(f"{model}: start-up " + "; ".join(f"{seconds:.1f} s {what}" for seconds, what in result["timeline"]))
            result["probes"] = pod.probes()
            log(f"{model}: probes " + ", ".join(f"{k} {v['path']} {v['status']}" for k, v in result["probes"].items()))
            result["predictions"] = check_predictions(pod, versions, handler)
            log(f"{model}: predictions {result['predictions']}")
            result["v2"] = check_v2(pod, handler)
            log(f"{model}: v2 {result['v2']}")
            if index == 0:
                result["explanation"] = check_explanation(pod, handler)
                log(f"{model}: /explanations answered {result['explanation']['status']} "
                    f"{result['explanation']['error']}; /predictions afterwards "
                    f"{result['explanation']['predictions_after']}")
            if index == 0:
                result["stop"] = pre_stop_and_terminate(pod, handler)
                stop = result["stop"]
                log(f"{model}: preStop {stop['pre_stop_seconds']} s (readiness {stop['readiness_while_draining']}, "
                    f"liveness {stop['liveness_while_draining']}, requests {stop['requests_while_draining']}), "
                    f"SIGTERM → exit {stop['exit_code']} in {stop['sigterm_to_exit_seconds']} s with in-flight "
                    f"requests {stop['in_flight_at_sigterm']}; {stop['total_seconds']} s of the "
                    f"{stop['grace_seconds']} s grace period")
            elif index == len(order) - 1:
                result["kill"] = kill_torchserve(pod)
                log(f"{model}: kill -9 of TorchServe → the container exited {result['kill']['exit_code']} in "
                    f"{result['kill']['exit_seconds']} s")
            result["notes"] = pod.notes
        except Exception:
            if pod.name:
                log(f"{model}: last lines of the container's output:\n{pod.logs()}")
            raise
        finally:
            pod.remove()
        results["pods"][f"{model}#{index}"] = result
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(args: argparse.Namespace) -> int:
    models = (args.model or "").replace(",", " ").split() or None
    try:
        results = check(args.image, models)
    except CheckFailed as failure:
        print(f"image-check FAILED: {failure}", file=sys.stderr)
        return 1
    ready = [pod["cold_start"]["ready_seconds"] for pod in results["pods"].values()]
    print(f"image-check passed: {len(results['pods'])} containers; podman run → ready "
          f"{min(ready):.1f} to {max(ready):.1f} s")
    return 0
