"""Tensor-parallel shards in one process: every rank's partial output summed (plus bias and
residual) equals the unsharded block; whole sharded models with the all-reduce played by
threads equal the unsharded models; refusals name the numbers and what to use instead."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from distinfer.models import FAMILIES, ModelSpec
from distinfer.models.bert import BertConfig, _Layer, load_bert
from distinfer.models.decoder import DecoderConfig, DecoderStage, _Block, build_layer, decoder_config
from distinfer.models.minilm import minilm_path
from distinfer.models.sharding import (
    AllReduce,
    ShardedBert,
    ShardedBertLayer,
    ShardedDecoder,
    ShardedDecoderBlock,
    layer_reader,
    shard_range,
)


class ThreadGroup:
    """N ranks as N threads of this process; `all_reduce(rank)` sums over them (rank order)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world

    def all_reduce(self, rank: int) -> AllReduce:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t
            self.barrier.wait()
            total = torch.stack([s for s in self.slots if s is not None]).sum(dim=0)
            self.barrier.wait()
            return total

        return reduce

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        results: list[Any] = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                with torch.inference_mode():
                    results[rank] = fn(rank)
            except BaseException as exc:  # re-raised in the test thread
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.fixture(scope="module")
def bert_layer() -> tuple[BertConfig, _Layer]:
    model = load_bert(minilm_path(), 0, 2)  # embeddings + the first layer
    layer = model.layers[0]
    assert isinstance(layer, _Layer)
    return model.config, layer


def test_shard_ranges_split_evenly() -> None:
    assert [shard_range(12, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ValueError, match="equal share"):
        shard_range(8, 0, 3)


@pytest.mark.parametrize("world", [2, 4])
def test_decoder_block_partials_sum_to_the_block(world: int) -> None:
    cfg = decoder_config("tiny")
    block = build_layer(cfg, 1)
    assert isinstance(block, _Block)
    torch.manual_seed(0)
    x = torch.randn(3, 11, cfg.d_model)
    mask = torch.ones(3, 11, dtype=torch.bool)
    shards = [ShardedDecoderBlock(block, r, world) for r in range(world)]
    assert shards[0].qkv.weight.shape == (3 * cfg.d_model // world, cfg.d_model)
    assert shards[0].mlp_proj.weight.shape == (cfg.d_model, cfg.d_ff // world)
    with torch.inference_mode():
        expected = block(x, mask)
        h = x + sum(s.attention_partial(x) for s in shards) + shards[0].attn_proj_bias
        got = h + sum(s.mlp_partial(h) for s in shards) + shards[0].mlp_proj_bias
    torch.testing.assert_close(got, expected)


def test_decoder_block_shards_take_the_heads_from_each_of_q_k_v() -> None:
    cfg = DecoderConfig(300, 8, 1, 4, 16, 16)  # 4 heads of 2
    block = build_layer(cfg, 1)
    assert isinstance(block, _Block)
    shard = ShardedDecoderBlock(block, 1, 2)  # heads 2, 3: rows 4..7 of each of q, k and v
    full = block.qkv.weight
    torch.testing.assert_close(shard.qkv.weight, torch.cat([full[4:8], full[12:16], full[20:24]]))
    torch.testing.assert_close(shard.attn_proj.weight, block.attn_proj.weight[:, 4:8])
    assert shard.qkv.weight.untyped_storage().data_ptr() != full.untyped_storage().data_ptr()


@pytest.mark.parametrize("world", [2, 3])
def test_bert_layer_partials_sum_to_the_layer(bert_layer: tuple[BertConfig, _Layer], world: int) -> None:
    cfg, layer = bert_layer
    torch.manual_seed(0)
    x = torch.randn(2, 9, cfg.hidden_size)
    real = torch.ones(2, 9)
    real[1, 5:] = 0
    mask = (1.0 - real[:, None, None, :]) * torch.finfo(x.dtype).min
    shards = [ShardedBertLayer(cfg, layer_reader(layer), r, world) for r in range(world)]
    with torch.inference_mode():
        expected = layer(x, mask)
        h = shards[0].attn_norm(sum(s.attention_partial(x, mask) for s in shards) + shards[0].attn_out_bias + x)
        got = shards[0].mlp_norm(sum(s.mlp_partial(h) for s in shards) + shards[0].mlp_out_bias + h)
    torch.testing.assert_close(got, expected)


def test_sharded_decoder_with_threaded_all_reduce_equals_the_whole_model() -> None:
    cfg = decoder_config("tiny")
    ids = torch.randint(2, cfg.vocab_size, (4, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 13, dtype=torch.bool)
    mask[2, 7:] = False
    group = ThreadGroup(2)
    models = [ShardedDecoder(cfg, r, 2, group.all_reduce(r)) for r in range(2)]
    assert models[1].head is None
    out = group.run(lambda r: models[r](ids, mask))
    with torch.inference_mode():
        expected = DecoderStage(cfg)((ids, mask))
    assert isinstance(expected, dict)
    torch.testing.assert_close(out[0]["hidden"], expected["hidden"])
    torch.testing.assert_close(out[0]["next_token"], expected["next_token"])
    assert group.calls == [2 * cfg.n_layers] * 2  # exactly two all-reduces per block


def test_sharded_bert_reads_slices_and_equals_the_whole_encoder() -> None:
    path = minilm_path()
    encoder = load_bert(path)
    ids = torch.randint(1000, 2000, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    group = ThreadGroup(2)
    models = [ShardedBert(path, r, 2, group.all_reduce(r)) for r in range(2)]
    layer = encoder.layers[0]
    assert isinstance(layer, _Layer)
    from_module = ShardedBertLayer(encoder.config, layer_reader(layer), 1, 2).state_dict()
    for name, value in models[1].layers[0].state_dict().items():
        torch.testing.assert_close(value, from_module[name], rtol=0, atol=0)
    out = group.run(lambda r: models[r](ids, mask))
    with torch.inference_mode():
        expected = encoder(ids, mask, torch.zeros_like(ids))
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[1], expected)
    assert group.calls == [2 * encoder.config.num_hidden_layers] * 2


@pytest.mark.parametrize(
    ("name", "kind", "world", "message"),
    [
        ("model.onnx", "onnx", 2, "shards the built-in transformers (minilm, decoder-SIZE); 'model.onnx' runs with "
                                  "--strategy data or pipeline"),
        ("decoder-small", "decoder", 1, "at least 2 ranks, got --tensor-parallel 1"),
        ("decoder-small", "decoder", 3, "'decoder-small' has 8 attention heads and an MLP width of 2048; "
                                        "--tensor-parallel 3 does not divide both: use one of 2, 4, 8"),
        ("minilm", "minilm", 5, "'minilm' has 12 attention heads and an MLP width of 1536; "
                                "--tensor-parallel 5 does not divide both: use one of 2, 3, 4, 6, 12"),
        ("decoder-huge", "decoder", 2, "unknown decoder size 'huge'"),
    ],
)
def test_refusals_say_why_and_what_instead(name: str, kind: str, world: int, message: str) -> None:
    problem = _shard_problem(name, kind, world)
    assert problem is not None and message in problem
    assert "\n" not in problem


@pytest.mark.parametrize(("name", "kind", "world"), [("decoder-tiny", "decoder", 4), ("decoder-2b", "decoder", 5),
                                                     ("minilm", "minilm", 6)])
def test_shardable_models_have_no_problem(name: str, kind: str, world: int) -> None:
    assert _shard_problem(name, kind, world) is None


def _shard_problem(name: str, kind: str, world: int) -> str | None:
    """The family's answer for a model name, parsed or not (an unknown size is its problem too)."""
    family = next(f for f in FAMILIES if f.name == kind)
    return family.shard_problem(ModelSpec(name, family), world)
