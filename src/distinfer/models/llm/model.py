"""The decoder itself, for Gemma 3 and Llama-style models, in plain PyTorch.

`DecoderPart` holds a contiguous range of layers [start, stop), plus the token embedding
when it starts at 0 and the final norm and LM head when it ends at the last layer: the whole
model (one process), a pipeline stage, or, with `rank`/`world`, one tensor-parallel rank's
shards of every layer (Megatron: q/k/v, gate/up split by output rows, o/down by input
columns, an all-reduce after each; the vocabulary split for the embedding and the LM head).

Gemma 3 as transformers' `modeling_gemma3.py` computes it: RMSNorm in float32 (`x * w`, the
stored multiplier being `1 + w`), embeddings times `sqrt(hidden)`, q/k RMSNorm per head before
RoPE, attention scaled by `query_pre_attn_scalar ** -0.5`, norms after attention and after
the MLP too, a gated tanh-GELU MLP, sliding-window layers with their own RoPE base. Llama:
plain pre-norm blocks with SiLU, optional q/k/v biases (Qwen2), RoPE scaling.

Only the last token of each sequence that wants scores goes through the LM head; what comes
out is each such sequence's best candidates (`sampling.top_candidates`), never the full
262k-wide logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .config import LlmConfig
from .head import ScreenedHead
from .paged import PagedKV, StepMeta
from .weights import WeightStore

__all__ = ["AllReduce", "DecoderPart", "shard_problem"]

AllReduce = Callable[[torch.Tensor], Any]


def shard_problem(config: LlmConfig, world: int) -> str | None:
    """Why `world` ranks cannot shard this model; None when they can."""
    problems = []
    if config.heads % world:
        problems.append(f"{config.heads} attention heads")
    if config.kv_heads % world and world % config.kv_heads:
        problems.append(f"{config.kv_heads} key/value heads")
    if config.ffn % world:
        problems.append(f"an MLP width of {config.ffn}")
    if config.vocab % world:
        problems.append(f"a vocabulary of {config.vocab}")
    if not problems:
        return None
    return f"--tensor-parallel {world} does not divide {' and '.join(problems)}"


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * w).type_as(x)


def _inv_freq(config: LlmConfig, theta: float, local: bool) -> torch.Tensor:
    d = config.head_dim
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if local or s.kind == "default":
        return inv
    if s.kind == "linear":
        return inv / s.factor
    # llama3: long wavelengths scaled by the factor, short ones kept, a smooth ramp between
    low_wavelen = s.original_context / s.low_freq_factor
    high_wavelen = s.original_context / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = (1 - smooth) * scaled / s.factor + smooth * scaled
    between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(between, mid, scaled)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _Layer:
    def __init__(self, config: LlmConfig, index: int, w: dict[str, torch.Tensor], rank: int, world: int,
                 dtype: torch.dtype) -> None:
        c = config
        self.window = c.windows[index]
        d = c.head_dim
        self.heads = c.heads // world
        if c.kv_heads % world == 0:
            self.kv_heads, kv0 = c.kv_heads // world, rank * (c.kv_heads // world)
        else:  # more ranks than kv heads: each rank holds the one its query heads use
            self.kv_heads, kv0 = 1, rank // (world // c.kv_heads)
        q_rows = slice(rank * self.heads * d, (rank + 1) * self.heads * d)
        kv_rows = slice(kv0 * d, (kv0 + self.kv_heads) * d)
        f = c.ffn // world
        f_rows = slice(rank * f, (rank + 1) * f)
        self.q_dim, self.kv_dim = self.heads * d, self.kv_heads * d
        self.qkv = torch.cat([w["q"][q_rows], w["k"][kv_rows], w["v"][kv_rows]]).to(dtype).contiguous()
        self.qkv_bias = None
        if "q_bias" in w:
            bias = torch.cat([w["q_bias"][q_rows], w["k_bias"][kv_rows], w["v_bias"][kv_rows]])
            self.qkv_bias = bias.to(dtype)
        self.o = w["o"][:, q_rows].to(dtype).contiguous()
        self.gate_up = torch.cat([w["gate"][f_rows], w["up"][f_rows]]).to(dtype).contiguous()
        self.down = w["down"][:, f_rows].to(dtype).contiguous()
        self.f = f
        names = ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")
        self.norms = {k: w[k].float() for k in names if k in w}
        self.kv: PagedKV | None = None

    def forward(self, x: torch.Tensor, meta: StepMeta, rope: tuple[torch.Tensor, torch.Tensor],
                c: LlmConfig, all_reduce: AllReduce | None) -> torch.Tensor:
        assert self.kv is not None, "allocate the KV cache first"
        eps, n = c.norm_eps, self.norms
        h = _rms(x, n["attn_norm"], eps)
        qkv = F.linear(h, self.qkv, self.qkv_bias)
        t = x.shape[0]
        q = qkv[:, : self.q_dim].view(t, self.heads, c.head_dim)
        k = qkv[:, self.q_dim : self.q_dim + self.kv_dim].view(t, self.kv_heads, c.head_dim)
        v = qkv[:, self.q_dim + self.kv_dim :].view(t, self.kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = _rms(q, n["q_norm"], eps), _rms(k, n["k_norm"], eps)
        cos, sin = rope
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        a = self.kv.attend(q, k, v.contiguous(), meta.kinds[self.window], c.attn_scale)
        o = F.linear(a, self.o)
        if all_reduce is not None:
            all_reduce(o)
        if c.sandwich_norm:
            o = _rms(o, n["post_attn_norm"], eps)
        x = x + o
        h = _rms(x, n["ffn_norm"], eps)
        gu = F.linear(h, self.gate_up)
        g, u = gu[:, : self.f], gu[:, self.f :]
        act = F.gelu(g, approximate="tanh") if c.activation == "gelu_tanh" else F.silu(g)
        m = F.linear(act * u, self.down)
        if all_reduce is not None:
            all_reduce(m)
        if c.sandwich_norm:
            m = _rms(m, n["post_ffn_norm"], eps)
        return x + m


class DecoderPart:
    """Layers [start, stop) of the model (see the module docstring)."""

    def __init__(self, config: LlmConfig, store: WeightStore, start: int, stop: int, rank: int = 0,
                 world: int = 1, all_reduce: AllReduce | None = None,
                 dtype: torch.dtype = torch.float32, head_rows: tuple[int, int] | None = None) -> None:
        """`head_rows`: the vocabulary rows this part scores (default: the last part scores the
        whole vocabulary, or its rank's slice); a pipeline splits the LM head between its
        first and last stages."""
        self.config, self.start, self.stop = config, start, stop
        self.rank, self.world = rank, world
        self.all_reduce = all_reduce if world > 1 else None
        self.dtype = dtype
        v = config.vocab // world
        self.vocab_lo = rank * v  # a rank's slice of the embedding (tensor parallel)
        if head_rows is None and stop == config.layers:
            head_rows = (self.vocab_lo, self.vocab_lo + v)
        self.head_rows = head_rows
        self.embed: torch.Tensor | None = None
        self.head: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        if start == 0:
            self.embed = store.rows("embed", self.vocab_lo, self.vocab_lo + v).to(dtype).contiguous()
        if stop == config.layers:
            self.norm = store.part("norm")["norm"].float()
        if head_rows is not None:
            lo, hi = head_rows
            own = (lo, hi) == (self.vocab_lo, self.vocab_lo + v)
            if self.embed is not None and config.tied_embeddings and own:
                self.head = self.embed
            else:
                table = "embed" if config.tied_embeddings else "head"
                self.head = store.rows(table, lo, hi).to(dtype).contiguous()
        # a float32 head is screened at bfloat16 speed, its results still float32's (head.py)
        self.screen = ScreenedHead(self.head) if self.head is not None and dtype == torch.float32 else None
        self.layers = [_Layer(config, i, store.part(f"layer.{i}"), rank, world, dtype)
                       for i in range(start, stop)]
        self.windows = {layer.window for layer in self.layers}
        self._inv = {0: _inv_freq(config, config.rope_theta, False)}
        if any(config.windows):
            self._inv[1] = _inv_freq(config, config.rope_local_theta, config.arch == "gemma3")

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.stop == self.config.layers

    def allocate(self, pages: int, ring_pool: int) -> None:
        """The KV cache of this part's layers: `pages` pages for global layers, `ring_pool`
        pages for sliding-window ones."""
        for layer in self.layers:
            layer.kv = PagedKV(ring_pool if layer.window else pages, layer.kv_heads, self.config.head_dim)

    def cache_bytes(self) -> int:
        return sum(layer.kv.k.numel() * 2 * layer.kv.k.element_size() for layer in self.layers if layer.kv)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self.embed is not None
        if self.world == 1:
            x = F.embedding(tokens, self.embed)
        else:  # vocabulary-parallel: each rank looks up its slice, the sum is the embedding
            local = tokens - self.vocab_lo
            inside = (local >= 0) & (local < self.embed.shape[0])
            x = F.embedding(local.clamp(0, self.embed.shape[0] - 1), self.embed) * inside[:, None]
            assert self.all_reduce is not None
            self.all_reduce(x)
        scale = torch.tensor(self.config.embed_scale, dtype=self.dtype)
        return x * scale if self.config.embed_scale != 1.0 else x

    @torch.inference_mode()
    def forward(self, meta: StepMeta, x: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (first part) or the previous part's hidden states [T, hidden] in,
        hidden states out; the last part returns the final-normed hidden states of the tokens
        whose scores are wanted ([S', hidden])."""
        if x is None:
            x = self.embed_tokens(meta.tokens)
        pos = meta.positions.float()[:, None]
        ropes = {}
        for key, inv in self._inv.items():
            freqs = pos * inv[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            ropes[key] = (emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :])
        for layer in self.layers:
            x = layer.forward(x, meta, ropes[1 if layer.window and 1 in ropes else 0], self.config,
                              self.all_reduce)
        if not self.is_last:
            return x
        assert self.norm is not None
        return _rms(x.index_select(0, meta.last), self.norm, self.config.norm_eps)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The scores of this part's vocabulary rows (`head_rows`), float32 [S', rows]."""
        assert self.head is not None
        return F.linear(h.to(self.dtype), self.head).float()

    @torch.inference_mode()
    def candidates(self, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `k` best (score, token id) of this part's vocabulary rows for each row of `h`."""
        from .sampling import top_candidates

        assert self.head_rows is not None
        if self.screen is not None:
            return self.screen.candidates(h, k, self.head_rows[0])
        assert self.head is not None
        scores = F.linear(h.to(self.dtype), self.head)  # ranked in its own dtype: no 262k-wide copy
        values, ids = top_candidates(scores, k, self.head_rows[0])
        return values.float(), ids
