"""A model family: everything the engine needs to know about one kind of model, in one entry.

The runtime, the planner, the server and the CLI never test what kind a model is; they ask
its family (`ModelSpec.family`), found by name in the table (`models/families/__init__.py`):

- `parse(name)`: is this name one of ours? A cheap check in the driver (early, clear errors);
- `runner(spec, threads, device)`: the whole model loaded in this process (data parallelism);
- `staged(spec)`: the model as consecutive layers that a pipeline stage builds alone, or
  `no_stages`, the reason it has none;
- `sharded(spec)`: the model's tensor-parallel form (`ShardedForm`), or `no_shards`, the
  reason it has none; `shard_problem(spec, world)` says why `world` ranks cannot hold it;
- `layer_costs(spec, batch_size, seq_len)`: each layer measured, for the pipeline planner;
- `serving_problem(spec, strategy)`: why the server cannot serve it that way (None: it can);
- `schema(spec)`: the inputs and outputs, when known before loading.

A family object holds no state, so a `ModelSpec` (name + family) pickles cheaply into every
worker, stage and rank process, which then asks the same family for its part. A family
defined outside the package (a plug-in, a test) works the same way once it is in the table
of the process that parses model names (`families.register`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..errors import ModelError

if TYPE_CHECKING:
    import numpy as np

    from ..messages import GenerationOptions, ImageOptions, Strategy, TensorInfo
    from ..planning.cuts import LayerCost
    from .base import Runner
    from .staged import Preparer, StagedModel

__all__ = ["ModelFamily", "ModelSpec", "RankModel", "Schema", "ShardedForm"]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A parsed model name: `name` as the user gave it (files made absolute) and its family."""

    name: str
    family: ModelFamily
    generation: GenerationOptions | None = None  # set for a text-generation job

    @property
    def kind(self) -> str:
        """The family's name ("minilm", "decoder", "onnx", "torch", ...)."""
        return self.family.name

    def identity(self) -> dict[str, Any]:
        """What makes two jobs' models the same, for the output manifest."""
        ident = self.family.identity(self)
        if self.generation is not None:
            from dataclasses import asdict

            engine_only = {"max_running", "kv_cache_bytes", "step_tokens"}  # no effect on the text
            ident["generation"] = {k: list(v) if isinstance(v, tuple) else v
                                   for k, v in asdict(self.generation).items() if k not in engine_only}
        return ident


@dataclass(frozen=True, slots=True)
class Schema:
    """A model's inputs and outputs as far as they are known without loading it (None: not
    known until the model runs)."""

    inputs: tuple[TensorInfo, ...] | None
    outputs: tuple[TensorInfo, ...] | None


class RankModel(Protocol):
    """One tensor-parallel rank's shards, built in that rank's process: `(ids, mask)` of a
    micro-batch in, the outputs on rank 0 (None on the other ranks)."""

    def __call__(self, ids: Any, mask: Any) -> dict[str, np.ndarray] | None: ...


class ShardedForm(Protocol):
    """A model that can be sharded Megatron-style over ranks (see `models/sharding.py`).
    Picklable: it is sent to every rank process, which builds only its own shards."""

    def preparer(self, device: str) -> Preparer:
        """Rank 0's input side: a block's rows into (token ids, mask) micro-batches."""
        ...

    def build_rank(self, rank: int, world: int, all_reduce: Any, device: Any) -> RankModel:
        """Rank `rank` of `world`'s shards; `all_reduce` sums a tensor over the ranks."""
        ...


class ModelFamily(ABC):
    """One kind of model; see the module docstring. Subclasses set `name` and `summary` and
    implement `parse` and `runner`; the rest defaults to "cannot" with the reason given."""

    name: ClassVar[str]
    #: one line for `distinfer models`
    summary: ClassVar[str]
    #: the names it takes, for the error about an unknown model ("an .onnx file")
    accepts: ClassVar[str]
    #: why the family cannot be cut into pipeline stages (None: `staged` works)
    no_stages: ClassVar[str | None] = (
        "the engine cuts the built-in models, ONNX files and traceable PyTorch models; "
        "'{name}' runs with --strategy data"
    )
    #: why the family cannot be sharded over tensor-parallel ranks (None: `sharded` works)
    no_shards: ClassVar[str | None] = (
        "tensor parallelism shards the built-in transformers (minilm, decoder-SIZE); "
        "'{name}' runs with --strategy data or pipeline"
    )

    #: whether its job is text generation (`--task generate`, models/llm/)
    generates: ClassVar[bool] = False
    #: whether its rows are images (paths or bytes), decoded in the workers (models/images.py)
    takes_images: ClassVar[bool] = False
    #: whether its rows are token sequences, so that `layer_costs` depends on their length
    #: (the built-in transformers)
    has_tokens: ClassVar[bool] = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), ())  # stateless: a spec pickles as the class reference

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    @abstractmethod
    def parse(self, name: str) -> ModelSpec | None:
        """The spec when `name` belongs to this family, None when it does not; ModelError when
        it does but is wrong (an unknown size, a missing file)."""

    def identity(self, spec: ModelSpec) -> dict[str, Any]:
        ident: dict[str, Any] = {"model": spec.name, "kind": self.name}
        if os.path.isfile(spec.name):
            st = os.stat(spec.name)
            ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        return ident

    @abstractmethod
    def runner(self, spec: ModelSpec, threads: int, device: str) -> Runner:
        """The whole model, loaded in this process."""

    def staged(self, spec: ModelSpec) -> StagedModel:
        """The model as consecutive layers (cheap: no weights are loaded)."""
        reason = (self.no_stages or "").format(name=spec.name)
        raise ModelError(f"--strategy pipeline cannot cut '{spec.name}' into stages: {reason}")

    def sharded(self, spec: ModelSpec) -> ShardedForm:
        """The model's tensor-parallel form (cheap: no weights are loaded)."""
        raise ModelError(self.shard_problem(spec, 2) or f"'{spec.name}' cannot be sharded")

    def shard_problem(self, spec: ModelSpec, world: int) -> str | None:
        """Why `world` ranks cannot hold the model, with what to use instead; None if they can."""
        if self.no_shards is not None:
            return self.no_shards.format(name=spec.name)
        if world < 2:
            return f"tensor parallelism needs at least 2 ranks, got --tensor-parallel {world}"
        return None

    def weight_bytes(self, spec: ModelSpec) -> list[int] | None:
        """Each layer's weight size, known without building anything; None if unknown."""
        return self.staged(spec).weight_bytes() if self.no_stages is None else None

    def layer_costs(self, spec: ModelSpec, batch_size: int, seq_len: int) -> list[LayerCost]:
        """Each layer's measured time, weight and output bytes for one micro-batch."""
        return self.staged(spec).layer_costs(batch_size, seq_len)

    def served_name(self, spec: ModelSpec) -> str:
        """The model's name in a server's URLs (a file's stem, a factory's function)."""
        return spec.name

    def schema(self, spec: ModelSpec) -> Schema:
        """Inputs and outputs known before loading (default: known only once it runs)."""
        return Schema(None, None)

    def image_defaults(self, spec: ModelSpec) -> ImageOptions | None:
        """The model's own image preprocessing (size, resize, mean, std, ...), which the
        job's image options override field by field; None: the generic defaults."""
        return None

    def serving_problem(self, spec: ModelSpec, strategy: Strategy) -> str | None:
        """Why the server cannot serve the model with `strategy` (it must know each input's
        type and shape before the first request); None when it can."""
        return None
