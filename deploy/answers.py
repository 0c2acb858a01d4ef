"""What a container's answers must be: each version's /predictions answers to real photos and texts equal to TorchServe's
own loader's outside the container, the v2 protocol's (REST and gRPC, through tritonclient) equal to /predictions,
and an explanation answered as the image allows."""

from __future__ import annotations

import base64
import json
import subprocess
from typing import Any

import numpy as np

from archives.store import REPO, Manifest
from deploy.plan import DeployError
from deploy.pod import CheckFailed, PYTHON, Pod, TOLERANCE



OUTSIDE: dict[str, list[dict[str, Any]]] = {}  # job's hash → answers: the same archive answers the same


def outside_answers(model: str, version: str, bodies: list[tuple[bytes, str]]) -> list[dict[str, Any]]:
    """The archive's answers outside the container: ``export/worker_check.py`` (TorchServe's loader and the
    handler) on its unpacked folder, in this checkout's environment (once per archive and requests)."""
    import hashlib

    folder = Manifest().unpacked(model, version)
    job = json.dumps({"model_dir": str(folder), "requests": [{"body": base64.b64encode(body).decode(),
                                                              "headers": {"content-type": content_type}}
                                                             for body, content_type in bodies]})
    key = hashlib.sha256(f"{(folder / '.sha256').read_text()}\n{job}".encode()).hexdigest()
    if key not in OUTSIDE:
        result = subprocess.run([str(PYTHON), "-I", str(REPO / "export" / "worker_check.py")], input=job,
                                capture_output=True, text=True, timeout=300, check=False)
        if result.returncode != 0:
            raise DeployError(f"worker_check of {model} {version} failed: {result.stderr.strip()[-1500:]}")
        OUTSIDE[key] = json.loads(result.stdout)
    return OUTSIDE[key]


PREDICTIONS = 4  # real requests per version


def same(expected: Any, found: Any, tolerance: float = TOLERANCE) -> bool:
    """JSON values equal, numbers to ``tolerance``."""
    if isinstance(expected, bool) or isinstance(found, bool):
        return expected == found
    if isinstance(expected, (int, float)) and isinstance(found, (int, float)):
        return abs(expected - found) <= tolerance * max(1.0, abs(expected))
    if isinstance(expected, dict) and isinstance(found, dict):
        return list(expected) == list(found) and all(same(expected[k], found[k], tolerance) for k in expected)
    if isinstance(expected, list) and isinstance(found, list):
        return len(expected) == len(found) and all(same(e, f, tolerance) for e, f in zip(expected, found))
    return expected == found


def check_predictions(pod: Pod, versions: list[str], handler: str) -> dict[str, Any]:
    from load_test.inputs import requests_for

    bodies = requests_for(pod.model, handler)[:PREDICTIONS]
    checked = {}
    for version in versions:
        expected = outside_answers(pod.model, version, bodies)
        for index, ((body, content_type), want) in enumerate(zip(bodies, expected)):
            response = pod.post(f"/predictions/{pod.model}/{version}", body, content_type)
            answered = response.headers.get("X-Model-Version")
            want_body = base64.b64decode(want["body"])
            if response.status_code != want["status"] or answered != version:
                raise CheckFailed(f"{pod.model} {version} request {index}: {response.status_code} from "
                                  f"{answered} (outside: {want['status']}): {response.text[:300]}")
            if want["content_type"].startswith("application/json"):
                if not same(json.loads(want_body), response.json()):
                    raise CheckFailed(f"{pod.model} {version} request {index}: the answer differs from outside the "
                                      f"container:\n  in:  {response.text[:300]}\n  out: {want_body[:300]!r}")
            elif response.content != want_body:
                raise CheckFailed(f"{pod.model} {version} request {index}: {len(response.content)} bytes differ from "
                                  f"the {len(want_body)} outside the container")
        checked[version] = f"{len(bodies)} requests, answers identical to outside the container"
    return checked


def v2_elements(pod: Pod, handler: str, kind) -> list[bytes]:
    from export.samples import SENTENCES
    from load_test.inputs import requests_for

    if kind.input.name == "text":
        return [text.encode() for text in list(SENTENCES.values())[:3]]
    return [body for body, _ in requests_for(pod.model, handler)[:2]]


def check_v2(pod: Pod, handler: str) -> dict[str, Any]:
    """tritonclient over REST and gRPC against the published ports: each output equals what /predictions answers
    for the same element, mapped as the gateway documents it."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from serving.v2_protocol import KINDS

    kind = KINDS.get(handler, KINDS["generic"])
    elements = v2_elements(pod, handler, kind)
    rows = []
    for element in elements:
        body, content_type = kind.body(element)
        response = pod.post(f"/predictions/{pod.model}", body, content_type)
        if response.status_code != 200:
            raise CheckFailed(f"{pod.model}: /predictions answered {response.status_code}: {response.text[:200]}")
        rows.append((kind.parse(response), response.headers.get("X-Model-Version")))
    array = np.array(elements, dtype=np.object_)
    results = {}
    http = httpclient.InferenceServerClient(url=pod.url().split("://", 1)[1], network_timeout=120)
    tensor = httpclient.InferInput(kind.input.name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array, binary_data=True)
    answer = http.infer(pod.model, [tensor], headers=pod.auth)
    results["rest"] = ({o["name"]: answer.as_numpy(o["name"]) for o in answer.get_response()["outputs"]},
                       answer.get_response()["model_version"])
    channel = grpcclient.InferenceServerClient(url=pod.url("grpc").split("://", 1)[1])
    tensor = grpcclient.InferInput(kind.input.name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    answer = channel.infer(pod.model, [tensor], headers={"authorization": f"Bearer {pod.key}"}, client_timeout=120)
    results["grpc"] = ({o.name: answer.as_numpy(o.name) for o in answer.get_response().outputs},
                       answer.get_response().model_version)
    channel.close()
    for wire, (outputs, version) in results.items():
        if version != rows[0][1]:
            raise CheckFailed(f"{pod.model} v2 {wire}: version {version}, /predictions answered {rows[0][1]}")
        for spec in kind.outputs:
            for index, (row, _) in enumerate(rows):
                want, got = row[spec.name], outputs[spec.name][index]
                if not _same_tensor(want, got):
                    raise CheckFailed(f"{pod.model} v2 {wire}: {spec.name}[{index}] = {str(got)[:200]}, /predictions "
                                      f"gives {str(want)[:200]}")
    return {wire: f"{len(elements)} elements, {len(kind.outputs)} outputs each as /predictions answers (version "
                  f"{version})" for wire, (_, version) in results.items()}


def _same_tensor(want: Any, got: np.ndarray) -> bool:
    if isinstance(want, (bytes, bytearray)):
        return bytes(got) == bytes(want) if not isinstance(got, np.ndarray) else got.tobytes() == bytes(want)
    flat = np.asarray(got).reshape(-1).tolist()
    expected = np.asarray(want, dtype=object).reshape(-1).tolist()
    if len(flat) < len(expected):
        return False
    return all((e == f) if isinstance(e, (bytes, bool, np.bool_)) else same(float(e), float(f))
               for e, f in zip(expected, flat))


def check_explanation(pod: Pod, handler: str) -> dict[str, Any]:
    from load_test.inputs import requests_for

    body, content_type = requests_for(pod.model, handler)[0]
    response = pod.post(f"/explanations/{pod.model}", body, content_type, timeout=120)
    try:
        reason = response.json().get("error", "")
    except ValueError:
        reason = ""
    after = pod.post(f"/predictions/{pod.model}", body, content_type)
    if after.status_code != 200:
        raise CheckFailed(f"{pod.model}: after an explanation request, /predictions answered {after.status_code}")
    return {"status": response.status_code, "error": reason, "predictions_after": after.status_code}
