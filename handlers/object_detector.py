"""Object detection: one image per request → the objects in it, boxes in the image's own pixels.

The model takes one whole image at its own size (``handlers/vision.py``, ``WholeImageHandler``: scaled to [0, 1],
not normalised: torchvision's detectors resize and normalise inside, as they were trained) and returns three
arrays for it: boxes (N x 4, x1 y1 x2 y2 in the input's pixels), label indices (N) and scores (N), the shape of
torchvision's ``fasterrcnn_*``, ``retinanet_*``, ``fcos_*`` and ``ssd*`` models (the build exports them so:
``export/tasks.py``). Labels come from ``index_to_name.json``; index 0 is torchvision's background.

Response (JSON), the detections at or above ``threshold``, highest score first, at most ``max_detections``::

    {"detections": [{"label": "dog", "index": 18, "score": 0.9712, "box": [12.5, 40.0, 233.1, 310.75]}, ...],
     "width": 640, "height": 480}

``box`` is ``[x1, y1, x2, y2]`` in the pixels of the image as sent (upright, its EXIF orientation applied), to 0.01
pixel. Both bounds may be set per request: ``/predictions/<model>?threshold=0.3&max_detections=10`` (through the front door; to TorchServe's
own port, the header ``X-Query: threshold=0.3``); a value out of
range is 400 ``bad_option``. Explanations are not offered (400 ``no_explanations``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from handlers.vision import Picture, WholeImageHandler

BOX_DECIMALS = 2
SCORE_DECIMALS = 6


class ObjectDetector(WholeImageHandler):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **WholeImageHandler.DEFAULTS,
        "mean": [0.0, 0.0, 0.0],  # torchvision's detectors normalise inside the model
        "std": [1.0, 1.0, 1.0],
        "threshold": 0.5,  # the lowest score answered
        "max_detections": 100,  # the most detections in one answer
    }
    OPTIONS: ClassVar[dict[str, tuple]] = {"threshold": (float, 0.0, 1.0), "max_detections": (int, 1, 1000)}

    def answer(self, outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], items: list[Picture]) -> list[dict]:
        return [self.detections(output, item) for output, item in zip(outputs, items)]

    def detections(self, output: tuple[np.ndarray, np.ndarray, np.ndarray], item: Picture) -> dict[str, Any]:
        boxes, labels, scores = (np.asarray(array) for array in output)
        keep = np.flatnonzero(scores >= self.option(item, "threshold"))
        keep = keep[np.argsort(-scores[keep], kind="stable")][:self.option(item, "max_detections")]
        x_scale, y_scale = item.scale
        boxes = boxes[keep].astype(np.float64) * np.array([x_scale, y_scale, x_scale, y_scale])
        boxes = np.clip(boxes, 0, [item.width, item.height, item.width, item.height])
        return {"detections": [{"label": self.label(int(index)), "index": int(index),
                                "score": round(float(score), SCORE_DECIMALS),
                                "box": [round(float(v), BOX_DECIMALS) for v in box]}
                               for box, index, score in zip(boxes, labels[keep], scores[keep])],
                "width": item.width, "height": item.height}

    def top_class(self, answer: dict) -> str | None:
        return answer["detections"][0]["label"] if answer["detections"] else None
