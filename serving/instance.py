"""One running stack: TorchServe, its front door (nginx), the health checker and the v2 gateway, as ``serve.sh``
starts them for one home folder.

An ``Instance`` is everything that tells one stack from another: its home (pid files, the key file, the workers'
sockets), its logs, its model store, TorchServe's configuration, and every address. ``serve.sh`` reads it as
environment variables (``environment()``), and the processes it starts read it back (``Instance.current()``). A
second stack beside the first (the tests, the benchmark, the footprint and soak tools, the rehearsal) is
``Instance.fresh(home, store=...)``: free loopback ports and folders of its own, driven by the same calls, with
nothing changed in this process's environment.

Two sets of addresses. The front door is what clients call: inference on 127.0.0.1:8080, management on :8081,
metrics on :8082 (``PROXY_ADDRESS``, ``PROXY_MANAGEMENT_ADDRESS``, ``PROXY_METRICS_ADDRESS``). TorchServe's own
APIs listen behind it on the loopback addresses of config.properties, each overridden the way TorchServe itself
reads them (``TS_INFERENCE_ADDRESS``, ...).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import psutil

REPO = Path(__file__).resolve().parent.parent
SERVE_SH = "serve.sh"

# name → (the environment variable serve.sh reads, its default). The front door's scheme is https when TLS_CERT is set.
ADDRESSES = {
    "front": ("PROXY_ADDRESS", "{scheme}://127.0.0.1:8080"),
    "front_management": ("PROXY_MANAGEMENT_ADDRESS", "http://127.0.0.1:8081"),
    "front_metrics": ("PROXY_METRICS_ADDRESS", "http://127.0.0.1:8082"),
    "health": ("HEALTH_ADDRESS", "http://127.0.0.1:8183"),  # the health checker, behind the front door's /health/
    "retry": ("RETRY_ADDRESS", "http://127.0.0.1:8184"),  # the front door's retry hop (serving/nginx.conf.j2)
    "v2": ("V2_ADDRESS", "http://127.0.0.1:8185"),  # the Open Inference Protocol gateway, behind /v2/
    "v2_grpc": ("V2_GRPC_ADDRESS", "127.0.0.1:8083"),  # its gRPC, host:port (a container listens on 0.0.0.0)
}
# TorchServe's own listeners, keys of config.properties that TS_<KEY> overrides
TORCHSERVE_ADDRESSES = ("inference_address", "management_address", "metrics_address")
TORCHSERVE_PORTS = ("grpc_inference_port", "grpc_management_port")
# Everything else of the environment that says how this stack runs (serve.sh's header explains each)
SETTINGS = {"TLS_CERT", "TLS_KEY", "SERVE_MODELS", "AB_SPLITS", "CLIENT_KEYS_FILE", "DRAIN_SECONDS"}
# The processes serve.sh starts, by their pid files in the home: TorchServe's frontend (its workers are its
# children), the helpers (the health checker, the v2 gateway) and the front door's nginx master (its workers are
# its children).
PID_FILES = {"frontend": "tmp/.model_server.pid", "health checker": "health.pid", "v2 gateway": "v2.pid",
             "nginx master": "proxy/nginx.pid"}

T = TypeVar("T")


class ServeError(RuntimeError):
    """Something a user can act on, in one line: not running, no key file, unknown model, refused request."""


class Started(NamedTuple):
    """What ``Instance.started`` yields: the seconds ``serve.sh start`` took (every version READY, the front door
    ready) and what it printed."""

    seconds: float
    output: str


def read_properties(path: Path) -> dict[str, str]:
    """A Java properties file's ``key=value`` lines."""
    properties = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            properties[key.strip()] = value.strip()
    return properties


def free_ports(count: int) -> list[int]:
    """Loopback ports nobody listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    with ExitStack() as stack:
        for s in sockets:
            stack.enter_context(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Call ``check`` until it returns something true, and return that; ``TimeoutError`` naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if result := check():
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, if that process runs."""
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (TorchServe's workers, nginx's); empty once it is gone. Each
    ``psutil.Process`` knows its start time, so a later process that reuses a pid is never taken for it."""
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _address(name: str) -> property:
    return property(lambda self: self.address(name), doc=f"Base URL of {name} ({ADDRESSES[name][0]}).")


@dataclass(frozen=True)
class Instance:
    home: Path
    log_dir: Path
    store: Path
    config: Path = REPO / "config.properties"
    settings: Mapping[str, str] = field(default_factory=dict)  # addresses, TS_* overrides and SETTINGS, as set

    front = _address("front")
    front_management = _address("front_management")
    front_metrics = _address("front_metrics")
    health = _address("health")
    retry = _address("retry")
    v2 = _address("v2")
    v2_grpc = _address("v2_grpc")

    # --- made from ----------------------------------------------------------------------------------------------

    @classmethod
    def current(cls, env: Mapping[str, str] = os.environ) -> Instance:
        """The stack this process belongs to or talks to, from the environment serve.sh exports (the defaults of a
        plain ``make serve`` where it is unset)."""
        names = {variable for variable, _ in ADDRESSES.values()} | SETTINGS
        return cls(home=Path(env.get("SERVE_HOME") or REPO / ".serve"),
                   log_dir=Path(env.get("LOG_DIR") or REPO / "logs"),
                   store=Path(env.get("MODEL_STORE") or REPO / "model_store"),
                   config=Path(env.get("TS_CONFIG_FILE") or REPO / "config.properties"),
                   settings={k: v for k, v in env.items() if v and (k in names or
                             (k.startswith("TS_") and k != "TS_CONFIG_FILE"))})

    @classmethod
    def fresh(cls, home: Path, store: Path | None = None, **settings: str) -> Instance:
        """One more stack beside any other: ``home`` for its state, ``home/logs``, free loopback ports for every
        listener; ``settings`` (environment variable → value) on top, e.g. ``SERVE_MODELS``, ``TLS_CERT``."""
        ports = iter(free_ports(len(ADDRESSES) + len(TORCHSERVE_ADDRESSES) + len(TORCHSERVE_PORTS)))
        chosen = {f"TS_{key.upper()}": f"http://127.0.0.1:{next(ports)}" for key in TORCHSERVE_ADDRESSES}
        chosen |= {f"TS_{key.upper()}": str(next(ports)) for key in TORCHSERVE_PORTS}
        for name, (variable, default) in ADDRESSES.items():
            port = next(ports)
            chosen[variable] = f"127.0.0.1:{port}" if name == "v2_grpc" else f"http://127.0.0.1:{port}"
        config = Path(settings.pop("TS_CONFIG_FILE", REPO / "config.properties"))
        return cls(home=Path(home), log_dir=Path(home) / "logs", store=Path(store or REPO / "model_store"),
                   config=config, settings=chosen | settings)

    @classmethod
    def at(cls, home: Path) -> Instance:
        """The stack whose state is in ``home`` (its pids and key file), other settings as in this environment."""
        return cls.current({**os.environ, "SERVE_HOME": str(home)})

    # --- where it answers ---------------------------------------------------------------------------------------

    def address(self, name: str) -> str:
        variable, default = ADDRESSES[name]
        scheme = "https" if self.settings.get("TLS_CERT") else "http"
        return self.settings.get(variable) or default.format(scheme=scheme)

    def torchserve(self, api: str) -> str:
        """Base URL of TorchServe's own inference, management or metrics API."""
        key = f"{api}_address"
        return self.settings.get(f"TS_{key.upper()}") or self.properties()[key]

    def properties(self) -> dict[str, str]:
        return read_properties(self.config)

    @property
    def key_file(self) -> Path:
        return self.home / "key_file.json"

    def environment(self) -> dict[str, str]:
        """The environment variables serve.sh and the processes it starts read this stack from."""
        return {"SERVE_HOME": str(self.home), "LOG_DIR": str(self.log_dir), "MODEL_STORE": str(self.store),
                "TS_CONFIG_FILE": str(self.config), **self.settings}

    # --- its processes ------------------------------------------------------------------------------------------

    def pids(self) -> dict[str, int]:
        """name (as in PID_FILES) → pid, for each of serve.sh's processes that runs."""
        return {name: pid for name, file in PID_FILES.items() if (pid := read_pid(self.home / file))}

    def alive(self) -> bool:
        """Whether its TorchServe runs (its pid file names a live process)."""
        return read_pid(self.home / PID_FILES["frontend"]) is not None

    def frontend_pid(self) -> int:
        pid = read_pid(self.home / PID_FILES["frontend"])
        if pid is None:
            raise ServeError(f"no TorchServe runs for {self.home}: start it with ./serve.sh start")
        return pid

    def processes(self) -> dict[str, list[psutil.Process]]:
        """name → that process and all its descendants (the frontend's workers, nginx's workers)."""
        return {name: tree for name, pid in self.pids().items() if (tree := process_tree(pid))}

    # --- serve.sh -----------------------------------------------------------------------------------------------

    def serve(self, *command: str, timeout: float = 600, root: Path = REPO, **popen: Any) -> subprocess.CompletedProcess:
        """``serve.sh <command>`` of ``root`` for this stack, its output captured."""
        return subprocess.run([str(root / SERVE_SH), *command], env={**os.environ, **self.environment()},
                              capture_output=True, text=True, timeout=timeout, check=False, **popen)

    def spawn(self, *command: str, root: Path = REPO, **popen: Any) -> subprocess.Popen:
        """``serve.sh <command>`` started in the background (``run``, a container's command)."""
        return subprocess.Popen([str(root / SERVE_SH), *command], env={**os.environ, **self.environment()}, **popen)

    def start(self, timeout: float = 600, root: Path = REPO) -> str:
        """``serve.sh start``: returns its output once every version is READY and the front door is ready."""
        started = self.serve("start", timeout=timeout, root=root)
        if started.returncode != 0:
            raise ServeError(f"serve.sh start failed ({started.returncode}):\n{started.stdout[-3000:]}\n"
                             f"{started.stderr[-3000:]}")
        return started.stdout

    def stop(self, timeout: float = 300, root: Path = REPO) -> subprocess.CompletedProcess:
        return self.serve("stop", timeout=timeout, root=root)

    @contextmanager
    def started(self, timeout: float = 600, root: Path = REPO) -> Iterator[Started]:
        """``serve.sh start`` for the block, timed from its spawn, and ``serve.sh stop`` after it, also when the
        start fails (a failed start may leave processes behind)."""
        began = time.perf_counter()
        try:
            output = self.start(timeout, root)
            yield Started(time.perf_counter() - began, output)
        finally:
            self.stop(root=root)
