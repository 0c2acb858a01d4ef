"""The rehearsal's pods (``deploy/rehearsal.py``), as the kubelet sees them: the Deployment's one container read back
from the rendered manifest (``Container``, its probes as ``Probe``), run either as processes on loopback from a folder
staged with what the image carries (``ProcessReplica``) or as containers of the built image, run by podman
(``ContainerReplica``, ``deploy.pod.Pod``). Both answer the same calls: start, probe until a probe passes (restarting
a container that exits while starting), the preStop hook, SIGTERM then SIGKILL after the grace period, and a
``kill -9`` of TorchServe inside.

A process pod's container ports (8080, 8082, 8083 in the manifest) are mapped to free ports, ``/opt/toolkit`` to the
staged folder and ``/tmp`` to its own folder; TorchServe's internal loopback ports, which pods would not share, get
free ports too (``serving.instance.Instance.fresh``). A container pod publishes its container ports on free loopback
ports and keeps them across a restart, as a pod keeps its address.
"""

from __future__ import annotations

import abc
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from deploy import contract
from deploy.pod import Pod
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


class Replica(abc.ABC):
    """One pod of the rehearsal, a process or a container: what the kubelet does with it (probes until they pass,
    restarts of a container that exits while starting) is the same for both."""

    name: str
    container: Container
    home: Path
    restarts: int = 0  # the kubelet's restarts of the container before it became ready

    @abc.abstractmethod
    def start(self) -> None:
        """Start the container (again, after it exited)."""

    @abc.abstractmethod
    def exit_status(self) -> int | None:
        """The container's exit status once it exited; None before it started and while it runs."""

    @abc.abstractmethod
    def published(self, port: int) -> int:
        """The loopback port that reaches the container's ``port`` here."""

    def probe(self, which: str) -> bool:
        """One run of the ``startup``, ``readiness`` or ``liveness`` probe: whether it passed."""
        probe: Probe = getattr(self.container, which)
        return probe.check(self.published(probe.port))

    def http_port(self) -> int:
        """The loopback port the Service sends to: the container's ``http`` port."""
        return self.published(self.container.ports["http"])

    @abc.abstractmethod
    def pre_stop(self) -> int:
        """The Deployment's preStop hook, run in the container: its exit status."""

    @abc.abstractmethod
    def terminate(self) -> tuple[int | None, float]:
        """SIGTERM, SIGKILL after the grace period: (exit status, or None when killed; seconds)."""

    @abc.abstractmethod
    def kill_torchserve(self) -> None:
        """``kill -9`` of TorchServe's frontend inside the container."""

    @abc.abstractmethod
    def wait_exit(self, timeout: float) -> int | None:
        """The exit status once the container exits, None if it still runs after ``timeout`` seconds."""

    @abc.abstractmethod
    def output(self) -> str:
        """What the container printed."""

    @abc.abstractmethod
    def started(self) -> bool:
        """Whether the container was ever started."""

    def running(self) -> bool:
        return self.started() and self.exit_status() is None

    def close(self) -> None:
        """Stopped, at the rehearsal's end."""
        if self.running():
            self.terminate()

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
            status = self.exit_status()
            if status is not None:
                # the kubelet restarts a container that exits (restartPolicy: Always), a few times here
                self.restarts += 1
                if self.restarts > RESTARTS:
                    raise RuntimeError(f"{self.name} exited with {status} before its {which} probe passed, "
                                       f"{RESTARTS + 1} times; its last output:\n{self.output()[-2000:]}")
                self.start()
            return False

        wait_until(passes, startup.failures * startup.period, f"{self.name}: its {which} probe passing", probe.period)
        return time.monotonic() - started


class ProcessReplica(Replica):
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

    def started(self) -> bool:
        return self.process is not None

    def exit_status(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def published(self, port: int) -> int:
        return self.port.get(port, port)

    def output(self) -> str:
        return (self.home / "container.log").read_text(errors="replace")

    def pre_stop(self) -> int:
        command = [self.mapped(arg, self.image) for arg in self.container.pre_stop]
        return subprocess.run(command, env=self.env, capture_output=True, timeout=self.container.grace).returncode

    def terminate(self) -> tuple[int | None, float]:
        """SIGTERM to the container's first process, SIGKILL if it outlives the grace period: (status, seconds)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        status = self.wait_exit(self.container.grace)
        if status is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        return status, time.monotonic() - started

    def kill_torchserve(self) -> None:
        os.kill(self.instance.frontend_pid(), signal.SIGKILL)

    def wait_exit(self, timeout: float) -> int | None:
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


class ContainerReplica(Replica):
    """One pod as a container of the built image, run by podman as the kubelet runs it (``deploy.pod.Pod``: the
    Deployment's command, environment, user, read-only root, /tmp, mounts, limits), its ports published on
    loopback. A restart after a crash is a new container on the same ports, as a pod keeps its address."""

    def __init__(self, name: str, container: Container, pod: Pod, index: int):
        self.name, self.container, self.pod, self.index, self.home = name, container, pod, index, pod.work
        self.home.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip([p["name"] for p in pod.container["ports"]],
                              unique_ports(len(pod.container["ports"])), strict=True))

    def start(self) -> None:
        if self.pod.name:  # the kubelet's restart: the exited container goes, its output kept first
            (self.home / f"container-{self.restarts}.log").write_text(self.pod.logs(10_000))
            self.pod.remove()
        self.pod.start(self.index, self.ports)

    def started(self) -> bool:
        return bool(self.pod.name)

    def exit_status(self) -> int | None:
        return self.pod.exit_code() if self.started() else None

    def published(self, port: int) -> int:
        return next(self.ports[name] for name, inside in self.container.ports.items() if inside == port)

    def output(self) -> str:
        return self.pod.logs(10_000)

    def pre_stop(self) -> int:
        return self.pod.exec(*self.container.pre_stop, timeout=self.container.grace).returncode

    def terminate(self) -> tuple[int | None, float]:
        """``podman stop``: SIGTERM, SIGKILL after the grace period; (status, seconds)."""
        started = time.monotonic()
        status = self.pod.terminate(self.container.grace)
        if status is None:
            self.pod.signal("KILL")
        return status, time.monotonic() - started

    def kill_torchserve(self) -> None:
        self.pod.kill_torchserve()

    def close(self) -> None:
        super().close()
        if self.started():
            (self.home / "container.log").write_text(self.output())
            self.pod.remove()

    def wait_exit(self, timeout: float) -> int | None:
        return self.pod.wait_exit(timeout)
