"""`decoder`: a GPT-style decoder of selectable size with seeded random weights.

It exists to show model parallelism (pipeline stages, tensor-parallel shards) on a model too big
for one worker without downloading anything: the weights are random but reproducible.

Layers. The model is a list of `n_layers + 2` layers (`DecoderConfig.total_layers`): layer 0
embeds tokens (token + learned position embeddings), layers 1..n_layers are pre-LayerNorm
transformer blocks (causal self-attention, tanh-GELU MLP) and the last layer is the final
LayerNorm plus an untied LM head. Layer i is initialised from its own generator,
`torch.Generator().manual_seed(layer_seed(seed, i))`, like GPT-2 (normal std 0.02, residual
projections 0.02/sqrt(2 n_layers), zero biases, LayerNorm weights one), in float32 on the CPU and
then cast and moved. So `build_layers(cfg, a, b)` builds exactly layers [a, b) - the others are
never allocated - and any split into stages gives bit-identical results to the whole model.

Stages. `DecoderStage(cfg, a, b)` holds layers [a, b). Its input and output is the plain tuple
`(x, mask)`: x is token ids (int64 [B, T]) for the stage holding layer 0, hidden states
([B, T, d_model]) after it; mask is bool [B, T], True for real tokens. The stage holding the
last layer returns the outputs dict instead.

Padding. Rows are left-aligned (real tokens first, padding after) and attention is causal
(`scaled_dot_product_attention(is_causal=True)`), so a real token never attends to a padded
position: a row's results do not depend on the other rows of its batch, nor on their padding.
The mask is needed only at the end, to find each row's last real token.

Outputs per row: "hidden", the final (LayerNorm'ed) hidden state of the last real token
(float32 [d_model]), and "next_token", the argmax of the LM head there (int64); only that one
position goes through the LM head.

Input. The single input "text" holds either strings, tokenised byte-wise without any tokenizer
([BOS=1] + [utf-8 byte + 2, ...]), or an integer array [rows, T] of token ids in which trailing
negative values pad shorter rows. Both are truncated to max_seq_len tokens.

Sizes (`decoder-<size>`; plain `decoder` is "small"); parameters counted by `num_parameters()`:

    size   vocab  d_model layers heads  d_ff  max_seq     parameters  float32
    tiny     512    128      6      4    512     256      1,353,728    5.4 MB
    small   8192    512      6      8   2048     512     27,566,080    110 MB
    base   32000    768     12     12   3072    1024    134,994,432    540 MB
    large  32000   1024     24     16   4096    1024    368,896,000    1.5 GB
    1b     32000   2048     22     16   8192    2048  1,243,152,384    5.0 GB
    2b     32000   2560     24     20  10240    2048  2,057,323,520    8.2 GB
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelInputError
from ._batching import padded_batches
from .base import Batches, Column, Runner

__all__ = [
    "BOS_ID",
    "BYTE_OFFSET",
    "DECODER_SIZES",
    "DEFAULT_SIZE",
    "Activation",
    "DecoderConfig",
    "DecoderRunner",
    "DecoderStage",
    "build_layer",
    "build_layers",
    "decoder_config",
    "decoder_rows",
    "encode_text",
    "layer_seed",
    "parse_decoder_name",
]

BOS_ID = 1  # id 0 is padding
BYTE_OFFSET = 2  # utf-8 byte b is token b + BYTE_OFFSET
#: what passes between stages: (token ids or hidden states, mask of real tokens)
Activation = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class DecoderConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.d_model, self.n_layers, self.n_heads, self.d_ff, self.max_seq_len) < 1:
            raise ValueError(f"decoder dimensions must be positive: {self}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.vocab_size < BYTE_OFFSET + 256:
            raise ValueError(f"vocab_size must be at least {BYTE_OFFSET + 256} for byte tokens")

    @property
    def total_layers(self) -> int:
        """Embedding + blocks + head: the layers a pipeline splits."""
        return self.n_layers + 2

    def layer_parameters(self) -> list[int]:
        """Parameters of each of the `total_layers` layers, in order."""
        d, f, v = self.d_model, self.d_ff, self.vocab_size
        block = 4 * d * d + 2 * d * f + 9 * d + f  # qkv, out proj, mlp in/out, two LayerNorms
        return [(v + self.max_seq_len) * d, *[block] * self.n_layers, v * d + 2 * d]

    def num_parameters(self) -> int:
        return sum(self.layer_parameters())

    def bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Size of all weights in `dtype`."""
        return self.num_parameters() * dtype.itemsize


DEFAULT_SIZE = "small"
DECODER_SIZES: dict[str, DecoderConfig] = {
    "tiny": DecoderConfig(512, 128, 6, 4, 512, 256),
    "small": DecoderConfig(8192, 512, 6, 8, 2048, 512),
    "base": DecoderConfig(32000, 768, 12, 12, 3072, 1024),
    "large": DecoderConfig(32000, 1024, 24, 16, 4096, 1024),
    "1b": DecoderConfig(32000, 2048, 22, 16, 8192, 2048),
    "2b": DecoderConfig(32000, 2560, 24, 20, 10240, 2048),
}


def decoder_config(size: str) -> DecoderConfig:
    """The config of a named size; ValueError listing the sizes for an unknown one."""
    try:
        return DECODER_SIZES[size.lower()]
    except KeyError:
        raise ValueError(f"unknown decoder size '{size}'; sizes: {', '.join(DECODER_SIZES)}") from None


def parse_decoder_name(name: str) -> DecoderConfig | None:
    """`decoder` → the default size, `decoder-<size>` → that size, anything else → None."""
    if name == "decoder":
        return DECODER_SIZES[DEFAULT_SIZE]
    if not name.startswith("decoder-"):
        return None
    return decoder_config(name.removeprefix("decoder-"))


def layer_seed(seed: int, index: int) -> int:
    """Seed of layer `index`'s generator; distinct for every (seed, index) with index < 1e6."""
    return (seed * 1_000_003 + index) % 2**63


class _Embedding(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        out: torch.Tensor = self.tokens(ids) + self.positions(positions)[None]
        return out


class _Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.heads = cfg.n_heads
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Linear(d, cfg.d_ff)
        self.mlp_proj = nn.Linear(cfg.d_ff, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, heads, t, head_dim]
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(ctx.transpose(1, 2).reshape(b, t, d))
        out: torch.Tensor = x + self.mlp_proj(F.gelu(self.mlp(self.ln_2(x)), approximate="tanh"))
        return out


class _Head(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        last = mask.sum(dim=1) - 1  # rows are left-aligned
        hidden: torch.Tensor = self.ln_f(x[torch.arange(x.shape[0], device=x.device), last])
        return {"hidden": hidden, "next_token": self.lm_head(hidden).argmax(dim=-1)}


def build_layer(
    cfg: DecoderConfig, index: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Layer `index` alone, with its seeded weights (see the module docstring)."""
    if not 0 <= index < cfg.total_layers:
        raise ValueError(f"layer {index} out of range: the decoder has {cfg.total_layers} layers")
    kind = _Embedding if index == 0 else _Block if index <= cfg.n_layers else _Head
    with torch.device("meta"):
        layer = kind(cfg)
    layer.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(layer_seed(cfg.seed, index))
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    with torch.no_grad():
        for name, module in layer.named_modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith("_proj") else 0.02
                module.weight.normal_(0.0, std, generator=generator)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()
    return layer.requires_grad_(False).to(device=device, dtype=dtype).eval()


def build_layers(
    cfg: DecoderConfig, start: int, stop: int,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> nn.ModuleList:
    """Exactly layers [start, stop), one at a time; no other layer is ever allocated."""
    if not 0 <= start < stop <= cfg.total_layers:
        raise ValueError(f"layers [{start}, {stop}) are not a range of the {cfg.total_layers} layers")
    return nn.ModuleList(build_layer(cfg, i, dtype, device) for i in range(start, stop))


class DecoderStage(nn.Module):
    """Layers [start, stop) as one pipeline stage; stop=None means to the end."""

    def __init__(
        self, config: DecoderConfig, start: int = 0, stop: int | None = None,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.config = config
        self.start = start
        self.stop = config.total_layers if stop is None else stop
        self.layers = build_layers(config, start, self.stop, dtype, device)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.stop == self.config.total_layers

    def forward(self, x: Activation) -> Activation | dict[str, torch.Tensor]:
        """(ids or hidden, mask) → (hidden, mask), or the outputs dict from the last stage."""
        hidden, mask = x
        for layer in self.layers:
            out = layer(hidden, mask)
            if isinstance(out, dict):
                return out
            hidden = out
        return hidden, mask


def encode_text(text: str, max_seq_len: int) -> np.ndarray:
    """Byte-level token ids: BOS, then each utf-8 byte + BYTE_OFFSET; at most max_seq_len ids."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[: max_seq_len - 1]
    return np.concatenate([[BOS_ID], data.astype(np.int64) + BYTE_OFFSET])


def decoder_rows(cfg: DecoderConfig, column: Column) -> list[np.ndarray]:
    """A text or token-id column as one int64 id array per row (see the module docstring)."""
    if isinstance(column, list):
        if not all(isinstance(t, str) for t in column):
            raise ModelInputError("model 'decoder' takes text or an integer array of token ids")
        return [encode_text(t, cfg.max_seq_len) for t in column]
    if column.ndim != 2 or column.dtype.kind not in "iu":
        raise ModelInputError(
            f"model 'decoder' takes text or an integer array [rows, tokens] of token ids "
            f"(pad with -1), not {column.dtype} of shape {list(column.shape)}"
        )
    ids = column.astype(np.int64, copy=False)
    real = ids >= 0
    lengths = real.sum(axis=1)
    bad = np.flatnonzero((real != (np.arange(ids.shape[1]) < lengths[:, None])).any(axis=1)
                         | (lengths == 0) | (ids >= cfg.vocab_size).any(axis=1))
    if len(bad):
        raise ModelInputError(
            f"the token ids are not 1+ ids in [0, {cfg.vocab_size}) followed only by negative padding",
            row=int(bad[0]),
        )
    return [row[: min(int(n), cfg.max_seq_len)] for row, n in zip(ids, lengths, strict=True)]


class DecoderRunner(Runner):
    """The whole decoder in one process (data parallelism); see the module docstring."""

    input_names = ("text",)

    def __init__(
        self, size: str | DecoderConfig = "tiny", device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        if isinstance(size, DecoderConfig):
            self.config = size
        else:
            self.config = parse_decoder_name(size) or decoder_config(size)
        self.device = torch.device(device)
        self.model = DecoderStage(self.config, dtype=dtype, device=self.device)

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        rows = decoder_rows(self.config, inputs["text"])
        return padded_batches(rows, batch_size, self.device.type, torch.bool)

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        ids, mask = (t.to(self.device) for t in batch)
        with torch.inference_mode():
            out = self.model((ids, mask))
        return {
            "hidden": out["hidden"].float().cpu().numpy(),
            "next_token": out["next_token"].cpu().numpy(),
        }
