"""A model family for tests of failures caused by the input: `poison-tiny` is `decoder-tiny`
whose forward raises `ModelInputError` for a batch holding a marked row (one whose text
contains MARK), late: in the last pipeline stage, on rank 0 after the last all-reduce of a
tensor-parallel group, after the whole model in one process. Everything else is the decoder's.

It is also the worked example of adding a family: one module, one `register()` (the line in
the table, for a family that lives outside the package). Worker, stage and rank processes
need nothing: a parsed spec carries its family, which they import by reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from distinfer.errors import ModelInputError
from distinfer.models import ModelSpec, Schema
from distinfer.models import register as register_family
from distinfer.models.base import Batches, Column, Runner
from distinfer.models.decoder import BYTE_OFFSET
from distinfer.models.families.decoder import FAMILY as DECODER
from distinfer.models.families.decoder import DecoderFamily
from distinfer.models.staged import Preparer, StagedModel

__all__ = ["MARK", "POISON_MODEL", "PoisonFamily", "register"]

POISON_MODEL = "poison-tiny"
MARK = "#"
_MARK_ID = ord(MARK) + BYTE_OFFSET
_BASE = ModelSpec("decoder-tiny", DECODER)


def _check(ids: torch.Tensor) -> None:
    """Raise for a batch holding a marked row (the engine names the batch's input rows)."""
    if bool((ids == _MARK_ID).any()):
        raise ModelInputError(f"a row holds the marked character {MARK!r}")


class _Runner(Runner):
    input_names = ("text",)

    def __init__(self, device: str) -> None:
        self.inner = DECODER.runner(_BASE, 1, device)

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        return self.inner.prepare(inputs, batch_size)

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        out = self.inner.forward(batch)
        _check(batch[0])
        return out


class _Stage:
    """A decoder stage that carries the batch's token ids along to the last stage."""

    def __init__(self, inner: Any, first: bool) -> None:
        self.inner = inner
        self.first = first
        self.is_last = inner.is_last

    def __call__(self, x: Any) -> Any:
        ids = x[0] if self.first else x[2]
        out = self.inner((x[0], x[1]))
        if self.is_last:
            _check(ids)
            return out
        return out[0], out[1], ids


class _Staged(StagedModel):
    name = POISON_MODEL

    def __init__(self) -> None:
        self.inner = DECODER.staged(_BASE)

    def layer_names(self) -> list[str]:
        return self.inner.layer_names()

    def weight_bytes(self) -> list[int] | None:
        return self.inner.weight_bytes()

    def layer_costs(self, batch_size: int, seq_len: int) -> Any:
        return self.inner.layer_costs(batch_size, seq_len)

    def preparer(self, device: str) -> Preparer:
        return self.inner.preparer(device)

    def build_stage(self, start: int, stop: int, device: str, threads: int) -> _Stage:
        return _Stage(self.inner.build_stage(start, stop, device, threads), start == 0)


class _Rank:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray] | None:
        out = self.inner(ids, mask)
        if out is not None:  # rank 0, after every all-reduce of the micro-batch
            _check(ids)
        return out  # type: ignore[no-any-return]


class _Shards:
    def __init__(self) -> None:
        self.inner = DECODER.sharded(_BASE)

    def preparer(self, device: str) -> Preparer:
        return self.inner.preparer(device)

    def build_rank(self, rank: int, world: int, all_reduce: Any, device: Any) -> _Rank:
        return _Rank(self.inner.build_rank(rank, world, all_reduce, device))


class PoisonFamily(DecoderFamily):
    name = "poison"
    summary = "decoder-tiny that refuses rows holding '#' late in its forward (tests)"
    accepts = POISON_MODEL
    no_stages: ClassVar[str | None] = None
    no_shards: ClassVar[str | None] = None

    def parse(self, name: str) -> ModelSpec | None:
        return ModelSpec(name, self) if name == POISON_MODEL else None

    def runner(self, spec: ModelSpec, threads: int, device: str) -> Runner:
        return _Runner(device)

    def staged(self, spec: ModelSpec) -> StagedModel:
        return _Staged()

    def sharded(self, spec: ModelSpec) -> Any:
        return _Shards()

    def shard_problem(self, spec: ModelSpec, world: int) -> str | None:
        return DECODER.shard_problem(_BASE, world)

    def weight_bytes(self, spec: ModelSpec) -> list[int]:
        return DECODER.weight_bytes(_BASE)

    def layer_costs(self, spec: ModelSpec, batch_size: int, seq_len: int) -> Any:
        return DECODER.layer_costs(_BASE, batch_size, seq_len)

    def schema(self, spec: ModelSpec) -> Schema:
        return DECODER.schema(_BASE)


FAMILY = PoisonFamily()


def register() -> None:
    """Put the family in this process's model table (the parent of the workers)."""
    register_family(FAMILY)
