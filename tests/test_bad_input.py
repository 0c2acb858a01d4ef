"""The bad-input corpus (``tests/corpus.py``) through the real front door to every model, predictions and
explanations: never a 5xx, a 4xx naming the problem where the corpus says so, every worker still the same process,
and the next good request answered."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.corpus import Case, corpus

pytestmark = pytest.mark.integration

KINDS = {"efficientnet_lite0": "image", "digits": "image", "super_resolution": "image", "minilm": "text"}
EXPLAINS = {"efficientnet_lite0", "digits", "minilm"}


def all_pids(client) -> dict[tuple[str, str], list[int]]:
    return {key: sorted(w["pid"] for w in info["workers"]) for key, info in client.registered().items()}


def send(url: str, token: str, case: Case) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if case.content_type:
        headers["Content-Type"] = case.content_type
    else:  # no Content-Type at all: requests would not add one to bytes either, but say so
        headers["Content-Type"] = None
    return requests.post(url, data=case.body, headers={k: v for k, v in headers.items() if v is not None},
                         timeout=120)


def test_the_corpus_gets_4xx_naming_the_problem_and_no_worker_dies(served, photos):
    client = served.client
    token = client.token("inference")
    front = served.env["PROXY_ADDRESS"]
    before = all_pids(client)
    jobs = []
    for model, kind in KINDS.items():
        for case in corpus():
            if case.kind not in (kind, "any"):
                continue
            jobs.append(("predictions", model, case))
            # an explanation of a valid input is slow (Integrated Gradients): the bad ones are what matter here
            if case.status != 200:
                jobs.append(("explanations", model, case))

    def run(job):
        api, model, case = job
        return job, send(f"{front}/{api}/{model}", token, case)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(run, jobs))
    server_errors = [(api, model, case.name, r.status_code, r.text[:200]) for (api, model, case), r in answers
                     if r.status_code >= 500]
    assert not server_errors, server_errors
    wrong = []
    for (api, model, case), response in answers:
        if case.status is not None and api == "predictions" and response.status_code != case.status:
            wrong.append((model, case.name, case.status, response.status_code, response.text[:160]))
        if response.status_code >= 400:
            body = response.json()
            if not (body.get("error") and body.get("message")):
                wrong.append((api, model, case.name, "no error and message", body))
            elif case.reason and api == "predictions" and body["error"] != case.reason:
                wrong.append((model, case.name, case.reason, body["error"]))
    assert not wrong, wrong
    assert all_pids(client) == before  # no worker died, none was replaced
    statuses = Counter(r.status_code for _, r in answers)
    assert statuses[200] and sum(n for status, n in statuses.items() if 400 <= status < 500) > 300, statuses
    good = client.predict("efficientnet_lite0", photos["coffee"])
    assert good.status_code == 200 and "espresso" in next(iter(good.json()))
