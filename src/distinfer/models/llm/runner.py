"""A generation model as the engine sees it (`LlmModel`: picklable, loads nothing until asked),
the executor that runs every layer in this process, and `GenerationRunner`, the `Runner` of a
batch job: a block's prompts in, its completions out.

Rows: the input column `prompt` (text), or `messages` (a chat, as JSON: the model's chat
template is applied), or the column `--column` names; optional per-row columns
`max_tokens`, `temperature`, `top_p`, `top_k`, `min_p` and `seed` override the job's
settings. Outputs: `completion`, `prompt_tokens`, `completion_tokens`, `finish_reason`
("stop" or "length"), and `completion_ids` (the generated token ids).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import ModelInputError
from ...messages import GenerationOptions, GenerationStats, GroupStats, TensorInfo
from ..base import Batches, Column, Runner
from .config import LlmConfig, read_config
from .engine import Engine, EngineStats, Executor, Request
from .engine import Sequence as Seq
from .model import AllReduce, DecoderPart
from .paged import KV_ITEMSIZE, PAGE, SeqChunk, build_meta, ring_pages
from .sampling import SamplingParams, candidates_for, choose
from .tokenizer import IncrementalDecoder, LlmTokenizer, load_tokenizer
from .weights import WeightStore

if TYPE_CHECKING:
    from ...planning.cuts import LayerCost

__all__ = ["CachePlan", "GenerationRunner", "LlmModel", "LocalExecutor", "PromptPreparer", "sample_tokens"]

PARAM_COLUMNS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed")


@dataclass(frozen=True, slots=True)
class CachePlan:
    """How a KV budget becomes pages: `pages` for global layers, rings of `ring` pages for
    sliding-window layers out of a pool of `ring_pool`."""

    pages: int
    ring: int
    ring_pool: int

    def bytes(self, config: LlmConfig, layers: range) -> int:
        per_page = 2 * PAGE * config.kv_dim * KV_ITEMSIZE
        return sum((self.ring_pool if config.windows[i] else self.pages) * per_page for i in layers)


class LlmModel:
    """The model at `path` (a GGUF file or a Hugging Face directory) with its job's options."""

    def __init__(self, path: Path, options: GenerationOptions) -> None:
        self.path = Path(path)
        self.options = options

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.options = state["path"], state["options"]

    @cached_property
    def config(self) -> LlmConfig:
        return read_config(self.path)

    @cached_property
    def tokenizer(self) -> LlmTokenizer:
        return load_tokenizer(self.path)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.options.dtype == "bfloat16" else torch.float32

    def part(self, start: int, stop: int, rank: int = 0, world: int = 1,
             all_reduce: AllReduce | None = None, head_rows: tuple[int, int] | None = None) -> DecoderPart:
        part = DecoderPart(self.config, WeightStore(self.path, self.config), start, stop, rank, world,
                           all_reduce, self.dtype, head_rows)
        plan = self.cache_plan()
        part.allocate(plan.pages, plan.ring_pool)
        return part

    def cache_plan(self) -> CachePlan:
        """The replica's KV budget (all layers) as pages; see `CachePlan`."""
        c, o = self.config, self.options
        page_of = 2 * PAGE * c.kv_dim * KV_ITEMSIZE  # one layer's page
        n_global = sum(1 for w in c.windows if not w)
        n_sliding = c.layers - n_global
        window = max(c.windows)
        ring = ring_pages(window, o.step_tokens) if window else 0
        budget = o.kv_cache_bytes
        ring_pool = 0
        if n_sliding:
            wanted = o.max_running * ring
            ring_pool = min(wanted, (budget // 2 if n_global else budget) // (page_of * n_sliding))
            budget -= ring_pool * page_of * n_sliding
        # with no global layer, the tables only count positions
        pages = budget // (page_of * n_global) if n_global else o.max_running * math.ceil(c.context / PAGE)
        return CachePlan(max(int(pages), 1), ring, max(int(ring_pool), ring))

    def weight_bytes(self) -> list[int]:
        """Each layer's weights as a pipeline holds them: the embedding with the first layer,
        and the LM head split between the first and the last (models/llm/staged.py), so the
        last stage holds half the vocabulary's rows again (a whole model holds it once)."""
        c = self.config
        itemsize = 2 if self.options.dtype == "bfloat16" else 4
        sizes = [itemsize * n for n in c.layer_parameters()]
        table = itemsize * c.vocab * c.hidden
        sizes[0] += table + (0 if c.tied_embeddings else table // 2)
        sizes[-1] += table // 2
        return sizes

    def layer_costs(self, batch_size: int) -> list[LayerCost]:
        """Each layer's share of a decode step of `batch_size` sequences, from its
        multiply-adds at a nominal 20 GFLOP/s. A pipeline scores half the vocabulary in its
        first stage and half in its last (`worker/generation.py`), so half the LM head is
        counted with the first layer and half with the last."""
        from ...planning.cuts import LayerCost

        c = self.config
        flops = [2.0 * n * batch_size for n in c.layer_parameters()]
        flops[0] += c.vocab * c.hidden * batch_size
        flops[-1] += c.vocab * c.hidden * batch_size
        act = 4 * c.hidden * batch_size
        return [LayerCost(f"layer.{i}", f / 20e9, size, act)
                for i, (f, size) in enumerate(zip(flops, self.weight_bytes(), strict=True))]

    def engine(self, executor: Executor) -> Engine:
        plan, o, tok = self.cache_plan(), self.options, self.tokenizer
        eos = tok.eos_ids or ((self.config.eos_id,) if self.config.eos_id is not None else ())
        return Engine(executor, plan.pages, plan.ring, plan.ring_pool, self.config.context, eos,
                      o.max_running, o.step_tokens, lambda: IncrementalDecoder(tok))


def sample_tokens(part: DecoderPart, h: torch.Tensor,
                  sampling: list[tuple[SamplingParams, int]]) -> list[int]:
    """One token per row of `h` (the last part's hidden states) from the part's candidates."""
    values, ids = part.candidates(h, candidates_for(sampling))
    return choose_all(values.numpy(), ids.numpy(), sampling)


def choose_all(values: np.ndarray, ids: np.ndarray, sampling: list[tuple[SamplingParams, int]]) -> list[int]:
    return [choose(values[i], ids[i], p, pos) for i, (p, pos) in enumerate(sampling)]


class LocalExecutor:
    """Every layer in this process: a step runs when it is submitted."""

    depth = 1

    def __init__(self, model: LlmModel) -> None:
        self.part = model.part(0, model.config.layers)
        self.ring = model.cache_plan().ring
        self._done: deque[list[int]] = deque()
        self.busy_s = 0.0

    def submit(self, chunks: list[SeqChunk], sampling: list[tuple[SamplingParams, int]]) -> None:
        meta = build_meta(chunks, self.part.windows, self.ring)
        h = self.part.forward(meta, None)
        self._done.append(sample_tokens(self.part, h, sampling) if sampling else [])

    def collect(self) -> list[int]:
        return self._done.popleft()


@dataclass(frozen=True, slots=True)
class _Row:
    prompt: tuple[int, ...]
    request: Request


class PromptPreparer:
    """A block's rows into engine requests: prompts tokenised (a chat through the model's
    template), per-row parameters checked; a bad row is a `ModelInputError` naming it."""

    input_names: tuple[str, ...] = ("prompt",)

    def __init__(self, model: LlmModel) -> None:
        self.model = model
        self.options = model.options
        self.tokenizer = model.tokenizer

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        prompts = inputs["prompt"]
        rows = [self._row(i, prompts[i], inputs) for i in range(len(prompts))]
        return Batches([rows])

    def _row(self, i: int, value: Any, inputs: Mapping[str, Column]) -> _Row:
        o = self.options

        def param(name: str, default: Any, kind: type) -> Any:
            if name not in inputs:
                return default
            v = inputs[name][i]
            try:
                return kind(v)
            except (TypeError, ValueError):
                raise ModelInputError(f"'{name}' must be a number, got {v!r}", row=i) from None

        max_tokens = param("max_tokens", o.max_tokens, int)
        seed = param("seed", o.seed + i, int)
        params = SamplingParams(param("temperature", o.temperature, float), param("top_k", o.top_k, int),
                                param("top_p", o.top_p, float), param("min_p", o.min_p, float), seed)
        problem = params.problem()
        if max_tokens < 1:
            problem = f"max_tokens must be >= 1, got {max_tokens}"
        if problem:
            raise ModelInputError(problem, row=i)
        ids = self._encode(i, value)
        context = self.model.config.context
        if len(ids) >= context:
            raise ModelInputError(f"the prompt has {len(ids)} tokens; the model's context holds {context} "
                                  "(shorten it)", row=i)
        return _Row(tuple(ids), Request(i, tuple(ids), max_tokens, params, o.stop, o.ignore_eos))

    def _encode(self, i: int, value: Any) -> list[int]:
        if isinstance(value, str) and value.lstrip().startswith("[") and _is_chat(value):
            try:
                ids = self.tokenizer.encode_chat(json.loads(value))
            except ValueError as exc:
                raise ModelInputError(str(exc), row=i) from None
        elif isinstance(value, str):
            ids = self.tokenizer.encode(value)
        else:
            raise ModelInputError(f"a prompt must be text or a chat, got {type(value).__name__}", row=i)
        if not ids:
            raise ModelInputError("the prompt is empty", row=i)
        return ids


@dataclass(slots=True)
class _Open:
    """A block in the engine: its rows, their sequences, and how many are still running."""

    rows: list[_Row]
    seqs: list[Seq]
    opened: float
    left: int


class GenerationRunner(Runner):
    """A batch job's replica: every block's rows through one engine (continuous batching).

    Blocks overlap: `open` adds a block's prompts to the engine and `advance` runs one step,
    returning the blocks whose every sequence has ended. A worker opens the next block as soon
    as `room` says the engine has started all it holds, so a finished sequence's place is taken
    by the next block's prompt at the next step, not after the block's last sequence ends."""

    pads_batches = False

    def __init__(self, model: LlmModel, executor: Callable[[LlmModel], Executor],
                 stats: Callable[[], GroupStats | None] | None = None) -> None:
        self.model = model
        self.options = model.options
        self.preparer = PromptPreparer(model)
        self.input_names = ("prompt",)
        self.executor = executor(model)
        self.hosts: tuple[str, ...] = getattr(self.executor, "hosts", ())  # a group's stages or ranks
        self.engine = model.engine(self.executor)
        self._group_stats = stats
        self.last: GenerationStats | None = None
        self._open: dict[int, _Open] = {}
        self._owner: dict[int, int] = {}  # request id -> block key
        self._next_id = 0
        self._seen = EngineStats()  # the engine's figures when the last block ended
        self._last_end: float | None = None

    def bind(self, columns: Sequence[str], column: str | None) -> dict[str, str]:
        if column is not None:
            if column not in columns and columns:
                raise ModelInputError(f"the input has no column '{column}' (available: {', '.join(columns)})")
            prompt = column
        elif "prompt" in columns:
            prompt = "prompt"
        elif "messages" in columns:
            prompt = "messages"
        elif len(columns) == 1:
            prompt = columns[0]
        else:
            raise ModelInputError(
                "the input has no column 'prompt' or 'messages' "
                f"(available: {', '.join(columns) or 'none'}); pick one with --column")
        return {"prompt": prompt, **{p: p for p in PARAM_COLUMNS if p in columns and p != prompt}}

    def input_info(self) -> tuple[TensorInfo, ...] | None:
        return (TensorInfo("prompt", "text", (-1,)),)

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        return self.preparer.prepare(inputs, batch_size)

    # --- overlapping blocks ---------------------------------------------------------------

    @property
    def room(self) -> bool:
        """Whether another block may join: the engine has started every sequence it holds."""
        return not self.engine.waiting

    @property
    def busy(self) -> bool:
        return bool(self._open)

    def open(self, key: int, rows: list[_Row]) -> None:
        """Add a block's prepared rows (`prepare`'s one batch) to the engine."""
        if key in self._open:
            raise ValueError(f"block {key} is open already")
        seqs = []
        for r in rows:
            rid, self._next_id = self._next_id, self._next_id + 1
            seqs.append(self.engine.add(replace(r.request, id=rid)))
            self._owner[rid] = key
        now = time.perf_counter()
        if not self._open:
            self._last_end = now  # the engine was idle until now
        self._open[key] = _Open(rows, seqs, now, len(rows))

    def advance(self) -> list[tuple[int, dict[str, np.ndarray], GenerationStats]]:
        """One engine step; the blocks it ended, with their outputs and figures."""
        if self.engine.busy:
            for event in self.engine.step():
                if event.finish is not None:
                    self._open[self._owner.pop(event.id)].left -= 1
        ended = [k for k, o in self._open.items() if o.left == 0]
        return [(k, *self._close(k)) for k in ended]

    def abandon(self) -> list[int]:
        """Drop every open block (after an error in a step); their keys. The engine starts
        afresh."""
        keys = list(self._open)
        self._open.clear()
        self._owner.clear()
        self.engine = self.model.engine(self.executor)
        return keys

    def _close(self, key: int) -> tuple[dict[str, np.ndarray], GenerationStats]:
        block = self._open.pop(key)
        now = time.perf_counter()
        st, seen = self.engine.stats, self._seen
        self._seen = replace(st)
        firsts = [s.first_token_at for s in block.seqs if s.first_token_at is not None]
        plan, c = self.model.cache_plan(), self.model.config
        stats = GenerationStats(
            st.prompt_tokens - seen.prompt_tokens, st.generated_tokens - seen.generated_tokens,
            st.steps - seen.steps, st.running_sum - seen.running_sum, st.preemptions - seen.preemptions,
            st.peak_pages, plan.pages,
            plan.bytes(c, range(c.layers)),
            min(firsts) - block.opened if firsts else None, now - (self._last_end or block.opened))
        self._last_end = now
        seqs, rows = block.seqs, block.rows
        outputs = {
            "completion": np.array([s.text for s in seqs], dtype=object),
            "prompt_tokens": np.array([len(r.prompt) for r in rows], dtype=np.int64),
            "completion_tokens": np.array([len(s.out) for s in seqs], dtype=np.int64),
            "completion_ids": _ragged([s.out for s in seqs]),
            "finish_reason": np.array([s.finish or "length" for s in seqs], dtype=object),
        }
        return outputs, stats

    # --- one block at a time (run_block) ----------------------------------------------------

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        assert not self._open, "forward runs one block alone"
        key = -1  # never a block id
        self.open(key, batch)
        while True:
            for k, outputs, stats in self.advance():
                if k == key:
                    self.last = stats
                    return outputs

    def generation_stats(self) -> GenerationStats | None:
        return self.last

    def group_stats(self) -> GroupStats | None:
        return self._group_stats() if self._group_stats else None


def _ragged(lists: list[list[int]]) -> np.ndarray:
    out = np.empty(len(lists), dtype=object)
    for i, ids in enumerate(lists):
        out[i] = np.asarray(ids, dtype=np.int32)
    return out


def _is_chat(value: str) -> bool:
    try:
        parsed = json.loads(value)
    except ValueError:
        return False
    return isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed)


