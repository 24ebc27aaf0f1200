"""The paged KV cache on the model side, and one step's attention metadata.

A KV cache is a pool of fixed-size pages (PagedAttention's idea): a sequence holds a list of
page ids (its page table), so sequences of any length share one allocation without
fragmenting it. Which pages a sequence holds is the engine's decision (`engine.PageTable`);
every process that holds layers (a pipeline stage, a tensor-parallel rank) keeps the pages of
its own layers and follows the tables it is sent.

Global layers use a pool whose tables grow with the sequence. Sliding-window layers keep only
their window: their pool is used as a ring of `ring_pages` pages per sequence (position p in
ring page `(p // page) % ring_pages`), enough for the window plus one prefill chunk, so a
step's keys and values can be written before they are read.

`StepMeta` turns a step's plan (which tokens of which sequences, at which positions, with
which tables) into index tensors once per step; every layer of a kind reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...messages import KV_PAGE_TOKENS

__all__ = ["KV_DTYPE", "KV_ITEMSIZE", "KindMeta", "PagedKV", "SeqChunk", "StepMeta", "build_meta",
           "ring_pages"]

PAGE = KV_PAGE_TOKENS  # tokens per page
# Keys and values are kept in float32 whatever the weights' dtype: attention is a small part
# of the work, and float32 keys need no conversion before it (nor lose any precision).
KV_DTYPE = torch.float32
KV_ITEMSIZE = 4


def ring_pages(window: int, chunk: int, page: int = PAGE) -> int:
    """Pages of a sliding layer's ring: the window and one chunk of new tokens fit in it."""
    return -(-(window + chunk) // page) + 1


@dataclass(frozen=True, slots=True)
class SeqChunk:
    """One sequence's share of a step: tokens at positions [start, start + len(tokens))."""

    tokens: tuple[int, ...]
    start: int
    pages: tuple[int, ...]  # global layers' page table (covers start + len(tokens))
    ring: tuple[int, ...]  # sliding layers' ring pages (empty when the model has none)
    logits: bool  # the last token's next-token scores are wanted (the prompt is done)


@dataclass(slots=True)
class KindMeta:
    """Index tensors for the layers of one kind (one window size) in a step."""

    window: int  # 0: global
    write: torch.Tensor  # [T] flat cache slot of each new token
    # decodes (one new token each), in groups of similar context length, one batched call
    # each: (their token indices in the step [B], flat slots of the keys each attends to,
    # padded [B, L], True where a key is attended [B, 1, 1, L])
    decodes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    # prefill chunks, one call each: (first token index, tokens, slots [Lk], mask [n, Lk])
    chunks: list[tuple[int, int, torch.Tensor, torch.Tensor]]


@dataclass(slots=True)
class StepMeta:
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    kinds: dict[int, KindMeta]  # by window
    last: torch.Tensor  # [S'] token indices whose logits are wanted, in chunk order
    rows: int  # sequences in the step


def _slots(lo: int, end: int, table: torch.Tensor, ring: int) -> torch.Tensor:
    """Flat cache slots of positions [lo, end) for a page table (a ring of `ring` pages if set)."""
    pos = torch.arange(lo, end)
    page = pos // PAGE
    if ring:
        page = page % ring
    return table[page] * PAGE + pos % PAGE


def build_meta(chunks: list[SeqChunk], windows: set[int], ring: int) -> StepMeta:
    """The step's metadata for layers with these windows (0: global); `ring` = ring pages."""
    tokens: list[int] = []
    positions: list[torch.Tensor] = []
    firsts: list[int] = []
    for c in chunks:
        firsts.append(len(tokens))
        tokens.extend(c.tokens)
        positions.append(torch.arange(c.start, c.start + len(c.tokens)))
    tables = [(torch.tensor(c.pages, dtype=torch.long), torch.tensor(c.ring, dtype=torch.long))
              for c in chunks]
    kinds = {}
    for window in windows:
        write: list[torch.Tensor] = []
        dec_tokens: list[int] = []
        dec_keys: list[torch.Tensor] = []
        prefill: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        for c, first, (pages, ring_table) in zip(chunks, firsts, tables, strict=True):
            n = len(c.tokens)
            end = c.start + n
            table, r = (ring_table, ring) if window else (pages, 0)
            write.append(_slots(c.start, end, table, r))
            lo = max(0, c.start - window + 1) if window else 0
            keys = _slots(lo, end, table, r)
            if n == 1:
                dec_tokens.append(first)
                dec_keys.append(keys)
            else:
                kpos = torch.arange(lo, end)
                qpos = torch.arange(c.start, end)
                mask = kpos[None, :] <= qpos[:, None]
                if window:
                    mask &= kpos[None, :] > qpos[:, None] - window
                prefill.append((first, n, keys, mask))
        kinds[window] = KindMeta(window, torch.cat(write) if write else torch.zeros(0, dtype=torch.long),
                                 _decode_groups(dec_tokens, dec_keys), prefill)
    last = [first + len(c.tokens) - 1 for c, first in zip(chunks, firsts, strict=True) if c.logits]
    return StepMeta(torch.tensor(tokens, dtype=torch.long),
                    torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long),
                    kinds, torch.tensor(last, dtype=torch.long), len(chunks))


def _decode_groups(tokens: list[int], keys: list[torch.Tensor]
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Decodes grouped by context length (a group's longest at most twice its shortest, plus
    a page), so a long sequence does not pad every short one to its length."""
    order = sorted(range(len(keys)), key=lambda i: len(keys[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and len(keys[i]) <= 2 * len(keys[groups[-1][0]]) + PAGE:
            groups[-1].append(i)
        else:
            groups.append([i])
    out = []
    for group in groups:
        longest = len(keys[group[-1]])
        slots = torch.zeros((len(group), longest), dtype=torch.long)
        mask = torch.zeros((len(group), 1, 1, longest), dtype=torch.bool)
        for row, i in enumerate(group):
            slots[row, : len(keys[i])] = keys[i]
            mask[row, 0, 0, : len(keys[i])] = True
        out.append((torch.tensor([tokens[i] for i in group], dtype=torch.long), slots, mask))
    return out


class PagedKV:
    """Keys and values of one layer: [pages * PAGE, kv_heads, head_dim] each."""

    def __init__(self, pages: int, kv_heads: int, head_dim: int) -> None:
        self.k = torch.zeros((pages * PAGE, kv_heads, head_dim), dtype=KV_DTYPE)
        self.v = torch.zeros_like(self.k)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: KindMeta,
               scale: float) -> torch.Tensor:
        """Write the step's new keys/values, then attend: q [T, H, d] -> [T, H * d]."""
        self.k.index_copy_(0, meta.write, k.to(KV_DTYPE))
        self.v.index_copy_(0, meta.write, v.to(KV_DTYPE))
        out = torch.empty_like(q)
        heads, kv_heads, d = q.shape[1], self.k.shape[1], q.shape[2]
        for tokens, slots, mask in meta.decodes:
            # one query token per sequence: two batched matrix products in float32, each KV
            # head's queries together (faster here than scaled_dot_product_attention's kernels)
            b = len(tokens)
            qd = q.index_select(0, tokens).to(KV_DTYPE).view(b, kv_heads, heads // kv_heads, d)
            kd = self.k[slots].transpose(1, 2)  # [B, kvh, L, d]
            vd = self.v[slots].transpose(1, 2)
            scores = torch.matmul(qd, kd.transpose(-1, -2)).mul_(scale)  # [B, kvh, g, L]
            scores.masked_fill_(~mask, float("-inf"))
            o = torch.matmul(torch.softmax(scores, dim=-1), vd)  # [B, kvh, g, d]
            out.index_copy_(0, tokens, o.reshape(b, heads, d).to(out.dtype))
        for first, n, slots, mask in meta.chunks:
            qc = q[first : first + n].to(KV_DTYPE).transpose(0, 1)[None]  # [1, H, n, d]
            kc = self.k[slots].transpose(0, 1)[None]  # [1, kvh, Lk, d]
            vc = self.v[slots].transpose(0, 1)[None]
            o = torch.nn.functional.scaled_dot_product_attention(
                qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True)
            out[first : first + n] = o[0].transpose(0, 1)
        return out.reshape(q.shape[0], -1)
