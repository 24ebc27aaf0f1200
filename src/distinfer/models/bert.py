"""A BERT encoder in plain PyTorch, loaded straight from a safetensors checkpoint.

Why not `transformers.AutoModel`: importing `transformers` costs seconds in every worker
process, and a model written out here can later be cut into stages (each stage loads only
its own layers' tensors) or sharded per attention head. The maths follows the Hugging Face
`BertModel` exactly (post-LayerNorm blocks, exact-erf GELU, absolute positions), so outputs
match it and `sentence-transformers` within float32 tolerances.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .packing import Packing

__all__ = ["BertConfig", "BertEncoder", "load_bert"]


@dataclass(frozen=True, slots=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("model_type", "bert") != "bert" or raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: only BERT models with GELU are supported")
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


class _Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(positions)[None]
        )
        out: torch.Tensor = self.LayerNorm(x)
        return out

    def forward_packed(self, packing: Packing, input_ids: torch.Tensor) -> torch.Tensor:
        """Packed [T, H] embeddings of the real tokens of padded `input_ids` [B, W] (token type 0)."""
        x = (
            self.word_embeddings(packing.pack(input_ids))
            + self.token_type_embeddings.weight[0]
            + self.position_embeddings(packing.positions)
        )
        out: torch.Tensor = self.LayerNorm(x)
        return out


class _Layer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.mlp_in = nn.Linear(h, cfg.intermediate_size)
        self.mlp_out = nn.Linear(cfg.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        d = h // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)),
            attn_mask=mask, scale=1.0 / math.sqrt(d),
        )
        return self._after_attention(ctx.transpose(1, 2).reshape(b, t, h), x)

    def forward_packed(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """The same layer over packed [T, H] tokens."""
        scale = 1.0 / math.sqrt(x.shape[1] // self.heads)
        ctx = packing.attention(self.query(x), self.key(x), self.value(x), self.heads, scale)
        return self._after_attention(ctx, x)

    def _after_attention(self, ctx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(self.attn_out(ctx) + x)
        out: torch.Tensor = self.mlp_norm(self.mlp_out(F.gelu(self.mlp_in(x))) + x)
        return out


# Checkpoint names (Hugging Face layout) of each _Layer parameter.
_LAYER_KEYS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "mlp_in": "intermediate.dense",
    "mlp_out": "output.dense",
    "mlp_norm": "output.LayerNorm",
}


class BertEncoder(nn.Module):
    """Embeddings followed by transformer layers; returns the last hidden state.

    With `start`/`stop` it holds only layers [start, stop) of the model's
    `num_hidden_layers + 1` layers (layer 0 is the embeddings, layer i the (i-1)-th
    transformer layer): one pipeline stage. `run_part` runs such a part.
    """

    def __init__(self, cfg: BertConfig, start: int = 0, stop: int | None = None) -> None:
        super().__init__()
        total = cfg.num_hidden_layers + 1
        stop = total if stop is None else stop
        if not 0 <= start < stop <= total:
            raise ValueError(f"layers [{start}, {stop}) are not a range of the {total} layers")
        self.config = cfg
        self.start, self.stop = start, stop
        self.embeddings = _Embeddings(cfg) if start == 0 else None
        self.first_layer = max(start, 1) - 1
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(self.first_layer, stop - 1))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        assert self.embeddings is not None, "forward() needs the part holding the embeddings"
        x: torch.Tensor = self.embeddings(input_ids, token_type_ids)
        return self._layers(x, attention_mask)

    def forward_packed(self, input_ids: torch.Tensor, packing: Packing) -> torch.Tensor:
        """The last hidden state of the real tokens only, [T, H] in `packing`'s order (token
        type 0 everywhere); the same values as `forward` without computing the padding."""
        assert self.embeddings is not None, "forward_packed() needs the part holding the embeddings"
        x = self.embeddings.forward_packed(packing, input_ids)
        for layer in self.layers:
            assert isinstance(layer, _Layer)
            x = layer.forward_packed(x, packing)
        return x

    def run_part(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids (first part) or hidden states (later parts) → hidden states."""
        if self.embeddings is not None:
            x = self.embeddings(x, torch.zeros_like(x))
        return self._layers(x, attention_mask)

    def _layers(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Additive mask as in transformers' sdpa path: padded keys get the dtype's minimum.
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, mask)
        return x


def load_bert(model_dir: Path, start: int = 0, stop: int | None = None) -> BertEncoder:
    """Build the encoder (or layers [start, stop) of it) from `config.json` and fill it from
    `model.safetensors`, reading only the tensors of the layers it holds."""
    from safetensors import safe_open

    cfg = BertConfig.from_file(model_dir / "config.json")
    with torch.device("meta"):
        model = BertEncoder(cfg, start, stop)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())

        def get(key: str) -> torch.Tensor:
            # some checkpoints prefix every name with "bert."
            tensor: torch.Tensor = f.get_tensor(key if key in names else f"bert.{key}")
            return tensor

        if model.embeddings is not None:
            for suffix in ("weight", "bias"):
                key = f"embeddings.LayerNorm.{suffix}"
                state[key] = get(key)
            for emb in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
                key = f"embeddings.{emb}.weight"
                state[key] = get(key)
        for ours_index, i in enumerate(range(model.first_layer, model.stop - 1)):
            for ours, theirs in _LAYER_KEYS.items():
                for suffix in ("weight", "bias"):
                    key = f"encoder.layer.{i}.{theirs}.{suffix}"
                    state[f"layers.{ours_index}.{ours}.{suffix}"] = get(key)
    model.load_state_dict(state, assign=True, strict=True)
    model.eval()
    return model
