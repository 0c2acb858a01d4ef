"""Sentence embeddings: texts (see ``handlers/text.py``) → unit-length vectors; compare two with a dot product.

Response, for plain text or ``{"text": ...}``::

    {"embedding": [0.0123, ...], "tokens": 9, "truncated": false}

for ``{"texts": [...]}``: ``{"embeddings": [[...], ...], "tokens": [...], "truncated": [...]}``. ``tokens`` counts
the word pieces the model saw (special tokens included); a text longer than ``max_tokens`` is truncated, marked
``"truncated": true``, and the response carries ``X-Input-Truncated: true`` (otherwise ``false``).

Explanation (``POST /explanations/<model>``, same body, at most ``max_explained_texts`` texts): per text, Integrated
Gradients of the cosine similarity between the text's embedding and the embedding it is explained against (its own,
fixed) with respect to the word embeddings, from a baseline of padding between the special tokens: how much each word
piece makes the embedding what it is::

    {"explanations": [{"tokens": [["[CLS]", 0.01], ["cats", 0.41], ...], "steps": 4, "convergence_delta": 0.002}]}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from handlers.base import Reply
from handlers.text import TRUNCATED_HEADER, TextHandler, TextItem, rows_per_item  # noqa: F401 (the header's name)


class SentenceEmbedder(TextHandler):
    def answer(self, outputs: np.ndarray, items: list[TextItem]) -> list[Reply]:
        answers = []
        for item, vectors in zip(items, rows_per_item(np.asarray(outputs, dtype=np.float32).tolist(), items)):
            tokens = [len(encoding.ids) for encoding in item.encodings]
            truncated = item.truncated
            body = ({"embedding": vectors[0], "tokens": tokens[0], "truncated": truncated[0]} if item.single else
                    {"embeddings": vectors, "tokens": tokens, "truncated": truncated})
            answers.append(self.reply(item, body))
        return answers

    def explanation(self, item: TextItem) -> dict[str, Any]:
        return {"explanations": [self.explain_text(encoding) for encoding in item.encodings]}

    def explain_text(self, encoding) -> dict[str, Any]:
        target = self.model(*self.encoded(encoding))
        model = self.explainer()

        def similarity(words, mask, target):
            return (model.encode_embeddings(words, mask) * target).sum(dim=1)

        return self.explain_tokens(encoding, similarity, extra=self.as_tensors(target))
