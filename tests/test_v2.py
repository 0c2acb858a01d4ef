"""The Open Inference Protocol (KServe v2) on the front door, through tritonclient (HTTP and gRPC), a client nobody
here wrote: every model answers as /predictions does; health, metadata and bad requests as the protocol says; the
gRPC door checks the key before it reads a message, refuses counts and sizes over its limits, caps its calls and
speaks TLS with the front door's certificate. And TorchServe's own gRPC inference API, through grpcio and its .proto
files compiled from TorchServe's jar at test time.

tritonclient.grpc and kserve cannot share a process (both define the protobuf ``inference.*`` messages): nothing
this module or manage/ imports brings in kserve.
"""

from __future__ import annotations

import base64
import importlib
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from archives.store import store_of
from export import digits, super_resolution
from export.samples import SENTENCES, encode
from serving.front_door import max_body
from serving.instance import Instance
from serving.torchserve import TorchServe
from serving.v2 import GRPC_SERVICE, MAX_DIMS, MAX_TENSORS, grpc_limits, max_message
from tests.conftest import instance, make_ca, manage, ok

pytestmark = pytest.mark.integration

MODES = ("http-binary", "http-json", "grpc")
TOLERANCE = 1e-6


@dataclass
class V2:
    front: str  # the front door's base URL
    grpc: str  # the gateway's gRPC host:port
    key: str  # the inference key
    http_client: httpclient.InferenceServerClient
    grpc_client: grpcclient.InferenceServerClient

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="module")
def v2(served) -> V2:
    """Clients of the served instance's v2 endpoints, once the gateway answers."""
    gateway = served.env["V2_ADDRESS"]
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{gateway}/v2", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the v2 gateway did not answer within 30 s"
        time.sleep(0.2)
    front = served.env["PROXY_ADDRESS"]
    return V2(front, served.env["V2_GRPC_ADDRESS"], served.client.token("inference"),
              httpclient.InferenceServerClient(url=front.split("://", 1)[1]),
              grpcclient.InferenceServerClient(url=served.env["V2_GRPC_ADDRESS"]))


def infer(v2: V2, mode: str, model: str, input_name: str, elements: list[bytes], version: str = "",
          outputs: list[str] | None = None) -> tuple[dict[str, np.ndarray], str]:
    """One v2 inference through tritonclient: each output as numpy, and the version that answered. ``http-json``
    sends and asks for JSON tensors (binary elements base64, as the gateway documents); the others binary."""
    array = np.array(elements, dtype=np.object_)
    if mode == "grpc":
        tensor = grpcclient.InferInput(input_name, list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
        wanted = [grpcclient.InferRequestedOutput(name) for name in outputs] if outputs else None
        result = v2.grpc_client.infer(model, [tensor], model_version=version, outputs=wanted,
                                      headers={"authorization": f"Bearer {v2.key}"})
        names = [output.name for output in result.get_response().outputs]
        return {name: result.as_numpy(name) for name in names}, result.get_response().model_version
    binary = mode == "http-binary"
    if not binary and input_name == "image":
        array = np.array([base64.b64encode(element) for element in elements], dtype=np.object_)
    tensor = httpclient.InferInput(input_name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array, binary_data=binary)
    if not outputs and not binary:  # tritonclient asks for binary outputs unless they are named
        outputs = [output["name"] for output in v2.http_client.get_model_metadata(model)["outputs"]]
    wanted = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in outputs] if outputs else None
    result = v2.http_client.infer(model, [tensor], model_version=version, outputs=wanted, headers=v2.auth)
    response = result.get_response()
    assert all(("data" in output) != binary for output in response["outputs"])
    return {output["name"]: as_bytes(output, result.as_numpy(output["name"])) for output in response["outputs"]}, \
        response["model_version"]


def as_bytes(output: dict, array: np.ndarray) -> np.ndarray:
    """A BYTES output of a JSON answer as bytes, as binary answers give them: text, or base64 for a PNG."""
    if output["datatype"] != "BYTES" or "data" not in output:
        return array
    decode = base64.b64decode if output["name"] == "upscaled" else str.encode
    return np.vectorize(decode, otypes=[np.object_])(array)


def predictions(served, model: str, payload: bytes, version: str | None = None) -> requests.Response:
    response = served.client.predict(model, payload, version)
    assert response.status_code == 200, response.text
    return response


def assert_top_k(outputs: dict[str, np.ndarray], answers: list[dict[str, float]]) -> None:
    """labels [N, k] and scores [N, k] hold each /predictions answer, in its order."""
    assert outputs["labels"].shape == outputs["scores"].shape == (len(answers), len(answers[0]))
    assert outputs["scores"].dtype == np.float32
    for labels, scores, answer in zip(outputs["labels"], outputs["scores"], answers):
        assert [label.decode() for label in labels] == list(answer)
        np.testing.assert_allclose(scores, list(answer.values()), atol=TOLERANCE, rtol=0)


# --- health and metadata ----------------------------------------------------------------------------------------


def test_server_live_ready_and_metadata_through_both_clients(v2):
    for client in (v2.http_client, v2.grpc_client):
        assert client.is_server_live()
        assert client.is_server_ready()
    assert v2.http_client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    assert v2.grpc_client.get_server_metadata().version == "0.12.0"
    ready = requests.get(f"{v2.front}/v2/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True  # the health checker's own report


def test_every_model_and_version_is_ready_and_described(served, v2):
    expected = {"efficientnet_lite0": ("image", ["labels", "scores"]), "digits": ("image", ["labels", "scores"]),
                "minilm": ("text", ["embedding", "tokens", "truncated"]),
                "super_resolution": ("image", ["upscaled", "size"])}
    registered = served.client.registered()
    for model, (input_name, output_names) in expected.items():
        versions = sorted(v for m, v in registered if m == model)
        assert v2.http_client.is_model_ready(model) and v2.grpc_client.is_model_ready(model)
        described = v2.http_client.get_model_metadata(model)
        assert described["name"] == model and described["versions"] == versions
        assert [(t["name"], t["datatype"]) for t in described["inputs"]] == [(input_name, "BYTES")]
        assert [t["name"] for t in described["outputs"]] == output_names
        over_grpc = v2.grpc_client.get_model_metadata(model)
        assert list(over_grpc.versions) == versions and [t.name for t in over_grpc.outputs] == output_names
        for version in versions:
            assert v2.http_client.is_model_ready(model, version) and v2.grpc_client.is_model_ready(model, version)
            assert v2.grpc_client.get_model_metadata(model, version).versions == [version]
    platforms = {v2.http_client.get_model_metadata("efficientnet_lite0", v)["platform"] for v in ("1.0", "1.1")}
    assert platforms == {"pytorch_libtorch", "onnxruntime_onnx"}


def test_unknown_models_and_versions_are_not_found(v2):
    assert not v2.http_client.is_model_ready("no_such_model")
    for path, word in (("/v2/models/no_such_model", "no_such_model"), ("/v2/models/digits/versions/9.9", "9.9"),
                       ("/v2/models/digits/versions/9.9/ready", "9.9")):
        answer = requests.get(v2.front + path, timeout=10)
        assert answer.status_code == 404 and word in answer.json()["error"], answer.text
    for call in (lambda: v2.grpc_client.get_model_metadata("no_such_model"),
                 lambda: v2.grpc_client.is_model_ready("digits", "9.9")):
        with pytest.raises(InferenceServerException) as error:
            call()
        assert "NOT_FOUND" in error.value.status()


# --- answers as /predictions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_photos_are_classified_as_by_predictions(served, v2, photos, mode):
    names = ["chelsea", "coffee", "rocket"]
    outputs, version = infer(v2, mode, "efficientnet_lite0", "image", [photos[name] for name in names])
    answers = [predictions(served, "efficientnet_lite0", photos[name]) for name in names]
    assert_top_k(outputs, [answer.json() for answer in answers])
    assert version == answers[0].headers["X-Model-Version"] == "1.1"


@pytest.mark.parametrize("mode", MODES)
def test_digits_of_each_version_as_by_predictions(served, v2, mode):
    images, _ = digits.held_out()
    payloads = [encode(image, "PNG") for image in images[:4]]
    for version in ("1.0", "2.0"):
        outputs, answered = infer(v2, mode, "digits", "image", payloads, version=version)
        assert answered == version
        assert_top_k(outputs, [predictions(served, "digits", p, version).json() for p in payloads])


def test_the_front_doors_metrics_count_v2_requests_under_their_own_api(served, v2):
    """A v2 infer is counted as api="v2" (its model named), and each of its elements as the prediction it became:
    the HPA's rate, taken from predictions, counts the work once."""
    metrics = f"{served.env['PROXY_METRICS_ADDRESS']}/metrics/front_door"

    def count(api: str) -> float:
        lines = [line for line in requests.get(metrics, timeout=10).text.splitlines()
                 if line.startswith("frontdoor_requests_total{") and f'api="{api}",model="digits"' in line
                 and 'status="200"' in line]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    def settled() -> tuple[float, float]:  # once the checker has read every line the earlier tests left
        last = None
        while (now := (count("v2"), count("predictions"))) != last:
            last = now
            time.sleep(1.5)
        return now

    before_v2, before_predictions = settled()
    images, _ = digits.held_out()
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                        "data": [base64.b64encode(encode(image, "PNG")).decode() for image in images[:3]]}]}
    answer = requests.post(f"{v2.front}/v2/models/digits/infer", json=body, headers=v2.auth, timeout=30)
    assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 10  # the health checker reads the access log as it grows
    while (count("v2"), count("predictions")) != (before_v2 + 1, before_predictions + 3):
        assert time.monotonic() < deadline, (count("v2") - before_v2, count("predictions") - before_predictions)
        time.sleep(0.3)
    assert settled() == (before_v2 + 1, before_predictions + 3)  # and no more


@pytest.mark.parametrize("mode", MODES)
def test_sentences_are_embedded_as_by_predictions(served, v2, mode):
    texts = [SENTENCES[name] for name in ("cat", "kitten", "long")] + ['{"text": "a text that looks like JSON"}']
    outputs, _ = infer(v2, mode, "minilm", "text", [text.encode() for text in texts])
    assert outputs["embedding"].dtype == np.float32 and outputs["embedding"].shape == (4, 384)
    for index, text in enumerate(texts):
        answer = served.client.request("inference", "POST", "/predictions/minilm", json={"text": text}).json()
        np.testing.assert_allclose(outputs["embedding"][index], answer["embedding"], atol=TOLERANCE, rtol=0)
        assert outputs["tokens"][index] == answer["tokens"] and bool(outputs["truncated"][index]) is answer["truncated"]
    assert outputs["truncated"].tolist() == [False, False, True, False]


@pytest.mark.parametrize("mode", MODES)
def test_upscaling_gives_the_png_of_predictions(served, v2, mode):
    _, payload = super_resolution.held_out(2)["chelsea"]
    outputs, _ = infer(v2, mode, "super_resolution", "image", [payload])
    answer = predictions(served, "super_resolution", payload)
    assert outputs["upscaled"].shape == (1,) and outputs["upscaled"][0] == answer.content
    assert "x".join(map(str, outputs["size"][0])) == answer.headers["X-Output-Size"]


def test_the_front_doors_ab_split_applies_to_v2(served, v2, restored):
    images, _ = digits.held_out()
    payloads = [encode(image, "PNG") for image in images[:16]]
    by_version = {version: [list(predictions(served, "digits", p, version).json()) for p in payloads]
                  for version in ("1.0", "2.0")}
    ok(manage("ab", "digits", "1.0=50", "2.0=50"))
    outputs, version = infer(v2, "grpc", "digits", "image", payloads)
    assert version == "1.0,2.0"  # 16 elements split 50/50 at random: both versions but for 1 in 30,000
    for index, labels in enumerate(outputs["labels"]):
        assert [label.decode() for label in labels] in (by_version["1.0"][index], by_version["2.0"][index])
    assert v2.grpc_client.is_model_ready("digits")


def test_requested_outputs_filter_the_answer_and_shape_n_by_1_is_taken(v2, photos):
    for mode in MODES:
        outputs, _ = infer(v2, mode, "minilm", "text", [b"one", b"two"], outputs=["tokens"])
        assert list(outputs) == ["tokens"] and outputs["tokens"].shape == (2,)
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                        "data": [base64.b64encode(photos["chelsea"]).decode()]}]}
    answer = requests.post(f"{v2.front}/v2/models/efficientnet_lite0/infer", json=body, headers=v2.auth, timeout=60)
    assert answer.status_code == 200 and answer.json()["outputs"][0]["shape"] == [1, 5]


def test_concurrent_requests_on_both_protocols_are_each_answered_right(served, v2, photos):
    names = ["chelsea", "coffee", "rocket", "astronaut"]
    expected = {name: predictions(served, "efficientnet_lite0", photos[name]).json() for name in names}

    local = threading.local()

    def one(index: int) -> None:
        if not hasattr(local, "v2"):  # tritonclient's HTTP client (gevent) is one per thread
            local.v2 = replace(v2, http_client=httpclient.InferenceServerClient(url=v2.front.split("://", 1)[1]))
        pair = [names[index % 4], names[(index + 1) % 4]]
        outputs, _ = infer(local.v2, MODES[index % 3], "efficientnet_lite0", "image", [photos[n] for n in pair])
        assert_top_k(outputs, [expected[name] for name in pair])

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(one, range(36)))


def test_a_tritonclient_answer_beside_the_predictions_answer(served, v2, photos, capsys):
    """The closing note's pair: one real photo through tritonclient's gRPC client and through /predictions."""
    outputs, version = infer(v2, "grpc", "efficientnet_lite0", "image", [photos["chelsea"]])
    answer = predictions(served, "efficientnet_lite0", photos["chelsea"]).json()
    with capsys.disabled():
        print(f"\nchelsea, efficientnet_lite0 {version}: tritonclient.grpc / POST /predictions")
        for label, score, (name, probability) in zip(outputs["labels"][0], outputs["scores"][0], answer.items()):
            print(f"  {label.decode():<28} {score:.8f}   {name:<28} {probability:.8f}")
    assert_top_k(outputs, [answer])


# --- bad requests ------------------------------------------------------------------------------------------------


def bad_rest_requests(photos) -> dict[str, tuple[str, dict, bytes, int, str]]:
    """name → (path, headers, body, status, a word the message has)."""
    image = base64.b64encode(photos["chelsea"]).decode()

    def body(**tensor) -> bytes:
        return json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image],
                                       **tensor}]}).encode()

    infer_path = "/v2/models/efficientnet_lite0/infer"
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 50}}]}).encode()
    return {
        "malformed JSON": (infer_path, {}, b'{"inputs": [', 400, "JSON"),
        "no inputs": (infer_path, {}, b'{"outputs": []}', 400, "inputs"),
        "wrong input name": (infer_path, {}, body(name="text"), 400, "'image'"),
        "wrong datatype": (infer_path, {}, body(datatype="FP32"), 400, "BYTES"),
        "shape and data differ": (infer_path, {}, body(shape=[2]), 400, "2 elements"),
        "a shape of 3 dimensions": (infer_path, {}, body(shape=[1, 1, 1]), 400, "shape"),
        "not base64": (infer_path, {}, body(data=["not base64 !"]), 400, "base64"),
        "too many elements": (infer_path, {}, body(shape=[65], data=[image] * 65), 400, "too many"),
        "unknown output": (infer_path, {}, json.dumps({**json.loads(body()), "outputs": [{"name": "x"}]}).encode(),
                           400, "'x'"),
        "header length over the body": (infer_path, {"Inference-Header-Content-Length": "99999"}, body(), 400,
                                        "Inference-Header-Content-Length"),
        "header length not a number": (infer_path, {"Inference-Header-Content-Length": "abc"}, body(), 400,
                                       "Inference-Header-Content-Length"),
        "binary data size over the data": (infer_path, {"Inference-Header-Content-Length": str(len(header))},
                                           header + b"\x05\x00\x00\x00ab", 400, "binary_data_size"),
        "not an image": (infer_path, {}, body(data=[base64.b64encode(b"hello").decode()]), 400, "not_an_image"),
        "unknown model": ("/v2/models/no_such_model/infer", {}, body(), 404, "no_such_model"),
        "unknown version": ("/v2/models/efficientnet_lite0/versions/9.9/infer", {}, body(), 404, "9.9"),
    }


def test_bad_rest_requests_get_a_4xx_naming_the_problem_and_the_gateway_goes_on(served, v2, photos):
    for name, (path, headers, body, status, word) in bad_rest_requests(photos).items():
        answer = requests.post(v2.front + path, data=body, headers={**v2.auth, **headers}, timeout=60)
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        assert word in answer.json()["error"], (name, answer.json())
    outputs, _ = infer(v2, "http-binary", "efficientnet_lite0", "image", [photos["chelsea"]])
    assert outputs["labels"][0][0].decode() == "Egyptian cat"


def test_bad_grpc_requests_get_their_status_and_the_gateway_goes_on(v2, photos):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(v2.grpc))
    key = (("authorization", f"Bearer {v2.key}"),)

    def request(model="efficientnet_lite0", datatype="BYTES", shape=(1,), raw=None, contents=None):
        message = pb.ModelInferRequest(model_name=model)
        tensor = message.inputs.add(name="image", datatype=datatype, shape=list(shape))
        if contents is not None:
            tensor.contents.bytes_contents.extend(contents)
        message.raw_input_contents.extend(raw if raw is not None else [])
        return message

    framed = len(photos["chelsea"]).to_bytes(4, "little") + photos["chelsea"]
    cases = {
        "wrong datatype": (request(datatype="FP32", raw=[b"\0" * 4]), key, grpc.StatusCode.INVALID_ARGUMENT),
        "shape and data differ": (request(shape=(2,), raw=[framed]), key, grpc.StatusCode.INVALID_ARGUMENT),
        "element longer than the data": (request(raw=[b"\xff\xff\x00\x00abc"]), key,
                                         grpc.StatusCode.INVALID_ARGUMENT),
        "raw contents for no input": (request(raw=[framed, framed]), key, grpc.StatusCode.INVALID_ARGUMENT),
        "not an image": (request(contents=[b"hello"]), key, grpc.StatusCode.INVALID_ARGUMENT),
        "unknown model": (request(model="no_such_model", raw=[framed]), key, grpc.StatusCode.NOT_FOUND),
        "no key": (request(raw=[framed]), (), grpc.StatusCode.UNAUTHENTICATED),
        "wrong key": (request(raw=[framed]), (("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
    }
    for name, (message, metadata, code) in cases.items():
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(message, metadata=metadata, timeout=60)
        assert error.value.code() == code, (name, error.value.code(), error.value.details())
        assert error.value.details(), name
    answer = stub.ModelInfer(request(contents=[photos["chelsea"]]), metadata=key, timeout=60)  # contents, not raw
    assert answer.outputs[0].name == "labels" and list(answer.outputs[0].shape) == [1, 5]


def test_no_key_is_refused_on_both_protocols(v2, photos):
    answer = requests.post(f"{v2.front}/v2/models/efficientnet_lite0/infer", timeout=10,
                           json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]})
    assert answer.status_code == 401 and answer.json()["error"] == "unauthorized"
    tensor = httpclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([photos["chelsea"]], dtype=np.object_))
    with pytest.raises(InferenceServerException) as error:
        v2.http_client.infer("efficientnet_lite0", [tensor])
    assert error.value.status() == "401"
    tensor = grpcclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([photos["chelsea"]], dtype=np.object_))
    with pytest.raises(InferenceServerException) as error:
        v2.grpc_client.infer("efficientnet_lite0", [tensor])
    assert "UNAUTHENTICATED" in error.value.status() and "key" in error.value.message()
    assert requests.delete(f"{v2.front}/v2/models/digits", timeout=10).status_code == 405


def model_infer(channel: grpc.Channel):
    """ModelInfer taking the message already serialized: what is timed is the call, not the client's encoding."""
    return channel.unary_unary(f"/{GRPC_SERVICE}/ModelInfer", request_serializer=None,
                               response_deserializer=pb.ModelInferResponse.FromString)


def contents_message(model: str, count: int, shape: list[int], element: bytes = b"x") -> bytes:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="image", datatype="BYTES", shape=shape).contents.bytes_contents.extend([element] * count)
    return message.SerializeToString()


def memory(pid: int, field: str) -> int:
    """A process's VmRSS (resident memory now) or VmHWM (its peak since ``reset_peak``), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith(f"{field}:"))


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS


def test_an_infer_without_the_key_is_refused_before_its_message_is_read(served, v2):
    """As many one-byte bytes_contents as the message limit lets through (8.7 million, 25 MiB), shape [N] and no
    key: UNAUTHENTICATED, not the INVALID_ARGUMENT of a count the gateway would have unpacked to find, at once, and
    the gateway's memory does not grow with it."""
    count = max_body() // 3  # each element: a tag, a length and the byte
    message = contents_message("digits", count, [count])
    assert max_body() < len(message) <= max_message()
    gateway = Instance.at(Path(served.env["SERVE_HOME"])).pids()["v2 gateway"]
    call = model_infer(grpc.insecure_channel(v2.grpc))
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", f"Basic {v2.key}"),)):
        reset_peak(gateway)
        baseline = memory(gateway, "VmRSS")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            call(message, metadata=metadata, timeout=60)
        seconds = time.monotonic() - started
        grown = memory(gateway, "VmHWM") - baseline
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, error.value.details())
        assert "key" in error.value.details()
        assert seconds < 1.0, (metadata, seconds)
        assert grown < 64 * 2**20, (metadata, grown)  # unpacked, 8.7 million bytes objects: some 500 MB
    with pytest.raises(grpc.RpcError) as error:  # with the key, the count is refused before any is copied out
        call(message, metadata=(("authorization", f"Bearer {v2.key}"),), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 64" in error.value.details()


def test_grpc_methods_need_the_key_where_rest_does(v2):
    """Health and metadata need no key (as /v2/health/* and GET /v2/models/...); every other method does, even one
    the gateway does not implement: without the key UNAUTHENTICATED, with it UNIMPLEMENTED."""
    assert v2.grpc_client.is_server_live() and v2.grpc_client.is_model_ready("digits")
    assert v2.grpc_client.get_model_metadata("digits").name == "digits"
    assert v2.grpc_client.get_server_metadata().name == "torchserve"
    for call in (v2.grpc_client.get_model_repository_index, lambda **kw: v2.grpc_client.get_inference_statistics(
            "digits", **kw), lambda **kw: v2.grpc_client.get_model_config("digits", **kw)):
        with pytest.raises(InferenceServerException) as error:
            call()
        assert "UNAUTHENTICATED" in error.value.status(), error.value
        with pytest.raises(InferenceServerException) as error:
            call(headers={"authorization": f"Bearer {v2.key}"})
        assert "UNIMPLEMENTED" in error.value.status(), error.value


def test_counts_and_sizes_over_the_limits_are_refused_naming_the_limit(v2):
    key = {"authorization": f"Bearer {v2.key}"}

    def refused(elements: list[bytes], shape: list[int]) -> InferenceServerException:
        tensor = grpcclient.InferInput("image", shape, "BYTES")
        tensor.set_data_from_numpy(np.array(elements, dtype=np.object_).reshape(shape))
        with pytest.raises(InferenceServerException) as error:
            v2.grpc_client.infer("digits", [tensor], headers=key, client_timeout=60)
        return error.value

    over_count = refused([b"x"] * 65, [65])
    assert "INVALID_ARGUMENT" in over_count.status() and "at most 64" in over_count.message(), over_count
    over_size = refused([b"\0" * max_body()], [1])  # 4 bytes of length besides: one over
    assert "RESOURCE_EXHAUSTED" in over_size.status() and f"limit of {max_body()} bytes" in over_size.message()

    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(v2.grpc))
    metadata = tuple(key.items())

    def request(inputs: int = 1, shape: tuple[int, ...] = (1,), raw: list[bytes] | None = None,
                contents: list[bytes] | None = None) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name="digits")
        for _ in range(inputs):
            message.inputs.add(name="image", datatype="BYTES", shape=list(shape)).contents.bytes_contents.extend(
                contents or [])
        message.raw_input_contents.extend(raw or [])
        return message

    framed = (1).to_bytes(4, "little") + b"x"
    cases = {
        "a million bytes_contents, shape [1]": (request(contents=[b"x"] * 1_000_000), "has 1000000"),
        "a thousand raw elements, shape [2]": (request(shape=(2,), raw=[framed * 1000]), "has more than 2"),
        "too many inputs": (request(inputs=MAX_TENSORS + 1), f"at most {MAX_TENSORS}"),
        "too many dimensions": (request(shape=(1,) * (MAX_DIMS + 1)), f"at most {MAX_DIMS}"),
    }
    for name, (message, words) in cases.items():
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(message, metadata=metadata, timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.value.details())
        assert words in error.value.details(), (name, error.value.details())
    with pytest.raises(grpc.RpcError) as error:  # over the message limit: grpcio's own refusal, naming it
        model_infer(grpc.insecure_channel(v2.grpc))(b"\0" * (max_message() + 1), metadata=metadata, timeout=60)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and str(max_message()) in error.value.details()
    images, _ = digits.held_out()
    answer = v2.grpc_client.infer("digits", [digit_input([encode(images[0], "PNG")])], headers=key)
    assert answer.as_numpy("labels").shape == (1, 5)  # and the gateway goes on


def digit_input(payloads: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", [len(payloads)], "BYTES")
    tensor.set_data_from_numpy(np.array(payloads, dtype=np.object_))
    return tensor


# --- TorchServe's own gRPC inference API ------------------------------------------------------------------------


def compiled_protos(folder: Path):
    """TorchServe's inference.proto and management.proto, from its jar, compiled for grpcio here: the modules."""
    import grpc_tools
    import ts
    from grpc_tools import protoc

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as archive:
        for name in ("proto/inference.proto", "proto/management.proto", "google/rpc/status.proto"):
            archive.extract(name, folder)
    out = folder / "generated"
    out.mkdir()
    status = protoc.main(["protoc", f"-I{folder / 'proto'}", f"-I{folder}",
                          f"-I{Path(grpc_tools.__file__).parent / '_proto'}", f"--python_out={out}",
                          f"--grpc_python_out={out}", str(folder / "proto" / "inference.proto"),
                          str(folder / "proto" / "management.proto")])
    assert status == 0
    return out


def test_torchserve_own_grpc_inference_api(served, photos, tmp_path, monkeypatch):
    port = served.env["TS_GRPC_INFERENCE_PORT"]
    assert port != Instance.current().properties()["grpc_inference_port"]  # a port of this instance's own, not the demo's
    monkeypatch.syspath_prepend(str(compiled_protos(tmp_path)))
    messages, services = importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")
    from google.protobuf import empty_pb2

    stub = services.InferenceAPIsServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    key = (("authorization", f"Bearer {served.client.token('inference')}"),)
    assert json.loads(stub.Ping(empty_pb2.Empty(), metadata=key, timeout=10).health)["status"] == "Healthy"
    with pytest.raises(grpc.RpcError) as error:  # TorchServe's token check covers gRPC too
        stub.Ping(empty_pb2.Empty(), timeout=10)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for version in ("1.0", "1.1"):
        request = messages.PredictionsRequest(model_name="efficientnet_lite0", model_version=version,
                                              input={"data": photos["chelsea"]})
        answer = json.loads(stub.Predictions(request, metadata=key, timeout=60).prediction)
        expected = predictions(served, "efficientnet_lite0", photos["chelsea"], version).json()
        assert list(answer) == list(expected)
        np.testing.assert_allclose(list(answer.values()), list(expected.values()), atol=TOLERANCE, rtol=0)


# --- a second, smaller instance: gRPC over TLS, its calls capped ----------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """digits 2.0 alone on its own TorchServe, with TLS_CERT and TLS_KEY from a throwaway CA: the front door speaks
    HTTPS and the gateway's gRPC TLS. Last in this module: its environment stays set until the module ends."""
    home = tmp_path_factory.mktemp("v2-tls")
    store = store_of(home / "store", [("digits", "2.0")])
    ca, cert, key = make_ca(home)
    env = {**Instance.fresh(home / "serve", store=str(store)).environment(), "TLS_CERT": str(cert), "TLS_KEY": str(key),
           "REQUESTS_CA_BUNDLE": str(ca)}
    env["PROXY_ADDRESS"] = env["PROXY_ADDRESS"].replace("http://", "https://")
    with instance(env):
        client = grpcclient.InferenceServerClient(env["V2_GRPC_ADDRESS"], ssl=True, root_certificates=str(ca))
        deadline, last = time.monotonic() + 30, None
        while True:
            try:
                if client.is_server_live():
                    break
            except InferenceServerException as error:  # not listening yet
                last = error
            assert time.monotonic() < deadline, f"the v2 gateway did not answer gRPC over TLS within 30 s: {last}"
            time.sleep(0.2)
        yield {"env": env, "ca": ca, "client": client, "key": TorchServe().token("inference")}


def test_grpc_speaks_tls_with_the_front_doors_certificate_and_refuses_plaintext(tls):
    images, _ = digits.held_out()
    payloads = [encode(image, "PNG") for image in images[:2]]
    answer = tls["client"].infer("digits", [digit_input(payloads)],
                                 headers={"authorization": f"Bearer {tls['key']}"})
    for index, payload in enumerate(payloads):
        expected = requests.post(f"{tls['env']['PROXY_ADDRESS']}/predictions/digits", data=payload, timeout=30,
                                 headers={"Authorization": f"Bearer {tls['key']}"}, verify=str(tls["ca"])).json()
        assert [label.decode() for label in answer.as_numpy("labels")[index]] == list(expected)
    address = tls["env"]["V2_GRPC_ADDRESS"]
    for client in (grpcclient.InferenceServerClient(address),  # plaintext
                   grpcclient.InferenceServerClient(address, ssl=True)):  # TLS, but not trusting the throwaway CA
        with pytest.raises(InferenceServerException) as error:
            client.is_server_live(client_timeout=10)
        assert "UNAVAILABLE" in error.value.status(), error.value


def test_calls_beyond_the_cap_are_refused_at_once(tls):
    """``calls`` + 4 ModelInfer calls whose message never comes: ``calls`` of them hold every thread and every
    waiting place, the other 4 are RESOURCE_EXHAUSTED at once, and so is the next call; once the held ones are gone,
    calls are answered again."""
    threads, calls = grpc_limits()
    log = (Path(tls["env"]["LOG_DIR"]) / "v2.log").read_text()
    assert f"gRPC: TLS, {threads} threads, at most {calls} calls at once" in log
    channel = grpc.secure_channel(tls["env"]["V2_GRPC_ADDRESS"],
                                  grpc.ssl_channel_credentials(tls["ca"].read_bytes()))
    held = channel.stream_unary(f"/{GRPC_SERVICE}/ModelInfer", request_serializer=None,
                                response_deserializer=pb.ModelInferResponse.FromString)
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait(60)
        yield from ()

    metadata = (("authorization", f"Bearer {tls['key']}"),)
    extra = 4
    futures = [held.future(never(), metadata=metadata, timeout=60) for _ in range(calls + extra)]
    try:
        deadline = time.monotonic() + 10
        while sum(future.done() for future in futures) < extra:
            assert time.monotonic() < deadline, f"{sum(f.done() for f in futures)} of {calls + extra} calls refused"
            time.sleep(0.05)
        time.sleep(0.5)  # and no more than those
        refused = [future for future in futures if future.done()]
        assert len(refused) == extra, len(refused)
        assert all(future.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for future in refused)
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as error:
            tls["client"].is_server_live(client_timeout=10)
        assert "RESOURCE_EXHAUSTED" in error.value.status() and time.monotonic() - started < 1.0
    finally:
        for future in futures:
            future.cancel()
        release.set()
    deadline = time.monotonic() + 20
    while True:
        try:
            assert tls["client"].is_server_live(client_timeout=10)
            break
        except InferenceServerException as error:
            assert time.monotonic() < deadline, f"calls still refused 20 s after the held ones went: {error}"
            time.sleep(0.2)


def test_grpc_takes_a_renewed_key_and_refuses_the_old_one(tls):
    """TorchServe rewrites its key file when a key is renewed: the gateway reads it again at the next call."""
    images, _ = digits.held_out()
    tensor = digit_input([encode(images[0], "PNG")])
    old = tls["key"]
    client = TorchServe()  # this instance's, while its environment is set
    client.renew("inference")
    new = client.keys()["inference"]["key"]
    assert new != old
    answer = tls["client"].infer("digits", [tensor], headers={"authorization": f"Bearer {new}"})
    assert answer.as_numpy("labels").shape == (1, 5)
    with pytest.raises(InferenceServerException) as error:
        tls["client"].infer("digits", [tensor], headers={"authorization": f"Bearer {old}"})
    assert "UNAUTHENTICATED" in error.value.status(), error.value
