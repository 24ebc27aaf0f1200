"""The `minilm` family: the pretrained all-MiniLM-L6-v2 sentence embedder (see models/minilm.py).

Whole model packed (no work on padding), stages that read only their tensors from the
safetensors checkpoint, Megatron shards of every BERT layer; text in, a 384-d embedding out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ...messages import TensorInfo
from ..family import ModelFamily, ModelSpec, Schema

if TYPE_CHECKING:
    from ...planning.cuts import LayerCost
    from ..base import Runner
    from ..family import ShardedForm
    from ..staged import StagedModel

__all__ = ["FAMILY", "MiniLMFamily"]


class MiniLMFamily(ModelFamily):
    name = "minilm"
    summary = "all-MiniLM-L6-v2 sentence embeddings (384-d), pretrained"
    accepts = "minilm"
    no_stages: ClassVar[str | None] = None
    no_shards: ClassVar[str | None] = None

    def parse(self, name: str) -> ModelSpec | None:
        return ModelSpec(name, self) if name == "minilm" else None

    def identity(self, spec: ModelSpec) -> dict[str, Any]:
        return {"model": spec.name, "kind": self.name}

    def runner(self, spec: ModelSpec, threads: int, device: str) -> Runner:
        from ..minilm import MiniLMRunner

        return MiniLMRunner(device=device)

    def staged(self, spec: ModelSpec) -> StagedModel:
        from ..minilm import MiniLMStaged

        return MiniLMStaged()

    def sharded(self, spec: ModelSpec) -> ShardedForm:
        from ..minilm import minilm_path
        from ..sharding import BertShards

        return BertShards(minilm_path())

    def shard_problem(self, spec: ModelSpec, world: int) -> str | None:
        from ..bert import BertConfig
        from ..minilm import minilm_path
        from ..sharding import divisibility_problem

        if world < 2:
            return super().shard_problem(spec, world)
        bert = BertConfig.from_file(minilm_path() / "config.json")
        return divisibility_problem(spec.name, bert.num_attention_heads, bert.intermediate_size, world)

    has_tokens = True

    def layer_costs(self, spec: ModelSpec, batch_size: int, seq_len: int) -> list[LayerCost]:
        from ..layer_costs import bert_layer_costs
        from ..minilm import minilm_path

        return bert_layer_costs(minilm_path(), batch_size, seq_len)

    def schema(self, spec: ModelSpec) -> Schema:
        return Schema((TensorInfo("text", "text", (-1,)),), (TensorInfo("embedding", "<f4", (-1, 384)),))


FAMILY = MiniLMFamily()
