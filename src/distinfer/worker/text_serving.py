"""A replica serving text generation: the server's sequences through the replica's engine,
one step at a time, their new text sent back as it is made.

The same engine as a batch job (`GenerationRunner`'s, with the executor of the replica's
strategy): `generate` adds a sequence, `stop` ends one at the next step (its KV pages are
freed), `step` runs one engine step and returns a `TokenPieces` report: every sequence's new
text (whole characters), and the replica's state (running and waiting sequences, free
pages, its measured decode and prefill rates), by which the server routes and admits. A
failed step fails every sequence in the engine (each gets an "error" piece) and the engine
starts afresh; the replica stays up.
"""

from __future__ import annotations

import time

from ..messages import Generate, Piece, TokenPieces
from ..models.llm.engine import Request, Sequence
from ..models.llm.runner import GenerationRunner
from ..models.llm.sampling import SamplingParams

__all__ = ["TextServing"]

_SMOOTH = 0.2  # weight of a new measurement in the running rates


class TextServing:
    def __init__(self, worker: int, runner: GenerationRunner) -> None:
        self.worker = worker
        self.runner = runner
        self._live: dict[int, Sequence] = {}  # server request id -> its sequence
        self._last_token: dict[int, float] = {}
        self._told: dict[int, int] = {}  # tokens reported so far, per sequence
        self._pending: list[Piece] = []  # pieces not yet reported (a refused request's)
        self._changed = False  # a sequence was stopped: the freed pages are worth a report
        self._stopped: set[int] = set()  # stopped before their start arrived (orders may cross)
        self.token_s = 0.0  # between a sequence's tokens
        self.prefill_token_s = 0.0  # what a step's prompt tokens add to it, per token
        self._decode_step_s = 0.0  # a step with no prompt tokens
        self._busy = 0.0

    @property
    def engine(self):  # type: ignore[no-untyped-def]  # the runner's (renewed after a failed step)
        return self.runner.engine

    @property
    def busy(self) -> bool:
        return self.engine.busy or bool(self._pending) or self._changed

    @property
    def kv_pages(self) -> int:
        return int(self.engine.pool.size)

    @property
    def max_running(self) -> int:
        return int(self.engine.max_running)

    def warm_up(self, prompt: tuple[int, ...]) -> None:
        """Pay first-call costs and measure the rates before the first request: a short prompt
        prefilled alone, then two sequences decoded together."""
        for rid in (-1, -2):
            self.generate(Generate(rid, prompt, 6, ignore_eos=True))
            while self.engine.busy:
                self.step()
        self._pending.clear()

    def generate(self, order: Generate) -> None:
        if order.request in self._stopped:
            self._stopped.discard(order.request)
            return
        params = SamplingParams(order.temperature, order.top_k, order.top_p, order.min_p, order.seed)
        request = Request(order.request, order.prompt, order.max_tokens, params, order.stop, order.ignore_eos)
        try:
            seq = self.engine.add(request)
        except ValueError as exc:  # the server checks first; a refusal here is still an answer
            self._pending.append(Piece(order.request, "", 0, "error", str(exc)))
            return
        self._live[order.request] = seq

    def stop(self, request: int) -> None:
        if request in self._live:
            self.engine.cancel(request)
            self._forget(request)
            self._changed = True
        elif len(self._stopped) < 10_000:
            self._stopped.add(request)

    def step(self) -> TokenPieces:
        """One engine step (when it has work); the report."""
        pieces, self._pending, self._changed = self._pending, [], False
        if self.engine.busy:
            t = time.perf_counter()
            prefilled = self.engine.stats.prompt_tokens
            try:
                events = self.engine.step()
            except Exception as exc:  # every sequence in the engine fails with the step
                self.runner.abandon()
                why = f"generation failed on the replica: {type(exc).__name__}: {exc}"
                pieces += [Piece(r, "", 0, "error", why[:500]) for r in self._live]
                for r in list(self._live):
                    self._forget(r)
                events = []
            now = time.perf_counter()
            self._busy += now - t
            self._measure(now - t, self.engine.stats.prompt_tokens - prefilled)
            for e in events:
                pieces.append(self._piece(e.id, e.text, e.finish, now))
        e = self.engine
        report = TokenPieces(
            self.worker,
            tuple(pieces),
            len(e.running),
            len(e.waiting),
            len(e.pool.free),
            e.stats.preemptions,
            self.token_s,
            self.prefill_token_s,
            self._busy,
        )
        self._busy = 0.0
        return report

    def _piece(self, rid: int, text: str, finish: str | None, now: float) -> Piece:
        seq = self._live.get(rid)
        made = len(seq.out) if seq is not None else 0  # an end-of-text token is not counted
        tokens = made - self._told.get(rid, 0)
        self._told[rid] = made
        last = self._last_token.get(rid)
        if last is not None:
            self.token_s = _mix(self.token_s, now - last)
        self._last_token[rid] = now
        if finish is not None:
            self._forget(rid)
        return Piece(rid, text, tokens, finish)

    def _measure(self, step_s: float, prefilled: int) -> None:
        """The prefill rate from the steps' times: a step with prompt tokens costs what a
        decode step costs plus its prompt tokens (a sequence's first token waits for that,
        not for the steps of the sequences queued before it, which admission counts apart)."""
        if prefilled <= 0:
            self._decode_step_s = _mix(self._decode_step_s, step_s)
            return
        extra = max(step_s - self._decode_step_s, 0.25 * step_s)
        self.prefill_token_s = _mix(self.prefill_token_s, extra / prefilled)

    def _forget(self, rid: int) -> None:
        self._live.pop(rid, None)
        self._last_token.pop(rid, None)
        self._told.pop(rid, None)


def _mix(old: float, new: float) -> float:
    return new if old == 0.0 else (1 - _SMOOTH) * old + _SMOOTH * new
