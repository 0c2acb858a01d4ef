"""The Open Inference Protocol (KServe v2) as this toolkit serves it, whatever the wire: what each kind of model takes and
gives, tensors, and the gateway that turns a v2 inference into the front door's /predictions calls (``serving/v2.py`` puts it on REST and gRPC).

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
import json
import logging
import math
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any
from urllib.parse import urlparse

import numpy as np
import requests
import urllib3

from archives.store import Manifest, default_store
from serving.front_door import (
    NAME,
    READ_TIMEOUT,
    max_body,
)
from serving.instance import Instance, ServeError
from serving.torchserve import TorchServe, minimum_workers, ready_workers

logger = logging.getLogger(__name__)

CALLS = 64  # /predictions calls in flight at once, over every v2 request
CATALOG_TTL = 2.0  # seconds a view of the registered versions is reused
NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32,
         "FP64": np.float64}


class V2Error(Exception):
    """A request the gateway cannot answer: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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
        instance = Instance.current()
        self.front = loopback(front or instance.front)
        self.health_url = health or instance.health
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


