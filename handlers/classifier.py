"""Classification answers, shared by the classifier handlers (``image_classifier.py``, ``text_classifier.py``).

Contract: a model layer that mixes ``Classifier`` in before its task layer (``class ImageClassifier(Classifier,
ImageHandler)``) and adds ``CLASSIFIER_DEFAULTS`` to its settings answers each row of model scores (logits, one per
class) with a JSON object mapping label → probability (softmax): ``top_k`` entries, never more than there are
classes, highest first (the shape of TorchServe's stock ``image_classifier``). Labels come from ``self.mapping``
(``index_to_name.json`` in the archive); a value that is a list (``["n01440764", "tench"]``) is shown by its last
item, an index without a name by its number. ``top_class`` is the label an answer names first (metrics' class
drift).

Not a handler: TorchServe loads a handler entry module that defines exactly one class, so this mix-in lives here.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CLASSIFIER_DEFAULTS: dict[str, Any] = {"top_k": 5}  # classes per answer (fewer when the model has fewer)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Each row of scores → probabilities, in float32 (what torch.softmax gives on float32 logits)."""
    scores = np.asarray(scores, dtype=np.float32)
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


class Classifier:
    """Mix-in for a ModelHandler: ``answer`` and ``top_class`` of a classifier, one answer per row of scores."""

    def answer(self, outputs: np.ndarray, items: list) -> list[dict[str, float]]:
        return self.top_labels(outputs)

    def top_labels(self, outputs: np.ndarray) -> list[dict[str, float]]:
        """Each row of scores → {label: probability}, the ``top_k`` most probable, highest first (ties: the lower
        index first)."""
        probabilities = softmax(outputs)
        k = min(int(self.settings["top_k"]), probabilities.shape[1])
        indices = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        values = np.take_along_axis(probabilities, indices, axis=1)
        return [
            {self.label(index): value for value, index in zip(row_values, row_indices)}
            for row_values, row_indices in zip(values.tolist(), indices.tolist())
        ]

    def top_class(self, answer: dict[str, float]) -> str | None:
        return next(iter(answer), None)
