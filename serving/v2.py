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

* REST on ``V2_ADDRESS`` (loopback, default :8185), behind the front door's ``/v2/`` (``serving/nginx.conf.j2``: nginx
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


The tensors each kind of model takes and gives, and the gateway itself: ``serving/v2_protocol.py``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from serving.front_door import (
    Listen,
    client_keys,
    cpu_limit,
    max_body,
    valid_keys,
)
from serving.instance import Instance, ServeError
from serving.loopback import QuietHandler, loopback_server
from serving.torchserve import TorchServe
from serving.v2_protocol import (
    Answer,
    Gateway,
    Input,
    Request,
    V2Error,
    check_size,
    json_tensor,
    raw_tensor,
)

logger = logging.getLogger(__name__)

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
    gateway, instance = Gateway(), Instance.current()
    try:
        rest = serve_rest(gateway, instance.v2)
        rpc = serve_grpc(gateway, instance.v2_grpc)
    except OSError as error:
        logger.error("cannot listen at %s: %s", instance.v2, error.strerror or error)
        raise SystemExit(1) from None
    except ServeError as error:
        logger.error("%s", error)
        raise SystemExit(1) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=rest.serve_forever, daemon=True).start()
    rpc.start()
    logger.info("answering v2 REST at %s and gRPC at %s, for the front door at %s", instance.v2, instance.v2_grpc,
                gateway.front)
    while not stop.wait(1):
        pass
    rpc.stop(grace=5).wait()
    rest.shutdown()
