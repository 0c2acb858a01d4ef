"""Text classification: texts (see ``handlers/text.py``) → their top-k classes.

Response, for plain text or ``{"text": ...}``: a JSON object mapping label → probability (softmax of the model's
logits), ``top_k`` entries (never more than the model has classes), highest first: the image classifier's shape
(``handlers/classifier.py``)::

    {"positive": 0.93, "negative": 0.07}

for ``{"texts": [...]}``: ``{"predictions": [{...}, ...], "truncated": [...]}``, one per text in order. Labels come
from ``index_to_name.json`` in the archive (a Hugging Face model's ``id2label``). A text longer than ``max_tokens`` is
truncated, and the response carries ``X-Input-Truncated: true`` (otherwise ``false``).

Explanation (``POST /explanations/<model>``, same body, at most ``max_explained_texts`` texts): per text, Integrated
Gradients of the top class's logit with respect to the word embeddings, from a baseline of padding between the special
tokens: how much each word piece pushes the text towards the class it is given::

    {"explanations": [{"class": "positive", "index": 1, "probability": 0.93,
                       "tokens": [["[CLS]", 0.01], ["great", 0.82], ...], "truncated": false, "steps": 8,
                       "convergence_delta": 0.004}]}
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from handlers.base import Reply
from handlers.classifier import CLASSIFIER_DEFAULTS, Classifier, softmax
from handlers.text import TextHandler, TextItem, rows_per_item


class TextClassifier(Classifier, TextHandler):
    DEFAULTS: ClassVar[dict[str, Any]] = {**TextHandler.DEFAULTS, **CLASSIFIER_DEFAULTS}

    def answer(self, outputs: np.ndarray, items: list[TextItem]) -> list[Reply]:
        answers = []
        for item, predictions in zip(items, rows_per_item(self.top_labels(outputs), items)):
            body = predictions[0] if item.single else {"predictions": predictions, "truncated": item.truncated}
            answers.append(self.reply(item, body))
        return answers

    def top_class(self, answer: Reply) -> str | None:
        """The first text's top class (a label's value is a probability, never a list)."""
        body = answer.body
        return super().top_class(body["predictions"][0] if isinstance(body.get("predictions"), list) else body)

    def explanation(self, item: TextItem) -> dict[str, Any]:
        return {"explanations": [self.explain_class(encoding) for encoding in item.encodings]}

    def explain_class(self, encoding) -> dict[str, Any]:
        probabilities = softmax(self.model(*self.encoded(encoding)))[0]
        index = int(probabilities.argmax())
        model = self.explainer()

        def logits(words, mask):
            return model.encode_embeddings(words, mask)

        return {"class": self.label(index), "index": index, "probability": round(float(probabilities[index]), 6),
                **self.explain_tokens(encoding, logits, target=index)}
