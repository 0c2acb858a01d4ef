"""Locust scenarios against a running TorchServe's front door (``make serve``), with its A/B splits (``make ab``).

``make load-test USERS=16 RATE=4 DURATION=60s SCENARIO=ClassifierUser`` runs one headless and writes
``load_test/results/<SCENARIO>_stats.csv`` (and the failures and history CSVs) and ``<SCENARIO>.html``.

* ``ClassifierUser``: real photos of varied sizes (213 to 1600 pixels on a side) to ``efficientnet_lite0``;
* ``DigitsUser``: held-out digits to ``digits`` (its default version);
* ``ABUser``: digits split by ``make ab``, each simulated user with its own ``X-Client-Id``; requests are reported
  under the version that answered (``digits via proxy -> 2.0``), so the report shows the split;
* ``ModelUser``: any model of the store (``MODEL=<name>``, an imported detector, segmenter, classifier or text
  model), with the requests its handler takes (``load_test/inputs.requests_for``): an answer counts when it is
  HTTP 200 with a JSON body or a PNG.

An answer counts as failed unless it is HTTP 200 with the JSON a classifier answers (top-k label → probability);
failures are listed in the report and make locust exit non-zero. Addresses and the token come from the same place as
``python -m manage``'s (``PROXY_ADDRESS``, config.properties and ``TS_*``, the key file in ``SERVE_HOME``).
"""

from __future__ import annotations

import itertools
import json
import os
import uuid

from locust import HttpUser, constant, task

from load_test import inputs
from serving.torchserve import TorchServe

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


class ModelUser(HttpUser):
    """Any model of the store, named by ``MODEL`` (make passes it as ``ARG_MODEL``)."""

    host = SERVER.inference_url
    wait_time = constant(0)

    def on_start(self) -> None:
        from archives.store import Manifest

        self.model = os.environ.get("ARG_MODEL") or os.environ.get("MODEL") or ""
        entries = [e for e in Manifest().entries() if e["model"] == self.model]
        if not entries:
            raise RuntimeError(f"ModelUser: MODEL={self.model!r} is not in the model store; make import it first")
        self.next_request = itertools.cycle(inputs.requests_for(self.model, entries[-1]["handler"])).__next__

    @task
    def predict(self) -> None:
        body, content_type = self.next_request()
        headers = {"Authorization": f"Bearer {SERVER.token('inference')}", "Content-Type": content_type}
        with self.client.post(f"/predictions/{self.model}", data=body, headers=headers, name=self.model,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:120]}")
            elif response.headers.get("Content-Type", "").startswith("image/png"):
                if not response.content.startswith(b"\x89PNG"):
                    response.failure("an image/png answer that is not a PNG")
            else:
                try:
                    json.loads(response.content)
                except ValueError:
                    response.failure(f"not JSON: {response.text[:120]}")
