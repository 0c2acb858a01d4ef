"""A small client for a TorchServe started by serve.sh: addresses, tokens and one-line errors.

Two sets of addresses. The front door (nginx, ``manage/proxy.py``) is what clients call: inference on
127.0.0.1:8080, management on 127.0.0.1:8081, metrics on 127.0.0.1:8082, moved by ``PROXY_ADDRESS``,
``PROXY_MANAGEMENT_ADDRESS`` and ``PROXY_METRICS_ADDRESS``. TorchServe's own APIs listen behind it on the loopback
addresses of config.properties, overridden like TorchServe itself does by ``TS_INFERENCE_ADDRESS``,
``TS_MANAGEMENT_ADDRESS`` and ``TS_METRICS_ADDRESS``; this toolkit's own commands manage TorchServe there.
Tokens come from the key file TorchServe writes into ``$SERVE_HOME`` (default ``.serve/``); an expired token is
renewed with the API key, so long sessions keep working.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

REPO = Path(__file__).resolve().parent.parent
CONFIG = Path(os.environ.get("TS_CONFIG_FILE") or REPO / "config.properties")  # serve.sh exports the one it uses
TOKEN_MARGIN = dt.timedelta(seconds=30)  # renew a token this long before it expires
API_KEYS = ("inference", "management")
KEY_FILE_READS = 20
KEY_SYNC_SECONDS = 5.0  # the longest the front door may take to accept a renewed key
READY = "READY"


class ServeError(RuntimeError):
    """Something a user can act on, in one line: not running, no key file, unknown model, refused request."""


def read_properties(path: Path = CONFIG) -> dict[str, str]:
    properties = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            properties[key.strip()] = value.strip()
    return properties


def address(api: str) -> str:
    """Base URL of the inference, management or metrics API."""
    key = f"{api}_address"
    return os.environ.get(f"TS_{key.upper()}") or read_properties()[key]


def front_address() -> str:
    """Base URL of the front door (predictions, explanations, health): ``PROXY_ADDRESS``, default 127.0.0.1:8080,
    https when TLS_CERT is set."""
    scheme = "https" if os.environ.get("TLS_CERT") else "http"
    return os.environ.get("PROXY_ADDRESS", f"{scheme}://127.0.0.1:8080")


def front_management_address() -> str:
    """Base URL of the front door's management port (loopback only): ``PROXY_MANAGEMENT_ADDRESS`` or :8081."""
    return os.environ.get("PROXY_MANAGEMENT_ADDRESS", "http://127.0.0.1:8081")


def front_metrics_address() -> str:
    """Base URL of the front door's metrics port: ``PROXY_METRICS_ADDRESS`` or 127.0.0.1:8082."""
    return os.environ.get("PROXY_METRICS_ADDRESS", "http://127.0.0.1:8082")


def retry_address() -> str:
    """The front door's retry hop, on loopback (``proxy/nginx.conf``): ``RETRY_ADDRESS`` or :8184."""
    return os.environ.get("RETRY_ADDRESS", "http://127.0.0.1:8184")


def health_address() -> str:
    """Where the health checker (``manage/health.py``) answers the front door: ``HEALTH_ADDRESS`` or :8183."""
    return os.environ.get("HEALTH_ADDRESS", "http://127.0.0.1:8183")


def v2_address() -> str:
    """Where the Open Inference Protocol gateway (``manage/v2.py``) answers the front door's ``/v2/``, on loopback:
    ``V2_ADDRESS`` or :8185."""
    return os.environ.get("V2_ADDRESS", "http://127.0.0.1:8185")


def v2_grpc_address() -> str:
    """Where the gateway speaks KServe v2 gRPC, host:port: ``V2_GRPC_ADDRESS`` or 127.0.0.1:8083 (a container
    listens on 0.0.0.0:8083)."""
    return os.environ.get("V2_GRPC_ADDRESS", "127.0.0.1:8083")


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler of the loopback servers behind the front door, which log nothing themselves: the front
    door's access log has every request."""

    def log_message(self, format: str, *args) -> None:
        pass


def loopback_server(address: str, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threaded HTTP server on ``address`` (a URL), one daemon thread per request."""
    parsed = urlparse(address)
    server = ThreadingHTTPServer((parsed.hostname, parsed.port), handler)
    server.daemon_threads = True
    return server


def serve_home() -> Path:
    return Path(os.environ.get("SERVE_HOME", REPO / ".serve"))


# The processes serve.sh starts for a SERVE_HOME, by their pid files: TorchServe's frontend (its workers are its
# children), the helpers of its start_helper (the health checker, the v2 gateway) and the front door's nginx master
# (its workers are its children).
PID_FILES = {"frontend": "tmp/.model_server.pid", "health checker": "health.pid", "v2 gateway": "v2.pid",
             "nginx master": "proxy/nginx.pid"}


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, if that process runs."""
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def serve_pids(home: Path | None = None) -> dict[str, int]:
    """name (as in PID_FILES) → pid, for each of serve.sh's processes that runs."""
    home = home or serve_home()
    return {name: pid for name, file in PID_FILES.items() if (pid := read_pid(home / file))}


def server_alive() -> bool:
    """Whether the TorchServe of this SERVE_HOME runs (its pid file names a live process)."""
    return read_pid(serve_home() / PID_FILES["frontend"]) is not None


def free_ports(count: int) -> list[int]:
    """Loopback ports nobody listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    with ExitStack() as stack:
        for s in sockets:
            stack.enter_context(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def instance_env(home: Path) -> dict[str, str]:
    """The environment of one more TorchServe (and its front door) beside any other: its own state folder, logs and
    free ports. serve.sh, the client and ``python -m manage`` all read it."""
    (inference, management, metrics, grpc_inference, grpc_management, front, front_management, front_metrics,
     health, retry, v2, v2_grpc) = free_ports(12)
    return {
        "SERVE_HOME": str(home),
        "LOG_DIR": str(home / "logs"),
        "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{inference}",
        "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{management}",
        "TS_METRICS_ADDRESS": f"http://127.0.0.1:{metrics}",
        "TS_GRPC_INFERENCE_PORT": str(grpc_inference),
        "TS_GRPC_MANAGEMENT_PORT": str(grpc_management),
        "PROXY_ADDRESS": f"http://127.0.0.1:{front}",
        "PROXY_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{front_management}",
        "PROXY_METRICS_ADDRESS": f"http://127.0.0.1:{front_metrics}",
        "HEALTH_ADDRESS": f"http://127.0.0.1:{health}",
        "RETRY_ADDRESS": f"http://127.0.0.1:{retry}",
        "V2_ADDRESS": f"http://127.0.0.1:{v2}",
        "V2_GRPC_ADDRESS": f"127.0.0.1:{v2_grpc}",
    }


class TorchServe:
    """TorchServe's management API at its own address; predictions through the front door, as a client sends them."""

    def __init__(self, timeout: float = 30.0):
        self.inference_url = front_address()
        self.management_url = address("management")
        self.metrics_url = front_metrics_address()
        self.key_file = serve_home() / "key_file.json"
        self.timeout = timeout
        self.session = requests.Session()

    # --- tokens -------------------------------------------------------------------------------------------------

    def keys(self) -> dict[str, Any]:
        """The key file's contents; TorchServe writes it in place, so a read can catch it half written."""
        for _ in range(KEY_FILE_READS):
            if not self.key_file.exists():
                raise ServeError(f"no TorchServe key file at {self.key_file}: start TorchServe with ./serve.sh start")
            try:
                return json.loads(self.key_file.read_text())
            except json.JSONDecodeError:
                time.sleep(0.05)
        raise ServeError(f"the key file {self.key_file} is not valid JSON")

    def token(self, kind: str) -> str:
        """The current key for the inference or management API, renewed first if it is about to expire."""
        if kind not in API_KEYS:
            raise ServeError(f"token kind must be one of {', '.join(API_KEYS)}, not {kind!r}")
        entry = self.keys()[kind]
        if parse_expiry(entry["expiration time"]) - TOKEN_MARGIN <= dt.datetime.now(dt.timezone.utc):
            self.renew(kind)
            entry = self.keys()[kind]
        return entry["key"]

    def renew(self, kind: str) -> None:
        """Ask TorchServe for a new key (it rewrites the key file), and have the front door take it."""
        from manage.proxy import Proxy

        api_key = self.keys()["API"]["key"]
        self._send("POST", self.management_url, f"/token?type={kind}", token=api_key)
        Proxy().sync_keys(wait=False)

    # --- requests -----------------------------------------------------------------------------------------------

    def _send(self, method: str, base: str, path: str, token: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        try:
            return self.session.request(method, base + path, headers=headers, timeout=self.timeout, **kwargs)
        except requests.ConnectionError:
            raise ServeError(f"TorchServe is not answering at {base}: start it with ./serve.sh start") from None
        except requests.Timeout:
            raise ServeError(f"TorchServe did not answer {method} {base}{path} within {self.timeout:g} s") from None

    def request(self, api: str, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs) -> requests.Response:
        """A request to the inference or management API; a refused token is renewed once; other refusals raise."""
        base = self.inference_url if api == "inference" else self.management_url
        response = self._send(method, base, path, self.token(api), **kwargs)
        if response.status_code == 401 or (response.status_code == 400 and "InvalidKeyException" in response.text):
            self.renew(api)
            deadline = time.monotonic() + KEY_SYNC_SECONDS
            response = self._send(method, base, path, self.token(api), **kwargs)
            while response.status_code == 401 and time.monotonic() < deadline:  # the front door takes it in a moment
                time.sleep(0.1)
                response = self._send(method, base, path, self.token(api), **kwargs)
        if response.status_code not in ok:
            raise ServeError(f"{method} {path}: HTTP {response.status_code}: {_message(response)}")
        return response

    def management(self, method: str, path: str, **kwargs) -> Any:
        return self.request("management", method, path, **kwargs).json()

    # --- what the command line and serve.sh use -----------------------------------------------------------------

    def models(self) -> list[str]:
        return [m["modelName"] for m in self.management("GET", "/models?limit=1000")["models"]]

    def versions(self, model: str) -> list[dict[str, Any]]:
        """Every registered version of a model, as TorchServe describes it (workers, batch settings, default)."""
        return self.management("GET", f"/models/{model}/all")

    def registered(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every registered version of every model, by (model, version)."""
        return {(model, info["modelVersion"]): info for model in self.models() for info in self.versions(model)}

    def default_version(self, model: str) -> str:
        return self.management("GET", f"/models/{model}")[0]["modelVersion"]

    def defaults(self, registered: dict[tuple[str, str], Any]) -> dict[str, str]:
        """Each registered model's default version (one call per model)."""
        return {model: self.default_version(model) for model in {m for m, _ in registered}}

    def set_default(self, model: str, version: str) -> None:
        self.management("PUT", f"/models/{model}/{version}/set-default")

    def register(self, archive_name: str, **params: str | int) -> str:
        """Register an archive from the model store, by its name (``<model>_<version>.mar``, extracted by
        TorchServe) or by its unpacked folder's (``<model>_<version>``, linked); returns when its workers are up
        (synchronous). ``params`` are the management API's other register parameters (model_name, initial_workers,
        batch_size, ...)."""
        query = "".join(f"&{key}={value}" for key, value in params.items())
        return self.management("POST", f"/models?url={archive_name}&synchronous=true{query}")["status"]

    def unregister(self, model: str, version: str) -> str:
        return self.management("DELETE", f"/models/{model}/{version}")["status"]

    def scale(self, model: str, version: str, min_workers: int, max_workers: int) -> str:
        path = f"/models/{model}/{version}?min_worker={min_workers}&max_worker={max_workers}&synchronous=true"
        return self.management("PUT", path)["status"]

    def predict(self, model: str, payload: bytes, version: str | None = None) -> requests.Response:
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        return self.request("inference", "POST", path, ok=tuple(range(200, 600)), data=payload,
                            headers={"Content-Type": "application/octet-stream"})


def ready_workers(info: dict[str, Any]) -> int:
    """How many of a version's workers are READY, from TorchServe's description of the version."""
    return sum(worker["status"] == READY for worker in info.get("workers", []))


def minimum_workers(info: dict[str, Any]) -> int:
    """How many READY workers make a version ready: its minWorkers, and at least one."""
    return max(1, int(info.get("minWorkers", 1)))


def parse_expiry(text: str) -> dt.datetime:
    """TorchServe writes nanoseconds ("2026-01-01T10:00:00.123456789Z"); Python reads up to microseconds."""
    seconds, _, fraction = text.rstrip("Z").partition(".")
    return dt.datetime.fromisoformat(f"{seconds}.{(fraction or '0')[:6]:0<6}+00:00")


def _message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200]
    return body.get("message", body) if isinstance(body, dict) else str(body)
