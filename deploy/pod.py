"""One pod's container: an image run by podman with a Deployment's command, environment, user, read-only root, /tmp,
mounts and limits, probed as the kubelet probes it, its cold start timed from its own output."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from archives.store import REPO, Manifest
from deploy import build, contract, kubernetes, podman
from deploy.plan import DeployError, plan_models
from serving.instance import PID_FILES, free_ports


PYTHON = REPO / ".venv" / "bin" / "python"
POLL = 0.1  # seconds between the cold-start polls
START_LIMIT = 300  # seconds a container may take to say ready before the check gives up (the startup probe's budget)
TOLERANCE = 1e-5


# serve.sh's own lines while it starts (its output is the container's), in order
TIMELINE_MARKERS = (("starting TorchServe", "serve.sh: archives verified, Java chosen, TorchServe launched"),
                    ("front door started", "the front door (nginx) answers"),
                    ("TorchServe ready in", "every worker READY"),
                    ("front door ready", "the front door says ready"))


def _epoch(stamp: str) -> float:
    """Seconds since the epoch of an RFC 3339 / log4j time stamp (UTC; nanoseconds cut to microseconds)."""
    import datetime as dt

    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?", stamp.strip())
    if not match:
        return 0.0
    moment = dt.datetime.fromisoformat(match.group(1)).replace(tzinfo=dt.timezone.utc)
    return moment.timestamp() + float(f"0.{match.group(2) or 0}")


class CheckFailed(AssertionError):
    """A check that did not hold, in one line."""


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``448Mi``, ``2Gi``, ``512M``) in bytes."""
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", quantity)
    if not match:
        raise ValueError(f"unsupported quantity {quantity!r}")
    number, unit = int(match.group(1)), match.group(2) or ""
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    return number * (1024 if unit.endswith("i") else 1000) ** powers[unit[0]] if unit else number


# --- the Deployments of an image -----------------------------------------------------------------------------------


def deployments(name: str, models: list[str] | None = None) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """model → (its Deployment, its A/B ConfigMap), rendered for the versions the image holds (its labels), from the
    built store's archives, which must be the ones in the image (same sha256)."""
    facts = build.image_facts(name)
    store = Manifest()
    held = {(v["model"], v["version"]): v for v in facts["versions"]}
    for (model, version), record in held.items():
        entry = store.get(model, version)
        if entry is None or entry["sha256"] != record["sha256"]:
            raise DeployError(f"{name} holds {model} {version} built as sha256 {record['sha256'][:12]}..., which "
                              f"model_store/ no longer has: rebuild the image (make image)")
    store.models = {m: {v: e for v, e in versions.items() if (m, v) in held} for m, versions in store.models.items()}
    store.models = {m: versions for m, versions in store.models.items() if versions}
    chosen = models or sorted(store.models)
    unknown = sorted(set(chosen) - set(store.models))
    if unknown:
        raise DeployError(f"{name} does not serve {', '.join(unknown)} (it serves {', '.join(sorted(store.models))})")
    plans = plan_models(chosen, manifest=store, use_running=False)
    return {plan.model: (kubernetes.deployment(plan, name), kubernetes.ab_configmap(plan)) for plan in plans}


# --- one pod's container -------------------------------------------------------------------------------------------


@dataclass
class Pod:
    """One container of a Deployment, run by podman as the kubelet would run it."""

    model: str
    deployment: dict[str, Any]
    config_map: dict[str, Any]
    work: Path
    key: str
    name: str = ""
    ports: dict[str, int] = field(default_factory=dict)  # container port's name → its port on loopback here
    started: float = 0.0
    wall: float = 0.0  # time.time() when podman run was called
    notes: list[str] = field(default_factory=list)

    @property
    def spec(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        return self.spec["containers"][0]

    def url(self, port: str | int = "http") -> str:
        return f"http://127.0.0.1:{self.ports[self._port_name(port)]}"

    def _port_name(self, port: str | int) -> str:
        if isinstance(port, str):
            return port
        return next(p["name"] for p in self.container["ports"] if p["containerPort"] == port)

    def mounts(self) -> list[str]:
        volumes = {v["name"]: v for v in self.spec["volumes"]}
        group = self.spec["securityContext"].get("fsGroup")
        options = []
        for mount in self.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                size = quantity_bytes(volume["emptyDir"].get("sizeLimit", "64Mi"))
                options += ["--mount", f"type=tmpfs,destination={mount['mountPath']},tmpfs-size={size},"
                                       "tmpfs-mode=1777"]
                continue
            folder = self.work / "volumes" / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                for key, text in self.config_map["data"].items():
                    (folder / key).write_text(text)
                    (folder / key).chmod(0o444)
            elif "secret" in volume:
                path = folder / Path(contract.CLIENT_KEYS_FILE).name
                path.write_text(self.key + "\n")
                mode = volume["secret"].get("defaultMode", 0o644)
                try:  # as the kubelet writes it: root's, the pod's fsGroup's, defaultMode
                    os.chown(path, 0, group)
                    path.chmod(mode)
                except PermissionError:  # rootless: readable by anyone instead
                    path.chmod(0o444)
            folder.chmod(0o755)
            options += ["--volume", f"{folder}:{mount['mountPath']}:ro{',z' if _selinux() else ''}"]
        return options

    def run_command(self) -> list[str]:
        security = {**self.spec.get("securityContext", {}), **self.container.get("securityContext", {})}
        command = ["podman", "run", "--detach", "--pull", "never", "--name", self.name, *podman.run_options(),
                   "--no-healthcheck", "--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
        if "fsGroup" in security:
            command += ["--group-add", str(security["fsGroup"])]
        if security.get("readOnlyRootFilesystem"):
            command += ["--read-only", "--read-only-tmpfs=false"]
        if security.get("allowPrivilegeEscalation") is False:
            command += ["--security-opt", "no-new-privileges"]
        for capability in security.get("capabilities", {}).get("drop", []):
            command += ["--cap-drop", capability]
        limits = self.container.get("resources", {}).get("limits", {})
        if "cpu" in limits:
            cpus = min(float(limits["cpu"]), len(os.sched_getaffinity(0)))
            if cpus < float(limits["cpu"]):
                self.notes.append(f"CPU limit {limits['cpu']} run as {cpus:g}: this machine has {cpus:g} cores")
            command += ["--cpus", f"{cpus:g}"]
        if "memory" in limits:
            command += ["--memory", str(quantity_bytes(limits["memory"]))]
        command += self.mounts()
        for variable in self.container.get("env", []):
            command += ["--env", f"{variable['name']}={variable['value']}"]
        for port in self.container["ports"]:
            command += ["--publish", f"127.0.0.1:{self.ports[port['name']]}:{port['containerPort']}"]
        command += ["--entrypoint", json.dumps(self.container["command"]), self.container["image"],
                    *self.container.get("args", [])]
        return command

    def start(self, index: int, ports: dict[str, int] | None = None) -> None:
        """``podman run``, the container's ports published on ``ports`` (its port names → loopback ports; free ones
        by default)."""
        self.name = f"image-check-{os.getpid()}-{index}-{self.model.replace('_', '-')}"
        names = [p["name"] for p in self.container["ports"]]
        self.ports = ports or dict(zip(names, free_ports(len(names))))
        command = self.run_command()
        self.started, self.wall = time.monotonic(), time.time()
        podman.run(command, f"podman run of {self.model}'s Deployment", timeout=120)

    def state(self) -> dict[str, Any]:
        return json.loads(podman.podman("inspect", "--format", "{{json .State}}", self.name, what="podman inspect"))

    def logs(self, lines: int = 40) -> str:
        result = subprocess.run(["podman", "logs", "--tail", str(lines), self.name], capture_output=True, text=True,
                                timeout=30, check=False)
        return (result.stdout + result.stderr).strip()

    def exec(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["podman", "exec", self.name, *command], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def remove(self) -> None:
        subprocess.run(["podman", "rm", "--force", "--time", "0", self.name], capture_output=True, timeout=120,
                       check=False)

    def kill_torchserve(self) -> None:
        """``kill -9`` of TorchServe's frontend inside the container, by its pid file."""
        home = next(e["value"] for e in self.container["env"] if e["name"] == "SERVE_HOME")
        pid_file = f"{home}/{PID_FILES['frontend']}"
        killed = self.exec("sh", "-c", f'kill -9 "$(cat {pid_file})"')
        if killed.returncode != 0:
            raise CheckFailed(f"{self.model}: kill -9 of TorchServe failed: {killed.stderr.strip()}")

    def exit_code(self) -> int | None:
        """The container's exit code once it stopped; None while it runs."""
        state = self.state()
        return int(state["ExitCode"]) if state["Status"] in ("exited", "stopped") else None

    def signal(self, name: str) -> None:
        """``podman kill --signal NAME``: the signal to the container's first process, as the kubelet sends it."""
        podman.podman("kill", "--signal", name, self.name, what=f"podman kill --signal {name}")

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM, then the exit code once the container stopped, None if it still runs after ``timeout`` seconds."""
        self.signal("TERM")
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float) -> int | None:
        """The container's exit code once it stopped, or None if it still runs after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                return code
            time.sleep(0.2)
        return None

    # --- the kubelet's probes ----------------------------------------------------------------------------------

    def probe(self, kind: str) -> tuple[int | None, float]:
        """One probe as the manifest defines it: (status or None when it got no answer, seconds it took)."""
        spec = self.container[kind]["httpGet"]
        timeout = self.container[kind].get("timeoutSeconds", 1)
        started = time.monotonic()
        try:
            status = requests.get(self.url(spec["port"]) + spec["path"], timeout=timeout).status_code
        except requests.RequestException:
            status = None
        return status, time.monotonic() - started

    def passes(self, kind: str) -> bool:
        status, _ = self.probe(kind)
        return status is not None and 200 <= status < 400

    def cold_start(self) -> dict[str, float]:
        """Seconds from podman run to: the startup probe's first pass, then readiness; and when a kubelet probing
        every periodSeconds would have seen each."""
        startup = self.container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"] + startup.get("initialDelaySeconds", 0)
        live = ready = None
        while time.monotonic() - self.started < min(budget, START_LIMIT):
            if live is None and self.passes("startupProbe"):
                live = time.monotonic() - self.started
            if live is not None and self.passes("readinessProbe"):
                ready = time.monotonic() - self.started
                break
            if self.state()["Status"] != "running":
                raise CheckFailed(f"{self.model}: the container exited while starting "
                                  f"(exit {self.state()['ExitCode']}):\n{self.logs()}")
            time.sleep(POLL)
        if ready is None:
            raise CheckFailed(f"{self.model}: not ready within {min(budget, START_LIMIT)} s (the startup probe's "
                              f"budget):\n{self.logs()}")
        period = startup["periodSeconds"]
        readiness = self.container["readinessProbe"]["periodSeconds"]
        kubelet_live = math.ceil(live / period) * period
        kubelet_ready = kubelet_live + math.ceil(max(0.0, ready - kubelet_live) / readiness) * readiness
        return {"live_seconds": round(live, 2), "ready_seconds": round(ready, 2),
                "kubelet_live_seconds": kubelet_live, "kubelet_ready_seconds": kubelet_ready}

    def timeline(self) -> list[tuple[float, str]]:
        """Seconds from podman run to each step of the start, from the container's output (serve.sh) and the logs
        it writes in /tmp (TorchServe's frontend and workers)."""
        state = self.state()
        steps = [(_epoch(state.get("StartedAt", "")), "the container's process started")]
        logs = subprocess.run(["podman", "logs", "--timestamps", self.name], capture_output=True, text=True,
                              timeout=30, check=False)
        for line in (logs.stdout + logs.stderr).splitlines():
            stamp, _, text = line.partition(" ")
            for marker, what in TIMELINE_MARKERS:
                if text.startswith(marker):
                    steps.append((_epoch(stamp), what))
        home = dict((e["name"], e["value"]) for e in self.container["env"])
        for name, marker, count, what in (("ts_log.log", " main ", 1, "TorchServe's frontend (Java) logs"),
                                          ("ts_log.log", "Model server started", 1, "TorchServe's APIs answer"),
                                          ("model_log.log", " ready on ", 9, "a worker loaded its model")):
            path = f"{home['LOG_DIR']}/{name}"
            found = self.exec("sh", "-c", f"grep -m {count} -h -- '{marker}' {path} 2>/dev/null || true").stdout
            for line in found.splitlines():
                steps.append((_epoch(line[:23].replace(",", ".")), what))
        return sorted((round(stamp - self.wall, 2), what) for stamp, what in steps if stamp)

    def probes(self) -> dict[str, Any]:
        found = {}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            status, seconds = self.probe(kind)
            spec = self.container[kind]
            found[kind] = {"path": spec["httpGet"]["path"], "status": status, "seconds": round(seconds, 3)}
            if status != 200 or seconds > spec.get("timeoutSeconds", 1):
                raise CheckFailed(f"{self.model}: {kind} {spec['httpGet']['path']} answered {status} in "
                                  f"{seconds:.2f} s (the manifest wants 200 within {spec.get('timeoutSeconds', 1)} s)")
        return found

    # --- a client's requests -----------------------------------------------------------------------------------

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def post(self, path: str, body: bytes, content_type: str, timeout: float = 60) -> requests.Response:
        return requests.post(self.url() + path, data=body, timeout=timeout,
                             headers={**self.auth, "Content-Type": content_type})


def _selinux() -> bool:
    return Path("/sys/fs/selinux/enforce").exists() and Path("/sys/fs/selinux/enforce").read_text().strip() == "1"
