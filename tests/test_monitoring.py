"""A real Prometheus (the ``prometheus`` binary) scrapes the tests' real TorchServe during a burst of requests; PromQL
over its HTTP API must count exactly the requests sent, per real version, and give latencies the client can vouch for.

Other tests use the same TorchServe, so every number here is a difference between two moments that Prometheus scraped
while nothing else was sending: ``X @ after - X @ before``.
"""

from __future__ import annotations

import itertools
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from export import digits
from export.samples import encode
from monitoring.prometheus import JOB, Prometheus
from serving.instance import free_ports
from tests.test_dashboard import load, targets

pytestmark = pytest.mark.integration

SCRAPE = "1s"
# the Prometheus Java client's default histogram buckets, which TorchServe uses (seconds)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, float("inf"))


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run ./install.sh")
    [port] = free_ports(1)
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{port}")
    server.start(served.env["PROXY_METRICS_ADDRESS"], scrape_interval=SCRAPE)  # the front door's, as make monitor
    try:
        yield server
    finally:
        assert server.stop()


def last_scrape(prometheus: Prometheus) -> float:
    """When Prometheus last scraped TorchServe successfully (0 if never). timestamp() gives a sample's own time only
    when applied to a plain selector: on `up == 1` it would give the evaluation time."""
    result = prometheus.query(f'timestamp(up{{job="{JOB}"}}) and up{{job="{JOB}"}} == 1')
    return float(result[0]["value"][1]) if result else 0.0


def settled(prometheus: Prometheus, promql: str, timeout: float = 30.0) -> float:
    """The time of a scrape at which ``promql`` had the same value as at the scrape before: everything sent before
    has reached Prometheus."""
    deadline = time.monotonic() + timeout
    previous = (None, None)
    while time.monotonic() < deadline:
        scraped = last_scrape(prometheus)
        if scraped and scraped != previous[0]:
            value = by_labels(prometheus.query(promql, at=scraped))
            if value == previous[1]:
                return scraped
            previous = (scraped, value)
        time.sleep(0.2)
    raise AssertionError(f"{promql} did not settle within {timeout:g} s (last: {previous})")


def by_labels(result: list[dict]) -> dict[tuple, float]:
    return {tuple(sorted(item["metric"].items())): float(item["value"][1]) for item in result}


def increase(prometheus: Prometheus, expression: str, by: str, before: float, after: float) -> dict[str, float]:
    """sum by (<by>) of a counter expression at ``after`` minus at ``before``, keyed by the value of <by>."""
    query = f"sum by ({by}) ({expression} @ {after:.3f}) - sum by ({by}) ({expression} @ {before:.3f})"
    return {item["metric"].get(by, ""): float(item["value"][1]) for item in prometheus.query(query)}


def test_prometheus_counts_every_request_by_the_version_that_answered(served, prometheus, photos):
    images, _ = digits.held_out()
    pngs = itertools.cycle([encode(image, "PNG") for image in images[:20]])
    # (model, version in the URL or None for the default route, payload)
    jobs = ([("digits", None, next(pngs))] * 12 + [("digits", "1.0", next(pngs))] * 9
            + [("digits", "2.0", next(pngs))] * 6 + [("digits", "1.0", b"not an image")] * 2
            + [("efficientnet_lite0", None, photos[name]) for name in ("coffee", "chelsea", "rocket")] * 3)
    jobs = jobs[::2] + jobs[1::2]
    for model, version, payload in set(jobs):  # each kind of request once, so that its series exist before the burst
        served.client.predict(model, payload, version)
    watched = "sum by (model_name, model_version) (handler_request_seconds_count)"
    before = settled(prometheus, watched)

    def send(job):
        model, version, payload = job
        started = time.perf_counter()
        response = served.client.predict(model, payload, version)
        return job, response, time.perf_counter() - started

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, jobs))
    after = settled(prometheus, watched)
    assert after > before

    defaults = {model: served.client.default_version(model) for model in ("digits", "efficientnet_lite0")}
    served_by = Counter()  # (model, version that answered): requests
    for (model, version, payload), response, _ in results:
        assert response.status_code == (400 if payload == b"not an image" else 200), response.text
        served_by[model, version or defaults[model]] += 1
    counted = increase(prometheus, 'handler_request_seconds_count{model_name="digits"}', "model_version", before, after)
    assert counted == {"1.0": served_by["digits", "1.0"], "2.0": served_by["digits", "2.0"]} == {"1.0": 11, "2.0": 18}
    # TorchServe's own counter files the default-routed requests under "default"
    routed = increase(prometheus, 'ts_inference_requests_total{model_name="digits"}', "model_version", before, after)
    assert routed == {"default": 12, "1.0": 11, "2.0": 6}
    refused = increase(prometheus, "handler_bad_inputs_total", "model_version", before, after)
    assert {version: n for version, n in refused.items() if n} == {"1.0": 2}
    top1 = increase(prometheus, 'handler_top1_total{model_name="efficientnet_lite0"}', "class", before, after)
    assert {name: n for name, n in top1.items() if n} == {"espresso": 3, "Egyptian cat": 3, "missile": 3}

    for model, version in served_by:
        latencies = sorted(seconds for (m, v, _), _, seconds in results if m == model and (v or defaults[m]) == version)
        check_latency_histogram(prometheus, model, version, latencies, before, after)


def check_latency_histogram(prometheus, model, version, latencies, before, after):
    """The handler's part of a request's time is inside what the client measured for that request, so at every bucket
    bound at least as many handler times as client latencies lie below; and the p99 that histogram_quantile gives
    lies within the latencies the client measured, up to the bucket that holds the slowest."""
    selector = f'handler_request_seconds_bucket{{model_name="{model}",model_version="{version}"}}'
    buckets = increase(prometheus, selector, "le", before, after)
    assert set(map(float, buckets)) == set(BUCKETS), buckets
    assert buckets["+Inf"] == len(latencies)
    for bound in BUCKETS:
        assert buckets[_le(bound)] >= sum(latency <= bound for latency in latencies), (model, version, bound, buckets)
    burst = f"(sum by (le) ({selector} @ {after:.3f}) - sum by (le) ({selector} @ {before:.3f}))"
    [p99] = prometheus.query(f"histogram_quantile(0.99, {burst})")
    p99 = float(p99["value"][1])
    slowest_bucket = next(bound for bound in BUCKETS if latencies[-1] <= bound)
    assert 0 < p99 <= slowest_bucket, (model, version, p99, latencies)


def _le(bound: float) -> str:
    """A bucket bound as the Java client writes it in its le label."""
    return "+Inf" if bound == float("inf") else repr(bound)


def test_every_dashboard_query_answers(served, prometheus, photos):
    """The Grafana dashboard's PromQL, run by the real Prometheus (Grafana's $model and $__rate_interval filled in)."""
    images, _ = digits.held_out()
    for version in ("1.0", "2.0", None):
        assert served.client.predict("digits", encode(images[0], "PNG"), version).status_code == 200
    assert served.client.predict("digits", b"not an image").status_code == 400
    time.sleep(2)  # two more scrapes: rate() needs two samples since these requests
    settled(prometheus, "sum by (model_version) (handler_request_seconds_count)")
    for target in targets(load()):
        expr = target["expr"].replace("$__rate_interval", "1m").replace("${model}", "digits")
        result = prometheus.query(expr.replace("$model", "digits"))
        if target["legendFormat"] != "5xx":  # TorchServe has that series only once it has answered a 5xx
            assert result, (target["legendFormat"], expr)
