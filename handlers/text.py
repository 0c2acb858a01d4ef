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
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from handlers.base import InputError, ModelHandler, request_value

logger = logging.getLogger(__name__)


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
