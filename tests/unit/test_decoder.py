"""The seeded GPT-style `decoder`: sizes, per-layer building, stage splits and the runner."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from distinfer import ModelInputError
from distinfer.models import StageTimer, run_block
from distinfer.models.decoder import (
    BOS_ID,
    BYTE_OFFSET,
    DECODER_SIZES,
    DecoderConfig,
    DecoderRunner,
    DecoderStage,
    build_layers,
    encode_text,
    parse_decoder_name,
)

TINY = DECODER_SIZES["tiny"]


def _batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-aligned random rows of the given lengths, padded with 0."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=np.bool_)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(0, TINY.vocab_size, n)
        mask[row, :n] = True
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _run(stages: list[DecoderStage], batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    x = batch
    with torch.inference_mode():
        for stage in stages:
            x = stage(x)
    assert isinstance(x, dict)
    return x


@pytest.fixture(scope="module")
def whole() -> DecoderStage:
    return DecoderStage(TINY)


def test_sizes_and_parameter_counts() -> None:
    assert DECODER_SIZES["1b"].num_parameters() >= 1e9
    assert DECODER_SIZES["2b"].num_parameters() >= 2e9
    assert 1e6 <= TINY.num_parameters() <= 2e6
    for cfg in DECODER_SIZES.values():
        per_layer = cfg.layer_parameters()
        assert len(per_layer) == cfg.total_layers == cfg.n_layers + 2
        assert sum(per_layer) == cfg.num_parameters()
        assert cfg.bytes() == 4 * cfg.num_parameters()
        assert cfg.bytes(torch.bfloat16) == 2 * cfg.num_parameters()
    counts = [c.num_parameters() for c in DECODER_SIZES.values()]
    assert counts == sorted(counts)


@pytest.mark.parametrize(("start", "stop"), [(0, 1), (1, 3), (6, 8), (0, 8), (2, 7)])
def test_build_layers_allocates_only_those_layers(start: int, stop: int) -> None:
    layers = build_layers(TINY, start, stop)
    assert len(layers) == stop - start
    for i, layer in zip(range(start, stop), layers, strict=True):
        assert sum(p.numel() for p in layer.parameters()) == TINY.layer_parameters()[i]
        assert all(p.device.type == "cpu" for p in layer.parameters())
    with pytest.raises(ValueError, match="not a range"):
        build_layers(TINY, 3, 3)
    with pytest.raises(ValueError, match="not a range"):
        build_layers(TINY, 0, TINY.total_layers + 1)


@pytest.mark.parametrize("cuts", [[4], [1, 7], [3, 5], [2, 4, 6]])
def test_split_stages_equal_whole_model(whole: DecoderStage, cuts: list[int]) -> None:
    batch = _batch([5, 17, 1, 11])
    bounds = [0, *cuts, TINY.total_layers]
    stages = [DecoderStage(TINY, a, b) for a, b in itertools.pairwise(bounds)]
    assert stages[0].is_first and stages[-1].is_last
    assert not any(s.is_last for s in stages[:-1])
    with torch.inference_mode():
        middle = stages[0](batch)
    assert isinstance(middle, tuple) and len(middle) == 2
    assert middle[0].shape == (4, 17, TINY.d_model) and torch.equal(middle[1], batch[1])
    split, ref = _run(stages, batch), _run([whole], batch)
    assert ref["hidden"].shape == (4, TINY.d_model) and ref["hidden"].dtype == torch.float32
    assert ref["next_token"].dtype == torch.int64
    torch.testing.assert_close(split["hidden"], ref["hidden"])
    torch.testing.assert_close(split["next_token"], ref["next_token"])


def test_rows_do_not_depend_on_their_batch(whole: DecoderStage) -> None:
    batch = _batch([9, 3, 14])
    together = _run([whole], batch)
    for row in range(3):
        n = int(batch[1][row].sum())
        alone = _run([whole], (batch[0][row : row + 1, :n], batch[1][row : row + 1, :n]))
        torch.testing.assert_close(alone["hidden"][0], together["hidden"][row])
        assert alone["next_token"][0] == together["next_token"][row]


def test_weights_are_seeded_per_layer() -> None:
    a, b = build_layers(TINY, 0, 3), build_layers(TINY, 0, 3)
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y)
    # layer 2 built alone equals layer 2 built with its neighbours
    alone = build_layers(TINY, 2, 3)[0]
    for x, y in zip(a[2].parameters(), alone.parameters(), strict=True):
        assert torch.equal(x, y)
    other = build_layers(dataclasses.replace(TINY, seed=1), 0, 3)
    for x, y in zip(a.parameters(), other.parameters(), strict=True):
        if x.std() > 0:  # LayerNorm weights (ones) and biases (zeros) do not depend on the seed
            assert not torch.equal(x, y)
    # blocks differ from each other even with one seed
    assert not torch.equal(a[1].qkv.weight, a[2].qkv.weight)
    assert float(a[1].qkv.weight.std()) == pytest.approx(0.02, rel=0.05)


def test_runner_text_input_order_and_batch_independence() -> None:
    runner = DecoderRunner("tiny")
    texts = ["hello", "a much longer piece of text, with ünïcödé", "", "x" * 1000, "mid length"]
    full = run_block(runner, {"text": texts}, 2, StageTimer())
    assert full["hidden"].shape == (5, TINY.d_model) and full["hidden"].dtype == np.float32
    assert full["next_token"].shape == (5,) and full["next_token"].dtype == np.int64
    for i, text in enumerate(texts):  # each row alone, in input order
        alone = run_block(runner, {"text": [text]}, 8, StageTimer())
        torch.testing.assert_close(alone["hidden"][0], full["hidden"][i])
        assert alone["next_token"][0] == full["next_token"][i]
    perm = [3, 0, 4, 2, 1]
    shuffled = run_block(runner, {"text": [texts[i] for i in perm]}, 64, StageTimer())
    torch.testing.assert_close(shuffled["hidden"], full["hidden"][perm])
    np.testing.assert_array_equal(shuffled["next_token"], full["next_token"][perm])


def test_runner_int_array_input_matches_text() -> None:
    runner = DecoderRunner("decoder-tiny")
    texts = ["abc", "hello world"]
    ids = np.full((2, 12), -1, dtype=np.int64)
    for row, text in enumerate(texts):
        encoded = encode_text(text, TINY.max_seq_len)
        ids[row, : len(encoded)] = encoded
    from_ids = run_block(runner, {"text": ids}, 8, StageTimer())
    from_text = run_block(runner, {"text": texts}, 8, StageTimer())
    torch.testing.assert_close(from_ids["hidden"], from_text["hidden"])
    np.testing.assert_array_equal(from_ids["next_token"], from_text["next_token"])
    # a full-width int32 array works too
    unpadded = run_block(runner, {"text": ids[1:, :12].astype(np.int32)}, 8, StageTimer())
    torch.testing.assert_close(unpadded["hidden"][0], from_text["hidden"][1])


def test_runner_rejects_bad_inputs() -> None:
    runner = DecoderRunner(DecoderConfig(300, 32, 1, 2, 64, 16))
    with pytest.raises(ModelInputError, match=r"not float64 of shape \[2, 3\]"):
        runner.prepare({"text": np.zeros((2, 3))}, 8)
    with pytest.raises(ModelInputError, match="integer array"):
        runner.prepare({"text": np.zeros(3, dtype=np.int64)}, 8)
    for bad in ([[5, 6], [1, -1, 2]], [[5, 6], [-1, -1]], [[5, 6], [1, 300]]):
        rows = np.array([row + [-1] * (3 - len(row)) for row in bad])
        # The bad row travels as data (`row`); the worker names its absolute input row once.
        with pytest.raises(ModelInputError, match=r"the token ids are not 1\+ ids") as caught:
            runner.prepare({"text": rows}, 8)
        assert caught.value.row == 1
    long = runner.prepare({"text": np.ones((1, 40), dtype=np.int64)}, 8)
    assert long.batches[0][0].shape == (1, 16)


def test_encode_text() -> None:
    assert encode_text("", 8).tolist() == [BOS_ID]
    assert encode_text("é", 8).tolist() == [BOS_ID, 0xC3 + BYTE_OFFSET, 0xA9 + BYTE_OFFSET]
    assert len(encode_text("x" * 100, 8)) == 8


def test_parse_decoder_name() -> None:
    assert parse_decoder_name("decoder") == DECODER_SIZES["small"]
    assert parse_decoder_name("decoder-1b") == DECODER_SIZES["1b"]
    assert parse_decoder_name("decoder-tiny") == TINY
    assert parse_decoder_name("decoder-Large") == DECODER_SIZES["large"]
    for other in ("minilm", "decoders", "model.onnx", "pkg.decoder:make", ""):
        assert parse_decoder_name(other) is None
    with pytest.raises(ValueError, match=r"unknown decoder size 'huge'; sizes: tiny, small, base, large, 1b, 2b"):
        parse_decoder_name("decoder-huge")
    with pytest.raises(ValueError, match="unknown decoder size ''"):
        parse_decoder_name("decoder-")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple of n_heads"):
        DecoderConfig(512, 100, 2, 3, 64, 16)
    with pytest.raises(ValueError, match="vocab_size"):
        DecoderConfig(100, 32, 2, 2, 64, 16)
