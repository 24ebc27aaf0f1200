"""The generation engine of one replica: continuous (iteration-level) batching over a paged
KV cache, independent of where the layers run.

Each step the engine picks the sequences to advance and how many of their tokens to feed:
one for a sequence that is decoding, a chunk of the prompt for one that is prefilling (at
most `step_tokens` tokens in the whole step, so a long prompt is prefilled over several
steps alongside the running decodes instead of stalling them). Up to `max_running`
sequences run at once; a finished sequence's place goes to the next waiting one at the next
step. Feeding a sequence's tokens [computed, computed + n) is the same operation for a
prefill chunk and a decode; when it reaches the end of the sequence, the step returns the
next token, sampled where the scores are (`sampling.choose`).

Pages of the KV cache are allocated as sequences grow. When none is free, the most recently
admitted sequence that is not in flight is preempted: its pages are freed and it goes back to
the front of the queue, to be recomputed (prompt and tokens so far) when pages free up,
which gives the same tokens as if it had never stopped.

An `Executor` runs steps: in this process (`depth` 1), or through a pipeline of stage
processes, where `depth` steps are in flight at once (one per stage), each over a different
group of sequences, so no stage waits for a token its own group has not produced yet.

Tokens leave the engine as they are made (`Engine.step` returns them), which is what a
server streams; a batch job runs `run_all`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .paged import PAGE, SeqChunk
from .sampling import SamplingParams

__all__ = ["Engine", "EngineStats", "Executor", "Request", "Sequence", "TokenEvent"]


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    prompt: tuple[int, ...]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


class TextDecoder(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@dataclass(slots=True)
class Sequence:
    request: Request
    decoder: TextDecoder | None
    out: list[int] = field(default_factory=list)
    text: str = ""
    computed: int = 0  # tokens whose keys and values are in the cache
    pages: list[int] = field(default_factory=list)
    ring: list[int] = field(default_factory=list)
    in_flight: bool = False
    finish: str | None = None  # "stop" or "length"
    started_at: float | None = None  # when it first joined the running batch
    first_token_at: float | None = None

    @property
    def length(self) -> int:
        return len(self.request.prompt) + len(self.out)

    def token(self, i: int) -> int:
        p = self.request.prompt
        return p[i] if i < len(p) else self.out[i - len(p)]


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A token made for request `id`: its text (whole characters; may be "") and, on the
    last one, why the sequence ended (`token` is -1 when a sequence ends without one: the KV
    cache cannot hold it any longer)."""

    id: int
    token: int
    text: str
    finish: str | None


class Executor(Protocol):
    depth: int  # steps it can hold in flight

    def submit(self, chunks: list[SeqChunk], sampling: list[tuple[SamplingParams, int]]) -> None:
        """Start a step; `sampling`: (parameters, position) of each chunk that wants a token."""
        ...

    def collect(self) -> list[int]:
        """The oldest step's tokens, one per chunk that wanted one, in order."""
        ...


@dataclass(slots=True)
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0  # prefilled (recomputation after preemption included)
    generated_tokens: int = 0
    preemptions: int = 0
    running_sum: int = 0  # sequences per step, summed (mean running batch = / steps)
    peak_pages: int = 0


class _Pool:
    def __init__(self, pages: int) -> None:
        self.size = pages
        self.free = list(range(pages - 1, -1, -1))

    def take(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        return [self.free.pop() for _ in range(n)]

    def give(self, pages: Iterable[int]) -> None:
        self.free.extend(pages)


class Engine:
    def __init__(
        self, executor: Executor, pages: int, ring_pages: int, ring_pool: int, context: int,
        eos_ids: tuple[int, ...], max_running: int = 32, step_tokens: int = 256,
        decoder: Callable[[], TextDecoder] | None = None,
    ) -> None:
        self.executor = executor
        self.pool = _Pool(pages)
        self.ring_pages = ring_pages  # per sequence, 0 when the model has no sliding layers
        self.ring_pool = _Pool(ring_pool) if ring_pages else None
        self.context = context
        self.eos_ids = set(eos_ids)
        self.max_running = max_running
        self.step_tokens = step_tokens
        self.decoder = decoder
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.in_flight: deque[list[tuple[Sequence, int]]] = deque()
        self.stats = EngineStats()

    # --- requests ----------------------------------------------------------------------

    def add(self, request: Request) -> Sequence:
        """Queue a request; its sequence (which fills in as it runs) is returned."""
        if not request.prompt:
            raise ValueError("a request needs at least one prompt token")
        if len(request.prompt) >= self.context:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens; the context holds {self.context}")
        need = self._pages_for(len(request.prompt) + 1)
        if need > self.pool.size:
            raise ValueError(f"the prompt needs {need} KV pages; the cache holds {self.pool.size} "
                             "(raise --kv-cache-memory)")
        seq = Sequence(request, self.decoder() if self.decoder else None)
        self.waiting.append(seq)
        return seq

    def cancel(self, request_id: int) -> None:
        """End a request at the next step (a client that went away); its pages are freed."""
        for seq in [*self.waiting, *self.running]:
            if seq.request.id == request_id and seq.finish is None:
                seq.finish = "cancelled"
                if not seq.in_flight:
                    self._retire(seq)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.in_flight)

    # --- the loop ----------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Fill the executor, then take one step's tokens."""
        while len(self.in_flight) < self.executor.depth:
            batch = self._schedule()
            if not batch:
                break
            self._submit(batch)
        if not self.in_flight:
            if self.running:  # alone in the cache and still too long for it: it ends here
                seq = self.running[0]
                seq.finish = "length"
                tail = self._flush(seq)
                self._retire(seq)
                return [TokenEvent(seq.request.id, -1, tail, "length")]
            if self.waiting:
                raise RuntimeError("the KV cache cannot hold the next sequence")  # add() rules it out
            return []
        return self._finish_step(self.in_flight.popleft(), self.executor.collect())

    def run_all(self, requests: Iterable[Request]) -> dict[int, Sequence]:
        """Generate for every request; the finished sequences by request id."""
        sequences = {r.id: self.add(r) for r in requests}
        while self.busy:
            self.step()
        return sequences

    # --- scheduling ----------------------------------------------------------------------

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // PAGE)

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Pages for the sequence's first `tokens` positions, if the pools have them."""
        more = self._pages_for(tokens) - len(seq.pages)
        ring_more = min(self._pages_for(tokens), self.ring_pages) - len(seq.ring) if self.ring_pool else 0
        if more > len(self.pool.free) or (self.ring_pool and ring_more > len(self.ring_pool.free)):
            return False
        if more > 0:
            seq.pages += self.pool.take(more) or []
        if self.ring_pool and ring_more > 0:
            seq.ring += self.ring_pool.take(ring_more) or []
        used = self.pool.size - len(self.pool.free)
        self.stats.peak_pages = max(self.stats.peak_pages, used)
        return True

    def _release(self, seq: Sequence) -> None:
        self.pool.give(seq.pages)
        seq.pages = []
        if self.ring_pool:
            self.ring_pool.give(seq.ring)
        seq.ring = []

    def _preempt_for(self, seq: Sequence, keep: list[tuple[Sequence, int]]) -> bool:
        """Free pages by preempting the newest other sequence neither in flight nor already
        in the step being formed (`keep`)."""
        chosen = {id(s) for s, _ in keep}
        for victim in reversed(self.running):
            if victim is not seq and not victim.in_flight and id(victim) not in chosen:
                self.running.remove(victim)
                self._release(victim)
                victim.computed = 0
                self.waiting.appendleft(victim)
                self.stats.preemptions += 1
                return True
        return False

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """The next step: (sequence, tokens to feed) for sequences not already in flight."""
        cap = -(-self.max_running // self.executor.depth)
        budget = self.step_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if len(batch) >= cap or budget <= 0:
                break
            if seq.in_flight or seq not in self.running:
                continue
            n = min(seq.length - seq.computed, budget)
            while not self._grow(seq, seq.computed + n):
                if not self._preempt_for(seq, batch):
                    n = 0
                    break
            if n:
                batch.append((seq, n))
                budget -= n
        while self.waiting and len(self.running) < self.max_running and len(batch) < cap and budget > 0:
            seq = self.waiting[0]
            n = min(seq.length - seq.computed, budget)
            if not self._grow(seq, seq.computed + n):
                break
            self.waiting.popleft()
            self.running.append(seq)
            if seq.started_at is None:
                seq.started_at = time.perf_counter()
            batch.append((seq, n))
            budget -= n
        return batch

    def _submit(self, batch: list[tuple[Sequence, int]]) -> None:
        chunks, sampling = [], []
        for seq, n in batch:
            seq.in_flight = True
            wants = seq.computed + n == seq.length
            tokens = tuple(seq.token(i) for i in range(seq.computed, seq.computed + n))
            chunks.append(SeqChunk(tokens, seq.computed, tuple(seq.pages), tuple(seq.ring), wants))
            if wants:
                sampling.append((seq.request.params, seq.length))
        self.stats.steps += 1
        self.stats.running_sum += len(batch)
        self.executor.submit(chunks, sampling)
        self.in_flight.append(batch)

    def _finish_step(self, batch: list[tuple[Sequence, int]], tokens: list[int]) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        made = iter(tokens)
        now = time.perf_counter()
        for seq, n in batch:
            seq.in_flight = False
            wanted = seq.computed + n == seq.length
            seq.computed += n
            # every token fed is prefill work but a generated token fed to make the next one
            decoding = wanted and seq.length - 1 >= len(seq.request.prompt)
            self.stats.prompt_tokens += n - 1 if decoding else n
            if not wanted:
                continue
            token = next(made)
            if seq.finish == "cancelled":
                self._retire(seq)
                continue
            self.stats.generated_tokens += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
            events.append(self._append(seq, token))
        return events

    def _append(self, seq: Sequence, token: int) -> TokenEvent:
        r = seq.request
        if token in self.eos_ids and not r.ignore_eos:
            seq.finish = "stop"
            piece = self._flush(seq)
            self._retire(seq)
            return TokenEvent(r.id, token, piece, "stop")
        seq.out.append(token)
        piece = seq.decoder.push(token) if seq.decoder else ""
        before = len(seq.text)
        seq.text += piece
        if r.stop and piece:
            # a stop string may have begun in earlier text: search from its longest reach back
            reach = max(len(s) for s in r.stop) - 1
            window_start = max(0, before - reach)
            hits = [i for s in r.stop if (i := seq.text.find(s, window_start)) >= 0]
            if hits:
                cut = min(hits)
                piece = seq.text[before:cut] if cut > before else ""
                seq.text = seq.text[:cut]
                seq.finish = "stop"
        if seq.finish is None and (len(seq.out) >= r.max_tokens or seq.length >= self.context):
            seq.finish = "length"
            piece += self._flush(seq)
        if seq.finish is not None:
            self._retire(seq)
        return TokenEvent(r.id, token, piece, seq.finish)

    def _flush(self, seq: Sequence) -> str:
        """The text the decoder still held, now added to the sequence's text."""
        tail = seq.decoder.flush() if seq.decoder else ""
        seq.text += tail
        return tail

    def _retire(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
