"""The `decoder-SIZE` family: GPT-style decoders with seeded random weights (models/decoder.py),
for measuring speed, memory and equality of every strategy without downloading weights.

Any layer range builds alone (pipeline stages), every block shards over ranks; text or token
ids in, the last token's hidden state and next token out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import ModelError
from ...messages import TensorInfo
from ..family import ModelFamily, ModelSpec, Schema

if TYPE_CHECKING:
    from ...planning.cuts import LayerCost
    from ..base import Runner
    from ..decoder import DecoderConfig
    from ..family import ShardedForm
    from ..staged import StagedModel

__all__ = ["FAMILY", "DecoderFamily"]


def _config(name: str) -> DecoderConfig:
    from ..decoder import parse_decoder_name

    try:
        config = parse_decoder_name(name)
    except ValueError as exc:
        raise ModelError(f"{exc}; e.g. --model decoder-tiny") from None
    if config is None:
        raise ModelError(f"'{name}' is not a decoder-SIZE model")
    return config


class DecoderFamily(ModelFamily):
    name = "decoder"
    summary = (
        "GPT-style decoder with seeded random weights; decoder-SIZE picks the size "
        "(tiny 1.4M, small 28M, base 135M, large 369M, 1b 1.24B, 2b 2.06B parameters; default small)"
    )
    accepts = "decoder-SIZE"
    no_stages: ClassVar[str | None] = None
    no_shards: ClassVar[str | None] = None

    def parse(self, name: str) -> ModelSpec | None:
        lowered = name.lower()
        if lowered != "decoder" and not lowered.startswith("decoder-"):
            return None
        _config(lowered)
        return ModelSpec(lowered, self)

    def identity(self, spec: ModelSpec) -> dict[str, Any]:
        return {"model": spec.name, "kind": self.name}

    def runner(self, spec: ModelSpec, threads: int, device: str) -> Runner:
        from ..decoder import DecoderRunner

        return DecoderRunner(spec.name, device=device)

    def staged(self, spec: ModelSpec) -> StagedModel:
        from ..decoder_stages import DecoderStaged

        return DecoderStaged(spec.name)

    def sharded(self, spec: ModelSpec) -> ShardedForm:
        from ..sharding import DecoderShards

        return DecoderShards(spec.name)

    def shard_problem(self, spec: ModelSpec, world: int) -> str | None:
        from ..sharding import divisibility_problem

        if world < 2:
            return super().shard_problem(spec, world)
        try:
            config = _config(spec.name)
        except ModelError as exc:
            return str(exc)
        return divisibility_problem(spec.name, config.n_heads, config.d_ff, world)

    def weight_bytes(self, spec: ModelSpec) -> list[int]:
        return [4 * n for n in _config(spec.name).layer_parameters()]

    has_tokens = True

    def layer_costs(self, spec: ModelSpec, batch_size: int, seq_len: int) -> list[LayerCost]:
        from ..layer_costs import decoder_layer_costs

        return decoder_layer_costs(_config(spec.name), batch_size, seq_len)

    def schema(self, spec: ModelSpec) -> Schema:
        d = _config(spec.name).d_model
        outputs = (TensorInfo("hidden", "<f4", (-1, d)), TensorInfo("next_token", "<i8", (-1,)))
        return Schema((TensorInfo("text", "text", (-1,)),), outputs)


FAMILY = DecoderFamily()
