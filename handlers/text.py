"""Text task layer: one or more texts per request → token ids and attention mask, padded to the batch's longest.

Input, UTF-8: plain text (``curl -H "Content-Type: text/plain" --data-binary "..."`` or ``-T file.txt``), or JSON
``{"text": "..."}`` (one text) or ``{"texts": ["...", ...]}`` (up to ``max_texts``). A body that starts with ``{`` is
read as JSON whatever its Content-Type.

Texts are split into word pieces by the model's fast tokenizer (``tokenizers``, ``tokenizer.json`` shipped in the
archive) and truncated to ``max_tokens`` (special tokens included); ``TextItem.truncated`` says which were. The
batch of every text of every request in a TorchServe batch is padded to its own longest text, never to a fixed length.

Bounds, each checked before the work it bounds: a body over ``max_body_bytes`` (413 ``body_too_large``, before it is
decoded or parsed; JSON that TorchServe parsed itself, sent as ``application/json``, is bounded by the next two), more
than ``max_texts`` texts (413 ``too_many_texts``, before any text is looked at), a text over ``max_chars`` characters
(413 ``text_too_long``, before tokenizing: longer texts are still truncated to ``max_tokens``, this bounds the
tokenizer's work), a request's texts together over ``max_request_chars`` (413 ``too_much_text``, before tokenizing),
JSON nested deeper than ``MAX_JSON_DEPTH`` (400 ``json_too_deep``, from one linear scan of the brackets outside
strings before parsing: a body of 100,000 ``[`` never reaches the parser), a batch over ``max_batch_tokens`` word
pieces (503 ``busy`` for the requests past it, see ``ModelHandler.admit``), and an explanation of more than
``max_explained_texts`` texts (413 ``too_many_texts_to_explain``: each text costs ``explain_steps`` forwards and
backwards, over a second at 256 word pieces on one CPU thread for MiniLM).

Refused with a 400: an empty or blank text (``empty_text``), bytes that are not UTF-8 or text with lone surrogates
(``\\ud800`` in JSON; ``not_utf8``), a body that starts with ``{`` but is not JSON (``bad_json``, integers of more than
4300 digits included), JSON without a string ``text`` or a non-empty list of strings ``texts`` (``no_text``).

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
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from handlers.base import ModelHandler, Reply
from handlers.inputs import InputError, request_value, some_keys

logger = logging.getLogger(__name__)

TRUNCATED_HEADER = "X-Input-Truncated"
# what one explained word piece costs against max_batch_tokens, per explain_step: a forward and a backward (which
# costs about two forwards)
EXPLAIN_STEP_COST = 3
# A batch runs in groups of like lengths: a group's longest text at most LENGTH_RATIO times its shortest (texts under
# SHORT_TOKENS count as that long: splitting short texts further saves less than another model call costs).
LENGTH_RATIO = 2
SHORT_TOKENS = 32
PAD_TOKENS = ("[PAD]", "<pad>")  # the explanations' baseline: the first the vocabulary has, else id 0 (as collate pads)
MAX_JSON_DEPTH = 16  # {"texts": [...]} is 2 deep; deeper is refused before parsing (Python's parser recurses)
QUOTE, BACKSLASH = ord('"'), ord("\\")
SURROGATE = re.compile("[\ud800-\udfff]")  # what JSON's \ud800 escapes give and UTF-8 cannot hold


@dataclass
class TextItem:
    """One request: its texts, their word pieces, and whether they came as one ``text`` or a list of ``texts``."""

    texts: list[str]
    encodings: list[Any]  # tokenizers.Encoding, one per text
    single: bool

    @property
    def truncated(self) -> list[bool]:
        return [bool(encoding.overflowing) for encoding in self.encodings]


def json_depth(text: str) -> int:
    """How deep the brackets of a JSON text nest, string literals left out: one linear pass in numpy, without the
    recursion of a parser or the backtracking of a regular expression (a string of 65,000 escaped quotes took a
    regular expression minutes). A quote is a string's edge unless an odd run of backslashes comes before it."""
    codes = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    if not codes.size:
        return 0
    positions = np.arange(codes.size, dtype=np.int32)
    # for each position, the last one at or before it that is not a backslash (-1: none)
    last_other = np.maximum.accumulate(np.where(codes == BACKSLASH, np.int32(-1), positions))
    backslashes_before = np.empty_like(positions)
    backslashes_before[0] = 0
    backslashes_before[1:] = positions[:-1] - last_other[:-1]
    edges = (codes == QUOTE) & (backslashes_before % 2 == 0)
    outside = np.bitwise_xor.accumulate(edges.view(np.uint8)) == 0  # an opening quote and what follows are inside
    # [ and { are 0x5B and 0x7B, ] and } 0x5D and 0x7D: one bit apart
    bracket = ((codes | 0x20) == 0x7B) | ((codes | 0x20) == 0x7D)
    steps = np.where(bracket & outside, (codes & 2).astype(np.int8) - 1, np.int8(0))
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def body_text(value: Any, max_bytes: int) -> Any:
    """A body as TorchServe passes it → text, or parsed JSON when it starts with ``{``; a body already parsed
    (``application/json``) as it is. Its size and its JSON's depth are checked before decoding and parsing."""
    if isinstance(value, (bytes, bytearray, str)):
        size = len(value) if isinstance(value, (bytes, bytearray)) else len(value.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise InputError("body_too_large", f"the body is {size:,} bytes; the limit is {max_bytes:,} "
                                               "(max_body_bytes)", status=413)
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError("not_utf8", f"the body is not UTF-8 text: {error}")
    if isinstance(value, str) and value.lstrip().startswith("{"):
        depth = json_depth(value)
        if depth > MAX_JSON_DEPTH:
            raise InputError("json_too_deep", f"the JSON body nests {depth:,} deep; the limit is {MAX_JSON_DEPTH} "
                                              '(send {"text": "..."} or {"texts": ["...", ...]})')
        try:
            value = json.loads(value)
        except RecursionError:
            raise InputError("json_too_deep", "the JSON body nests too deep to parse")
        except ValueError as error:  # JSONDecodeError, and integers too long to convert
            raise InputError("bad_json", f"the body starts with '{{' but is not JSON: {error}")
    return value


def texts_of(value: Any, max_texts: int) -> tuple[list[str], bool]:
    """The texts in a request body as ``body_text`` gives it (text or parsed JSON), and whether it was one;
    their count checked before any of them is looked at."""
    if isinstance(value, str):
        return [value], True
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return [value["text"]], True
    texts = value.get("texts") if isinstance(value, dict) else None
    if isinstance(texts, list) and len(texts) > max_texts:
        raise InputError("too_many_texts", f"{len(texts):,} texts in one request; the limit is {max_texts}",
                         status=413)
    if isinstance(texts, list) and texts and all(isinstance(text, str) for text in texts):
        return list(texts), False
    got = f"keys {some_keys(value)}" if isinstance(value, dict) else type(value).__name__
    if isinstance(texts, list):
        got = "an empty list of texts" if not texts else "texts that are not all strings"
    raise InputError("no_text", f'expected plain text, {{"text": "..."}} or {{"texts": ["...", ...]}}; got {got}')


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
        "max_chars": 20_000,  # characters in one text, before tokenizing (413 text_too_long)
        "max_body_bytes": 4 * 1024 * 1024,  # the whole body, before decoding (413 body_too_large)
        "max_explained_texts": 8,  # texts in one /explanations request (413 too_many_texts_to_explain)
        # all of one request's characters, before tokenizing (413 too_much_text): tokenizing runs at about 0.4 M
        # characters a second at worst (one word piece per character, CJK), and only max_tokens of each text count
        "max_request_chars": 100_000,
        # word pieces one batch may hold (an explained one counts 3 x explain_steps): the model's time grows with
        # them, and a batch must end well within responseTimeout, over which TorchServe kills the worker. Requests
        # past it are answered 503 busy (the front door sends them once more); the batch's first always runs.
        "max_batch_tokens": 16_384,
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
        texts, single = texts_of(body_text(payload, int(self.settings["max_body_bytes"])),
                                 int(self.settings["max_texts"]))
        max_chars, total = int(self.settings["max_chars"]), sum(map(len, texts))
        if total > int(self.settings["max_request_chars"]):
            raise InputError("too_much_text", f"the {len(texts)} texts hold {total:,} characters; the limit is "
                                              f"{int(self.settings['max_request_chars']):,} for one request "
                                              "(max_request_chars): send fewer or shorter texts", status=413)
        for number, text in enumerate(texts):
            where = "" if single else f" (texts[{number}])"
            if len(text) > max_chars:
                raise InputError("text_too_long", f"the text{where} is {len(text):,} characters; the limit is "
                                                  f"{max_chars:,} (max_chars)", status=413)
            if SURROGATE.search(text):
                raise InputError("not_utf8", f"the text{where} holds a lone surrogate (a \\ud800-\\udfff escape "
                                             "in JSON), which is not Unicode text")
            if not text.strip():
                raise InputError("empty_text", f"the text{where} is empty: send at least one word")
        return TextItem(texts, self.tokenizer.encode_batch(texts), single)

    def admit_explanation(self, item: TextItem) -> None:
        limit = int(self.settings["max_explained_texts"])
        if len(item.texts) > limit:
            raise InputError("too_many_texts_to_explain", f"{len(item.texts)} texts to explain in one request; the "
                                                          f"limit is {limit} (max_explained_texts): each costs "
                                                          f"{self.settings['explain_steps']} forwards and backwards",
                             status=413)

    def cost(self, item: TextItem, explained: bool) -> int:
        tokens = sum(len(encoding.ids) for encoding in item.encodings)
        return tokens * (EXPLAIN_STEP_COST * int(self.settings["explain_steps"]) if explained else 1)

    def budget(self) -> tuple[int, str]:
        return int(self.settings["max_batch_tokens"]), "word pieces (max_batch_tokens)"

    def collate(self, items: list[TextItem]) -> tuple[np.ndarray, np.ndarray]:
        encodings = [encoding for item in items for encoding in item.encodings]
        return self.pad([encoding.ids for encoding in encodings])

    def forward(self, model, inputs: tuple[np.ndarray, np.ndarray]) -> Any:
        """The model on texts of like lengths together. A batch padded to its longest text makes every text cost
        that length (attention grows with its square): one text of 256 word pieces among seven short ones cut a
        served text encoder from 203 to 4.8 requests a second. The rows are sorted by length and cut into groups
        whose longest is at most ``LENGTH_RATIO`` times their shortest; each group runs trimmed to its own longest,
        and the rows of every output come back in their order."""
        ids, mask = inputs
        lengths = mask.sum(axis=1)
        groups, run = length_groups(lengths), super().forward
        if len(groups) == 1:
            return run(model, inputs)
        parts = [run(model, (ids[rows, :lengths[rows].max()], mask[rows, :lengths[rows].max()])) for rows in groups]
        back = np.argsort(np.concatenate(groups), kind="stable")  # the position of each row in the groups' order
        if isinstance(parts[0], (tuple, list)):
            return type(parts[0])(np.concatenate(outputs)[back] for outputs in zip(*parts))
        return np.concatenate(parts)[back]

    @staticmethod
    def pad(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids → (ids, mask), int64, zero-padded to the longest sequence."""
        length = max(len(ids) for ids in sequences)
        ids = np.zeros((len(sequences), length), dtype=np.int64)
        mask = np.zeros((len(sequences), length), dtype=np.int64)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)] = sequence
            mask[row, :len(sequence)] = 1
        return ids, mask

    def example_input(self) -> tuple[np.ndarray, np.ndarray]:
        return self.pad([self.tokenizer.encode("warm up").ids])

    @staticmethod
    def reply(item: TextItem, body: Any) -> Reply:
        return Reply(body, headers={TRUNCATED_HEADER: str(any(item.truncated)).lower()})

    def encoded(self, encoding) -> tuple[np.ndarray, np.ndarray]:
        """One text's (ids, mask), a batch of one."""
        return self.pad([encoding.ids])

    def pad_id(self) -> int:
        return next((i for i in map(self.tokenizer.token_to_id, PAD_TOKENS) if i is not None), 0)

    def explain_tokens(self, encoding, function, target: int | None = None, extra: tuple = ()) -> dict[str, Any]:
        """Integrated Gradients of ``function(words, mask, *extra)`` (one score per row, or ``target`` picks the
        column) with respect to the text's word embeddings, from padding between its first and last word pieces."""
        import torch

        model = self.explainer()
        ids, mask = self.as_tensors(*self.encoded(encoding))
        baseline_ids = torch.full_like(ids, self.pad_id())
        baseline_ids[:, 0], baseline_ids[:, -1] = ids[:, 0], ids[:, -1]  # keep [CLS] and [SEP]
        attributions, delta = self.integrated_gradients(
            function, model.embed_tokens(ids).detach(), model.embed_tokens(baseline_ids).detach(), target=target,
            additional_forward_args=(mask, *extra))
        scores = attributions.sum(dim=-1)[0].tolist()
        return {"tokens": [[token, round(score, 5)] for token, score in zip(encoding.tokens, scores)],
                "truncated": bool(encoding.overflowing), "steps": int(self.settings["explain_steps"]),
                "convergence_delta": round(delta, 6)}


def length_groups(lengths: np.ndarray) -> list[np.ndarray]:
    """Row indices grouped by length, shortest first: a group closes where the next row is longer than
    ``LENGTH_RATIO`` times the group's first (at least ``SHORT_TOKENS``)."""
    order = np.argsort(lengths, kind="stable")
    groups, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or lengths[order[end]] > LENGTH_RATIO * max(int(lengths[order[start]]), SHORT_TOKENS):
            groups.append(order[start:end])
            start = end
    return groups
