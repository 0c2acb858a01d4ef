"""A client for a TorchServe started by serve.sh: its management API, tokens, predictions through the front door,
and one-line errors.

Tokens come from the key file TorchServe writes into the instance's home; an expired token is renewed with the API
key (the health checker sees the key file change and has the front door take the new key), so long sessions keep
working.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any

import requests

from serving.instance import Instance, ServeError, wait_until

logger = logging.getLogger(__name__)

TOKEN_MARGIN = dt.timedelta(seconds=30)  # renew a token this long before it expires
API_KEYS = ("inference", "management")
KEY_FILE_READS = 20
KEY_SYNC_SECONDS = 5.0  # the longest the front door may take to accept a renewed key
READY = "READY"


class TorchServe:
    """TorchServe's management API at its own address; predictions through the front door, as a client sends them."""

    def __init__(self, instance: Instance | None = None, timeout: float = 30.0):
        self.instance = instance or Instance.current()
        self.inference_url = self.instance.front
        self.management_url = self.instance.torchserve("management")
        self.metrics_url = self.instance.front_metrics
        self.key_file = self.instance.key_file
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
        """Ask TorchServe for a new key; it rewrites the key file, which the health checker watches and hands to the
        front door. Returns once the front door takes the new key (at most KEY_SYNC_SECONDS)."""
        api_key = self.keys()["API"]["key"]
        self._send("POST", self.management_url, f"/token?type={kind}", token=api_key)
        try:
            wait_until(lambda: self._door_takes(kind), KEY_SYNC_SECONDS, "the front door taking the renewed key")
        except TimeoutError as error:  # the next request says 401 if the door never takes it
            logger.warning("%s", error)

    def _door_takes(self, kind: str) -> bool:
        """Whether the front door answers a request with the current key of ``kind`` as anything but 401."""
        base, path = ((self.inference_url, "/ping") if kind == "inference"
                      else (self.instance.front_management, "/models?limit=1"))
        try:
            answer = self.session.get(base + path, headers={"Authorization": f"Bearer {self.keys()[kind]['key']}"},
                                      timeout=self.timeout)
        except requests.RequestException:
            return False
        return answer.status_code != 401

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
