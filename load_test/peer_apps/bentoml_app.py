"""BentoML serving our pipeline: ``bentoml serve load_test.peer_apps.bentoml_app:Classifier`` (settings in
``PEER_SETTINGS``).

One ``@bentoml.service`` with ``workers`` processes, each loading the pipeline once, and one ``@bentoml.api`` at
``/predict``. Without batching it takes the photo's raw bytes (a positional-only ``bytes`` parameter: BentoML passes
a non-JSON body as it is) and answers our JSON. With batching (``batchable=True, max_batch_size``) BentoML's
dispatcher in each worker joins the requests' batches into one call: a request is a batch of one photo, still sent
as the raw bytes, and its answer is serialised as that photo's answer alone, so clients see the same API either way.
"""

from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType
from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from load_test.peers import BENTOML_MAX_LATENCY_MS, Pipeline, app_settings

SETTINGS, GIVEN = app_settings()

Photo = Annotated[bytes, ContentType("application/octet-stream")]
# one request of the batchable API: a batch of one photo (its raw bytes in the body) ...
Photos = Annotated[list[bytes], BeforeValidator(lambda body: [body] if isinstance(body, bytes) else body),
                   WithJsonSchema({"type": "string", "format": "binary"}), ContentType("application/octet-stream")]
# ... and its answer, the answer of that one photo
Answers = Annotated[list[dict[str, Any]], PlainSerializer(lambda answers: answers[0] if len(answers) == 1 else answers)]


@bentoml.service(workers=SETTINGS.workers, traffic={"timeout": 120})
class Classifier:
    def __init__(self) -> None:
        self.pipeline = Pipeline(GIVEN["archive"], SETTINGS.threads)

    if SETTINGS.batch > 1:
        @bentoml.api(route="/predict", batchable=True, max_batch_size=SETTINGS.batch,
                     max_latency_ms=BENTOML_MAX_LATENCY_MS)
        def predict(self, photos: Photos, /) -> Answers:
            return self.pipeline(photos)
    else:
        @bentoml.api(route="/predict")
        def predict(self, photo: Photo, /) -> dict[str, Any]:
            return self.pipeline.one(photo)
