"""Text task layer: one or more texts per request → token ids and attention mask, padded to the batch's longest.

Input, UTF-8: plain text (``curl -H "Content-Type: text/plain" --data-binary "..."`` or ``-T file.txt``), or JSON
``{"text": "..."}`` (one text) or ``{"texts": ["...", ...]}`` (up to ``max_texts``). A body that starts with ``{`` is
read as JSON whatever its Content-Type.

Texts are split into word pieces by the model's fast tokenizer (``tokenizers``, ``tokenizer.json`` shipped in the
archive) and truncated to ``max_tokens`` (special tokens included); ``TextItem.truncated`` says which were. The
batch of every text of every request in a TorchServe batch is padded to its own longest text, never to a fixed length.

Refused with a 400: an empty or blank text (``empty_text``), bytes that are not UTF-8 (``not_utf8``), a body that
starts with ``{`` but is not JSON (``bad_json``), JSON without a string ``text`` or a list of strings ``texts``
(``no_text``); more than ``max_texts`` texts is a 413 (``too_many_texts``).

Shared by the model layers on top (``sentence_embedding.py``, ``text_classifier.py``):

* ``rows_per_item(rows, items)``: a batch's output rows (one per text) grouped by request;
* ``reply(item, body)``: the answer with ``X-Input-Truncated: true`` when any of the request's texts was truncated
  (otherwise ``false``);
* ``explain_tokens(encoding, function, target, extra)``: Integrated Gradients of ``function(words, mask, *extra)``
  with respect to one text's word embeddings (the TorchScript model's ``embed_tokens(ids)``; ``function`` calls its
  ``encode_embeddings(words, mask)``), from a baseline of padding between the text's first and last word pieces
  (``[CLS]`` and ``[SEP]`` are kept): ``{"tokens": [[piece, score], ...], "truncated", "steps",
  "convergence_delta"}``, one score per word piece.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from handlers.base import InputError, ModelHandler, Reply, request_value

logger = logging.getLogger(__name__)

TRUNCATED_HEADER = "X-Input-Truncated"
PAD_TOKENS = ("[PAD]", "<pad>")  # the explanations' baseline: the first the vocabulary has, else id 0 (as collate pads)


@dataclass
class TextItem:
    """One request: its texts, their word pieces, and whether they came as one ``text`` or a list of ``texts``."""

    texts: list[str]
    encodings: list[Any]  # tokenizers.Encoding, one per text
    single: bool

    @property
    def truncated(self) -> list[bool]:
        return [bool(encoding.overflowing) for encoding in self.encodings]


def texts_of(value: Any) -> tuple[list[str], bool]:
    """The texts in a request body as TorchServe passes it (bytes, str or parsed JSON), and whether it was one."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError("not_utf8", f"the body is not UTF-8 text: {error}")
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise InputError("bad_json", f"the body starts with '{{' but is not JSON: {error}")
    if isinstance(value, str):
        return [value], True
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return [value["text"]], True
    if isinstance(value, dict) and isinstance(value.get("texts"), list) and value["texts"] \
            and all(isinstance(text, str) for text in value["texts"]):
        return list(value["texts"]), False
    keys = ", ".join(sorted(map(str, value))[:5]) if isinstance(value, dict) else type(value).__name__
    raise InputError("no_text", f'expected plain text, {{"text": "..."}} or {{"texts": ["...", ...]}}; got {keys}')


def rows_per_item(rows: list, items: list[TextItem]) -> list[list]:
    """A batch's output rows, one per text of every request in order, grouped by request."""
    groups, start = [], 0
    for item in items:
        groups.append(rows[start:start + len(item.texts)])
        start += len(item.texts)
    return groups


class TextHandler(ModelHandler):
    """Task layer for models that take token ids and an attention mask: ``model(ids, mask)``."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        **ModelHandler.DEFAULTS,
        "tokenizer": "tokenizer.json",  # in the archive (the spec's extra_files)
        "max_tokens": 256,  # longer texts are truncated to this many word pieces, and the answer says so
        "max_texts": 64,  # texts in one request
    }
    DYNAMIC_AXES = ((0, 1), (0, 1))  # ids and mask: batch and word pieces

    def configure(self) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(self.files / self.settings["tokenizer"]))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=int(self.settings["max_tokens"]))

    def payload(self, row: Any) -> Any:
        return request_value(row)

    def decode(self, payload: Any) -> TextItem:
        texts, single = texts_of(payload)
        if len(texts) > int(self.settings["max_texts"]):
            raise InputError("too_many_texts", f"{len(texts)} texts in one request; the limit is "
                                               f"{self.settings['max_texts']}", status=413)
        for number, text in enumerate(texts):
            if not text.strip():
                where = "" if single else f" (texts[{number}])"
                raise InputError("empty_text", f"the text{where} is empty: send at least one word")
        return TextItem(texts, self.tokenizer.encode_batch(texts), single)

    def collate(self, items: list[TextItem]) -> tuple[torch.Tensor, torch.Tensor]:
        encodings = [encoding for item in items for encoding in item.encodings]
        return self.pad([encoding.ids for encoding in encodings])

    @staticmethod
    def pad(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids → (ids, mask), zero-padded to the longest sequence."""
        length = max(len(ids) for ids in sequences)
        ids = torch.zeros(len(sequences), length, dtype=torch.long)
        mask = torch.zeros(len(sequences), length, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, :len(sequence)] = 1
        return ids, mask

    def example_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pad([self.tokenizer.encode("warm up").ids])

    @staticmethod
    def reply(item: TextItem, body: Any) -> Reply:
        return Reply(body, headers={TRUNCATED_HEADER: str(any(item.truncated)).lower()})

    def encoded(self, encoding) -> tuple[torch.Tensor, torch.Tensor]:
        """One text's (ids, mask), a batch of one on the model's device."""
        ids, mask = self.pad([encoding.ids])
        return ids.to(self.device), mask.to(self.device)

    def pad_id(self) -> int:
        return next((i for i in map(self.tokenizer.token_to_id, PAD_TOKENS) if i is not None), 0)

    def explain_tokens(self, encoding, function, target: int | None = None, extra: tuple = ()) -> dict[str, Any]:
        """Integrated Gradients of ``function(words, mask, *extra)`` (one score per row, or ``target`` picks the
        column) with respect to the text's word embeddings, from padding between its first and last word pieces."""
        model = self.explainer()
        ids, mask = self.encoded(encoding)
        baseline_ids = torch.full_like(ids, self.pad_id())
        baseline_ids[:, 0], baseline_ids[:, -1] = ids[:, 0], ids[:, -1]  # keep [CLS] and [SEP]
        attributions, delta = self.integrated_gradients(
            function, model.embed_tokens(ids).detach(), model.embed_tokens(baseline_ids).detach(), target=target,
            additional_forward_args=(mask, *extra))
        scores = attributions.sum(dim=-1)[0].tolist()
        return {"tokens": [[token, round(score, 5)] for token, score in zip(encoding.tokens, scores)],
                "truncated": bool(encoding.overflowing), "steps": int(self.settings["explain_steps"]),
                "convergence_delta": round(delta, 6)}
