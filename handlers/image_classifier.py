"""Image classification: one image per request → its top-k classes.

Response (the shape of TorchServe's stock ``image_classifier``, so clients can switch without changes): a JSON
object mapping label → probability, ``top_k`` entries, highest first. Labels come from ``index_to_name.json``
shipped in the archive; a value that is a list (``["n01440764", "tench"]``) is shown by its last item. The answer is
``handlers/classifier.py``'s, shared with the text classifier.

Explanation (``POST /explanations/<model>``, same body): Integrated Gradients of the top class's score with respect
to the input pixels, from the mean-colour image (zero after normalisation). The answer names the class it explains
and gives a compact heat map: ``explain_grid`` x ``explain_grid`` cells over the centre crop the model sees (the
image resized to ``resize`` on its shorter side, centre ``crop``), each the share of the total absolute attribution
(they sum to 1), rows top to bottom::

    {"class": "tabby, tabby cat", "index": 281, "probability": 0.29, "grid": 14, "heatmap": [[0.0012, ...], ...],
     "steps": 4, "convergence_delta": 0.03}
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from handlers.classifier import CLASSIFIER_DEFAULTS, Classifier, softmax
from handlers.vision import ImageHandler, heat_map


class ImageClassifier(Classifier, ImageHandler):
    DEFAULTS: ClassVar[dict[str, Any]] = {**ImageHandler.DEFAULTS, **CLASSIFIER_DEFAULTS, "explain_grid": 14}

    def explanation(self, item: np.ndarray) -> dict[str, Any]:
        batch = self.collate([item])
        probabilities = softmax(self.model(batch))[0]
        index = int(probabilities.argmax())
        [inputs, baselines] = self.as_tensors(batch, np.zeros_like(batch))
        attributions, delta = self.integrated_gradients(self.explainer(), inputs, baselines, target=index)
        grid = heat_map(attributions, int(self.settings["explain_grid"]))
        return {"class": self.label(index), "index": index, "probability": round(float(probabilities[index]), 6),
                "grid": len(grid), "heatmap": grid, "steps": int(self.settings["explain_steps"]),
                "convergence_delta": round(delta, 6)}
