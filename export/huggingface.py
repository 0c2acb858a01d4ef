"""A user's Hugging Face model folder (``save_pretrained``: config.json, weights, tokenizer) → a model to export.

Contract
--------
* ``is_model_folder(path)``: a folder with a transformers ``config.json`` (it has ``model_type``).
* ``task_of(folder)``: ``text_classification`` when the config's ``architectures`` name a ``*ForSequenceClassification``
  (or the config has ``id2label``/``num_labels`` and ``problem_type: single_label_classification``), else
  ``sentence_embedding``. A classifier whose head is not single-label (multi-label, regression) is refused: the
  server answers softmax probabilities over two or more classes.
* ``labels_of(folder)``: the classifier's ``id2label`` as ``{"0": "negative", ...}`` (index_to_name.json); None for
  embeddings.
* ``tokenizer_file(folder)``: the fast tokenizer (``tokenizer.json``) the served handler loads with ``tokenizers``.
* ``max_tokens(folder)``: the longest input the model takes, in word pieces (special tokens included).
* ``identity(folder)``: sha256 over config.json, the weight files and the tokenizer files (names and contents).
* ``load(folder, task)``: the model in eval mode, float32, called as the text handlers call it: ``model(ids, mask)``
  → logits ``[batch, classes]`` (``SequenceClassifier``) or unit-length mean-pooled embeddings ``[batch, hidden]``
  (``SentenceEncoder``, as sentence-transformers runs all-MiniLM-L6-v2).

Both models are split in two for explanations, as ``export/minilm.py`` is: ``embed_tokens(ids)`` (the model's input
word embeddings) and ``encode_embeddings(words, mask)`` (the model run from ``inputs_embeds``), with
``forward(ids, mask) == encode_embeddings(embed_tokens(ids), mask)`` by construction. ``trace_inputs(ids, mask)``
gives the example inputs of those two methods, so ``export/torchscript.py`` traces them beside ``forward``. Both trace
with dynamic batch and sequence length and export to ONNX (``export/onnx.py``) with both axes dynamic.

Positions that the mask marks as padding never change a text's output, whatever their ids. Every failure is a
``HuggingFaceError`` whose one-line message names the folder, the problem and what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

TASKS = ("text_classification", "sentence_embedding")
HANDLERS = {"text_classification": "text_classifier", "sentence_embedding": "sentence_embedding"}  # handlers/*.py
EXPORTED_METHODS = ("embed_tokens", "encode_embeddings")  # what export_torchscript must preserve for explanations

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
SENTENCE_BERT_CONFIG = "sentence_bert_config.json"  # sentence-transformers' own settings (max_seq_length)
TOKENIZER_CONFIG = "tokenizer_config.json"
SLOW_TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                        "tokenizer.model")
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json",
                   *SLOW_TOKENIZER_FILES)
WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model.bin.index.json")
SEQUENCE_CLASSIFIER_SUFFIX = "ForSequenceClassification"
SINGLE_LABEL = "single_label_classification"
IGNORED_MISSING = ("pooler.",)  # weights an embedding model may lack: mean pooling never uses BERT's pooler
MAX_SANE_LENGTH = 1_000_000  # tokenizer_config's model_max_length means "no limit" above this (transformers: 1e30)


class HuggingFaceError(ValueError):
    """A folder that cannot be imported as its task says; the message names the problem and what to do."""


# --- the folder: task, labels, tokenizer, limits, identity -------------------------------------------------------

def is_model_folder(path: Path) -> bool:
    """A folder with a transformers config.json (one with ``model_type``: sentence-transformers' ``1_Pooling/``
    has a config.json too)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        value = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # not a model folder; config_of says why
    return isinstance(value, dict) and "model_type" in value


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HuggingFaceError(f"{path}: cannot read it as JSON ({' '.join(str(error).split())[:200]}); "
                               "save the model again with save_pretrained") from None
    if not isinstance(value, dict):
        raise HuggingFaceError(f"{path}: expected a JSON object, got {type(value).__name__}; "
                               "save the model again with save_pretrained")
    return value


def config_of(folder: Path) -> dict:
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        what = "is not a folder" if not folder.is_dir() else f"has no {CONFIG_FILE}"
        raise HuggingFaceError(f"{folder} {what}: give the folder written by model.save_pretrained(folder)")
    config = read_json(folder / CONFIG_FILE)
    if "model_type" not in config:
        raise HuggingFaceError(f"{folder / CONFIG_FILE} is not a transformers config (no model_type): give the "
                               "folder written by model.save_pretrained(folder)")
    return config


def label_count(config: dict) -> int:
    """As transformers counts them: id2label's size, else num_labels, else its default of 2."""
    return len(config.get("id2label") or {}) or int(config.get("num_labels", 2))


def task_of(folder: Path) -> str:
    config = config_of(folder)
    architectures = config.get("architectures") or []
    classifier = any(str(name).endswith(SEQUENCE_CLASSIFIER_SUFFIX) for name in architectures) or (
        config.get("problem_type") == SINGLE_LABEL and ("id2label" in config or "num_labels" in config))
    if not classifier:
        return "sentence_embedding"
    problem = config.get("problem_type")
    if problem not in (None, SINGLE_LABEL) or label_count(config) < 2:
        head = problem or "regression (one label)"
        raise HuggingFaceError(f"{folder}: its classification head is {head}; only single-label classification over "
                               "2+ labels is served: fine-tune with problem_type single_label_classification")
    return "text_classification"


def labels_of(folder: Path) -> dict[str, str] | None:
    if task_of(folder) != "text_classification":
        return None
    config = config_of(folder)
    names = config.get("id2label") or {i: f"LABEL_{i}" for i in range(label_count(config))}
    if sorted(str(index) for index in names) != sorted(str(i) for i in range(len(names))):
        raise HuggingFaceError(f"{folder}: id2label's keys {sorted(map(str, names))[:5]} are not the class indices "
                               f"0..{len(names) - 1}: fix id2label in {CONFIG_FILE}")
    return {str(index): str(names.get(index, names.get(str(index)))) for index in range(len(names))}


def tokenizer_file(folder: Path) -> Path:
    folder = Path(folder)
    config_of(folder)
    path = folder / TOKENIZER_FILE
    if path.is_file():
        return path
    slow = [name for name in SLOW_TOKENIZER_FILES if (folder / name).is_file()]
    if slow:
        raise HuggingFaceError(f"{folder} has only a slow tokenizer ({', '.join(slow)}), no {TOKENIZER_FILE}: write "
                               "one with AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
    raise HuggingFaceError(f"{folder} has no tokenizer: save it beside the model with "
                           "tokenizer.save_pretrained(folder)")


def max_tokens(folder: Path) -> int:
    """sentence_bert_config.json's max_seq_length, else tokenizer_config.json's model_max_length when it is a real
    limit (not above the model's positions), else config.json's max_position_embeddings."""
    folder = Path(folder)
    config = config_of(folder)
    positions = config.get("max_position_embeddings")
    if (folder / SENTENCE_BERT_CONFIG).is_file():
        length = read_json(folder / SENTENCE_BERT_CONFIG).get("max_seq_length")
        if isinstance(length, int) and length > 0:
            return length
    if (folder / TOKENIZER_CONFIG).is_file():
        length = read_json(folder / TOKENIZER_CONFIG).get("model_max_length")
        if isinstance(length, (int, float)) and 0 < length <= min(positions or MAX_SANE_LENGTH, MAX_SANE_LENGTH):
            return int(length)
    if isinstance(positions, int) and positions > 0:
        return positions
    raise HuggingFaceError(f"{folder}: no input length limit found: set max_seq_length in {SENTENCE_BERT_CONFIG} "
                           f"or model_max_length in {TOKENIZER_CONFIG}")


def weight_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    found = sorted({path for pattern in WEIGHT_PATTERNS for path in folder.glob(pattern) if path.is_file()})
    if not found:
        raise HuggingFaceError(f"{folder} has no weights (model.safetensors or pytorch_model.bin): save them with "
                               "model.save_pretrained(folder)")
    return found


def identity(folder: Path) -> str:
    """sha256 (hex) of the files that make the served model: config, weights, tokenizer, sentence-transformers'
    settings; each by name and content, so a renamed or changed file changes it."""
    from archives.store import sha256_file

    folder = Path(folder)
    config_of(folder)
    named = [CONFIG_FILE, SENTENCE_BERT_CONFIG, *TOKENIZER_FILES]
    files = [folder / name for name in named if (folder / name).is_file()] + weight_files(folder)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


# --- the models ---------------------------------------------------------------------------------------------------

def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the token vectors the mask keeps, L2-normalised: sentence-transformers' Pooling + Normalize."""
    maskf = mask.to(hidden.dtype)
    pooled = (hidden * maskf[:, :, None]).sum(dim=1) / maskf.sum(dim=1, keepdim=True).clamp(min=1e-9)
    return F.normalize(pooled, p=2.0, dim=1)


class TokenModel(nn.Module):
    """A transformers model called as ``model(ids, mask)``, split in two for explanations (see the module doc)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def encode_embeddings(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encode_embeddings(self.embed_tokens(ids), mask)

    def trace_inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        """Example inputs of the exported methods, from forward's example (``export/torchscript.py``)."""
        return {"embed_tokens": (ids,), "encode_embeddings": (self.embed_tokens(ids), mask)}


class SequenceClassifier(TokenModel):
    """``forward(ids, mask) -> logits [batch, classes]``, from AutoModelForSequenceClassification."""

    def encode_embeddings(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=words, attention_mask=mask, return_dict=True).logits


class SentenceEncoder(TokenModel):
    """``forward(ids, mask) -> [batch, hidden]``: the encoder's last hidden states, mean-pooled over the mask and
    L2-normalised, from AutoModel."""

    def encode_embeddings(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs_embeds=words, attention_mask=mask, return_dict=True).last_hidden_state
        return mean_pooled(hidden, mask)


def load(folder: Path, task: str) -> TokenModel:
    """The folder's model for ``task``, in eval mode and float32. Weights the task needs but the folder lacks (a
    classification head never trained) are refused, never initialised at random."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    if task not in TASKS:
        raise HuggingFaceError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    folder = Path(folder)
    if task == "text_classification":
        task_of(folder)  # refuses a multi-label or regression head
    config_of(folder)
    weight_files(folder)
    auto, wrapper = ((AutoModelForSequenceClassification, SequenceClassifier) if task == "text_classification" else
                     (AutoModel, SentenceEncoder))
    try:
        model, info = auto.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True,
                                           output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise HuggingFaceError(f"{folder}: transformers cannot load it as {task}: {reason[:300]}") from None
    missing = sorted(name for name in info.get("missing_keys", ())
                     if not (task == "sentence_embedding" and any(part in name for part in IGNORED_MISSING)))
    if missing:
        raise HuggingFaceError(f"{folder}: the weights lack {len(missing)} tensors {task} needs ({missing[0]}, ...): "
                               f"save the trained {auto.__name__} with save_pretrained")
    logger.info("%s: %s from %s (%s)", folder.name, task, type(model).__name__, model.config._attn_implementation)
    return wrapper(model).eval()
