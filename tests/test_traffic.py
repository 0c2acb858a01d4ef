"""Versions and A/B through the real nginx proxy in front of a real TorchServe: weighted and sticky splits, promote
and rollback, and a live switch under load with every answer checked."""

from __future__ import annotations

import math
import re
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import requests

from export import digits
from export.samples import encode
from serving.front_door import Proxy, parse_split
from serving.instance import ServeError
from tests.conftest import manage, ok, one_line_error

pytestmark = pytest.mark.integration

IMAGES = [encode(image, "PNG") for image in digits.held_out()[0][:20]]
VERSIONS = ("1.0", "2.0")


@pytest.fixture(scope="module")
def expected(served) -> dict[tuple[int, str], dict]:
    """Each image's answer from each version, asked at the version's own URL, without the proxy."""
    answers = {}
    for version in VERSIONS:
        for index, payload in enumerate(IMAGES):
            response = served.client.predict("digits", payload, version)
            assert response.status_code == 200
            answers[index, version] = response.json()
    return answers


def via_proxy(served, payload: bytes, client_id: str | None = None, session=requests) -> requests.Response:
    headers = {"Authorization": f"Bearer {served.client.token('inference')}"}  # no Content-Type: the proxy fixes it
    if client_id:
        headers["X-Client-Id"] = client_id
    return session.post(f"{served.env['PROXY_ADDRESS']}/predictions/digits", data=payload, headers=headers,
                        timeout=60)


def served_count(served, version: str) -> float:
    """TorchServe's own ts_inference_requests_total for a digits version."""
    text = requests.get(served.env["PROXY_METRICS_ADDRESS"] + "/metrics", timeout=10).text
    pattern = rf'^ts_inference_requests_total{{[^}}]*model_name="digits",model_version="{re.escape(version)}"[^}}]*}} (\S+)'
    return sum(float(m) for m in re.findall(pattern, text, flags=re.MULTILINE))


def versions_of(served, count: int, client_ids: list[str | None]) -> list[str]:
    def one(i: int) -> str:
        response = via_proxy(served, IMAGES[i % len(IMAGES)], client_ids[i % len(client_ids)])
        assert response.status_code == 200, response.text
        return response.headers["X-Model-Version"]

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def within_three_sigma(hits: int, total: int, share: float) -> bool:
    return abs(hits - total * share) <= 3 * math.sqrt(total * share * (1 - share))


def test_split_follows_the_weights_and_torchserve_counts_the_real_versions(served, restored):
    ok(manage("ab", "digits", "1.0=90", "2.0=10"))
    before = {v: served_count(served, v) for v in VERSIONS}
    answered = Counter(versions_of(served, 2000, [None]))
    assert answered.keys() == set(VERSIONS)
    assert within_three_sigma(answered["1.0"], 2000, 0.9), answered
    print(f"split 1.0=90 2.0=10 over 2000 requests: {dict(answered)}")
    assert {v: served_count(served, v) - before[v] for v in VERSIONS} == dict(answered)


def test_keyed_clients_never_change_version(served, restored):
    ok(manage("ab", "digits", "1.0=90", "2.0=10"))
    clients = [f"client-{i}" for i in range(200)]
    seen: dict[str, set[str]] = {}
    for client, version in zip(clients * 3, versions_of(served, 600, clients)):
        seen.setdefault(client, set()).add(version)
    assert all(len(versions) == 1 for versions in seen.values())
    on_new = sum(versions == {"2.0"} for versions in seen.values())
    assert within_three_sigma(on_new, len(clients), 0.1), on_new
    print(f"200 keyed clients x 3 requests: {on_new} on 2.0, none changed version")

    ok(manage("ab", "digits", "1.0=50", "2.0=50"))  # ramping up 2.0 only moves clients onto it
    after = dict(zip(clients, versions_of(served, len(clients), clients)))
    assert all(after[client] == "2.0" for client, versions in seen.items() if versions == {"2.0"})
    assert within_three_sigma(sum(v == "2.0" for v in after.values()), len(clients), 0.5)


def test_a_new_split_keeps_the_default_promote_moves_it_and_rollback_restores_both(served, restored):
    ok(manage("set-default", "digits", "1.0"))
    ok(manage("ab", "digits", "1.0=90", "2.0=10"))
    assert served.client.default_version("digits") == "1.0"  # a split never makes a version the default

    ok(manage("promote", "digits", "2.0"))
    assert served.client.default_version("digits") == "2.0"
    assert Proxy().serving()["models"]["digits"] == {"split": {"2.0": 100.0}, "default": "2.0"}
    assert set(versions_of(served, 50, [None, "a", "b"])) == {"2.0"}

    ok(manage("rollback", "digits"))
    assert served.client.default_version("digits") == "1.0"
    assert Proxy().serving()["models"]["digits"] == {"split": {"1.0": 90.0, "2.0": 10.0}, "default": "1.0"}
    assert set(versions_of(served, 200, [None])) == set(VERSIONS)

    ok(manage("rollback", "digits"))  # back to before the split: everything to 1.0
    assert set(versions_of(served, 50, [None])) == {"1.0"}
    assert "no earlier split or default" in one_line_error(manage("rollback", "digits"))


def test_unregistered_versions_bad_splits_and_versions_in_use_are_refused(served, restored):
    assert "digits 9.9 is not registered" in one_line_error(manage("ab", "digits", "1.0=50", "9.9=50"))
    assert "not VERSION=WEIGHT" in one_line_error(manage("ab", "digits", "1.0"))
    assert "no traffic" in one_line_error(manage("ab", "digits", "1.0=0"))
    assert "nosuch is not registered" in one_line_error(manage("ab", "nosuch", "1.0=1"))
    assert "no earlier split" in one_line_error(manage("rollback", "digits"))
    ok(manage("ab", "digits", "1.0=90", "2.0=10"))
    assert "still takes 10%" in one_line_error(manage("unregister", "digits", "2.0"))
    assert served.client.registered().get(("digits", "2.0")) is not None


def test_parse_split():
    assert parse_split(["1.0=90 2.0=10"]) == {"1.0": 90, "2.0": 10}
    assert parse_split(["1.0=1,2.0=0", "3.0=3"]) == {"1.0": 1, "3.0": 3}
    for bad in ("1.0=-1", "1.0=1 1.0=2", "=5", "1.0=1e-9 2.0=1"):
        with pytest.raises(ServeError):
            parse_split([bad])


@dataclass
class Answer:
    sent: float
    version: str
    problem: str | None


@dataclass
class Load:
    """Clients sending digits through the proxy until stopped, half of them keyed; every answer is checked against
    what the version that answered gives for that image at its own URL."""

    served: object
    expected: dict
    clients: int = 4
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self):
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(self.clients)]

    def client(self, number: int) -> None:
        session = requests.Session()
        key = str(uuid.uuid4()) if number % 2 else None
        index = number
        while not self.done.is_set():
            index = (index + 1) % len(IMAGES)
            sent = time.monotonic()
            try:
                response = via_proxy(self.served, IMAGES[index], key, session)
            except requests.RequestException as error:
                self.answers.append(Answer(sent, "", f"{type(error).__name__}: {error}"))
                continue
            version = response.headers.get("X-Model-Version", "")
            problem = None
            if response.status_code != 200:
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            elif (index, version) not in self.expected:
                problem = f"answered by unexpected version {version!r}"
            elif response.json() != pytest.approx(self.expected[index, version], abs=1e-4):
                problem = f"image {index} from {version}: {response.text[:200]} differs from its own URL's answer"
            self.answers.append(Answer(sent, version, problem))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join()


def test_a_live_switch_under_load_drops_nothing(served, expected, restored):
    """Production on 1.0; under continuous load: register 2.0, split 90/10, ramp up in four more reloads, promote
    2.0, unregister 1.0."""
    ok(manage("set-default", "digits", "1.0"))
    ok(manage("unregister", "digits", "2.0"))
    ok(manage("ab", "digits", "1.0=100"))
    steps = {}
    with Load(served, expected) as load:
        time.sleep(1)
        for step, command in [("register", ("register", "digits", "2.0")),
                              ("split", ("ab", "digits", "1.0=90", "2.0=10")),
                              *[(f"ramp {share}", ("ab", "digits", f"1.0={100 - share}", f"2.0={share}"))
                                for share in (20, 35, 50, 75)],
                              ("promote", ("promote", "digits", "2.0")),
                              ("unregister", ("unregister", "digits", "1.0"))]:
            ok(manage(*command))
            steps[step] = time.monotonic()
            time.sleep(1)
    problems = [a.problem for a in load.answers if a.problem]
    assert not problems, f"{len(problems)} of {len(load.answers)} requests failed: {problems[:5]}"
    assert len(load.answers) > 200
    during_split = {a.version for a in load.answers if steps["split"] < a.sent < steps["ramp 20"]}
    after_promote = {a.version for a in load.answers if a.sent > steps["promote"]}
    assert during_split == set(VERSIONS) and after_promote == {"2.0"}
    print(f"live switch: {len(load.answers)} requests, 0 failed, {Counter(a.version for a in load.answers)}")
