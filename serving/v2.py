"""The Open Inference Protocol (KServe v2) for every model, REST and gRPC: a translation into the front door's own
``/predictions``.

Why a gateway of ours: TorchServe 0.12 speaks the protocol itself (``ts_open_inference_protocol``), but not well
enough to put in front of clients: its ``/v2/health/ready`` always says true, it refuses ``/versions/<v>``, its gRPC
ignores ``raw_input_contents`` (what tritonclient's gRPC client sends) and its REST does not read the binary tensor
extension (what tritonclient's HTTP client sends by default). Why a translation rather than a second way into
TorchServe: a v2 inference of N elements becomes N ``POST /predictions/<model>[/<version>]`` on the front door, sent
in parallel (TorchServe batches them), each with the client's own ``Authorization`` header. The door's key check, A/B
split, retry, size limits, access log and metrics apply unchanged, and the answers are /predictions' own by
construction. Health and metadata need no key, like ``/health/*``.

This process (``python -m manage v2``, started and stopped by serve.sh beside the health checker) answers:

* REST on ``V2_ADDRESS`` (loopback, default :8185), behind the front door's ``/v2/`` (``serving/nginx.conf``: nginx
  checks the key of an ``infer`` before its body reaches us): ``GET /v2`` (server metadata), ``/v2/health/live`` and
  ``/v2/health/ready`` (the health checker's ``/live`` and ``/ready``), ``GET /v2/models/<m>[/versions/<v>]``
  (metadata), ``/v2/models/<m>[/versions/<v>]/ready`` and ``POST /v2/models/<m>[/versions/<v>]/infer`` with JSON
  tensors or the binary tensor extension (``Inference-Header-Content-Length``, ``binary_data_size``; outputs in binary
  when the request asks, ``binary_data`` per output or ``binary_data_output``);
* gRPC, the KServe v2 ``GRPCInferenceService`` (tritonclient's generated stubs), on ``V2_GRPC_ADDRESS`` (default
  127.0.0.1:8083): ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata and ModelInfer, inputs from
  ``raw_input_contents`` or ``contents``, outputs in ``raw_output_contents``; the key in the metadata
  ``authorization: Bearer <key>``. With ``TLS_CERT`` and ``TLS_KEY`` (the front door's) it speaks TLS only.

gRPC has no nginx in front of it, so the gateway keeps the door itself, as nginx does for REST:

* the key first. An interceptor reads the call's metadata before its message: every method but health and metadata
  (which need no key, as ``/v2/health/*`` and ``GET /v2/models/...``) needs one of the keys the front door takes
  (``Keys``), and without it the call is answered UNAUTHENTICATED by a handler that never reads the message, so
  nothing of it is parsed or unpacked;
* sizes. A request message is at most the front door's body limit (``max_body``, TorchServe's ``max_request_size``)
  plus ``GRPC_MESSAGE_OVERHEAD`` for names and shapes (``grpc.max_receive_message_length``; grpcio answers
  RESOURCE_EXHAUSTED above it). grpcio parses the message of a call that passed the key check before our code sees
  it: that cost is bounded by this size (the worst, 25 MiB of one-byte ``bytes_contents``, parses to about 0.5 GB in
  about a second). Then, before any tensor is copied out of the message: at most ``MAX_TENSORS`` inputs and
  outputs and ``MAX_DIMS`` dimensions, the tensors' bytes at most ``max_body`` (RESOURCE_EXHAUSTED), the shape's
  element count at most the model kind's ``max_elements``, and the number of ``bytes_contents`` or of elements in
  ``raw_input_contents`` equal to it (INVALID_ARGUMENT); each refusal names its limit;
* calls. ``grpc_limits``: ``GRPC_THREADS_PER_CPU`` threads per CPU the process may use (``cpu_limit``, the
  container's CPU limit), and as many calls again waiting for a thread; beyond those, grpcio answers
  RESOURCE_EXHAUSTED at once (on 2 CPUs: 8 threads, 16 calls). A call's message is read and parsed in its thread,
  so at most as many messages as threads are parsed at a time. The key check runs on grpcio's one polling thread:
  it stats the key files, and reads them only when they have changed.

Tensors, by the model's handler (the model store's manifest says which; a model without an entry is served as
``generic``). Every input is BYTES of shape [N] or [N, 1], one element per /predictions call:

* ``image_classifier``, ``text_classifier``: input ``image`` (each element an encoded photo) or ``text`` (UTF-8);
  outputs ``labels`` BYTES [N, k] and ``scores`` FP32 [N, k], the top-k /predictions names, highest first
  (``text_classifier`` adds ``truncated`` BOOL [N]);
* ``sentence_embedding``: input ``text``; outputs ``embedding`` FP32 [N, dim], ``tokens`` INT32 [N] and
  ``truncated`` BOOL [N];
* ``super_resolution``: input ``image``; outputs ``upscaled`` BYTES [N] (the PNG) and ``size`` INT32 [N, 2] (width,
  height);
* ``multilabel_classifier``: input ``image``; outputs ``labels`` BYTES [N, k] and ``scores`` FP32 [N, k], the labels
  at or above their thresholds, highest first, and ``count`` INT32 [N]: how many of each row's k are real (rows are
  padded to the longest with "" and 0);
* ``object_detector``: input ``image``; outputs ``boxes`` FP32 [N, k, 4] (x1, y1, x2, y2 in the image's pixels),
  ``labels`` BYTES [N, k], ``scores`` FP32 [N, k] and ``count`` INT32 [N], padded likewise;
* ``image_segmenter``: input ``image``; outputs ``mask`` BYTES [N] (the class map as a PNG: each pixel's value is
  its class), ``size`` INT32 [N, 2] (width, height), ``classes`` BYTES [N, k] and ``shares`` FP32 [N, k] (each class
  present and its share of the pixels, padded likewise);
* ``generic``: input ``data``; output ``answer`` BYTES [N] (the /predictions body as it is).

In JSON, BYTES elements that are not text (photos, PNGs) are base64 strings; in binary (REST's extension, gRPC) they
are the bytes themselves. ``outputs`` in a request picks among a model's outputs.

A bad request is answered 4xx / INVALID_ARGUMENT naming the problem (malformed JSON, a missing or unknown input, a
wrong datatype, a shape that does not match the data, a bad binary header length, too many elements), tensors over
the size limit RESOURCE_EXHAUSTED (gRPC), an unknown model or version 404 / NOT_FOUND, a missing key 401 /
UNAUTHENTICATED; a 4xx of /predictions (a non-image) comes back with its status and message. The answer's
``model_version`` is the version that computed it (``X-Model-Version``; several, comma-separated, when an A/B split
sent the elements of one request to different versions).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import math
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import grpc
import numpy as np
import requests
import urllib3
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from archives.store import Manifest, default_store
from serving.front_door import (
    NAME,
    READ_TIMEOUT,
    Listen,
    client_keys,
    cpu_limit,
    max_body,
    valid_keys,
)
from serving.instance import Instance, ServeError
from serving.loopback import QuietHandler, loopback_server
from serving.torchserve import TorchServe, minimum_workers, ready_workers

logger = logging.getLogger(__name__)

CALLS = 64  # /predictions calls in flight at once, over every v2 request
MAX_TENSORS = 8  # inputs, and outputs asked for, in one gRPC request (every model here takes one input)
MAX_DIMS = 8  # dimensions of an input's shape in a gRPC request (every model here takes [N] or [N, 1])
GRPC_THREADS_PER_CPU = 4  # gRPC calls run at once per CPU: a call mostly waits for its /predictions answers
GRPC_MESSAGE_OVERHEAD = 64 * 2**10  # bytes of a request message besides its tensors: names, shapes, parameters
GRPC_MAX_SEND = 128 * 2**20  # an answer: up to 4 upscalings of up to 20 MiB each, and their framing
GRPC_SERVICE = "inference.GRPCInferenceService"
GRPC_OPEN = frozenset({"ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata"})  # no key
GRPC_DETAILS = 1000  # characters of a refusal's message sent back (it may quote a name the client sent)
UNAUTHENTICATED = ("missing or wrong key: send the metadata authorization: Bearer <key> (./serve.sh token "
                   "inference), the key of /predictions")
CATALOG_TTL = 2.0  # seconds a view of the registered versions is reused
NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32,
         "FP64": np.float64}


class V2Error(Exception):
    """A request the gateway cannot answer: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC status of an HTTP one."""
    codes = {401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
             404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
             429: grpc.StatusCode.RESOURCE_EXHAUSTED,
             502: grpc.StatusCode.UNAVAILABLE, 503: grpc.StatusCode.UNAVAILABLE,
             504: grpc.StatusCode.DEADLINE_EXCEEDED}
    if status in codes:
        return codes[status]
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.INTERNAL


# --- what each kind of model takes and gives ---------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A tensor of a model's metadata; ``binary``: BYTES elements that are not text (base64 in JSON)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    binary: bool = False
    padded: bool = False  # rows of different lengths (detections, labels above a threshold): padded to the longest

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Kind:
    """How one kind of model maps onto v2: its input, its outputs, an element → /predictions body (and its
    Content-Type), a /predictions answer → each output's row."""

    name: str
    input: Spec
    outputs: tuple[Spec, ...]
    body: Callable[[bytes], tuple[bytes, str]]
    parse: Callable[[requests.Response], dict[str, Any]]
    max_elements: int = 64


def raw_body(element: bytes) -> tuple[bytes, str]:
    return element, "application/octet-stream"


def text_body(element: bytes) -> tuple[bytes, str]:
    """One text as ``{"text": ...}``: a plain-text body that starts with ``{`` would be read as JSON."""
    try:
        text = element.decode("utf-8")
    except UnicodeDecodeError:
        raise V2Error(400, "a text element is not UTF-8") from None
    return json.dumps({"text": text}).encode(), "application/json"


def json_object(response: requests.Response) -> dict[str, Any]:
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise V2Error(502, f"/predictions answered {response.headers.get('Content-Type')}, not a JSON object")
    return answer


def truncated(response: requests.Response) -> bool:
    return response.headers.get("X-Input-Truncated", "false") == "true"


def top_k(response: requests.Response) -> dict[str, Any]:
    answer = json_object(response)
    return {"labels": [label.encode() for label in answer], "scores": list(answer.values()),
            "truncated": truncated(response)}


def embedding(response: requests.Response) -> dict[str, Any]:
    answer = json_object(response)
    return {"embedding": answer["embedding"], "tokens": answer["tokens"], "truncated": answer["truncated"]}


def above_threshold(response: requests.Response) -> dict[str, Any]:
    answer = json_object(response)
    return {"labels": [label.encode() for label in answer], "scores": list(answer.values()), "count": len(answer)}


def detections(response: requests.Response) -> dict[str, Any]:
    found = json_object(response)["detections"]
    return {"boxes": [d["box"] for d in found], "labels": [d["label"].encode() for d in found],
            "scores": [d["score"] for d in found], "count": len(found)}


def segmentation(response: requests.Response) -> dict[str, Any]:
    width, _, height = response.headers.get("X-Output-Size", "0x0").partition("x")
    shares = json.loads(response.headers.get("X-Classes", "{}"))
    return {"mask": response.content, "size": [int(width), int(height)],
            "classes": [name.encode() for name in shares], "shares": list(shares.values())}


def upscaled(response: requests.Response) -> dict[str, Any]:
    width, _, height = response.headers.get("X-Output-Size", "0x0").partition("x")
    return {"upscaled": response.content, "size": [int(width), int(height)]}


IMAGE, TEXT = Spec("image", "BYTES", (-1,), binary=True), Spec("text", "BYTES", (-1,))
LABELS, SCORES = Spec("labels", "BYTES", (-1, -1)), Spec("scores", "FP32", (-1, -1))
TRUNCATED = Spec("truncated", "BOOL", (-1,))
COUNT, SIZE = Spec("count", "INT32", (-1,)), Spec("size", "INT32", (-1, 2))
PADDED_LABELS, PADDED_SCORES = Spec("labels", "BYTES", (-1, -1), padded=True), Spec("scores", "FP32", (-1, -1), padded=True)
KINDS = {kind.name: kind for kind in (
    Kind("image_classifier", IMAGE, (LABELS, SCORES), raw_body, top_k),
    Kind("text_classifier", TEXT, (LABELS, SCORES, TRUNCATED), text_body, top_k),
    Kind("sentence_embedding", TEXT, (Spec("embedding", "FP32", (-1, -1)), Spec("tokens", "INT32", (-1,)),
                                      TRUNCATED), text_body, embedding),
    # each answer up to 20 MiB (the handler's max_answer_bytes): a few per request
    Kind("super_resolution", IMAGE, (Spec("upscaled", "BYTES", (-1,), binary=True), Spec("size", "INT32", (-1, 2))),
         raw_body, upscaled, max_elements=4),
    Kind("multilabel_classifier", IMAGE, (PADDED_LABELS, PADDED_SCORES, COUNT), raw_body, above_threshold),
    Kind("object_detector", IMAGE, (Spec("boxes", "FP32", (-1, -1, 4), padded=True), PADDED_LABELS, PADDED_SCORES,
                                    COUNT), raw_body, detections, max_elements=16),
    # the class map as a PNG (images of a request may differ in size), and each class present with its share
    Kind("image_segmenter", IMAGE, (Spec("mask", "BYTES", (-1,), binary=True), SIZE,
                                    Spec("classes", "BYTES", (-1, -1), padded=True),
                                    Spec("shares", "FP32", (-1, -1), padded=True)), raw_body, segmentation,
         max_elements=8),
    Kind("generic", Spec("data", "BYTES", (-1,), binary=True), (Spec("answer", "BYTES", (-1,), binary=True),),
         raw_body, lambda response: {"answer": response.content}, max_elements=16),
)}
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}


# --- tensors on the wire ------------------------------------------------------------------------------------------


def unpack_bytes(raw: bytes, name: str, most: int | None = None) -> list[bytes]:
    """BYTES elements as the binary extension and raw_input_contents carry them: each a 4-byte little-endian length,
    then that many bytes. ``most``: stop at ``most + 1`` elements, the rest unread (the caller refuses that many)."""
    elements, offset = [], 0
    while offset < len(raw) and (most is None or len(elements) <= most):
        if offset + 4 > len(raw):
            raise V2Error(400, f"input {name!r}: binary BYTES data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise V2Error(400, f"input {name!r}: element {len(elements)} says {size} bytes, "
                               f"{len(raw) - offset} are left")
        elements.append(raw[offset:offset + size])
        offset += size
    return elements


def pack_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


@dataclass
class Input:
    """An input tensor as a request carries it: ``raw`` (binary extension, raw_input_contents), ``data`` (JSON,
    flattened) or ``contents`` (gRPC's bytes_contents, still in the message)."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | None = None
    data: list[Any] | None = None
    contents: Sequence[bytes] | None = None

    def elements(self, spec: Spec, count: int) -> list[bytes]:
        """The ``count`` elements the shape says; how many the data holds is checked before any is copied out."""
        if self.raw is not None:
            found = unpack_bytes(self.raw, self.name, most=count)
            self.check_count(count, len(found), more=len(found) > count)
            return found
        if self.contents is not None:
            self.check_count(count, len(self.contents))
            elements = list(self.contents)
            check_size(sum(map(len, elements)), f"input {self.name!r}")
            return elements
        self.check_count(count, len(self.data))
        if not all(isinstance(item, str) for item in self.data):
            raise V2Error(400, f"input {self.name!r} is BYTES: its JSON data must be strings")
        if not spec.binary:
            return [item.encode("utf-8", "surrogatepass") for item in self.data]
        try:
            return [base64.b64decode(item, validate=True) for item in self.data]
        except (binascii.Error, ValueError):
            raise V2Error(400, f"input {self.name!r}: in JSON each element is base64 (the bytes of the file); "
                               "or send it binary (binary_data_size)") from None

    def check_count(self, count: int, found: int, more: bool = False) -> None:
        if found != count:
            raise V2Error(400, f"input {self.name!r}: shape {self.shape} says {count} elements, the data has "
                               f"{'more than ' if more else ''}{found - more}")


def check_size(total: int, what: str) -> None:
    """Tensors of a request at most the front door's body limit, as a REST request's whole body."""
    limit = max_body()
    if total > limit:
        raise V2Error(413, f"{what}: {total} bytes of tensor data, over the limit of {limit} bytes "
                           f"({limit / 2**20:g} MiB, the front door's body limit)")


@dataclass
class Request:
    model: str
    version: str | None
    inputs: list[Input]
    outputs: list[str] | None = None  # None: every output
    binary: set[str] = field(default_factory=set)  # outputs to send as binary (REST)
    id: str = ""


@dataclass
class Answer:
    model: str
    version: str
    id: str
    outputs: list[tuple[Spec, np.ndarray]]


def stack(spec: Spec, rows: list[Any]) -> np.ndarray:
    """Each element's row → one tensor of ``spec``'s datatype, N first; a ``padded`` spec's rows are padded to the
    longest first (with b"", or zeros), the model's ``count`` output saying how many are real."""
    if spec.padded:
        longest = max(map(len, rows), default=0)
        filler = b"" if spec.datatype == "BYTES" else [0] * spec.shape[2] if len(spec.shape) == 3 else 0
        rows = [list(row) + [filler] * (longest - len(row)) for row in rows]
    if spec.datatype == "BYTES":
        array = np.empty((len(rows), *np.shape(rows[0])) if isinstance(rows[0], list) else len(rows), dtype=object)
        for index, row in enumerate(rows):
            if np.shape(row) != array.shape[1:]:
                raise V2Error(502, f"/predictions gave answers of different lengths for {spec.name!r}")
            array[index] = row
        return array
    try:
        return np.asarray(rows, dtype=NUMPY[spec.datatype])
    except ValueError:
        raise V2Error(502, f"/predictions gave answers of different lengths for {spec.name!r}") from None


def raw_tensor(spec: Spec, array: np.ndarray) -> bytes:
    if spec.datatype == "BYTES":
        return pack_bytes(list(array.reshape(-1)))
    return np.ascontiguousarray(array, dtype=np.dtype(NUMPY[spec.datatype]).newbyteorder("<")).tobytes()


def json_tensor(spec: Spec, array: np.ndarray) -> list[Any]:
    flat = array.reshape(-1)
    if spec.datatype != "BYTES":
        return flat.tolist()
    if spec.binary:
        return [base64.b64encode(item).decode() for item in flat]
    return [item.decode("utf-8", "replace") for item in flat]


# --- the gateway ----------------------------------------------------------------------------------------------------


def loopback(url: str) -> str:
    """The front door as this process reaches it: a wildcard listen address means this machine."""
    parsed = urlparse(url)
    if parsed.hostname in ("0.0.0.0", "::", ""):
        return parsed._replace(netloc=f"127.0.0.1:{parsed.port}").geturl()
    return url


class Catalog:
    """The registered versions and each model's default, from TorchServe's management API, at most ``ttl`` old."""

    def __init__(self, ttl: float = CATALOG_TTL):
        self.ts = TorchServe(timeout=5)
        self.ttl = ttl
        self.lock = threading.Lock()
        self.seen: tuple[float, dict, dict] | None = None

    def get(self) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, str]]:
        with self.lock:
            if self.seen is None or time.monotonic() - self.seen[0] > self.ttl:
                try:
                    registered = self.ts.registered()
                    defaults = self.ts.defaults(registered)
                except ServeError as error:
                    raise V2Error(503, str(error)) from None
                self.seen = (time.monotonic(), registered, defaults)
            return self.seen[1], self.seen[2]

    def versions(self, model: str, version: str | None) -> tuple[list[str], str]:
        """The model's registered versions and the one asked for (its default when none is); 404 when unknown."""
        registered, defaults = self.get()
        versions = sorted(v for m, v in registered if m == model)
        if not versions:
            raise V2Error(404, f"unknown model {model!r} (served: {', '.join(sorted(defaults)) or 'none'})")
        if version is not None and version not in versions:
            raise V2Error(404, f"{model} has no version {version!r} (registered: {', '.join(versions)})")
        return versions, version or defaults[model]


class Gateway:
    """Everything both protocols answer, in the protocols' terms."""

    def __init__(self, front: str | None = None, health: str | None = None):
        self.front = loopback(front or Instance.current().front)
        self.health_url = health or Instance.current().health
        self.catalog = Catalog()
        self.session = requests.Session()
        self.session.mount(self.front, requests.adapters.HTTPAdapter(pool_maxsize=CALLS))
        # the hop never leaves this machine: a certificate made for the door's public name would not match
        # loopback, so it is not checked (and not warned about on every request)
        self.verify = not self.front.startswith("https://")
        if not self.verify:
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self.calls = ThreadPoolExecutor(CALLS, thread_name_prefix="predict")
        self.manifest: tuple[float | None, Manifest] | None = None

    # --- health and metadata ------------------------------------------------------------------------------------

    def health(self, probe: str) -> tuple[bool, dict[str, Any]]:
        """The health checker's answer to /live or /ready (serving/health.py)."""
        try:
            response = requests.get(f"{self.health_url}/{probe}", timeout=5)
            return response.status_code == 200, response.json()
        except (requests.RequestException, ValueError):
            return False, {probe: False, "error": f"the health checker is not answering at {self.health_url}"}

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "torchserve", "version": metadata.version("torchserve"), "extensions": ["binary_tensor_data"]}

    def store(self) -> Manifest:
        """The model store's manifest (what each version is: its handler, its runtime), read again when it changes."""
        path = default_store() / "manifest.json"
        try:
            stamp = path.stat().st_mtime
        except OSError:
            stamp = None
        if self.manifest is None or self.manifest[0] != stamp:
            self.manifest = (stamp, Manifest(path.parent))
        return self.manifest[1]

    def kind(self, model: str, version: str) -> tuple[Kind, dict[str, Any]]:
        entry = self.store().get(model, version) or {}
        return KINDS.get(entry.get("handler", ""), KINDS["generic"]), entry

    def model_metadata(self, model: str, version: str | None) -> dict[str, Any]:
        versions, chosen = self.catalog.versions(model, version)
        kind, entry = self.kind(model, chosen)
        return {"name": model, "versions": [version] if version else versions,
                "platform": PLATFORMS.get(entry.get("runtime", ""), "torchserve"),
                "inputs": [kind.input.metadata()], "outputs": [spec.metadata() for spec in kind.outputs]}

    def model_ready(self, model: str, version: str | None) -> bool:
        """A version: its minimum workers READY. A model: every version that receives its traffic is ready, as the
        health checker judges it (its default and the versions of its A/B split)."""
        self.catalog.versions(model, version)  # 404 when unknown
        if version is not None:
            info = self.catalog.get()[0][(model, version)]
            return ready_workers(info) >= minimum_workers(info)
        _, report = self.health("ready")
        entries = [e for key, e in report.get("versions", {}).items() if key.rpartition("/")[0] == model]
        problems = [line for line in report.get("not_ready", [])
                    if line.startswith((f"{model} ", "TorchServe is not answering"))]
        return bool(entries) and not problems and all(e["ready"] >= e["min"] for e in entries)

    # --- inference ----------------------------------------------------------------------------------------------

    def infer(self, request: Request, authorization: str | None) -> Answer:
        for name in filter(None, (request.model, request.version)):
            if not NAME.match(name):
                raise V2Error(404, f"no model or version is named {name[:100]!r}")
        kind = self.infer_kind(request.model, request.version)
        elements = self.elements(request, kind)
        wanted = self.wanted(request, kind)
        bodies = [kind.body(element) for element in elements]
        answers = list(self.calls.map(lambda body: self.predict(request, body, authorization), bodies))
        for index, response in enumerate(answers):
            if response.status_code != 200:
                where = f"element {index}: " if len(answers) > 1 else ""
                raise V2Error(response.status_code, f"{request.model}: {where}{predictions_message(response)}")
        rows = [kind.parse(response) for response in answers]
        versions = sorted({response.headers.get("X-Model-Version", "") for response in answers} - {""})
        return Answer(request.model, ",".join(versions) or (request.version or ""), request.id,
                      [(spec, stack(spec, [row[spec.name] for row in rows])) for spec in wanted])

    def infer_kind(self, model: str, version: str | None) -> Kind:
        """The kind from the manifest, without asking TorchServe when its versions agree; an unknown model is
        looked up (404), and a known one left to /predictions (which says 404 for a version it does not have)."""
        versions = self.store().models.get(model, {})
        if version is None and len({entry["handler"] for entry in versions.values()}) == 1:
            return self.kind(model, next(iter(versions)))[0]
        if version is not None and version in versions:
            return self.kind(model, version)[0]
        return self.kind(model, self.catalog.versions(model, version)[1])[0]

    @staticmethod
    def elements(request: Request, kind: Kind) -> list[bytes]:
        """The one input's elements, checked against the kind's input."""
        expected = f"{kind.input.name!r} ({kind.input.datatype}, shape [N] or [N, 1])"
        if len(request.inputs) != 1 or request.inputs[0].name != kind.input.name:
            names = ", ".join(repr(tensor.name) for tensor in request.inputs) or "none"
            raise V2Error(400, f"{request.model} takes one input, {expected}; the request has {names}")
        tensor = request.inputs[0]
        if tensor.datatype != kind.input.datatype:
            raise V2Error(400, f"input {tensor.name!r} is {kind.input.datatype}, not {tensor.datatype}")
        shape = tensor.shape
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or any(d < 0 for d in shape):
            raise V2Error(400, f"input {tensor.name!r} has shape {shape}; expected [N] or [N, 1]")
        count = math.prod(shape)
        if count == 0:
            raise V2Error(400, f"input {tensor.name!r} has no elements")
        if count > kind.max_elements:
            raise V2Error(400, f"too many elements: {count}; {request.model} takes at most {kind.max_elements} "
                               "per request")
        return tensor.elements(kind.input, count)

    @staticmethod
    def wanted(request: Request, kind: Kind) -> list[Spec]:
        specs = {spec.name: spec for spec in kind.outputs}
        unknown = [name for name in request.outputs or [] if name not in specs]
        if unknown:
            raise V2Error(400, f"{request.model} has no output {unknown[0]!r} (outputs: {', '.join(specs)})")
        return [specs[name] for name in request.outputs] if request.outputs else list(kind.outputs)

    def predict(self, request: Request, body: tuple[bytes, str], authorization: str | None) -> requests.Response:
        path = f"/predictions/{request.model}" + (f"/{request.version}" if request.version else "")
        headers = {"Content-Type": body[1], **({"Authorization": authorization} if authorization else {})}
        try:
            return self.session.post(self.front + path, data=body[0], headers=headers, timeout=READ_TIMEOUT,
                                     verify=self.verify)
        except requests.RequestException as error:
            raise V2Error(503, f"the front door is not answering at {self.front}: {type(error).__name__}") from None


def predictions_message(response: requests.Response) -> str:
    """The message of a refusal, from the handlers' or nginx's JSON ({"code", "error", "message"}) or TorchServe's."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        reason, message = body.get("error") or body.get("type"), body.get("message")
        return f"{reason}: {message}" if reason and message else str(message or reason or body)
    return str(body)


# --- REST -----------------------------------------------------------------------------------------------------------

ROUTE = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?$")


def flatten(data: Any) -> list[Any]:
    """JSON tensor data, flat or nested in row-major order, as one flat list (without recursion)."""
    flat, stack_ = [], [iter([data])]
    while stack_:
        item = next(stack_[-1], StopIteration)
        if item is StopIteration:
            stack_.pop()
        elif isinstance(item, list):
            stack_.append(iter(item))
        else:
            flat.append(item)
    return flat


def rest_request(model: str, version: str | None, body: bytes, header_length: str | None) -> Request:
    """An infer body → Request: JSON, or JSON followed by the inputs' binary data (the binary tensor extension)."""
    length = len(body)
    if header_length is not None:
        if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
            raise V2Error(400, f"Inference-Header-Content-Length is {header_length!r}: it must be the length of the "
                               f"JSON header, 1 to {len(body)} (the body's length)")
        length = int(header_length)
    try:
        header = json.loads(body[:length])
    except (ValueError, RecursionError) as error:
        raise V2Error(400, f"the request is not valid JSON: {error}"[:300]) from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise V2Error(400, 'the request needs "inputs": a list of tensors ({"name", "datatype", "shape", "data"})')
    binary, offset, inputs = memoryview(body)[length:], 0, []
    for tensor in header["inputs"]:
        item, size = rest_input(tensor, binary, offset)
        inputs.append(item)
        offset += size
    if offset != len(binary):
        raise V2Error(400, f"{len(binary) - offset} bytes after the JSON header are not any input's "
                           "binary_data_size")
    outputs = header.get("outputs")
    if outputs is not None and not (isinstance(outputs, list)
                                    and all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)):
        raise V2Error(400, '"outputs" is a list of {"name": ...}')
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise V2Error(400, '"parameters" is an object')
    everything = parameters.get("binary_data_output") is True
    binary_outputs = {o["name"] for o in outputs or []
                      if isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data") is True}
    request_id = header.get("id", "")
    return Request(model, version, inputs, [o["name"] for o in outputs] if outputs else None,
                   binary_outputs | ({"*"} if everything else set()), request_id if isinstance(request_id, str) else "")


def rest_input(tensor: Any, binary: memoryview, offset: int) -> tuple[Input, int]:
    """One input of a JSON header, and how many bytes of the binary part it takes."""
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise V2Error(400, 'each input is {"name", "datatype", "shape", "data"}')
    name, datatype, shape = tensor["name"], tensor.get("datatype"), tensor.get("shape")
    if not isinstance(datatype, str):
        raise V2Error(400, f"input {name!r} has no datatype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise V2Error(400, f"input {name!r}: shape must be a list of integers")
    parameters = tensor.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - offset:
            raise V2Error(400, f"input {name!r}: binary_data_size {size!r}, but {len(binary) - offset} bytes of "
                               "binary data are left")
        return Input(name, datatype, shape, raw=bytes(binary[offset:offset + size])), size
    if "data" not in tensor:
        raise V2Error(400, f"input {name!r} has neither data nor parameters.binary_data_size")
    return Input(name, datatype, shape, data=flatten(tensor["data"])), 0


def rest_answer(answer: Answer, binary: set[str]) -> tuple[bytes, int | None]:
    """The answer's JSON, then the binary outputs' bytes; the JSON's length when there are any."""
    outputs, blobs = [], []
    for spec, array in answer.outputs:
        tensor: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(array.shape)}
        if spec.name in binary or "*" in binary:
            blob = raw_tensor(spec, array)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = json_tensor(spec, array)
        outputs.append(tensor)
    header = {"model_name": answer.model, "model_version": answer.version, "outputs": outputs,
              **({"id": answer.id} if answer.id else {})}
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b"".join(blobs), len(text) if blobs else None


def rest_get(gateway: Gateway, path: str) -> tuple[int, Any]:
    """A GET: (status, JSON body)."""
    if path in ("/v2", "/v2/"):
        return 200, gateway.server_metadata()
    if path in ("/v2/health/live", "/v2/health/ready"):
        probe = path.rpartition("/")[2]
        ok, _ = gateway.health(probe)  # the checker's details name versions: for callers with a key (/health/*)
        return (200 if ok else 503), {probe: ok}
    route = ROUTE.match(path)
    if route is None or route["action"] == "/infer":
        raise V2Error(404, f"no v2 endpoint GET {path[:100]}; see GET /v2/models/<model>, .../ready, "
                           "POST .../infer, /v2/health/ready")
    model, version = unquote(route["model"]), route["version"] and unquote(route["version"])
    if route["action"] == "/ready":
        ready = gateway.model_ready(model, version)
        return (200 if ready else 503), {"name": model, "ready": ready}
    return 200, gateway.model_metadata(model, version)


def serve_rest(gateway: Gateway, address: str) -> ThreadingHTTPServer:
    limit = max_body()

    class Handler(QuietHandler):
        timeout = 60  # seconds a client may stall while sending (nginx sends a buffered body at once)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.answer(lambda: rest_get(gateway, self.path.split("?")[0]) + (None,))

        do_HEAD = do_GET

        def do_POST(self) -> None:  # noqa: N802
            self.answer(self.infer)

        def infer(self) -> tuple[int, Any, int | None]:
            route = ROUTE.match(self.path.split("?")[0])
            if route is None or route["action"] != "/infer":
                raise V2Error(404, f"no v2 endpoint POST {self.path[:100]}; POST /v2/models/<model>/infer")
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():
                raise V2Error(411, "send the body with a Content-Length")
            if int(length) > limit:
                raise V2Error(413, f"the body is over the limit of {limit} bytes")
            body = self.rfile.read(int(length))
            request = rest_request(unquote(route["model"]), route["version"] and unquote(route["version"]), body,
                                   self.headers.get("Inference-Header-Content-Length"))
            payload, header_length = rest_answer(gateway.infer(request, self.headers.get("Authorization")),
                                                 request.binary)
            return 200, payload, header_length

        def answer(self, compute: Callable[[], tuple[int, Any, int | None]]) -> None:
            try:
                status, body, header_length = compute()
            except V2Error as error:
                status, body, header_length = error.status, {"error": error.message}, None
            except Exception:  # a surprise is logged and answered; the gateway keeps serving
                logger.exception("%s %s failed", self.command, self.path[:200])
                status, body, header_length = 500, {"error": "internal error in the v2 gateway (see v2.log)"}, None
            payload = body if isinstance(body, bytes) else (json.dumps(body) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if header_length else "application/json")
            if header_length is not None:
                self.send_header("Inference-Header-Content-Length", str(header_length))
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)


    return loopback_server(address, Handler)


# --- gRPC -------------------------------------------------------------------------------------------------------


def grpc_request(message: pb.ModelInferRequest) -> Request:
    """A parsed ModelInferRequest → Request. Counts first, from the message's lengths: its tensors, then the bytes of
    raw_input_contents; bytes_contents stay in the message until the element count is checked (``Input.elements``)."""
    if len(message.inputs) > MAX_TENSORS or len(message.outputs) > MAX_TENSORS:
        raise V2Error(400, f"{len(message.inputs)} inputs and {len(message.outputs)} outputs: a request names at "
                           f"most {MAX_TENSORS} of each (every model here takes one input)")
    if message.raw_input_contents and len(message.raw_input_contents) != len(message.inputs):
        raise V2Error(400, f"raw_input_contents has {len(message.raw_input_contents)} entries for "
                           f"{len(message.inputs)} inputs")
    for tensor in message.inputs:
        if len(tensor.shape) > MAX_DIMS:
            raise V2Error(400, f"input {tensor.name[:100]!r} has {len(tensor.shape)} dimensions; a shape has at most "
                               f"{MAX_DIMS} (every model here takes [N] or [N, 1])")
    raw = list(message.raw_input_contents)  # at most MAX_TENSORS entries
    check_size(sum(map(len, raw)), "raw_input_contents")
    inputs = [Input(tensor.name, tensor.datatype, list(tensor.shape), raw=raw[index] if raw else None,
                    contents=None if raw else tensor.contents.bytes_contents)
              for index, tensor in enumerate(message.inputs)]
    return Request(message.model_name, message.model_version or None, inputs,
                   [output.name for output in message.outputs] or None, id=message.id)


def grpc_answer(answer: Answer) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=answer.model, model_version=answer.version, id=answer.id)
    for spec, array in answer.outputs:
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(array.shape))
        response.raw_output_contents.append(raw_tensor(spec, array))
    return response


def tensor_metadata(spec: dict[str, Any]) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(**spec)


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe v2's GRPCInferenceService over the gateway; the other methods answer UNIMPLEMENTED."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    @staticmethod
    def guarded(context: grpc.ServicerContext, compute: Callable[[], Any]) -> Any:
        try:
            return compute()
        except V2Error as error:
            context.abort(grpc_code(error.status), error.message[:GRPC_DETAILS])
        except Exception:  # a surprise is logged and answered; the gateway keeps serving
            logger.exception("gRPC call failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error in the v2 gateway (see v2.log)")

    def ServerLive(self, request, context):  # noqa: N802 (the service's naming)
        return pb.ServerLiveResponse(live=self.gateway.health("live")[0])

    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.gateway.health("ready")[0])

    def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(**self.gateway.server_metadata())

    def ModelReady(self, request, context):  # noqa: N802
        return self.guarded(context, lambda: pb.ModelReadyResponse(
            ready=self.gateway.model_ready(request.name, request.version or None)))

    def ModelMetadata(self, request, context):  # noqa: N802
        def compute() -> pb.ModelMetadataResponse:
            found = self.gateway.model_metadata(request.name, request.version or None)
            return pb.ModelMetadataResponse(
                name=found["name"], versions=found["versions"], platform=found["platform"],
                inputs=[tensor_metadata(s) for s in found["inputs"]],
                outputs=[tensor_metadata(s) for s in found["outputs"]])
        return self.guarded(context, compute)

    def ModelInfer(self, request, context):  # noqa: N802
        authorization = dict(context.invocation_metadata()).get("authorization")
        return self.guarded(context, lambda: grpc_answer(self.gateway.infer(grpc_request(request), authorization)))


class Keys:
    """The inference keys the front door takes (``serving.front_door.render``): TorchServe's own until it expires, and
    ``CLIENT_KEYS_FILE``'s. Each file is read again when it changes, the expiry judged at every call; a file that
    cannot be read gives no key (the call is refused, the reason logged)."""

    def __init__(self) -> None:
        self.ts = TorchServe(timeout=5)
        self.lock = threading.Lock()
        self.seen: tuple[tuple, dict[str, Any], list[str]] | None = None  # (the files' stamps, key file, client keys)

    def files(self) -> list[Path]:
        client = os.environ.get("CLIENT_KEYS_FILE")
        return [self.ts.key_file, *([Path(client)] if client else [])]

    @staticmethod
    def stamp(path: Path) -> tuple[int, int, int] | None:
        try:
            status = path.stat()
        except OSError:
            return None
        return status.st_mtime_ns, status.st_size, status.st_ino

    def current(self) -> list[str]:
        stamps = tuple(self.stamp(path) for path in self.files())
        with self.lock:
            if self.seen is None or self.seen[0] != stamps:
                self.seen = (stamps, self.read(self.ts.keys, {}), self.read(client_keys, []))
            keys = valid_keys(self.seen[1], "inference") + self.seen[2]
        return keys

    @staticmethod
    def read(source: Callable[[], Any], empty: Any) -> Any:
        try:
            return source()
        except ServeError as error:
            logger.error("gRPC keys: %s; refusing the keys it would give", error)
            return empty

    def accepts(self, authorization: str | None) -> bool:
        """Whether ``authorization`` is ``Bearer <key>`` with a key the front door takes (compared in constant
        time)."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return False
        given = key.encode()
        return any([hmac.compare_digest(given, known.encode()) for known in self.current()])


def refuse_unauthenticated(requests_: Any, context: grpc.ServicerContext) -> None:
    """The answer to a call without the key: its message is never read (no deserializer, no iteration)."""
    context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)


REFUSED = grpc.stream_unary_rpc_method_handler(refuse_unauthenticated)


class KeyCheck(grpc.ServerInterceptor):
    """The key, from the call's metadata, before anything of its message: grpcio runs interceptors when a call's
    headers arrive, before it reads the message. Health and metadata (``GRPC_OPEN``) need no key, as REST's
    ``/v2/health/*`` and ``GET /v2/models/...`` at the front door; every other method, ours or not, needs it."""

    def __init__(self, keys: Keys):
        self.keys = keys

    def intercept_service(self, continuation, handler_call_details):
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if service == GRPC_SERVICE and method in GRPC_OPEN:
            return continuation(handler_call_details)
        authorization = next((value for key, value in handler_call_details.invocation_metadata or ()
                              if key == "authorization"), None)
        if isinstance(authorization, str) and self.keys.accepts(authorization):
            return continuation(handler_call_details)
        return REFUSED


def grpc_limits() -> tuple[int, int]:
    """(threads, calls): ``GRPC_THREADS_PER_CPU`` threads per CPU this process may use, and as many calls again
    waiting for a thread; grpcio refuses any call beyond ``calls`` (RESOURCE_EXHAUSTED)."""
    threads = GRPC_THREADS_PER_CPU * cpu_limit()
    return threads, 2 * threads


def max_message() -> int:
    """The largest request message: the front door's body limit of tensors, and their names and shapes."""
    return max_body() + GRPC_MESSAGE_OVERHEAD


def grpc_credentials() -> grpc.ServerCredentials | None:
    """TLS with the front door's certificate and key (``TLS_CERT``, ``TLS_KEY``, checked as the front door checks
    them); None without them."""
    listen = Listen.from_env()
    if listen.cert is None:
        return None
    try:
        return grpc.ssl_server_credentials([(listen.key.read_bytes(), listen.cert.read_bytes())])
    except OSError as error:
        raise ServeError(f"cannot read TLS_CERT or TLS_KEY: {error}") from None


def serve_grpc(gateway: Gateway, address: str, keys: Keys | None = None) -> grpc.Server:
    """A gRPC server: the key checked before a message is read (``KeyCheck``), messages up to ``max_message``,
    calls up to ``grpc_limits``, answers up to ``GRPC_MAX_SEND``, TLS when the front door has it."""
    threads, calls = grpc_limits()
    server = grpc.server(ThreadPoolExecutor(threads, thread_name_prefix="grpc"),
                         interceptors=[KeyCheck(keys or Keys())],
                         options=[("grpc.max_receive_message_length", max_message()),
                                  ("grpc.max_send_message_length", GRPC_MAX_SEND),
                                  ("grpc.so_reuseport", 0)],  # a port in use is an error, not a shared port
                         maximum_concurrent_rpcs=calls)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(gateway), server)
    credentials = grpc_credentials()
    try:
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio's "Failed to bind"
        raise ServeError(f"cannot listen for gRPC on {address}: in use, or not an address of this machine") from None
    logger.info("gRPC: %s, %d threads, at most %d calls at once, messages up to %d bytes",
                "TLS" if credentials else "plaintext (no TLS_CERT)", threads, calls, max_message())
    return server


def main() -> None:
    """Run until SIGTERM: REST on V2_ADDRESS, gRPC on V2_GRPC_ADDRESS."""
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    gateway = Gateway()
    try:
        rest = serve_rest(gateway, Instance.current().v2)
        rpc = serve_grpc(gateway, Instance.current().v2_grpc)
    except OSError as error:
        logger.error("cannot listen at %s: %s", Instance.current().v2, error.strerror or error)
        raise SystemExit(1) from None
    except ServeError as error:
        logger.error("%s", error)
        raise SystemExit(1) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=rest.serve_forever, daemon=True).start()
    rpc.start()
    logger.info("answering v2 REST at %s and gRPC at %s, for the front door at %s", Instance.current().v2,
                Instance.current().v2_grpc, gateway.front)
    while not stop.wait(1):
        pass
    rpc.stop(grace=5).wait()
    rest.shutdown()
