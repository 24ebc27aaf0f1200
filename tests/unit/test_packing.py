"""Packed (padding-free) encoder batches give what the padded forward gives, row by row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distinfer.models.minilm import MiniLMRunner, mean_pool
from distinfer.models.packing import Packing


def _padded(lengths: list[int], vocab: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, vocab, (len(lengths), width), generator=gen) * mask
    return ids, mask


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=12), st.floats(0.0, 1.0))
def test_pack_and_mean_rows_cover_every_real_token_once(lengths: list[int], tolerance: float) -> None:
    if max(lengths) == 0:
        lengths = [*lengths, 1]
    ids, mask = _padded(lengths)
    packing = Packing.from_mask(mask, tolerance=tolerance)
    flat = packing.pack(ids)
    assert flat.shape[0] == sum(lengths)
    for row, n in enumerate(lengths):  # each row's tokens, in order, exactly once
        assert packing.pack(ids)[packing.row_of == row].tolist() == ids[row, :n].tolist()
    assert sorted(packing.positions[packing.row_of == 0].tolist()) == list(range(lengths[0]))
    assert sum(g.rows for g in packing.groups) == sum(1 for n in lengths if n > 0)
    hidden = torch.randn(len(lengths), ids.shape[1], 3, dtype=torch.float64)
    means = packing.mean_rows(packing.pack(hidden))
    for row, n in enumerate(lengths):
        want = hidden[row, :n].mean(dim=0) if n else torch.zeros(3, dtype=torch.float64)
        torch.testing.assert_close(means[row], want)


@pytest.mark.parametrize("tolerance", [0.0, 0.1, 1.0])
def test_grouped_attention_equals_padded_attention(tolerance: float) -> None:
    lengths = [7, 30, 1, 30, 12, 29, 5]
    _, mask = _padded(lengths)
    b, w, heads, d = len(lengths), mask.shape[1], 4, 8
    q, k, v = (torch.randn(b, w, heads * d, dtype=torch.float64) for _ in range(3))
    packing = Packing.from_mask(mask, dtype=torch.float64, tolerance=tolerance)
    ours = packing.attention(*(packing.pack(x) for x in (q, k, v)), heads, 0.5)

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, w, heads, d).transpose(1, 2)

    additive = (1.0 - mask[:, None, None, :].double()) * torch.finfo(torch.float64).min
    want = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=additive,
                                                            scale=0.5)
    torch.testing.assert_close(ours, packing.pack(want.transpose(1, 2).reshape(b, w, heads * d)))


@pytest.fixture(scope="module")
def runner() -> MiniLMRunner:
    torch.manual_seed(0)
    return MiniLMRunner()


def test_minilm_packed_forward_equals_padded_forward(runner: MiniLMRunner, corpus_lines: list[str]) -> None:
    texts = corpus_lines[:40]  # random lengths, unsorted: the rows of a server's batch
    tokens = [e.ids for e in runner.tokens.tokenizer.encode_batch(texts)]
    ids, mask = _padded([len(t) for t in tokens])
    for row, t in enumerate(tokens):
        ids[row, : len(t)] = torch.tensor(t)
    with torch.inference_mode():
        padded = mean_pool(runner.model(ids, mask, torch.zeros_like(ids)), mask)["embedding"]
    packed = runner.forward((ids, mask))["embedding"]
    np.testing.assert_allclose(packed, padded, rtol=0, atol=2e-6)
    # and a row's embedding does not depend on the rows beside it
    alone = runner.forward((ids[3:4, : len(tokens[3])], mask[3:4, : len(tokens[3])]))["embedding"]
    np.testing.assert_allclose(alone[0], packed[3], rtol=0, atol=2e-6)


def test_minilm_batches_are_not_cut_by_length(runner: MiniLMRunner, corpus_lines: list[str]) -> None:
    texts = ["a", *corpus_lines[:30], "In the beginning " * 20]
    prepared = runner.prepare({"text": texts}, 64)
    assert len(prepared.batches) == 1  # a packed model gains nothing from cutting by length
    assert len(runner.prepare({"text": texts}, 8).batches) == 4
