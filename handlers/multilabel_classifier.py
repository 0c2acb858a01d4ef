"""Multi-label image classification: one image per request → every label that applies, each on its own.

The model's outputs are one logit per label, each read as an independent sigmoid (a chest X-ray can show several
findings, or none): unlike ``image_classifier``, the probabilities do not sum to 1 and nothing is ranked against
anything else. Preprocessing is the image classifier's (``handlers/vision.py``: resize, centre crop, normalise).

Response (JSON): each label whose probability is at or above its threshold → its probability, highest first; ``{}``
when none applies::

    {"Effusion": 0.8731, "Atelectasis": 0.6112}

Thresholds: ``thresholds`` maps a label to its own (the build can choose each on the ``EVAL`` set to maximise that
label's F1, and records them in the spec); a label without one uses ``threshold``. A request may set one threshold
for every label: ``/predictions/<model>?threshold=0.2`` (400 ``bad_option`` out of 0..1). Explanations are not
offered (400 ``no_explanations``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from handlers.vision import ImageHandler

DECIMALS = 6


# One request, decoded: its pixels (H x W x C uint8) and the options it set. A tuple, not a class: TorchServe wants
# exactly one class in a handler's entry module.
Item = tuple[np.ndarray, dict[str, Any]]


def sigmoid(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32)
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-logits))


class MultilabelClassifier(ImageHandler):
    DEFAULTS: ClassVar[dict[str, Any]] = {
        **ImageHandler.DEFAULTS,
        "threshold": 0.5,  # a label without its own threshold
        "thresholds": {},  # label → its own threshold; "f1": the build chooses each on EVAL and writes them here
    }
    OPTIONS: ClassVar[dict[str, tuple]] = {"threshold": (float, 0.0, 1.0)}

    def decode(self, payload: bytes) -> Item:
        return super().decode(payload), {}

    def with_options(self, item: Item, options: dict[str, Any]) -> Item:
        return item[0], {**item[1], **options}

    def collate(self, items: list[Item]) -> np.ndarray:
        return super().collate([pixels for pixels, _ in items])

    def label_thresholds(self, count: int) -> np.ndarray:
        own = self.settings["thresholds"] if isinstance(self.settings["thresholds"], dict) else {}
        default = float(self.settings["threshold"])
        return np.array([float(own.get(self.label(index), default)) for index in range(count)], dtype=np.float32)

    def answer(self, outputs: np.ndarray, items: list[Item]) -> list[dict[str, float]]:
        probabilities = sigmoid(outputs)
        thresholds = self.label_thresholds(probabilities.shape[1])
        answers = []
        for row, (_, options) in zip(probabilities, items):
            given = options.get("threshold")
            bar = thresholds if given is None else np.float32(given)
            chosen = np.flatnonzero(row >= bar)
            chosen = chosen[np.argsort(-row[chosen], kind="stable")]
            answers.append({self.label(int(index)): round(float(row[index]), DECIMALS) for index in chosen})
        return answers

    def top_class(self, answer: dict[str, float]) -> str | None:
        return next(iter(answer), None)
