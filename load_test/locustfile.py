"""Locust scenarios against a running TorchServe's front door (``make serve``), with its A/B splits (``make ab``).

``make load-test USERS=16 RATE=4 DURATION=60s SCENARIO=ClassifierUser`` runs one headless and writes
``load_test/results/<SCENARIO>_stats.csv`` (and the failures and history CSVs) and ``<SCENARIO>.html``.

* ``ClassifierUser``: real photos of varied sizes (213 to 1600 pixels on a side) to ``efficientnet_lite0``;
* ``DigitsUser``: held-out digits to ``digits`` (its default version);
* ``ABUser``: digits split by ``make ab``, each simulated user with its own ``X-Client-Id``; requests are reported
  under the version that answered (``digits via proxy -> 2.0``), so the report shows the split.

An answer counts as failed unless it is HTTP 200 with the JSON a classifier answers (top-k label → probability);
failures are listed in the report and make locust exit non-zero. Addresses and the token come from the same place as
``python -m manage``'s (``PROXY_ADDRESS``, config.properties and ``TS_*``, the key file in ``SERVE_HOME``).
"""

from __future__ import annotations

import itertools
import uuid

from locust import HttpUser, constant, task

from load_test import inputs
from manage.client import TorchServe


SERVER = TorchServe()
PHOTOS = list(inputs.photos().values())
DIGITS = inputs.digits()


class Classified(HttpUser):
    """A user who sends one payload after another and checks each answer."""

    abstract = True
    wait_time = constant(0)
    model = ""
    payloads: list[bytes] = []

    def on_start(self) -> None:
        self.next_payload = itertools.cycle(self.payloads).__next__

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {SERVER.token('inference')}", "Content-Type": "application/octet-stream"}

    def send(self, name: str, path: str, headers: dict[str, str]) -> None:
        with self.client.post(path, data=self.next_payload(), headers=headers, name=name,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:120]}")
                return
            try:
                answer = response.json()
                ok = isinstance(answer, dict) and answer and all(0 <= p <= 1 for p in answer.values())
            except ValueError:
                ok = False
            if not ok:
                response.failure(f"not a classifier answer: {response.text[:120]}")
            elif "->" in name:
                response.request_meta["name"] = f"{name} {response.headers.get('X-Model-Version', '?')}"


class ClassifierUser(Classified):
    host = SERVER.inference_url
    payloads = PHOTOS

    @task
    def classify(self) -> None:
        self.send("efficientnet_lite0", "/predictions/efficientnet_lite0", self.headers())


class DigitsUser(Classified):
    host = SERVER.inference_url
    payloads = DIGITS

    @task
    def digit(self) -> None:
        self.send("digits", "/predictions/digits", self.headers())


class ABUser(Classified):
    host = SERVER.inference_url
    payloads = DIGITS

    def on_start(self) -> None:
        super().on_start()
        self.client_id = str(uuid.uuid4())

    @task
    def digit(self) -> None:
        self.send("digits via proxy ->", "/predictions/digits", {**self.headers(), "X-Client-Id": self.client_id})
