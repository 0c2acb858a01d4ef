"""A Deployment rehearsed on one machine: the generated manifest's replicas, probes and rolling update.

This is a rehearsal of a cluster, not a cluster. What it runs for real: the replicas, either as containers of the
built image (``--image``: podman runs each as the Deployment says, ``deploy.pod.Pod``) or as processes running the
container's exact command line (its ``command`` and ``args``, under tini) and environment from a folder staged with
exactly what the image carries (``deploy.image.stage_image``); the Deployment's probes, with its paths, ports, periods
and thresholds; its ``preStop`` hook and its grace period; and nginx in front of them standing in for the Service.
What it plays itself: the kubelet (it runs the probes and the hook, sends SIGTERM, then SIGKILL after the grace
period, restarts a container that exits) and the endpoints controller (a replica is in the Service while its
readiness probe passes, and is taken out the moment it is deleted, ``propagation`` seconds later, as kube-proxy
learns of it). What it cannot show: networking between nodes, kube-proxy's connection tracking, the scheduler, image
pulls, a real Service's load balancing (nginx picks per request, kube-proxy per connection). The pods themselves:
``deploy/replicas.py``.

``python -m deploy.rehearsal [--model digits] [--replicas 3] [--split ..] [--image NAME]``: renders the manifests,
starts the replicas, runs a rolling update under steady load (one replica at a time: deleted → out of the Service →
preStop drain → SIGTERM → replacement started → startup probe → readiness probe → back in the Service) and prints the
count of requests and of failures, which must be zero; then kills one replica's TorchServe, whose readiness must fail
and whose container must exit with an error (for the kubelet to restart it), and restarts it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from deploy.plan import DeployError
from deploy.replicas import Container, ContainerReplica, ProcessReplica, Replica, unique_ports
from load_test import inputs
from serving.front_door import nginx_binary
from serving.instance import wait_until


class Service:
    """nginx standing in for the Service: an upstream of the replicas that are endpoints; reloaded gracefully (old
    workers finish what they hold) whenever the endpoints change. No retries: a Service does not retry."""

    def __init__(self, home: Path):
        self.home = home
        (home / "logs").mkdir(parents=True, exist_ok=True)
        [self.port] = unique_ports(1)
        self.endpoints: list[int] = []
        self.master: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.changes: list[tuple[float, list[int]]] = []

    def render(self) -> str:
        servers = "".join(f"        server 127.0.0.1:{p};\n" for p in self.endpoints) or "        server 127.0.0.1:9 down;\n"
        user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
        return (f"{user}worker_processes 1;\npid {self.home}/nginx.pid;\nerror_log {self.home}/logs/error.log warn;\n"
                f"daemon off;\nevents {{ worker_connections 1024; }}\nhttp {{\n"
                f"    access_log {self.home}/logs/access.log;\n    client_body_temp_path {self.home}/body;\n"
                f"    proxy_temp_path {self.home}/proxy;\n    client_max_body_size 25m;\n"
                # bodies in memory: its workers run as nobody, who may not write under a private home
                f"    client_body_buffer_size 25m;\n"
                f"    upstream service {{\n{servers}    }}\n"
                f"    server {{\n        listen 127.0.0.1:{self.port};\n        proxy_next_upstream off;\n"
                f"        location / {{ proxy_pass http://service; }}\n    }}\n}}\n")

    def set(self, endpoints: list[int]) -> None:
        with self.lock:
            self.endpoints = sorted(endpoints)
            (self.home / "nginx.conf").write_text(self.render())
            self.changes.append((time.monotonic(), list(self.endpoints)))
            if self.master is None:
                self.master = subprocess.Popen([nginx_binary(), "-c", str(self.home / "nginx.conf"), "-p",
                                                str(self.home)], stderr=subprocess.DEVNULL)
                wait_until(self.answers, 10, "the Service's nginx answering", 0.05)
                return
            self.master.send_signal(signal.SIGHUP)

    def answers(self) -> bool:
        try:
            requests.get(f"http://127.0.0.1:{self.port}/", timeout=1)
            return True
        except requests.ConnectionError:
            return False

    def stop(self) -> None:
        if self.master is not None:
            self.master.send_signal(signal.SIGQUIT)
            self.master.wait(timeout=30)


@dataclass
class Load:
    """Steady load through the Service: ``clients`` threads, each sending one request after another, each on a
    connection of its own: a reload of the stand-in's nginx closes idle keep-alive connections (a client that sends
    on one as it closes sees it reset), which a real Service, kube-proxy's packet rules, never does."""

    url: str
    body: bytes
    headers: dict[str, str]
    clients: int = 4
    statuses: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)  # X-Model-Version of the answers: the A/B split at work
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> list[threading.Thread]:
        def client() -> None:
            session = requests.Session()
            while not self.stop.is_set():
                try:
                    answer = session.post(self.url, data=self.body, timeout=30,
                                          headers={**self.headers, "Connection": "close"})
                    self.statuses[answer.status_code] += 1
                    self.versions[answer.headers.get("X-Model-Version", "none")] += 1
                    if answer.status_code != 200:
                        self.errors.append(f"{answer.status_code}: {answer.text[:200]}")
                except requests.RequestException as error:
                    self.statuses["connection error"] += 1
                    self.errors.append(f"{type(error).__name__}: {error}"[:300])

        threads = [threading.Thread(target=client, daemon=True) for _ in range(self.clients)]
        for thread in threads:
            thread.start()
        return threads

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def failed(self) -> int:
        return self.total - self.statuses[200]


class Rehearsal:
    """The replicas, the Service in front of them, and the steps of a rolling update."""

    def __init__(self, container: Container, make: Callable[[str, int], Replica], home: Path,
                 replicas: int | None = None, propagation: float = 1.0, log=print):
        self.container, self.make, self.home, self.propagation, self.log = container, make, home, propagation, log
        self.count = replicas or self.container.replicas
        self.numbers = itertools.count()
        self.replicas: list[Replica] = []
        self.created: list[Replica] = []  # every replica, the deleted ones too, stopped and removed at the end
        self.service = Service(home / "service")
        self.timeline: list[str] = []
        self.steps: list[dict[str, Any]] = []  # the rolling update's, one per replaced replica

    def note(self, text: str) -> None:
        self.timeline.append(text)
        self.log(text)

    def replica(self) -> Replica:
        number = next(self.numbers)
        self.created.append(self.make(f"pod-{number}", number))
        return self.created[-1]

    def endpoints(self, replicas: list[Replica]) -> None:
        """The Service's endpoints are now these replicas."""
        self.service.set([r.http_port() for r in replicas])

    def up(self) -> None:
        """Start every replica at once, wait for each one's startup and readiness probes, then serve them."""
        started = time.monotonic()
        self.replicas = [self.replica() for _ in range(self.count)]
        for replica in self.replicas:
            replica.start()
        for replica in self.replicas:
            replica.wait_probe("startup")
            replica.wait_probe("readiness")
        self.endpoints(self.replicas)
        restarts = sum(r.restarts for r in self.replicas)
        self.note(f"{self.count} replicas ready and in the Service after {time.monotonic() - started:.1f} s"
                  + (f" ({restarts} container restarts while starting)" if restarts else ""))

    def replace(self, old: Replica) -> Replica:
        """One step of the rolling update, in the order the Deployment's strategy gives: with ``maxSurge`` 1 the
        replacement starts first and ``old`` is deleted once it is ready (and ``minReadySeconds`` has passed), with
        ``maxSurge`` 0 the other way round. Deleting: out of the Service after ``propagation`` s, preStop meanwhile,
        then SIGTERM, SIGKILL after the grace period. Starting: in the Service once its startup and readiness probes
        pass."""
        step: dict[str, Any] = {}
        if self.container.surge:
            new = self._create(step)
            time.sleep(self.container.min_ready)
            self._delete(old, step)
            self.replicas[self.replicas.index(old)] = new
        else:
            self._delete(old, step)
            self.replicas.remove(old)
            new = self._create(step)
        step["order"] = "start, then delete" if self.container.surge else "delete, then start"
        self.steps.append(step)
        return new

    def _delete(self, old: Replica, step: dict[str, Any]) -> None:
        others = [r for r in self.replicas if r is not old and r.started()]
        deleted = time.monotonic()
        out = threading.Timer(self.propagation, self.endpoints, [others])
        out.start()
        hook = old.pre_stop()
        hook_s = time.monotonic() - deleted
        ready_during_drain = old.probe("readiness")
        live_during_drain = old.probe("liveness")
        out.join()
        status, stopping = old.terminate()
        step.update({"deleted": old.name, "pre_stop_exit": hook, "pre_stop_s": round(hook_s, 1),
                     "ready_while_draining": ready_during_drain, "live_while_draining": live_during_drain,
                     "exit_status": status, "stop_s": round(stopping, 1)})
        self.note(f"{old.name}: deleted; preStop exit {hook} after {step['pre_stop_s']} s (readiness "
                  f"{'passes' if ready_during_drain else 'fails'}, liveness {'passes' if live_during_drain else 'fails'}"
                  f" while draining); SIGTERM → exit {status} in {stopping:.1f} s (grace {self.container.grace:g} s)")
        if status != 0:
            raise RuntimeError(f"{old.name} did not stop cleanly on SIGTERM: {status}; its last output:\n{old.output()[-2000:]}")

    def _create(self, step: dict[str, Any]) -> Replica:
        new = self.replica()
        new.start()
        step["started"] = new.name
        step["startup_s"] = round(new.wait_probe("startup"), 1)
        step["ready_s"] = round(new.wait_probe("readiness"), 1)
        step["restarts"] = new.restarts
        self.endpoints([r for r in self.replicas if r.running()] + [new])
        self.note(f"{new.name}: started; startup probe passed after {step['startup_s']} s, readiness after "
                  f"{step['ready_s']} more; in the Service")
        return new

    def crash(self, replica: Replica) -> dict[str, Any]:
        """TorchServe killed (SIGKILL) inside a replica: its readiness probe must fail and the container exit with
        an error, for the kubelet to restart it; restarted in place, its probes pass again. The seconds each took."""
        wait_until(lambda: "serving in the foreground" in replica.output(), 60,
                   f"{replica.name}: serve.sh run finishing its start")  # its probes may pass before
        killed = time.monotonic()
        replica.kill_torchserve()
        wait_until(lambda: not replica.probe("readiness"), 30, f"{replica.name}: readiness failing after TorchServe "
                   "was killed")
        unready = time.monotonic() - killed
        status = replica.wait_exit(self.container.grace)
        exited = time.monotonic() - killed
        if status in (0, None):
            raise RuntimeError(f"{replica.name}: the container {'exited 0' if status == 0 else 'still runs'} "
                               f"{exited:.0f} s after TorchServe was killed")
        self.endpoints([r for r in self.replicas if r is not replica])
        replica.start()  # the kubelet restarts the container (restartPolicy: Always)
        replica.wait_probe("startup")
        replica.wait_probe("readiness")
        self.endpoints(self.replicas)
        result = {"unready_s": round(unready, 1), "exit_status": status, "exited_s": round(exited, 1),
                  "ready_again_s": round(time.monotonic() - killed, 1)}
        self.note(f"{replica.name}: TorchServe killed; readiness failed after {unready:.1f} s, the container exited "
                  f"{status} after {exited:.1f} s; restarted, ready again after {result['ready_again_s']} s")
        return result

    def rolling_update(self) -> None:
        for old in list(self.replicas):
            self.replace(old)

    def down(self) -> None:
        for replica in self.created:
            replica.close()
        self.service.stop()


def manifests_of(folder: Path, model: str) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """The Deployment in a rendered folder that serves ``model`` (its SERVE_MODELS), and the ConfigMaps' files."""
    import yaml

    documents = [d for path in sorted(folder.rglob("*.yaml")) for d in yaml.safe_load_all(path.read_text())
                 if isinstance(d, dict)]
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in documents if d.get("kind") == "ConfigMap"}
    for document in documents:
        if document.get("kind") == "Deployment" and model in Container.of(document).env.get(
                "SERVE_MODELS", "").split(","):
            return document, config_maps
    raise LookupError(f"no Deployment serving {model} under {folder}")


def rehearse(model: str = "digits", replicas: int | None = None, home: Path | None = None, split: str | None = None,
             load_seconds: float = 3.0, image: str | None = None, log=print) -> dict[str, Any]:
    """Render (with ``split`` as the model's A/B split, which the pods apply from their ConfigMap), start the
    replicas, roll them all under load, crash one; the figures. The replicas are containers of the built ``image``
    (its Deployment rendered from the versions it holds), or without one processes from a folder staged with what
    the image would carry."""
    from archives import load_specs
    from deploy.contract import CLIENT_KEYS_FILE, CLIENT_KEYS_SECRET

    home = home or Path(tempfile.mkdtemp(prefix="rehearsal-"))
    key = "rehearsal-client-key-" + os.urandom(8).hex()  # the user's Secret, as kubectl create secret would make it
    secrets = {CLIENT_KEYS_SECRET: {Path(CLIENT_KEYS_FILE).name: key + "\n"}}
    pods = home / "pods"
    if image:
        from deploy import podman
        from deploy.pod import Pod, deployments

        reason = podman.missing_tools(need_base=False)
        if reason:
            raise DeployError(f"the rehearsal on containers needs podman: {reason}")
        if split:
            raise ValueError("a split is rendered into the process rehearsal's manifests; an image's Deployment "
                             "applies the split its versions were built with")
        deployment, config_map = deployments(image, [model])[model]
        container = Container.of(deployment, {config_map["metadata"]["name"]: config_map["data"]}, secrets)

        def make(name: str, number: int) -> Replica:
            return ContainerReplica(name, container, Pod(model, deployment, config_map, pods / name, key), number)
    else:
        from deploy.image import stage_image
        from deploy.render import render_all

        rendered = render_all(home / "rendered", models=[model], split=split, use_running=False)
        container = Container.of(*manifests_of(rendered / "kubernetes", model), secrets)
        staged = stage_image(home / "image")

        def make(name: str, number: int) -> Replica:
            return ProcessReplica(name, container, staged, pods / name)

    rehearsal = Rehearsal(container, make, home / "pods", replicas, log=log)
    body, content_type = inputs.requests_for(model, load_specs()[model].handler)[0]
    try:
        rehearsal.up()
        load = Load(f"http://127.0.0.1:{rehearsal.service.port}/predictions/{model}", body,
                    {"Authorization": f"Bearer {key}", "Content-Type": content_type})
        threads = load.run()
        time.sleep(load_seconds)
        before = load.total
        started = time.monotonic()
        rehearsal.rolling_update()
        time.sleep(load_seconds)
        load.stop.set()
        for thread in threads:
            thread.join(timeout=60)
        result = {"model": model, "replicas": rehearsal.count, "as": f"containers of {image}" if image else "processes",
                  "requests": load.total, "failed": load.failed,
                  "statuses": {str(k): v for k, v in load.statuses.items()}, "errors": load.errors[:10],
                  "versions": dict(load.versions),
                  "requests_before_update": before, "update_seconds": round(time.monotonic() - started, 1)}
        log(f"rolling update of {rehearsal.count} replicas ({result['as']}) under load: {load.total} requests, "
            f"{load.failed} failed ({result['statuses']}), update {result['update_seconds']} s")
        result["crash"] = rehearsal.crash(rehearsal.replicas[0])
        result["steps"], result["timeline"] = rehearsal.steps, rehearsal.timeline
        return result
    finally:
        rehearsal.down()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.rehearsal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--split", default=None, help='the A/B split the pods apply, e.g. "1.0=80 2.0=20"')
    parser.add_argument("--image", default=None, help="run the replicas as containers of this image (make image)")
    args = parser.parse_args()
    try:
        result = rehearse(args.model, args.replicas, split=args.split, image=args.image)
    except (DeployError, ValueError) as error:
        print(f"rehearse: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k not in ("timeline", "steps")}, indent=2))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
