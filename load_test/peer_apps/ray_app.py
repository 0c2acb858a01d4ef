"""Ray Serve serving our pipeline: ``python -m load_test.peer_apps.ray_app`` (settings in ``PEER_SETTINGS``).

The app starts a local Ray (raylet, GCS, dashboard), then Serve (its controller and HTTP proxy) on the given port,
and deploys one ``@serve.deployment`` with ``num_replicas`` replicas of ``num_cpus`` = threads each (and room for
every client's request: ``max_ongoing_requests``, see ``load_test/peers.py``). A replica's
``__call__`` reads the raw body and, with batching on, awaits a ``@serve.batch`` method (``max_batch_size``,
``batch_wait_timeout_s``) that runs the pipeline on the batch. SIGINT or SIGTERM shuts Serve and Ray down.
"""

from __future__ import annotations

import signal
import sys

import ray
from ray import serve
from starlette.requests import Request

from load_test.peers import RAY_MAX_ONGOING_REQUESTS, Pipeline, app_settings


@serve.deployment
class Classifier:
    def __init__(self, archive: str, threads: int, batch: int, wait_s: float):
        self.pipeline = Pipeline(archive, threads)
        self.batched = batch > 1
        if self.batched:
            self.predict_batch.set_max_batch_size(batch)
            self.predict_batch.set_batch_wait_timeout_s(wait_s)

    async def __call__(self, request: Request):
        body = await request.body()
        if self.batched:
            return await self.predict_batch(body)
        return self.pipeline.one(body)

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.002)  # set from the settings in __init__
    async def predict_batch(self, bodies: list[bytes]) -> list:
        return self.pipeline(bodies)


def main() -> None:
    settings, given = app_settings()
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _temp_dir=given["scratch"], log_to_driver=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # after ray.init, which sets a handler of its own
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": given["port"]})
        app = Classifier.options(num_replicas=settings.workers, ray_actor_options={"num_cpus": settings.threads},
                                 max_ongoing_requests=RAY_MAX_ONGOING_REQUESTS)
        serve.run(app.bind(given["archive"], settings.threads, settings.batch, settings.wait_ms / 1000),
                  name="classifier", route_prefix="/predict")
        print("deployed", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
