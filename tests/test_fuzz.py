"""An API fuzzer nobody here wrote drives the front door from public API descriptions: Schemathesis (on Hypothesis)
generates requests from TorchServe's own OpenAPI description, which TorchServe serves on its inference port, and from
an OpenAPI description of the Open Inference Protocol's REST routes (``tests/v2-openapi.yaml``), and sends them to the
front door with the inference key. Nothing may answer 5xx (Schemathesis' ``not_a_server_error``), nothing may hang,
no worker of any served version may be replaced, serve.sh's own processes (TorchServe's frontend, the health checker,
the v2 gateway, nginx) stay the same, and the front door and TorchServe answer real requests afterwards.

Operations taken from TorchServe's description, each fuzzed through the front door:
  - ``GET /ping``;
  - ``POST /predictions/{model_name}`` and ``/predictions/{model_name}/{model_version}``: the body is any bytes of any
    media type (the description says only "defined by each model"), so Schemathesis sends small real images, text,
    JSON, YAML, XML, multipart and form bodies, and plain noise;
  - ``POST /explanations/{model_name}[/{model_version}]``: TorchServe serves them with the same body as
    predictions, but its 0.12 description leaves them out, so they are the predictions operations under the
    explanations path;
  - ``POST /v2/models/{model_name}/infer`` (TorchServe's own v2, any bytes): at the front door this is our gateway
    (serving/v2.py), so raw bytes of any media type reach its parser.
Left out: ``OPTIONS /`` and ``/api-description`` (the front door serves the description on its management port only),
``/metrics`` (the front door's metrics port, read-only), ``/v1/models/{model_name}:predict`` (KServe v1: the front
door does not pass it, 404), and the management and workflow APIs, which are not on the inference port at all: the
front door's management port is loopback only, takes registrations by archive name only and does not pass
``/workflows``; tests/test_front_door.py proves those refusals.

Every route of tests/v2-openapi.yaml is fuzzed: ``/v2/health/live``, ``/v2/health/ready``, ``GET /v2``, model
metadata and readiness, and ``infer``, each with and without ``/versions/{model_version}``; ``infer`` also in
Schemathesis' negative mode (bodies and headers that break the description: wrong types, missing fields,
a non-numeric ``Inference-Header-Content-Length``).

Path parameters are pinned to what is served: each templated operation runs once per served model (and per served
version of it), as a fuzzed model name only exercises the 404 of an unknown model. An input's name is drawn from the
served models' own input names (GET /v2/models/<model>) or from any string, so some fuzzed tensors reach the handlers.

Fuzzed bodies rarely make a valid v2 tensor (its shape must match its data), so the v2 operations mostly exercise
the gateway's own checks; the TorchServe operations are what reach the handlers with fuzzed bodies (their 200s), and
tests/test_v2.py proves valid v2 inference. Negative mode also breaks the Authorization header now and then: 401.

Bounded: ``FUZZ_EXAMPLES`` examples (default 15) per operation, served model (and version) and generation mode, a
quarter as many for explanations (a valid input's is Integrated Gradients, seconds each), no shrinking, 60 s at most
per request: about 650 requests in 50-120 s on two cores. ``FUZZ_SEED`` replays a run (each run prints its seed, its
request count, its 5xx count and its slowest operations); ``FUZZ_EXAMPLES=60`` fuzzes longer (about 3,000 requests).
"""

from __future__ import annotations

import copy
import os
import random
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup

from serving.instance import Instance

pytestmark = pytest.mark.integration

V2_DESCRIPTION = Path(__file__).with_name("v2-openapi.yaml")
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "15"))
# an explanation of a valid input (Schemathesis sends small real images and any text) is Integrated Gradients, seconds
# on two busy cores: a quarter as many
EXPLAIN_EXAMPLES = max(2, EXAMPLES // 4)
REQUEST_TIMEOUT = 60.0  # a handler's own limit is responseTimeout (archives/<model>.yaml); longer than that is a hang
# TorchServe's description, the operations kept: every one the front door serves on its inference port
TORCHSERVE_PATHS = ("/ping", "/predictions/{model_name}", "/predictions/{model_name}/{model_version}",
                    "/v2/models/{model_name}/infer")


@dataclass
class Run:
    """What the fuzzer sent and what came back."""

    statuses: Counter = field(default_factory=Counter)  # (method, concrete path, status) → count
    server_errors: list[str] = field(default_factory=list)  # the failure report of each 5xx, with its curl
    hangs: list[str] = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)  # operation (its label) → time spent on it

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + len(self.hangs)

    @property
    def server_error_count(self) -> int:
        return sum(n for (_, _, status), n in self.statuses.items() if status >= 500)


def torchserve_description() -> dict[str, Any]:
    """TorchServe's OpenAPI description as its inference port serves it, cut to the operations kept, with the
    explanations TorchServe serves (and its description omits) as its predictions operations under their path."""
    answer = requests.options(f"{Instance.current().torchserve('inference')}/", timeout=30)
    assert answer.status_code == 200, answer.text[:300]
    description = answer.json()
    assert description["info"]["title"] == "TorchServe APIs", description["info"]
    paths = description["paths"]
    missing = [path for path in TORCHSERVE_PATHS if path not in paths]
    assert not missing, f"TorchServe's description no longer has {missing}: {sorted(paths)}"
    kept = {path: paths[path] for path in TORCHSERVE_PATHS}
    for predictions in ("/predictions/{model_name}", "/predictions/{model_name}/{model_version}"):
        explanations = copy.deepcopy(paths[predictions])
        explanations["post"]["operationId"] = explanations["post"]["operationId"].replace("predictions",
                                                                                          "explanations")
        kept[predictions.replace("/predictions/", "/explanations/")] = explanations
    description["paths"] = kept
    return description


def v2_description(input_names: list[str]) -> dict[str, Any]:
    """tests/v2-openapi.yaml with an input's name drawn from the served models' own input names or any string."""
    description = yaml.safe_load(V2_DESCRIPTION.read_text())
    name = description["components"]["schemas"]["RequestInput"]["properties"]["name"]
    description["components"]["schemas"]["RequestInput"]["properties"]["name"] = {
        "anyOf": [{"enum": input_names}, name]}
    return description


def pins(operation, served: dict[tuple[str, str], Any]) -> list[dict[str, str]]:
    """The path parameters an operation is fuzzed with: every served model, or every served model and version."""
    names = {parameter.name for parameter in operation.iter_parameters() if parameter.location == "path"}
    if names == {"model_name", "model_version"}:
        return [{"model_name": model, "model_version": version} for model, version in sorted(served)]
    if names == {"model_name"}:
        return [{"model_name": model} for model in sorted({model for model, _ in served})]
    assert not names, f"{operation.label}: path parameters {names} are not pinned"
    return [{}]


def fuzz(schema, served: dict[tuple[str, str], Any], token: str, run: Run, fuzz_seed: int) -> None:
    """Every operation of ``schema``, at every pin, in positive mode, and in negative mode where it takes JSON."""
    session = requests.Session()
    headers = {"Authorization": f"Bearer {token}"}
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if "application/json" in operation.get_request_payload_content_types():
            modes.append(GenerationMode.NEGATIVE)
        examples = EXPLAIN_EXAMPLES if operation.path.startswith("/explanations/") else EXAMPLES
        for path_parameters in pins(operation, served):
            for mode in modes:
                # each operation, pin and mode its own stream of examples, the same for the same FUZZ_SEED
                @seed(fuzz_seed ^ zlib.crc32(f"{operation.label} {path_parameters} {mode.value}".encode()))
                @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
                def send(case) -> None:
                    try:
                        response = case.call(base_url=Instance.current().front, session=session, headers=headers,
                                             timeout=REQUEST_TIMEOUT)
                    except requests.Timeout:
                        run.hangs.append(f"{case.method} {case.formatted_path}: no answer in {REQUEST_TIMEOUT} s\n"
                                         f"{case.as_curl_command(headers=headers)}")
                        return
                    run.statuses[(case.method, case.formatted_path, response.status_code)] += 1
                    try:
                        case.validate_response(response, checks=[not_a_server_error], headers=headers)
                    except FailureGroup as failures:
                        run.server_errors.append(f"{failures}\nanswer: {response.text[:300]}")

                started = time.monotonic()
                send()
                run.seconds[operation.label] += time.monotonic() - started


def worker_pids(client) -> dict[tuple[str, str], list[int]]:
    """Every worker of every registered version, READY or not."""
    return {key: sorted(worker["pid"] for worker in info["workers"]) for key, info in client.registered().items()}


def test_a_fuzzer_from_the_public_api_descriptions_gets_no_5xx_and_no_worker_dies(served, photos, capsys):
    client = served.client
    assert Instance.current().torchserve("inference") == served.env["TS_INFERENCE_ADDRESS"]
    assert Instance.current().front == served.env["PROXY_ADDRESS"]
    token = client.token("inference")
    home = Path(served.env["SERVE_HOME"])
    registered = client.registered()
    workers, processes = worker_pids(client), Instance.at(home).pids()
    assert set(processes) == {"frontend", "health checker", "v2 gateway", "nginx master"}, processes
    input_names = sorted({tensor["name"] for model in {model for model, _ in registered}
                          for tensor in requests.get(f"{Instance.current().front}/v2/models/{model}", timeout=30)
                          .json()["inputs"]})
    fuzz_seed = int(os.environ.get("FUZZ_SEED") or random.randrange(2**32))

    run = Run()
    started = time.monotonic()
    for description in (torchserve_description(), v2_description(input_names)):
        fuzz(schemathesis.openapi.from_dict(description), registered, token, run, fuzz_seed)
    seconds = time.monotonic() - started
    workers_after, processes_after = worker_pids(client), Instance.at(home).pids()

    by_status = Counter()
    for (_, _, status), count in run.statuses.items():
        by_status[status] += count
    routes = len({(method, path) for method, path, _ in run.statuses})
    inferred = sum(n for (method, _, status), n in run.statuses.items() if method == "POST" and status == 200)
    refused = sum(n for status, n in by_status.items() if 400 <= status < 500)
    with capsys.disabled():
        print(f"\nfuzz: {run.requests} requests to {routes} routes in {seconds:.0f} s (FUZZ_SEED={fuzz_seed}, "
              f"FUZZ_EXAMPLES={EXAMPLES}): {run.server_error_count} answered 5xx, {len(run.hangs)} hung; "
              f"statuses {dict(sorted(by_status.items()))}; slowest: "
              + ", ".join(f"{label} {spent:.0f} s" for label, spent in run.seconds.most_common(3)))
    problems = run.server_errors + run.hangs
    if workers_after != workers:  # a worker died or was replaced
        problems.append(f"workers before the fuzz {workers}, after {workers_after}")
    if processes_after != processes:  # TorchServe's frontend, the health checker, the v2 gateway or nginx
        problems.append(f"serve.sh's processes before the fuzz {processes}, after {processes_after}")
    assert not problems, "\n\n".join(problems[:10])
    # fuzzed bodies reached the handlers (a POST answered 200: real inference) and were refused as they should be
    assert inferred and refused, run.statuses

    good = client.predict("efficientnet_lite0", photos["coffee"])
    assert good.status_code == 200 and "espresso" in next(iter(good.json())), good.text[:300]
    text = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["A cat sleeps on the sofa."]}]}
    v2 = requests.post(f"{Instance.current().front}/v2/models/minilm/infer", json=text, timeout=60,
                       headers={"Authorization": f"Bearer {token}"})
    assert v2.status_code == 200 and {o["name"] for o in v2.json()["outputs"]} >= {"embedding"}, v2.text[:300]
    ping = requests.get(f"{Instance.current().torchserve('inference')}/ping", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy", ping.text[:300]
