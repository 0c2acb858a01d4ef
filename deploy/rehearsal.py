"""A Deployment rehearsed on loopback: the generated manifest's replicas, probes and rolling update, run on one machine.

This is a rehearsal of a cluster, not a cluster. What it runs for real: the container's exact command line (its
``command`` and ``args``, under tini) and environment from the generated Deployment, from a folder staged with exactly
what the image carries (``deploy.image.stage_image``), as two or three replicas; the Deployment's probes, with its
paths, ports, periods and thresholds; its ``preStop`` hook and its grace period; and nginx in front of them standing in
for the Service. What it plays itself: the kubelet (it runs the probes and the hook, sends SIGTERM, then SIGKILL after
the grace period) and the endpoints controller (a replica is in the Service while its readiness probe passes, and is
taken out the moment it is deleted, ``propagation`` seconds later, as kube-proxy learns of it). What it cannot show:
networking between nodes, kube-proxy's connection tracking, the scheduler, image pulls, cgroup CPU limits, a real
Service's load balancing (nginx picks per request, kube-proxy per connection).

Each replica is one loopback "pod": its container ports (8080, 8082, 8083 in the manifest) are mapped to free ports,
``/opt/toolkit`` to the staged folder and ``/tmp`` to its own folder; TorchServe's internal loopback ports, which pods
would not share, get free ports too (``serving.instance.Instance.fresh``).

``python -m deploy.rehearsal [--model digits] [--replicas 3]``: renders the manifests, starts the replicas, runs a
rolling update under steady load (one replica at a time: deleted → out of the Service → preStop drain → SIGTERM →
replacement started → startup probe → readiness probe → back in the Service) and prints the count of requests and
of failures, which must be zero; then kills one replica's TorchServe, whose readiness must fail and whose container
must exit with an error (for the kubelet to restart it), and restarts it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from deploy import contract
from load_test import inputs
from serving.front_door import nginx_binary
from serving.instance import Instance, free_ports, wait_until

IMAGE_ROOT = "/opt/toolkit"
RESTARTS = 2  # restarts of a container that exits while starting, before the rehearsal gives up
ADDRESS = re.compile(r"\b(?:0\.0\.0\.0|127\.0\.0\.1|localhost):(\d+)\b")  # what a pod listens on


TAKEN: set[int] = set()  # every port handed to a replica or the Service in this process: free_ports alone may repeat


def claim(ports: set[int]) -> bool:
    """Take ``ports`` if none was handed out before."""
    if ports & TAKEN:
        return False
    TAKEN.update(ports)
    return True


def ports_of(env: dict[str, str]) -> set[int]:
    """The ports ``instance_env`` gives: its addresses' and its bare port numbers."""
    return {int(m.group(1)) for value in env.values() if (m := re.search(r"(?:^|:)(\d+)$", value))}


def unique_ports(count: int) -> list[int]:
    """``count`` free loopback ports, none handed out before in this process."""
    while True:
        ports = free_ports(count)
        if len(set(ports)) == count and claim(set(ports)):
            return ports


@dataclass(frozen=True)
class Probe(contract.Probe):
    """One of the container's httpGet probes, read back from the rendered manifest (Kubernetes' defaults where it
    leaves a field out), as the kubelet runs it."""

    port: int = 0  # the container's port; a replica maps it

    @classmethod
    def of(cls, spec: dict[str, Any], ports: dict[str, int]) -> Probe:
        get = spec["httpGet"]
        port = get["port"]
        return cls(get["path"], period=int(spec.get("periodSeconds", 10)),
                   failures=int(spec.get("failureThreshold", 3)), timeout=int(spec.get("timeoutSeconds", 1)),
                   delay=int(spec.get("initialDelaySeconds", 0)), port=ports[port] if isinstance(port, str) else int(port))

    def check(self, port: int) -> bool:
        """The kubelet's verdict: an answer from 200 to 399 within the timeout."""
        try:
            status = requests.get(f"http://127.0.0.1:{port}{self.path}", timeout=self.timeout,
                                  allow_redirects=False).status_code
        except requests.RequestException:
            return False
        return 200 <= status < 400


@dataclass
class Container:
    """What the Deployment says about its one container."""

    command: list[str]
    env: dict[str, str]
    ports: dict[str, int]  # name → containerPort
    startup: Probe
    readiness: Probe
    liveness: Probe
    pre_stop: list[str]
    grace: float
    replicas: int
    surge: int  # the rolling update's maxSurge (as a count; 0 or 1 here)
    min_ready: float  # minReadySeconds
    volumes: dict[str, dict[str, str]]  # mountPath → the files of the ConfigMap or Secret mounted there

    @classmethod
    def of(cls, deployment: dict[str, Any], config_maps: dict[str, dict[str, str]] | None = None,
           secrets: dict[str, dict[str, str]] | None = None) -> Container:
        config_maps, secrets = config_maps or {}, secrets or {}
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        ports = {p["name"]: int(p["containerPort"]) for p in container.get("ports", [])}
        env = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
        rolling = deployment["spec"].get("strategy", {}).get("rollingUpdate", {})
        sources = {v["name"]: config_maps.get(v["configMap"]["name"], {}) if "configMap" in v
                   else secrets.get(v["secret"]["secretName"], {}) for v in pod.get("volumes", [])
                   if "configMap" in v or "secret" in v}
        volumes = {m["mountPath"]: sources[m["name"]] for m in container.get("volumeMounts", [])
                   if m["name"] in sources}
        return cls(list(container.get("command", [])) + list(container.get("args", [])), env, ports,
                   Probe.of(container["startupProbe"], ports), Probe.of(container["readinessProbe"], ports),
                   Probe.of(container["livenessProbe"], ports), list(container["lifecycle"]["preStop"]["exec"]["command"]),
                   float(pod.get("terminationGracePeriodSeconds", 30)), int(deployment["spec"].get("replicas", 1)),
                   int(str(rolling.get("maxSurge", 1)).rstrip("%") != "0"), float(deployment["spec"].get("minReadySeconds", 0)),
                   volumes)


class Replica:
    """One pod on loopback: the container's command and environment with its ports, paths and /tmp mapped."""

    def __init__(self, name: str, container: Container, image: Path, home: Path):
        self.name, self.container, self.image, self.home = name, container, image, home
        home.mkdir(parents=True, exist_ok=True)
        self.mounts: dict[str, Path] = {}  # a ConfigMap's mountPath → the folder its files are written to here
        for index, (mount, files) in enumerate(sorted(container.volumes.items())):
            folder = home / "volumes" / str(index)
            folder.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (folder / name).write_text(text)
            self.mounts[mount] = folder
        # every port the pod listens on, its container ports and those its environment names on loopback (a pod
        # has a loopback of its own), gets a free one here
        inside = sorted(set(container.ports.values()) | {int(p) for v in container.env.values()
                                                         for p in ADDRESS.findall(v)})
        self.port = dict(zip(inside, unique_ports(len(inside)), strict=True))
        env = Instance.fresh(home).environment()  # and TorchServe's internal loopback ports, which config.properties names
        while not claim(ports_of(env)):
            env = Instance.fresh(home).environment()
        for key, value in container.env.items():
            env[key] = self.mapped(value, image)
        self.env = {**os.environ, **env, "TINI_SUBREAPER": "1"}  # tini is not PID 1 here
        self.instance = Instance.current(env)  # the stack serve.sh starts in the container, as it reads its environment
        self.command = [self.mapped(arg, image) for arg in container.command]
        self.process: subprocess.Popen | None = None
        self.restarts = 0  # the kubelet's restarts of the container before it became ready

    def mapped(self, value: str, image: Path) -> str:
        # the pod's paths, each mapped once (one pass: a mapped path may itself lie under /tmp)
        paths = {**{mount: str(folder) for mount, folder in self.mounts.items()}, "/tmp": str(self.home),
                 IMAGE_ROOT: str(image)}
        pattern = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
        value = re.sub(rf"(?<![\w.-])(?:{pattern})(?=/|$)", lambda m: paths[m.group(0)], value)
        return ADDRESS.sub(lambda m: f"127.0.0.1:{self.port[int(m.group(1))]}", value)

    def start(self) -> None:
        log = open(self.home / "container.log", "ab")  # noqa: SIM115 (the process holds it)
        self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()

    def probe(self, which: str) -> bool:
        probe: Probe = getattr(self.container, which)
        return probe.check(self.port[probe.port] if probe.port in self.port else probe.port)

    def wait_probe(self, which: str) -> float:
        """Run a probe at its period until it passes, within the startup probe's budget (failureThreshold x period:
        the kubelet would restart the container after it; readiness has no limit of its own)."""
        probe: Probe = getattr(self.container, which)
        startup = self.container.startup
        started = time.monotonic()
        time.sleep(probe.delay)

        def passes() -> bool:
            if self.probe(which):
                return True
            if self.process is not None and self.process.poll() is not None:
                # the kubelet restarts a container that exits (restartPolicy: Always), a few times here
                self.restarts += 1
                if self.restarts > RESTARTS:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode} before its {which} "
                                       f"probe passed, {RESTARTS + 1} times: see {self.home / 'container.log'}")
                self.start()
            return False

        wait_until(passes, startup.failures * startup.period, f"{self.name}: its {which} probe passing", probe.period)
        return time.monotonic() - started

    def pre_stop(self) -> int:
        command = [self.mapped(arg, self.image) for arg in self.container.pre_stop]
        return subprocess.run(command, env=self.env, capture_output=True, timeout=self.container.grace).returncode

    def terminate(self) -> tuple[int | None, float]:
        """SIGTERM to the container's first process, SIGKILL if it outlives the grace period: (status, seconds)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=self.container.grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            status = None
        return status, time.monotonic() - started


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

    def __init__(self, deployment: dict[str, Any], config_maps: dict[str, dict[str, str]],
                 secrets: dict[str, dict[str, str]], image: Path, home: Path, replicas: int | None = None,
                 propagation: float = 1.0, log=print):
        self.container = Container.of(deployment, config_maps, secrets)
        self.image, self.home, self.propagation, self.log = image, home, propagation, log
        self.count = replicas or self.container.replicas
        self.names = (f"pod-{i}" for i in itertools.count())
        self.replicas: list[Replica] = []
        self.service = Service(home / "service")
        self.timeline: list[str] = []
        self.steps: list[dict[str, Any]] = []  # the rolling update's, one per replaced replica

    def note(self, text: str) -> None:
        self.timeline.append(text)
        self.log(text)

    def replica(self) -> Replica:
        name = next(self.names)
        return Replica(name, self.container, self.image, self.home / name)

    def http_port(self, replica: Replica) -> int:
        return replica.port[self.container.ports["http"]]

    def up(self) -> None:
        """Start every replica at once, wait for each one's startup and readiness probes, then serve them."""
        started = time.monotonic()
        self.replicas = [self.replica() for _ in range(self.count)]
        for replica in self.replicas:
            replica.start()
        for replica in self.replicas:
            replica.wait_probe("startup")
            replica.wait_probe("readiness")
        self.service.set([self.http_port(r) for r in self.replicas])
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
        others = [self.http_port(r) for r in self.replicas if r is not old and r.process is not None]
        deleted = time.monotonic()
        out = threading.Timer(self.propagation, self.service.set, [others])
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
            raise RuntimeError(f"{old.name} did not stop cleanly on SIGTERM: {status} (see {old.home}/container.log)")

    def _create(self, step: dict[str, Any]) -> Replica:
        new = self.replica()
        new.start()
        step["started"] = new.name
        step["startup_s"] = round(new.wait_probe("startup"), 1)
        step["ready_s"] = round(new.wait_probe("readiness"), 1)
        step["restarts"] = new.restarts
        serving = [r for r in self.replicas if r.process is not None and r.process.poll() is None]
        self.service.set([self.http_port(r) for r in serving] + [self.http_port(new)])
        self.note(f"{new.name}: started; startup probe passed after {step['startup_s']} s, readiness after "
                  f"{step['ready_s']} more; in the Service")
        return new

    def crash(self, replica: Replica) -> dict[str, Any]:
        """TorchServe killed (SIGKILL) inside a replica: its readiness probe must fail and the container exit with
        an error, for the kubelet to restart it; restarted in place, its probes pass again. The seconds each took."""
        wait_until(lambda: b"serving in the foreground" in (replica.home / "container.log").read_bytes(), 60,
                   f"{replica.name}: serve.sh run finishing its start")  # its probes may pass before
        pid = replica.instance.frontend_pid()
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not replica.probe("readiness"), 30, f"{replica.name}: readiness failing after TorchServe "
                   "was killed")
        unready = time.monotonic() - killed
        assert replica.process is not None
        status = replica.process.wait(timeout=self.container.grace)
        exited = time.monotonic() - killed
        if status == 0:
            raise RuntimeError(f"{replica.name}: the container exited 0 after TorchServe was killed")
        self.service.set([self.http_port(r) for r in self.replicas if r is not replica])
        replica.start()  # the kubelet restarts the container (restartPolicy: Always)
        replica.wait_probe("startup")
        replica.wait_probe("readiness")
        self.service.set([self.http_port(r) for r in self.replicas])
        result = {"unready_s": round(unready, 1), "exit_status": status, "exited_s": round(exited, 1),
                  "ready_again_s": round(time.monotonic() - killed, 1)}
        self.note(f"{replica.name}: TorchServe killed; readiness failed after {unready:.1f} s, the container exited "
                  f"{status} after {exited:.1f} s; restarted, ready again after {result['ready_again_s']} s")
        return result

    def rolling_update(self) -> None:
        for old in list(self.replicas):
            self.replace(old)

    def down(self) -> None:
        for replica in self.replicas:
            if replica.process is not None and replica.process.poll() is None:
                replica.terminate()
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
             load_seconds: float = 3.0, log=print) -> dict[str, Any]:
    """Render (with ``split`` as the model's A/B split, which the pods apply from their ConfigMap), stage, start the
    replicas, roll them all under load, crash one; the figures."""
    from archives import load_specs
    from deploy.contract import CLIENT_KEYS_FILE, CLIENT_KEYS_SECRET
    from deploy.image import stage_image
    from deploy.render import render_all

    home = home or Path(tempfile.mkdtemp(prefix="rehearsal-"))
    rendered = render_all(home / "rendered", models=[model], split=split, use_running=False)
    image = stage_image(home / "image")
    key = "rehearsal-client-key-" + os.urandom(8).hex()  # the user's Secret, as kubectl create secret would make it
    secrets = {CLIENT_KEYS_SECRET: {Path(CLIENT_KEYS_FILE).name: key + "\n"}}
    rehearsal = Rehearsal(*manifests_of(rendered / "kubernetes", model), secrets, image, home / "pods", replicas,
                          log=log)
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
        result = {"model": model, "replicas": rehearsal.count, "requests": load.total, "failed": load.failed,
                  "statuses": {str(k): v for k, v in load.statuses.items()}, "errors": load.errors[:10],
                  "versions": dict(load.versions),
                  "requests_before_update": before, "update_seconds": round(time.monotonic() - started, 1)}
        log(f"rolling update of {rehearsal.count} replicas under load: {load.total} requests, {load.failed} failed "
            f"({result['statuses']}), update {result['update_seconds']} s")
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
    args = parser.parse_args()
    result = rehearse(args.model, args.replicas, split=args.split)
    print(json.dumps({k: v for k, v in result.items() if k not in ("timeline", "steps")}, indent=2))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
