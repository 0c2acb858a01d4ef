"""The front door: nginx in front of TorchServe (``serving/nginx.conf.j2``), and the A/B splits it holds.

Clients call the front door, never TorchServe itself: it checks the key (401), the method (405) and the body's size
(413, TorchServe's own ``max_request_size``) before TorchServe sees a byte, gives every request an ``X-Request-Id``,
drops stalled clients, sends a prediction whose worker died to TorchServe once more, answers ``/health/live`` and
``/health/ready`` (``serving/health.py``) without a key, and keeps TorchServe's management API to loopback, with
registration confined to the model store and no workflows.

Why nginx for the splits: ``split_clients`` is a weighted split by a hash of any key, so a client that sends
``X-Client-Id`` always lands on the same version and a client without one is split at random by weight (the hash of
nginx's per-request ``$request_id``). A reload is graceful: old workers finish the requests they hold while new
workers take new connections, so changing the split drops nothing. It is one Debian package, proven in front of most
of the web.

The routing table lives in ``$SERVE_HOME/proxy/routes.json`` as long as the front door runs: for each routed model
its split (version → weight), the TorchServe default it was set with, and the earlier states that ``rollback``
returns to. Requests for ``/predictions/<model>`` (and ``/explanations/<model>``) go to the chosen version's own URL,
so TorchServe's metrics carry the real version; every other model's requests go to TorchServe as they are.

Every change is: check the versions are registered with READY workers → render ``serving/nginx.conf.j2`` → ``nginx -t`` →
start or reload → wait until the front door serves the new table and every old worker has finished and exited. After
that no request is still on its way to a version the new split dropped, so unregistering it is safe.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import math
import os
import re
import shutil
import signal
import subprocess
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jinja2
import psutil
import requests
import yaml

from archives import MODEL_NAME, VERSION, SpecError, check_model_name, check_version
from archives.store import default_store
from serving.instance import REPO, Instance, ServeError, process_tree, wait_until
from serving.torchserve import TorchServe, parse_expiry

# nginx.conf as a Jinja2 template; undefined names fail the render rather than leave a hole in the configuration
TEMPLATE = jinja2.Environment(loader=jinja2.FileSystemLoader(REPO / "serving"), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                              autoescape=False).get_template("nginx.conf.j2")
HISTORY = 20  # earlier states kept per model for rollback
CLIENT_TIMEOUT = 10  # seconds a client may stall while sending its request or reading its answer
READ_TIMEOUT = 300  # seconds TorchServe may take to answer where no archive says (each model's location says less)
TORCHSERVE_RESPONSE_TIMEOUT = 120  # TorchServe's default responseTimeout, for an archive whose config sets none
MAR_MANIFEST, MODEL_CONFIG = "MAR-INF/MANIFEST.json", "model-config.yaml"  # in an archive
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The register parameters the front door passes (TorchServe's others, handler and runtime, would change what code
# serves an archive); each value plain characters, at most 64.
REGISTER_PARAMETERS = ("url", "model_name", "initial_workers", "synchronous", "batch_size", "max_batch_delay",
                       "response_timeout", "startup_timeout")
PLAIN_VALUE = "[A-Za-z0-9_.-]{1,64}"


def parse_split(terms: list[str]) -> dict[str, float]:
    """``["1.0=90", "2.0=10"]`` (or one string with spaces) → ``{"1.0": 90.0, "2.0": 10.0}``."""
    split: dict[str, float] = {}
    for term in " ".join(terms).replace(",", " ").split():
        version, sep, weight = term.partition("=")
        if not sep or not version:
            raise ServeError(f"split term {term!r} is not VERSION=WEIGHT (e.g. 1.0=90 2.0=10)")
        try:
            check_version(version)
        except SpecError as error:
            raise ServeError(f"split term {term!r}: {error}") from None
        try:
            value = float(weight)
        except ValueError:
            raise ServeError(f"split term {term!r}: weight {weight!r} is not a number") from None
        if value < 0 or version in split:
            raise ServeError(f"split term {term!r}: weights are >= 0 and each version appears once")
        split[version] = value
    total = sum(split.values())
    if total <= 0:
        raise ServeError("the split gives no traffic to any version")
    if any(0 < w / total < 1e-4 for w in split.values()):
        raise ServeError("a share below 0.01% cannot be expressed in nginx's split_clients")
    return {version: weight for version, weight in split.items() if weight > 0}


def describe_split(split: dict[str, float]) -> str:
    total = sum(split.values())
    return " ".join(f"{v}={100 * w / total:g}%" for v, w in split.items())


# --- the routing table -------------------------------------------------------------------------------------------


class Routes:
    """``routes.json``: ``{"generation": n, "models": {model: {"split", "default", "history": [...]}}}``."""

    def __init__(self, path: Path, fresh: bool = False):
        self.path = path
        data = json.loads(path.read_text()) if path.exists() and not fresh else {}
        self.generation: int = data.get("generation", 0)
        self.models: dict[str, dict[str, Any]] = data.get("models", {})

    def state(self, model: str) -> dict[str, Any] | None:
        route = self.models.get(model)
        return None if route is None else {"split": route["split"], "default": route["default"]}

    def change(self, model: str, split: dict[str, float], default: str, previous: dict[str, Any] | None) -> None:
        """Make ``split``/``default`` the model's route; ``previous`` (if any) becomes the rollback target."""
        history = self.models.get(model, {}).get("history", [])
        if previous is not None:
            history = (history + [previous])[-HISTORY:]
        self.models[model] = {"split": split, "default": default, "history": history}
        self.generation += 1

    def previous(self, model: str) -> dict[str, Any]:
        """The state the last change replaced (the rollback target); it stays in the history until ``drop_last``."""
        history = self.models.get(model, {}).get("history", [])
        if not history:
            raise ServeError(f"{model} has no earlier split or default to roll back to")
        return history[-1]

    def drop_last(self, model: str) -> None:
        self.models[model]["history"].pop()

    def served(self) -> dict[str, Any]:
        """What the proxy serves at /ab/routes (the table without its history)."""
        return {"generation": self.generation,
                "models": {m: {"split": r["split"], "default": r["default"]} for m, r in sorted(self.models.items())}}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"generation": self.generation, "models": self.models}, indent=2))
        tmp.replace(self.path)


# --- nginx -------------------------------------------------------------------------------------------------------


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")
    if not found:
        raise ServeError("nginx is not installed: run ./install.sh (the front door runs on it)")
    return found


def cpu_limit() -> int:
    """The CPUs this process may use: its cgroup's quota (a container's CPU limit) when one is set, else the cores it
    may run on. nginx's ``worker_processes auto`` counts the node's cores, a worker each, whatever the pod's limit."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return len(os.sched_getaffinity(0))


def _user() -> str:
    """As root, nginx's workers need an unprivileged user; as anyone else they run as that user."""
    if os.geteuid() != 0:
        return ""
    import grp
    import pwd

    nobody = pwd.getpwnam("nobody")
    return f"{nobody.pw_name} {grp.getgrgid(nobody.pw_gid).gr_name}"


def _split(model: str, split: dict[str, float]) -> dict[str, Any]:
    """What the template's ``split_clients``/``map`` blocks (http level) need to pick a routed model's version per
    request: each version's share, the last one taking the rest (``*``)."""
    total, versions = sum(split.values()), list(split)
    buckets = [(f"{100 * split[version] / total:.2f}%", version) for version in versions[:-1]]
    return {"model": model, "var": re.sub(r"\W", "_", model), "describe": describe_split(split),
            "buckets": buckets + [("*", versions[-1])]}


def _model_location(model: str, routed: bool, response_timeout: int | None) -> dict[str, Any]:
    """What the template's ``location`` blocks (server level) of one model need: its default URL, sent to the split's
    version when the model is routed, and its explicit versions. Each waits for TorchServe 1 s less than the model's
    shortest responseTimeout: a request that takes longer is answered 504 here and never sent again (when
    TorchServe's own timeout expires first, it kills the worker and answers 500 "Worker died.", which the retry hop
    would send to the next worker)."""
    check_model_name(model)
    seconds = READ_TIMEOUT if response_timeout is None else max(1, response_timeout - 1)
    limit = (f"{seconds} s (the model's responseTimeout, {response_timeout} s, less 1 s)" if response_timeout
             else f"{seconds} s")
    return {"model": model, "pattern": re.escape(model).replace("\\-", "-"), "routed": routed,
            "var": re.sub(r"\W", "_", model), "seconds": seconds, "limit": limit}


def archive_pattern() -> str:
    """What a registration's url may be, as a regular expression: an archive's name in the model store by the one
    rule for names, ``<model>_<version>.mar``, or its unpacked folder's, ``<model>_<version>``."""
    def bare(rule: re.Pattern) -> str:
        return rule.pattern.removeprefix("^").removesuffix("$")

    return f"{bare(MODEL_NAME)}_{bare(VERSION)}(?:\\.mar)?"


def response_timeouts(store: Path) -> dict[str, int]:
    """Each model's shortest ``responseTimeout`` over the archives in the model store (their model-config.yaml;
    TorchServe's default, 120 s, where one sets none)."""
    timeouts: dict[str, int] = {}
    for path in sorted(store.glob("*.mar")):
        try:
            with zipfile.ZipFile(path) as archive:
                name = json.loads(archive.read(MAR_MANIFEST))["model"]["modelName"]
                config = yaml.safe_load(archive.read(MODEL_CONFIG)) if MODEL_CONFIG in archive.namelist() else {}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, yaml.YAMLError) as error:
            raise ServeError(f"{path} is not an archive the front door can read: {error}") from None
        seconds = int((config or {}).get("responseTimeout", TORCHSERVE_RESPONSE_TIMEOUT))
        timeouts[name] = min(seconds, timeouts.get(name, seconds))
    return timeouts


# Errors nginx answers itself: status → (reason, message), as the handlers' errors: {"code", "error", "message"}.
ERRORS = {
    401: ("unauthorized", "missing or wrong key: send Authorization: Bearer <key> (./serve.sh token inference; "
                          "token management for the management API)"),
    403: ("forbidden", "models are registered by POST /models with the name of an archive in the model store "
                       "(url=<model>_<version>.mar, or its unpacked folder url=<model>_<version>), plain "
                       "parameters (no percent-encoding; only " + ", ".join(REGISTER_PARAMETERS) + ") and no body; "
                       "URLs, paths, other folders and workflows are refused"),
    404: ("not_found", "no such endpoint on this port; the front door serves /predictions/<model>[/<version>], "
                       "/explanations/..., /ping, /health/live and /health/ready, /v2/... (inference), /models... and "
                       "/ab/routes (management, loopback), /metrics (metrics)"),
    405: ("method_not_allowed", "method not allowed here; see the Allow header"),
    408: ("request_timeout", "the request was not received in time"),
    413: ("body_too_large", "the request body is over the limit of {limit}"),
    502: ("unavailable", "TorchServe is not answering; retry shortly"),
    504: ("timeout", "no answer within $answer_limit: the request is not sent again (it may be what holds the "
                     "worker); send less, or ask the operator for a longer responseTimeout"),
}
UNAVAILABLE = 503  # what a client sees for nginx's own 502 (no backend): retry later


def _errors(codes: tuple[int, ...], limit: str) -> list[dict[str, Any]]:
    """The errors the template's ``error_page`` lines and named locations answer with a JSON body, X-Request-Id
    kept."""
    errors = []
    for code in codes:
        reason, message = ERRORS[code]
        status = UNAVAILABLE if code == 502 else code
        headers = ["add_header X-Request-Id $req_id always;"]
        if code == 401:
            headers.append("add_header WWW-Authenticate 'Bearer realm=\"torchserve\"' always;")
        if code == 405:
            headers.append("add_header Allow $allowed always;")
        if status == UNAVAILABLE:
            headers.append('add_header Retry-After "1" always;')
        body = json.dumps({"code": status, "error": reason, "message": message.format(limit=limit)})
        errors.append({"code": code, "status": status, "headers": headers, "body": body})
    return errors


KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def valid_keys(keys: dict[str, Any], kind: str, now: dt.datetime | None = None) -> list[str]:
    """The key of ``kind`` in TorchServe's key file, unless it has expired (the API key does not expire)."""
    entry = keys.get(kind) or {}
    key, expiry = entry.get("key", ""), entry.get("expiration time")
    now = now or dt.datetime.now(dt.timezone.utc)
    if not KEY.match(key) or (expiry is not None and parse_expiry(expiry) <= now):
        return []
    return [key]


def _key_patterns(keys: list[str]) -> list[str]:
    """Each key as the template's ``map`` line takes it, a case-sensitive regular expression: nginx compares a map's
    plain strings without regard to case, which would take "Bearer ABCD..." for "Bearer AbCd..." (a bit less of a
    key per letter). The scheme's name is case-insensitive (RFC 7235), the key is not."""
    return [re.escape(key) for key in keys]


CLIENT_KEY = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")


def client_keys() -> list[str]:
    """Inference keys of the deployment's own, one per line of ``CLIENT_KEYS_FILE`` (a mounted Kubernetes Secret;
    ``#`` starts a comment; two lines during a rotation). TorchServe makes a random key per instance, so replicas
    behind one Service share no key of TorchServe's: the front door accepts these on every replica, besides
    TorchServe's own, and hands TorchServe its current key (``render``)."""
    path = os.environ.get("CLIENT_KEYS_FILE")
    if not path:
        return []
    try:
        lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines()]
    except OSError as error:
        raise ServeError(f"CLIENT_KEYS_FILE: {error}") from None
    keys = [line for line in lines if line]
    bad = [key for key in keys if not CLIENT_KEY.match(key)]
    if bad or not keys:
        raise ServeError(f"CLIENT_KEYS_FILE {path}: {'no key' if not keys else f'{len(bad)} malformed line(s)'}: "
                         "one key per line, 16 to 256 characters of A-Z a-z 0-9 . _ ~ + / = -")
    return keys


@dataclass
class Listen:
    """The front door's three addresses, and its TLS certificate and key (``TLS_CERT``, ``TLS_KEY``) when given."""

    inference: str
    management: str
    metrics: str
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def from_env(cls) -> "Listen":
        cert, key = os.environ.get("TLS_CERT"), os.environ.get("TLS_KEY")
        if bool(cert) != bool(key):
            raise ServeError("TLS needs both TLS_CERT (the certificate chain) and TLS_KEY (its private key)")
        for name, path in (("TLS_CERT", cert), ("TLS_KEY", key)):
            if path and not Path(path).is_file():
                raise ServeError(f"{name}={path} is not a file")
        instance = Instance.current()
        if (urlparse(instance.front).scheme == "https") != bool(cert):
            raise ServeError(f"PROXY_ADDRESS is {instance.front}: https needs TLS_CERT and TLS_KEY, and with them "
                             "the address is https")
        management = urlparse(instance.front_management)
        if management.hostname not in LOOPBACK:
            raise ServeError(f"the management API stays on loopback, not {management.hostname}")
        return cls(_host_port(instance.front), f"{management.hostname}:{management.port}",
                   _host_port(instance.front_metrics), Path(cert).resolve() if cert else None,
                   Path(key).resolve() if key else None)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _host_port(url: str) -> str:
    parsed = urlparse(url)
    return f"{parsed.hostname}:{parsed.port}"


def max_body() -> int:
    """TorchServe's max_request_size, as nginx's client_max_body_size: one limit for both."""
    return int(Instance.current().properties().get("max_request_size", 6553500))


def render(routes: Routes, listen: Listen, keys: dict[str, Any], state: Path, logs: Path) -> str:
    """nginx.conf for this instance, from ``serving/nginx.conf.j2``."""
    instance = Instance.current()
    timeouts = response_timeouts(default_store())
    limit_bytes = max_body()
    limit = f"{limit_bytes / 2**20:g} MiB ({limit_bytes} bytes)"
    return TEMPLATE.render(
        user=_user(), workers=cpu_limit(), state=state, logs=logs, max_body=limit_bytes,
        client_timeout=f"{CLIENT_TIMEOUT}s", read_timeout=f"{READ_TIMEOUT}s",
        inference=_host_port(instance.torchserve("inference")),
        management=_host_port(instance.torchserve("management")),
        metrics=_host_port(instance.torchserve("metrics")),
        health=_host_port(instance.health), v2=_host_port(instance.v2), retry=_host_port(instance.retry),
        listen=listen.inference + (" ssl" if listen.cert else ""), management_listen=listen.management,
        metrics_listen=listen.metrics, tls=listen if listen.cert else None,
        inference_keys=_key_patterns(valid_keys(keys, "inference") + client_keys()),
        # what TorchServe itself is sent: its own current key, whichever key the client passed the door with
        torchserve_key=(keys.get("inference") or {}).get("key", ""),
        management_keys=_key_patterns(valid_keys(keys, "management")),
        api_keys=_key_patterns(valid_keys(keys, "API")),
        archive_name=archive_pattern(),
        register_query="{0}(?:&{0})*".format(f"(?:{'|'.join(REGISTER_PARAMETERS)})={PLAIN_VALUE}"),
        errors=_errors((401, 404, 405, 408, 413, 502, 504), limit),
        management_errors=_errors((401, 403, 404, 405, 413, 502, 504), limit),
        splits=[_split(model, route["split"]) for model, route in sorted(routes.models.items())],
        locations=[_model_location(model, model in routes.models, timeouts.get(model))
                   for model in sorted(set(timeouts) | set(routes.models))],
        routes_json=json.dumps(routes.served(), separators=(",", ":")))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, already exited but not yet reaped by its parent, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def write_private(path: Path, text: str) -> None:
    """A file only its owner can read (the rendered configuration holds the keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


class Proxy:
    """The front door of this SERVE_HOME: nginx's rendered config, pid, routing table and logs."""

    def __init__(self, timeout: float = 60.0):
        self.home = Instance.current().home / "proxy"
        self.logs = Path(os.environ.get("LOG_DIR", REPO / "logs")).resolve()
        self.address = Instance.current().front_management
        self.timeout = timeout
        self.conf = self.home / "nginx.conf"
        self.pid_file = self.home / "nginx.pid"
        self.ts = TorchServe()

    @contextmanager
    def locked(self, wait: bool = True) -> Iterator[Routes | None]:
        """The routing table, held exclusively while one command changes it (None when ``wait`` is False and
        another holds it). A table lives as long as its front door: when nginx is not running, the next change
        starts from an empty one."""
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "routes.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield None
                return
            yield self.routes()

    def routes(self) -> Routes:
        """The routing table as it stands (empty when nginx is not running: a table lives as long as its proxy)."""
        return Routes(self.routes_file, fresh=self.master() is None)

    @property
    def routes_file(self) -> Path:
        return self.home / "routes.json"

    def master(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def serving(self) -> dict[str, Any]:
        """The routing table the running front door answers with (on the management port)."""
        try:
            response = requests.get(f"{self.address}/ab/routes", timeout=5,
                                    headers={"Authorization": f"Bearer {self.ts.token('management')}"})
            response.raise_for_status()
            return response.json()
        except (requests.RequestException, ValueError) as error:
            raise ServeError(f"the front door is not answering at {self.address}: {error}") from None

    def start(self) -> str:
        """Start nginx with an empty routing table (serve.sh start); nothing when it runs already."""
        if self.master() is not None:
            return f"front door already running (pid {self.master()})"
        with self.locked() as routes:
            message = self.apply(routes)
            routes.save()
        return message

    def sync_keys(self, wait: bool = True) -> bool:
        """Render again when TorchServe's keys changed (a renewal, an expiry); whether nginx was reloaded. With
        ``wait=False`` nothing is done while another command holds the routing table (the health checker will)."""
        if self.master() is None:
            return False
        with self.locked(wait) as routes:
            if routes is None or self._render(routes) == self.conf.read_text():
                return False
            self.apply(routes)
        return True

    def _render(self, routes: Routes) -> str:
        return render(routes, Listen.from_env(), self.ts.keys(), self.home, self.logs)

    def apply(self, routes: Routes) -> str:
        """Render, check, then start or reload nginx; return once only the new table is served."""
        nginx = nginx_binary()
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.home / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        candidate = self.home / "nginx.conf.new"
        write_private(candidate, self._render(routes))
        self._nginx(nginx, "-t", conf=candidate)
        candidate.replace(self.conf)
        master = self.master()
        if master is None:
            self._nginx(nginx, conf=self.conf)
            action = "started"
            old_workers: set[int] = set()
        else:
            old_workers = {worker.pid for worker in process_tree(master)[1:]}
            os.kill(master, signal.SIGHUP)
            action = "reloaded"
        self._wait(lambda: self._serves(routes.generation), f"the front door to serve generation {routes.generation}")
        self._wait(lambda: not any(_alive(pid) for pid in old_workers), "the old nginx workers to finish")
        return f"front door {action} at {Instance.current().front} (generation {routes.generation})"

    def stop(self) -> str:
        master = self.master()
        if master is None:
            return "front door not running"
        os.kill(master, signal.SIGQUIT)  # graceful: in-flight requests are answered first
        self._wait(lambda: not _alive(master), "nginx to stop")
        self.routes_file.unlink(missing_ok=True)
        return f"front door stopped (pid {master})"

    def _serves(self, generation: int) -> bool:
        try:
            return self.serving()["generation"] == generation
        except ServeError:
            return False

    def _wait(self, done, what: str) -> None:
        try:
            wait_until(done, self.timeout, what, 0.05)
        except TimeoutError:
            raise ServeError(f"timed out after {self.timeout:g} s waiting for {what}; "
                             f"see {self.logs / 'proxy-error.log'}") from None

    def _nginx(self, nginx: str, *args: str, conf: Path) -> None:
        command = [nginx, "-e", str(self.logs / "proxy-error.log"), "-p", str(self.home), "-c", str(conf), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            detail = " ".join(line for line in result.stderr.splitlines() if "emerg" in line or "error" in line)
            raise ServeError(f"nginx refused the configuration: {detail or result.stderr.strip()}")
