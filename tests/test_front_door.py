"""The front door (nginx) in front of a real TorchServe: keys, methods, limits, request ids, stalled clients, health,
a killed worker under load, a worker that keeps dying, a full queue, TLS, and what is kept out (URLs, paths,
workflows, the management API)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests

from archives.store import store_of
from serving.front_door import CLIENT_TIMEOUT
from serving.instance import Instance
from serving.torchserve import TorchServe
from tests.conftest import REPO, instance, make_ca, ready_pids

pytestmark = pytest.mark.integration


def inference_headers(served) -> dict[str, str]:
    return {"Authorization": f"Bearer {served.client.token('inference')}"}


def front(served) -> str:
    return served.env["PROXY_ADDRESS"]


def json_error(response: requests.Response, status: int, reason: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["code"] == status and body["error"] == reason and body["message"], body
    assert response.headers.get("X-Request-Id")
    return body


# --- refusals --------------------------------------------------------------------------------------------------


def test_a_missing_or_wrong_key_is_401(served, photos):
    url = f"{front(served)}/predictions/efficientnet_lite0"
    for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": "Basic abc"}):
        response = requests.post(url, data=photos["chelsea"], headers=headers, timeout=30)
        json_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    json_error(requests.get(f"{front(served)}/ping", timeout=30), 401, "unauthorized")
    assert requests.get(f"{front(served)}/ping", headers=inference_headers(served), timeout=30).json()["status"] \
        == "Healthy"


def test_an_unsupported_method_is_405_naming_the_allowed_ones(served):
    headers = inference_headers(served)
    for method in ("GET", "DELETE", "PATCH", "OPTIONS"):
        response = requests.request(method, f"{front(served)}/predictions/digits", headers=headers, timeout=30)
        json_error(response, 405, "method_not_allowed")
        assert response.headers["Allow"] == "POST, PUT"
    response = requests.post(f"{front(served)}/health/ready", timeout=30)
    json_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "GET, HEAD"


def test_a_body_over_the_limit_is_413_naming_the_limit_the_same_as_torchserves(served):
    limit = int(Instance.current().properties()["max_request_size"])
    response = requests.post(f"{front(served)}/predictions/digits", data=b"\0" * (limit + 1),
                             headers=inference_headers(served), timeout=60)
    body = json_error(response, 413, "body_too_large")
    assert str(limit) in body["message"]
    # just under the limit passes the front door: the handler answers (not an image)
    response = requests.post(f"{front(served)}/predictions/digits", data=b"\0" * (limit - 1024),
                             headers=inference_headers(served), timeout=60)
    json_error(response, 400, "not_an_image")


def test_form_urlencoded_and_multipart_bodies_are_served_like_raw_ones(served, photos):
    """curl --data-binary sends application/x-www-form-urlencoded; TorchServe's frontend fails on it (500)."""
    url = f"{front(served)}/predictions/efficientnet_lite0"
    headers = inference_headers(served)
    raw = requests.put(url, data=photos["coffee"], headers=headers, timeout=30)
    form = requests.post(url, data=photos["coffee"],
                         headers={**headers, "Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    multipart = requests.post(url, files={"data": ("coffee.jpg", photos["coffee"], "image/jpeg")}, headers=headers,
                              timeout=30)
    assert raw.status_code == form.status_code == multipart.status_code == 200, (form.text, multipart.text)
    assert raw.json() == pytest.approx(form.json(), abs=1e-6) == multipart.json()
    broken = requests.post(url, data=b"--xyz\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nabc",
                           headers={**headers, "Content-Type": "multipart/form-data; boundary=xyz"}, timeout=30)
    assert 400 <= broken.status_code < 500, broken.text


def test_the_management_api_and_workflows_are_not_reachable_through_the_front_door(served):
    management_key = {"Authorization": f"Bearer {served.client.token('management')}"}
    for path in ("/models", "/models/digits", "/workflows", "/metrics", "/api-description"):
        json_error(requests.get(f"{front(served)}{path}", headers=management_key, timeout=30), 404, "not_found")
    door = served.env["PROXY_MANAGEMENT_ADDRESS"]
    assert requests.get(f"{door}/models", headers=management_key, timeout=30).status_code == 200
    json_error(requests.get(f"{door}/models", timeout=30), 401, "unauthorized")
    json_error(requests.post(f"{door}/workflows?url=x.war", headers=management_key, timeout=30), 404, "not_found")
    # folders in TorchServe's working folder (tmp, workflows) are not archives unpacked in the store
    for url in ("http://127.0.0.1:1/x.mar", "file:///etc/passwd", "/tmp", "../model_store/digits_2.0.mar", "tmp",
                "workflows", "digits_2.0/"):
        response = requests.post(f"{door}/models", params={"url": url}, headers=management_key, timeout=30)
        json_error(response, 403, "forbidden")
    response = requests.post(f"{door}/models", json={"url": "http://127.0.0.1:1/x.mar"},
                             params={"url": "digits_2.0.mar"}, headers=management_key, timeout=30)
    json_error(response, 403, "forbidden")


def test_torchserve_itself_refuses_archives_from_urls_outside_the_model_store(served, tmp_path):
    """Behind the front door, TorchServe's own allowed_urls: any URL outside the model store is refused."""
    management = Instance.current().torchserve("management")
    headers = {"Authorization": f"Bearer {served.client.token('management')}"}
    outside = tmp_path / "digits_2.0.mar"
    outside.write_bytes((REPO / "model_store" / "digits_2.0.mar").read_bytes())
    for url in ("http://127.0.0.1:1/elsewhere.mar", f"file://{outside}", "https://example.com/model.mar"):
        response = requests.post(f"{management}/models", params={"url": url, "model_name": "intruder"},
                                 headers=headers, timeout=30)
        assert response.status_code in (400, 404), (url, response.status_code, response.text)
        assert "allowed URL" in response.text or "does not match" in response.text, response.text
    assert "intruder" not in served.client.models()
    response = requests.post(f"{management}/workflows", params={"url": "http://127.0.0.1:1/x.war"}, headers=headers,
                             timeout=30)
    assert response.status_code >= 400 and "does not match" in response.text, response.text


def test_the_key_file_and_the_rendered_configuration_are_readable_by_their_owner_only(served):
    home = Path(served.env["SERVE_HOME"])
    for path in (home / "key_file.json", home / "proxy" / "nginx.conf"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


# --- request ids and the access log ----------------------------------------------------------------------------


def test_every_request_gets_an_id_that_the_access_log_names_with_version_and_latency(served, photos):
    headers = inference_headers(served)
    mine = requests.post(f"{front(served)}/predictions/digits", data=photos["chelsea"],
                         headers={**headers, "X-Request-Id": "client-chosen-42"}, timeout=30)
    assert mine.status_code == 200 and mine.headers["X-Request-Id"] == "client-chosen-42"
    theirs = requests.post(f"{front(served)}/predictions/efficientnet_lite0/1.0", data=photos["coffee"],
                           headers=headers, timeout=30)
    refused = requests.post(f"{front(served)}/predictions/digits", data=b"", timeout=30)
    ids = [theirs.headers["X-Request-Id"], refused.headers["X-Request-Id"]]
    assert all(len(i) == 32 for i in ids) and len(set(ids)) == 2
    assert requests.post(f"{front(served)}/predictions/digits", data=b"x", timeout=30,
                         headers={**headers, "X-Request-Id": "bad id \" with quotes"}).headers["X-Request-Id"] \
        not in ("bad id \" with quotes",)
    log = Path(served.env["LOG_DIR"]) / "proxy-access.log"
    deadline = time.monotonic() + 5  # the log is flushed every second
    lines: dict[str, str] = {}
    while time.monotonic() < deadline and len(lines) < 3:
        text = log.read_text()
        lines = {i: line for line in text.splitlines() for i in ["client-chosen-42", *ids] if f"id={i} " in line}
        time.sleep(0.2)
    assert " 200 " in lines["client-chosen-42"] and "version=2.0" in lines["client-chosen-42"]
    assert "version=1.0" in lines[ids[0]] and " 401 " in lines[ids[1]]
    latency = float(lines[ids[0]].split('" 200 ')[1].split()[0])
    assert 0 < latency < 30


def door_counts(served) -> dict[str, float]:
    text = requests.get(f"{served.env['PROXY_METRICS_ADDRESS']}/metrics/front_door", timeout=30).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("frontdoor_requests_total{")}


def test_the_front_doors_own_counts_are_metrics_by_version_status_and_retry(served, photos):
    before = door_counts(served)
    headers = inference_headers(served)
    assert requests.post(f"{front(served)}/predictions/digits", data=photos["chelsea"], headers=headers,
                         timeout=30).status_code == 200
    requests.post(f"{front(served)}/predictions/digits", data=photos["chelsea"], timeout=30)  # 401
    requests.get(f"{front(served)}/predictions/digits", headers=headers, timeout=30)  # 405
    requests.post(f"{front(served)}/predictions/no-such-model-{time.time_ns()}", headers=headers, data=b"x",
                  timeout=30)  # 404 from TorchServe: counted, not labelled with the made-up name
    default = served.client.default_version("digits")
    expected = {
        f'frontdoor_requests_total{{api="predictions",model="digits",retried="false",status="200",'
        f'version="{default}"}}': 1,
        'frontdoor_requests_total{api="predictions",model="digits",retried="false",status="401",version=""}': 1,
        'frontdoor_requests_total{api="predictions",model="digits",retried="false",status="405",version=""}': 1,
        'frontdoor_requests_total{api="predictions",model="other",retried="false",status="404",version=""}': 1,
    }
    deadline = time.monotonic() + 10  # the access log is flushed every second, read every half second
    while time.monotonic() < deadline:
        after = door_counts(served)
        grown = {key: after.get(key, 0) - before.get(key, 0) for key in expected}
        if all(grown[key] >= n for key, n in expected.items()):
            break
        time.sleep(0.3)
    assert all(grown[key] >= n for key, n in expected.items()), grown
    assert not any("no-such-model" in key for key in after)


# --- stalled clients -------------------------------------------------------------------------------------------


def closed_after(host: str, port: int, sent: bytes) -> float:
    """Seconds until the front door closes a connection on which ``sent`` was written and nothing more."""
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=CLIENT_TIMEOUT + 20) as connection:
        connection.sendall(sent)
        while connection.recv(4096):
            pass
    return time.monotonic() - started


def test_a_client_that_stalls_is_dropped_after_the_timeout(served):
    parsed = urlparse(front(served))
    token = served.client.token("inference")
    stalls = {
        "headers": b"POST /predictions/digits HTTP/1.1\r\nHost: x\r\n",
        "body": (f"POST /predictions/digits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Length: 100000\r\n\r\n").encode() + b"\x89PNG",
    }
    with ThreadPoolExecutor(len(stalls)) as pool:
        seconds = dict(zip(stalls, pool.map(lambda sent: closed_after(parsed.hostname, parsed.port, sent),
                                            stalls.values())))
    for what, took in seconds.items():
        assert CLIENT_TIMEOUT - 1 <= took <= CLIENT_TIMEOUT + 10, (what, took)


# --- health ----------------------------------------------------------------------------------------------------


def test_health_needs_no_key_and_names_every_version_that_takes_traffic(served):
    live = requests.get(f"{front(served)}/health/live", timeout=30)
    assert live.status_code == 200 and live.json()["live"] is True
    ready = requests.get(f"{front(served)}/health/ready", headers=inference_headers(served), timeout=30)
    assert ready.status_code == 200, ready.text
    versions = ready.json()["versions"]
    defaults = {model: served.client.default_version(model) for model in served.client.models()}
    assert set(versions) == {f"{model}/{version}" for model, version in defaults.items()}
    assert all(v["ready"] >= v["min"] for v in versions.values())


# --- a worker killed under load --------------------------------------------------------------------------------


def test_kill_9_of_a_worker_under_load_loses_no_request(served, photos):
    model, version = "efficientnet_lite0", served.client.default_version("efficientnet_lite0")
    pids = ready_pids(served.client, model, version)
    assert len(pids) >= 2, pids
    url, headers = f"{front(served)}/predictions/{model}", inference_headers(served)
    statuses: Counter = Counter()
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                response = session.post(url, data=photos["chelsea"], headers=headers, timeout=60)
                statuses[response.status_code] += 1
                if response.status_code != 200:
                    failures.append(response.text[:200])

    readiness = []
    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(client)
        time.sleep(3)
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            readiness.append(requests.get(f"{front(served)}/health/ready", timeout=30).status_code)
            if readiness[-1] == 200 and 503 in readiness and len(ready_pids(served.client, model, version)) == 2:
                break
            time.sleep(0.25)
        time.sleep(1)
        stop.set()
    assert not failures and statuses[200] > 20, (statuses, failures[:3])
    assert 503 in readiness and readiness[-1] == 200, readiness
    assert pids[0] not in ready_pids(served.client, model, version)


# --- a second, smaller instance: TLS, a full queue, a worker that keeps dying ----------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """digits 2.0 and efficientnet_lite0's default on their own TorchServe: HTTPS at the front door with a
    certificate from a throwaway CA, and a queue of 2 requests per version."""
    home = tmp_path_factory.mktemp("small")
    store = store_of(home / "store", [("digits", "2.0"), ("efficientnet_lite0", "1.1")])
    ca, cert, key = make_ca(home)
    env = {**Instance.fresh(home / "serve", store=str(store)).environment(), "TLS_CERT": str(cert), "TLS_KEY": str(key),
           "TS_JOB_QUEUE_SIZE": "2", "REQUESTS_CA_BUNDLE": str(ca)}
    env["PROXY_ADDRESS"] = env["PROXY_ADDRESS"].replace("http://", "https://")
    with instance(env):
        yield {"env": env, "ca": ca, "client": TorchServe()}


def test_tls_with_the_users_certificate(small):
    url = f"{small['env']['PROXY_ADDRESS']}/health/ready"
    assert url.startswith("https://")
    verified = subprocess.run(["curl", "-sS", "--cacert", str(small["ca"]), url], capture_output=True, text=True,
                              timeout=30)
    assert verified.returncode == 0 and json.loads(verified.stdout)["ready"] is True, verified.stderr
    unverified = subprocess.run(["curl", "-sS", url], capture_output=True, text=True, timeout=30)
    assert unverified.returncode != 0 and "certificate" in unverified.stderr, unverified
    plain = subprocess.run(["curl", "-sS", url.replace("https://", "http://")], capture_output=True, text=True,
                           timeout=30)
    assert "HTTP request was sent to HTTPS port" in plain.stdout or plain.returncode != 0


def test_a_full_queue_is_503_with_retry_after_at_once(small, photos):
    client = small["client"]
    url = f"{small['env']['PROXY_ADDRESS']}/predictions/efficientnet_lite0"
    headers = {"Authorization": f"Bearer {client.token('inference')}"}

    def send(_):
        started = time.monotonic()
        response = requests.post(url, data=photos["rocket"], headers=headers, timeout=60)
        return response, time.monotonic() - started

    with ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(send, range(96)))
    statuses = Counter(response.status_code for response, _ in answers)
    assert set(statuses) <= {200, 503} and statuses[503] > 0 and statuses[200] > 0, statuses
    for response, seconds in answers:
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "1" and response.json()["code"] == 503
            assert seconds < 5, seconds


def test_a_version_whose_worker_keeps_dying_is_not_ready_within_10_s(small):
    """Kill digits' worker each time it is back: the front door says not ready within 10 s and stays so while the
    worker is READY between deaths; TorchServe's own /ping says Healthy all along."""
    client = small["client"]
    ready_url = f"{small['env']['PROXY_ADDRESS']}/health/ready"
    ping = f"{small['env']['PROXY_ADDRESS']}/ping"
    assert requests.get(ready_url, timeout=30).status_code == 200
    killed: list[int] = []
    kill_times: list[float] = []
    answers: list[tuple[float, int, bool]] = []  # (seconds since the first kill, /health/ready, worker READY)
    started = time.monotonic()
    while len(killed) < 3 and time.monotonic() - started < 60:
        pids = ready_pids(client, "digits", "2.0")
        for pid in pids:
            if pid not in killed:
                time.sleep(1.5)  # READY for a moment, as a worker that dies on its first requests
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                kill_times.append(time.monotonic() - started)
        answers.append((time.monotonic() - started, requests.get(ready_url, timeout=30).status_code, bool(pids)))
        time.sleep(0.2)
    assert len(killed) == 3, killed
    first_503 = next(t for t, status, _ in answers if status == 503)
    assert first_503 - kill_times[0] <= 10, answers
    # from its second death on, READY between deaths is not ready
    after = [(t, status) for t, status, up in answers if t > kill_times[1] + 1 and up]  # a poll later
    assert after and all(status == 503 for _, status in after), (kill_times, answers)
    headers = {"Authorization": f"Bearer {client.token('inference')}"}
    assert any("died" in line for line in requests.get(ready_url, headers=headers, timeout=30).json()["not_ready"])
    assert requests.get(ping, headers=headers, timeout=30).json()["status"] == "Healthy"
