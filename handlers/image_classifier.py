"""Image classification: one image per request → its top-k classes.

Response (the shape of TorchServe's stock ``image_classifier``, so clients can switch without changes): a JSON
object mapping label → probability, ``top_k`` entries, highest first. Labels come from ``index_to_name.json``
shipped in the archive; a value that is a list (``["n01440764", "tench"]``) is shown by its last item. The top-1
label of each answer is counted per version (``handler_top1_total``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from handlers.vision import ImageHandler


class ImageClassifier(ImageHandler):
    DEFAULTS: ClassVar[dict[str, Any]] = {**ImageHandler.DEFAULTS, "top_k": 5}

    def answer(self, outputs: torch.Tensor) -> list[dict[str, float]]:
        probabilities = torch.softmax(outputs.float(), dim=1)
        k = min(int(self.settings["top_k"]), probabilities.shape[1])
        values, indices = probabilities.topk(k, dim=1)
        return [
            {self.label(index): value for value, index in zip(row_values, row_indices)}
            for row_values, row_indices in zip(values.tolist(), indices.tolist())
        ]

    def top_class(self, answer: dict[str, float]) -> str | None:
        return next(iter(answer), None)

    def label(self, index: int) -> str:
        name = (self.mapping or {}).get(str(index), str(index))
        return name[-1] if isinstance(name, list) else name
