"""Tensor-parallel (Megatron-style) shards of the built-in transformers: `decoder-SIZE` and `minilm`.

Every one of the N ranks holds every layer, but only 1/N of each transformer block's weights:

- Attention. The q, k and v projections are column-parallel: rank r keeps the output rows of
  heads [r*H/N, (r+1)*H/N) and computes attention for those heads alone (heads never mix
  inside attention). The output projection is row-parallel: rank r keeps the input columns of
  its heads, so its matmul gives a partial sum of the full projection. One all-reduce (sum)
  over the ranks completes it; the bias is added once, after the reduce, then the residual.
- MLP. The first linear is column-parallel (d_ff/N rows each; the activation is elementwise,
  so each rank applies it to its own slice), the second row-parallel: again one all-reduce,
  bias once, residual.

So a block costs exactly two all-reduces of an activation [B, T, d]; nothing else crosses
ranks. After each reduce every rank holds the same hidden state, so LayerNorms, embeddings
and the head are replicated (computed redundantly; they are cheap). Only rank 0's outputs are
used, so only rank 0 builds the decoder's head and pools BERT's output.

The all-reduce is injected (an `AllReduce` callable that sums a tensor over the ranks and
returns the sum, in place or not), so the sharding maths can be checked in one process:
`attention_partial` / `mlp_partial` return a rank's share before the reduce, and the shares of
all ranks summed (plus bias and residual) equal the unsharded block.

Weights. A rank never holds a whole model: the decoder builds each block with its seeded
weights (`decoder.build_layer`), one at a time, slices it and frees it; BERT reads only its
slices from the safetensors checkpoint (`safe_open(...).get_slice(name)`).

`divisibility_problem` says, in one line, why N ranks cannot share a model's heads and MLP;
`DecoderShards` and `BertShards` are the two families' `ShardedForm`s (models/family.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .bert import _LAYER_KEYS, BertConfig, _Layer, load_bert
from .decoder import DecoderConfig, _Block, build_layer

__all__ = [
    "AllReduce",
    "BertShards",
    "DecoderShards",
    "ShardedBert",
    "ShardedBertLayer",
    "ShardedDecoder",
    "ShardedDecoderBlock",
    "SliceReader",
    "checkpoint_reader",
    "divisibility_problem",
    "layer_reader",
    "shard_range",
]

#: sums a tensor over all ranks and returns the sum (gloo/NCCL reduce in place)
AllReduce = Callable[[torch.Tensor], torch.Tensor]
#: (parameter name as in bert._Layer, e.g. "query.weight"; rows; columns) → that slice
SliceReader = Callable[[str, slice | None, slice | None], torch.Tensor]


def _no_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


def shard_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s share [start, stop) of `total` units (heads, d_ff rows); N must divide it."""
    if world < 1 or not 0 <= rank < world or total % world:
        raise ValueError(f"cannot give rank {rank} of {world} an equal share of {total}")
    size = total // world
    return rank * size, (rank + 1) * size


def _param(t: torch.Tensor) -> nn.Parameter:
    # A copy, never a view: a view would keep the whole unsharded tensor alive.
    return nn.Parameter(t.clone(memory_format=torch.contiguous_format), requires_grad=False)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding exactly `weight` ([out, in]) and `bias` (no initialisation)."""
    out_features, in_features = weight.shape
    with torch.device("meta"):
        layer = nn.Linear(in_features, out_features, bias=bias is not None)
    layer.weight = _param(weight)
    if bias is not None:
        layer.bias = _param(bias)
    return layer


def divisibility_problem(model_name: str, heads: int, d_ff: int, world: int) -> str | None:
    """Why `world` ranks cannot share `heads` attention heads and an MLP width of `d_ff`
    equally, with the rank counts that can; None when they can."""
    if world < 2:
        return f"tensor parallelism needs at least 2 ranks, got --tensor-parallel {world}"
    if heads % world or d_ff % world:
        common = math.gcd(heads, d_ff)
        valid = ", ".join(str(k) for k in range(2, common + 1) if common % k == 0)
        return (
            f"'{model_name}' has {heads} attention heads and an MLP width of {d_ff}; "
            f"--tensor-parallel {world} does not divide both: use one of {valid}"
        )
    return None


# --- decoder-SIZE ---------------------------------------------------------------------------


class ShardedDecoderBlock(nn.Module):
    """Rank `rank`'s shard of a pre-LN decoder block (`decoder._Block`); see the module docstring."""

    def __init__(self, block: _Block, rank: int, world: int, all_reduce: AllReduce = _no_reduce) -> None:
        super().__init__()
        d = block.qkv.in_features
        heads = block.heads
        head_dim = d // heads
        h0, h1 = shard_range(heads, rank, world)
        f0, f1 = shard_range(block.mlp.out_features, rank, world)
        c0, c1 = h0 * head_dim, h1 * head_dim  # this rank's columns of the attention context
        self.local_heads = h1 - h0
        self.head_dim = head_dim
        self.all_reduce = all_reduce
        self.ln_1 = block.ln_1
        self.ln_2 = block.ln_2
        # qkv's output is laid out (3, heads, head_dim): keep this rank's heads of q, k and v.
        self.qkv = _linear(
            block.qkv.weight.view(3, heads, head_dim, d)[:, h0:h1].reshape(-1, d),
            block.qkv.bias.view(3, heads, head_dim)[:, h0:h1].reshape(-1),
        )
        self.attn_proj = _linear(block.attn_proj.weight[:, c0:c1], None)  # row-parallel
        self.attn_proj_bias = _param(block.attn_proj.bias)
        self.mlp = _linear(block.mlp.weight[f0:f1], block.mlp.bias[f0:f1])  # column-parallel
        self.mlp_proj = _linear(block.mlp_proj.weight[:, f0:f1], None)  # row-parallel
        self.mlp_proj_bias = _param(block.mlp_proj.bias)

    def attention_partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of attn_proj(attention(ln_1(x))), without the bias."""
        b, t, _ = x.shape
        qkv = self.qkv(self.ln_1(x)).view(b, t, 3, self.local_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, local heads, t, head_dim]
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ctx = ctx.transpose(1, 2).reshape(b, t, self.local_heads * self.head_dim)
        out: torch.Tensor = self.attn_proj(ctx)
        return out

    def mlp_partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of mlp_proj(gelu(mlp(ln_2(x)))), without the bias."""
        out: torch.Tensor = self.mlp_proj(F.gelu(self.mlp(self.ln_2(x)), approximate="tanh"))
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.all_reduce(self.attention_partial(x))
        y += self.attn_proj_bias
        y += x
        x = y
        y = self.all_reduce(self.mlp_partial(x))
        y += self.mlp_proj_bias
        y += x
        return y


class ShardedDecoder(nn.Module):
    """One rank of `decoder-SIZE`: the embedding (replicated), every block's shard and, on rank 0
    only, the final LayerNorm + LM head. `forward((ids, mask))` returns the outputs dict on
    rank 0 (as `DecoderStage` does) and the last hidden state elsewhere."""

    def __init__(
        self, config: DecoderConfig, rank: int, world: int, all_reduce: AllReduce = _no_reduce,
        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.config = config
        self.rank = rank
        self.embedding = build_layer(config, 0, dtype, device)
        blocks = []
        for index in range(1, config.n_layers + 1):
            full = build_layer(config, index)  # float32 on the CPU; freed once sliced
            assert isinstance(full, _Block)
            blocks.append(ShardedDecoderBlock(full, rank, world, all_reduce).to(device=device, dtype=dtype))
            del full
        self.blocks = nn.ModuleList(blocks)
        self.head = build_layer(config, config.n_layers + 1, dtype, device) if rank == 0 else None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        x: torch.Tensor = self.embedding(ids, mask)
        for block in self.blocks:
            x = block(x, mask)
        if self.head is None:
            return x
        out: dict[str, torch.Tensor] = self.head(x, mask)
        return out


# --- BERT (minilm) --------------------------------------------------------------------------


def layer_reader(layer: _Layer) -> SliceReader:
    """Slices of an already built BERT layer's parameters (for tests and small models)."""
    params = dict(layer.named_parameters())

    def read(name: str, rows: slice | None, cols: slice | None) -> torch.Tensor:
        t = params[name].detach()
        if rows is not None:
            t = t[rows]
        if cols is not None:
            t = t[:, cols]
        return t

    return read


def checkpoint_reader(handle: Any, index: int) -> SliceReader:
    """Slices of layer `index`'s tensors read from an open safetensors file (`safe_open`): only
    the requested rows or columns are read from disk."""
    names = set(handle.keys())

    def read(name: str, rows: slice | None, cols: slice | None) -> torch.Tensor:
        ours, suffix = name.split(".")
        key = f"encoder.layer.{index}.{_LAYER_KEYS[ours]}.{suffix}"
        key = key if key in names else f"bert.{key}"  # some checkpoints prefix every name
        part = handle.get_slice(key)
        if rows is not None:
            t: torch.Tensor = part[rows]
        elif cols is not None:
            t = part[:, cols]
        else:
            t = part[:]
        return t

    return read


class ShardedBertLayer(nn.Module):
    """Rank `rank`'s shard of a post-LN BERT layer (`bert._Layer`); see the module docstring.
    q, k and v are stored fused ([3 * local width, hidden]) so that one matmul computes them."""

    def __init__(
        self, config: BertConfig, read: SliceReader, rank: int, world: int, all_reduce: AllReduce = _no_reduce
    ) -> None:
        super().__init__()
        h = config.hidden_size
        head_dim = h // config.num_attention_heads
        h0, h1 = shard_range(config.num_attention_heads, rank, world)
        f0, f1 = shard_range(config.intermediate_size, rank, world)
        cols = slice(h0 * head_dim, h1 * head_dim)
        ff = slice(f0, f1)
        self.local_heads = h1 - h0
        self.head_dim = head_dim
        self.all_reduce = all_reduce
        qkv = ("query", "key", "value")
        self.qkv = _linear(  # column-parallel
            torch.cat([read(f"{p}.weight", cols, None) for p in qkv]),
            torch.cat([read(f"{p}.bias", cols, None) for p in qkv]),
        )
        self.attn_out = _linear(read("attn_out.weight", None, cols), None)  # row-parallel
        self.attn_out_bias = _param(read("attn_out.bias", None, None))
        self.attn_norm = self._norm(config, read, "attn_norm")
        self.mlp_in = _linear(read("mlp_in.weight", ff, None), read("mlp_in.bias", ff, None))
        self.mlp_out = _linear(read("mlp_out.weight", None, ff), None)  # row-parallel
        self.mlp_out_bias = _param(read("mlp_out.bias", None, None))
        self.mlp_norm = self._norm(config, read, "mlp_norm")

    @staticmethod
    def _norm(config: BertConfig, read: SliceReader, name: str) -> nn.LayerNorm:
        with torch.device("meta"):
            norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        norm.weight = _param(read(f"{name}.weight", None, None))
        norm.bias = _param(read(f"{name}.bias", None, None))
        return norm

    def attention_partial(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This rank's share of attn_out(attention(x)), without the bias; `mask` is additive."""
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.local_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
        ctx = ctx.transpose(1, 2).reshape(b, t, self.local_heads * self.head_dim)
        out: torch.Tensor = self.attn_out(ctx)
        return out

    def mlp_partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of mlp_out(gelu(mlp_in(x))), without the bias."""
        out: torch.Tensor = self.mlp_out(F.gelu(self.mlp_in(x)))
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.all_reduce(self.attention_partial(x, mask))
        y += self.attn_out_bias
        y += x
        x = self.attn_norm(y)
        y = self.all_reduce(self.mlp_partial(x))
        y += self.mlp_out_bias
        y += x
        out: torch.Tensor = self.mlp_norm(y)
        return out


class ShardedBert(nn.Module):
    """One rank of a BERT encoder (`minilm`): the embeddings (replicated) and every layer's
    shard, read slice by slice from `model_dir/model.safetensors`. `forward` returns the last
    hidden state, like `BertEncoder` (token type 0 everywhere)."""

    def __init__(
        self, model_dir: Path, rank: int, world: int, all_reduce: AllReduce = _no_reduce,
        device: str | torch.device = "cpu",
    ) -> None:
        from safetensors import safe_open

        super().__init__()
        self.config = BertConfig.from_file(model_dir / "config.json")
        embeddings = load_bert(model_dir, 0, 1).embeddings  # the embeddings alone, no layer
        assert embeddings is not None
        self.embeddings = embeddings
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
            self.layers = nn.ModuleList(
                ShardedBertLayer(self.config, checkpoint_reader(f, i), rank, world, all_reduce)
                for i in range(self.config.num_hidden_layers)
            )
        self.to(device).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.embeddings(input_ids, torch.zeros_like(input_ids))
        # Additive mask as in BertEncoder: padded keys get the dtype's minimum.
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, mask)
        return x


# --- the families' sharded forms ------------------------------------------------------------


class _Rank:
    """A rank's shards and, on rank 0, what turns the last hidden state into outputs."""

    def __init__(
        self, model: nn.Module, rank: int, outputs: Callable[[Any, torch.Tensor], dict[str, Any]]
    ) -> None:
        self.model = model
        self.rank = rank
        self.outputs = outputs

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any] | None:
        with torch.inference_mode():
            out = self.model(ids, mask)
            return self.outputs(out, mask) if self.rank == 0 else None


class DecoderShards:
    """`decoder-SIZE`'s tensor-parallel form: `ShardedDecoder` per rank, the LM head on rank 0."""

    def __init__(self, name: str) -> None:
        from .decoder import parse_decoder_name

        config = parse_decoder_name(name)
        if config is None:
            raise ValueError(f"'{name}' is not a decoder-SIZE model")
        self.name = name
        self.config = config

    def preparer(self, device: str) -> Any:
        from .decoder_stages import DecoderStaged

        return DecoderStaged(self.name).preparer(device)

    def build_rank(self, rank: int, world: int, all_reduce: AllReduce, device: Any) -> _Rank:
        from .decoder_stages import decoder_outputs

        model = ShardedDecoder(self.config, rank, world, all_reduce, device)
        return _Rank(model, rank, lambda out, mask: decoder_outputs(out))


class BertShards:
    """`minilm`'s tensor-parallel form: `ShardedBert` per rank, mean pooling on rank 0."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir

    def preparer(self, device: str) -> Any:
        from .minilm import MiniLMTokens

        return MiniLMTokens(self.model_dir, device)

    def build_rank(self, rank: int, world: int, all_reduce: AllReduce, device: Any) -> _Rank:
        from .minilm import mean_pool

        return _Rank(ShardedBert(self.model_dir, rank, world, all_reduce, device), rank, mean_pool)
