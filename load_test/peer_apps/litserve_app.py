"""LitServe serving our pipeline: ``python -m load_test.peer_apps.litserve_app`` (settings in ``PEER_SETTINGS``).

A ``LitAPI`` on a ``LitServer``: ``workers_per_device`` inference processes on the CPU, LitServe's own API server
processes in front (its default count), and its dynamic batching (``max_batch_size``, ``batch_timeout``). The request
body is the photo's raw bytes (FastAPI reads a ``bytes`` body as it is).
"""

# no ``from __future__ import annotations``: LitServe reads decode_request's annotation to build its endpoint
from typing import Annotated

import litserve as ls
from fastapi import Body

from load_test.peers import Pipeline, app_settings

SETTINGS, GIVEN = app_settings()


class Classifier(ls.LitAPI):
    def setup(self, device):
        self.pipeline = Pipeline(GIVEN["archive"], SETTINGS.threads)

    def decode_request(self, request: Annotated[bytes, Body(media_type="application/octet-stream")]) -> bytes:
        return request

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def predict(self, x):
        return self.pipeline(x) if SETTINGS.batch > 1 else self.pipeline.one(x)

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    api = Classifier(max_batch_size=SETTINGS.batch, batch_timeout=SETTINGS.wait_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=SETTINGS.workers, timeout=120)
    server.run(host="127.0.0.1", port=GIVEN["port"], log_level="warning", generate_client_file=False)
