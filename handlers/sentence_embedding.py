"""Sentence embeddings: texts (see ``handlers/text.py``) → unit-length vectors; compare two with a dot product.

Response, for plain text or ``{"text": ...}``::

    {"embedding": [0.0123, ...], "tokens": 9, "truncated": false}

for ``{"texts": [...]}``: ``{"embeddings": [[...], ...], "tokens": [...], "truncated": [...]}``. ``tokens`` counts
the word pieces the model saw (special tokens included); a text longer than ``max_tokens`` is truncated, marked
``"truncated": true``, and the response carries ``X-Input-Truncated: true`` (otherwise ``false``).

Explanation (``POST /explanations/<model>``, same body): per text, Integrated Gradients of the cosine similarity
between the text's embedding and the embedding it is explained against (its own, fixed) with respect to the word
embeddings, from a baseline of padding between the special tokens: how much each word piece makes the embedding what
it is::

    {"explanations": [{"tokens": [["[CLS]", 0.01], ["cats", 0.41], ...], "steps": 4, "convergence_delta": 0.002}]}
"""

from __future__ import annotations

from typing import Any

import torch

from handlers.base import Reply
from handlers.text import TextHandler, TextItem

TRUNCATED_HEADER = "X-Input-Truncated"


class SentenceEmbedder(TextHandler):
    def answer(self, outputs: torch.Tensor, items: list[TextItem]) -> list[Reply]:
        answers, rows = [], outputs.float().tolist()
        for item in items:
            vectors, rows = rows[:len(item.texts)], rows[len(item.texts):]
            tokens = [len(encoding.ids) for encoding in item.encodings]
            truncated = item.truncated
            body = ({"embedding": vectors[0], "tokens": tokens[0], "truncated": truncated[0]} if item.single else
                    {"embeddings": vectors, "tokens": tokens, "truncated": truncated})
            answers.append(Reply(body, headers={TRUNCATED_HEADER: str(any(truncated)).lower()}))
        return answers

    def explanation(self, item: TextItem) -> dict[str, Any]:
        return {"explanations": [self.explain_text(encoding) for encoding in item.encodings]}

    def explain_text(self, encoding) -> dict[str, Any]:
        model = self.explainer()
        ids, mask = (t.to(self.device) for t in self.pad([encoding.ids]))
        baseline_ids = torch.full_like(ids, self.tokenizer.token_to_id("[PAD]"))
        baseline_ids[:, 0], baseline_ids[:, -1] = ids[:, 0], ids[:, -1]  # keep [CLS] and [SEP]
        with torch.inference_mode():
            target = self.model(ids, mask)

        def similarity(words: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return (model.encode_embeddings(words, mask) * target).sum(dim=1)

        attributions, delta = self.integrated_gradients(
            similarity, model.embed_tokens(ids).detach(), model.embed_tokens(baseline_ids).detach(),
            additional_forward_args=(mask, target.clone()))
        scores = attributions.sum(dim=-1)[0].tolist()
        return {"tokens": [[token, round(score, 5)] for token, score in zip(encoding.tokens, scores)],
                "truncated": bool(encoding.overflowing), "steps": int(self.settings["explain_steps"]),
                "convergence_delta": round(delta, 6)}
