"""The serving core for text generation: streams in, each to the replica that will start it
soonest, new text back as the replicas make it.

Every replica runs its own iteration-level loop (worker/text_serving.py) over up to
`--max-running` sequences. This server keeps the requests that no replica has room for in
one queue (at most `--max-queue`), oldest first, and hands the oldest to the ready replica
with the most free places (then the most free KV pages), as soon as one has room: a place
free, and the pages the prompt needs. A replica is given a few more sequences than it runs
(`spare`) so that a finished sequence's place is taken at its next step, not after a round
trip to this server.

Admission predicts a request's time to first token from what is ahead of it: the queue, and
when each replica's places free (a running sequence's remaining tokens times that replica's
measured time per token; only the replica it would be handed to when the queue is empty and
one has room, since it then waits for that one's places), plus the prompts handed to a
replica but not yet prefilled and its own, at the replica's measured prefill rate. The sum
is scaled by how far the measured first tokens of earlier requests were from their
predictions (the 90th percentile of the last 20 ratios of the last 30 s, a prediction under
half the allowed wait counted as that, never below 1), which covers what the rates miss
under load. A request that finds the server idle (nothing queued or running) is always
admitted: it starts at once, and a scale learnt under load must not refuse every request of
a quiet server (which would then never measure a first token again). A request that cannot
start within its deadline (less the same 25% margin as the KServe route's admission), or
finds the queue full, is refused at once (429 with Retry-After). An admitted request is
never dropped for a later one.

A replica that is lost is replaced (the life cycle is `InferenceServer`'s). Its sequences
that had not yet sent a token to a streaming client, and non-streamed ones, are retried once
elsewhere; a stream that had sent tokens ends with an error piece that says so.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field

from .. import messages as msg
from ..backends.base import Backend
from ..scheduling.supervisor import Retired
from .batcher import DEADLINE_MARGIN, Shed
from .config import ServeConfig
from .metrics import ServerMetrics
from .server import InferenceServer, _Replica

__all__ = ["GenerationServer", "TextStream"]

TTFT_WINDOW = 20  # admission's calibration: the last first tokens' measured/predicted ratios
TTFT_QUANTILE = 0.9  # ... of which this quantile scales the predictions (the tail, not the mean)
TTFT_HORIZON_S = 30.0  # ... and only those measured this recently (a quiet server forgets)


@dataclass(eq=False)
class TextStream:
    """One choice of one request, from admission to its last piece."""

    order: msg.Generate
    streaming: bool
    arrived: float
    pieces: asyncio.Queue[msg.Piece]  # shared by a request's choices
    state: str = "queued"  # queued, running, done
    worker: int | None = None
    attempts: int = 0
    text: str = ""
    tokens: int = 0
    finish: str | None = None
    error: str | None = None
    error_status: int = 500  # 500 the replica's generation failed, 503 the server's doing
    first_at: float | None = None
    last_at: float | None = None
    predicted_s: float | None = None  # the first token's wait admission predicted (uncalibrated)

    @property
    def id(self) -> int:
        return self.order.request

    @property
    def prompt_tokens(self) -> int:
        return len(self.order.prompt)

    @property
    def pages(self) -> int:
        return -(-(len(self.order.prompt) + 1) // msg.KV_PAGE_TOKENS)


@dataclass
class _TextReplica(_Replica):
    kv_pages: int = 0
    max_running: int = 0
    free_pages: int = 0
    running: int = 0
    token_s: float = 0.0
    prefill_token_s: float = 0.0
    preemptions: int = 0
    assigned: dict[int, TextStream] = field(default_factory=dict)  # in the order given

    @property
    def spare(self) -> int:
        return max(1, self.max_running // 4)

    def room(self, stream: TextStream) -> bool:
        if not self.ready or not self.max_running:
            return False
        if not self.assigned:
            return True
        if len(self.assigned) >= self.max_running + self.spare:
            return False
        unstarted = sum(s.pages for s in self.assigned.values() if s.tokens == 0)
        return self.free_pages - unstarted >= stream.pages


class GenerationServer(InferenceServer):
    def __init__(
        self, config: ServeConfig, backend: Backend, metrics: ServerMetrics, name: str, kind: str
    ) -> None:
        super().__init__(config, backend, metrics, name, kind)
        self.waiting: deque[TextStream] = deque()
        self.streams: dict[int, TextStream] = {}
        self._next_id = 0
        self._ttft_scale = 1.0  # measured over predicted first-token waits (see _calibrate)
        self._ttft_ratios: deque[tuple[float, float]] = deque(maxlen=TTFT_WINDOW)  # (when, ratio)

    def _new_replica(self, worker: int) -> _Replica:
        return _TextReplica(worker)

    def _text_replicas(self) -> list[_TextReplica]:
        return [r for r in self.replicas.values() if isinstance(r, _TextReplica)]

    # -- requests --------------------------------------------------------------------------

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def submit_text(self, orders: list[msg.Generate], streaming: bool) -> list[TextStream]:
        """Queue a request's choices, or raise Shed (503 not ready or draining, 429 when the
        queue is full or the first token cannot come within the deadline)."""
        if not self.is_ready():
            raise self.not_ready()
        if len(self.waiting) + len(orders) > self.config.max_queue:
            raise Shed(
                429,
                "queue_full",
                f"{len(self.waiting)} requests are waiting (--max-queue "
                f"{self.config.max_queue}); retry later",
                1,
            )
        longest = max(len(o.prompt) for o in orders)
        predicted = self.predict_first_token_s(longest, len(orders))
        idle = not self.waiting and not self._running()  # it starts now: nothing to wait for
        if predicted is not None and not idle and predicted > self.deadline_s * (1 - DEADLINE_MARGIN):
            retry = max(1, math.ceil(predicted - self.deadline_s))
            raise Shed(
                429,
                "deadline",
                f"the first token would come in about {predicted:.1f} s, past the "
                f"deadline of {self.deadline_s:g} s; retry later",
                retry,
            )
        now = self.loop.time()
        pieces: asyncio.Queue[msg.Piece] = asyncio.Queue()
        streams = [TextStream(o, streaming, now, pieces) for o in orders]
        raw = None if predicted is None else predicted / self._ttft_scale
        for s in streams:
            s.predicted_s = raw
            self.streams[s.id] = s
            self.waiting.append(s)
        self.metrics.waiting.set(len(self.waiting))
        self._wake.set()
        return streams

    def kv_pages(self) -> int:
        """The smallest KV cache of the ready replicas, in pages (0 before one is ready)."""
        return min((r.kv_pages for r in self._text_replicas() if r.ready and r.kv_pages), default=0)

    def cancel(self, stream: TextStream) -> None:
        """The client went away: end the stream at the replica's next step (its pages freed)."""
        if stream.state == "done":
            return
        if stream.state == "queued":
            self.waiting.remove(stream)
            self.metrics.waiting.set(len(self.waiting))
        elif stream.worker is not None:
            replica = self.replicas.get(stream.worker)
            if isinstance(replica, _TextReplica):
                replica.assigned.pop(stream.id, None)
            self.pool.send(stream.worker, msg.StopSequence(stream.id))
        self.metrics.shed.inc(model=self.name, reason="disconnected")
        self._end(stream)
        self._wake.set()

    def predict_first_token_s(self, prompt_tokens: int, count: int = 1) -> float | None:
        """When a new request's first token would come, from what is ahead of it (None before
        any replica has measured its rates)."""
        replicas = [r for r in self._text_replicas() if r.ready and r.token_s > 0]
        if not replicas:
            return None
        self._rescale()
        open_now = [r for r in replicas if len(r.assigned) < r.max_running + r.spare]
        if not self.waiting and open_now:
            # it is handed at once to the replica `_dispatch` picks, and waits for that one's
            # places, not for whichever replica frees one first
            replicas = [_pick(open_now)]
        free_at: list[float] = []
        ahead = len(self.waiting) + count - 1
        for r in replicas:
            running = list(r.assigned.values())[: r.max_running]
            free_at += [0.0] * (r.max_running - len(running))
            free_at += [max(0, s.order.max_tokens - s.tokens) * r.token_s for s in running]
            ahead += max(0, len(r.assigned) - r.max_running)
        free_at.sort()
        token_s = sum(r.token_s for r in replicas) / len(replicas)
        prefill_s = sum(r.prefill_token_s for r in replicas) / len(replicas)
        # prompts handed to a replica and not yet prefilled go first (the least loaded replica's)
        queued = min(sum(len(s.order.prompt) for s in r.assigned.values() if s.tokens == 0) for r in replicas)
        if ahead < len(free_at):
            wait = free_at[ahead]
        else:  # beyond the running sequences: each round of places takes a typical sequence
            typical = sum(s.order.max_tokens for s in self.waiting) / max(1, len(self.waiting))
            wait = free_at[ahead % len(free_at)] + (ahead // len(free_at)) * typical * token_s
        return (wait + (queued + prompt_tokens) * prefill_s + token_s) * self._ttft_scale

    def _ttft_floor(self) -> float:
        """A prediction below this is compared as this: half the wait admission allows. What
        matters is how wrong the predictions near the shedding threshold are; a first token
        predicted in 0.1 s that takes 0.4 s (a loaded step) says nothing about one predicted
        in 1.5 s, and as a ratio it would shed requests that would have kept their deadline."""
        return 0.5 * self.deadline_s * (1 - DEADLINE_MARGIN)

    def _calibrate(self, ratio: float) -> None:
        """Scale later predictions by how far the measured first tokens were from theirs: the
        rates the replicas report miss what a loaded step costs (prefill chunks, queueing).
        It never goes below 1: a quiet spell of early first tokens must not halve the
        predictions that the next burst is admitted on (measured: at 3x overload, a scale
        learnt down to 0.5 admitted requests predicted at 2.6 s, whose first tokens came in 3.1).
        The scale is an upper quantile of the last ratios, not their mean: a deadline is kept
        by the slow first tokens (an admitted p99), and a mean lets every other one be late."""
        self._ttft_ratios.append((self.loop.time(), min(max(ratio, 1.0), 10.0)))
        self._rescale()

    def _rescale(self) -> None:
        """The scale from the ratios of the last `TTFT_HORIZON_S` (1 when there are none)."""
        old = self.loop.time() - TTFT_HORIZON_S
        while self._ttft_ratios and self._ttft_ratios[0][0] < old:
            self._ttft_ratios.popleft()
        self._ttft_scale = calibration_scale([r for _, r in self._ttft_ratios])

    # -- routing ---------------------------------------------------------------------------

    def _dispatch(self) -> float | None:
        while self.waiting:
            stream = self.waiting[0]
            fits = [r for r in self._text_replicas() if r.room(stream)]
            if not fits:
                return None
            best = _pick(fits)
            self.waiting.popleft()
            self._send_stream(best, stream)
        self.metrics.waiting.set(len(self.waiting))
        return None

    def _send_stream(self, replica: _TextReplica, stream: TextStream) -> None:
        stream.state, stream.worker = "running", replica.worker
        stream.attempts += 1
        replica.assigned[stream.id] = stream
        self.metrics.queue_time.observe(self.loop.time() - stream.arrived, model=self.name)
        self.pool.send(replica.worker, stream.order)

    # -- what the replicas say -------------------------------------------------------------

    def _ready(self, item: msg.WorkerReady) -> None:
        super()._ready(item)
        replica = self.replicas.get(item.worker)
        if isinstance(replica, _TextReplica):
            replica.kv_pages, replica.max_running = item.kv_pages, item.max_running
            replica.free_pages = item.kv_pages

    def _pieces(self, item: msg.TokenPieces) -> None:
        replica = self.replicas.get(item.worker)
        if not isinstance(replica, _TextReplica):
            return  # retired meanwhile
        label = str(item.worker)
        replica.running, replica.free_pages = item.running, item.free_pages
        replica.token_s, replica.prefill_token_s = item.token_s, item.prefill_token_s
        if item.preemptions > replica.preemptions:
            self.metrics.preemptions.inc(item.preemptions - replica.preemptions, replica=label)
        replica.preemptions = item.preemptions
        self.metrics.running.set(item.running, replica=label)
        self.metrics.replica_waiting.set(item.waiting, replica=label)
        if replica.kv_pages:
            self.metrics.kv_use.set(1 - item.free_pages / replica.kv_pages, replica=label)
        self.metrics.replica_busy.inc(item.busy_s, replica=label)
        now = self.loop.time()
        for piece in item.pieces:
            stream = replica.assigned.get(piece.request)
            if stream is not None:
                self._piece(replica, stream, piece, now)

    def _piece(self, replica: _TextReplica, stream: TextStream, piece: msg.Piece, now: float) -> None:
        stream.text += piece.text
        if piece.tokens:
            if stream.first_at is None:
                stream.first_at = now
                self.metrics.ttft.observe(now - stream.arrived, model=self.name)
                if stream.predicted_s is not None and stream.attempts == 1:
                    self._calibrate((now - stream.arrived) / max(stream.predicted_s, self._ttft_floor()))
                self.metrics.prompt_tokens.inc(stream.prompt_tokens, model=self.name)
            stream.tokens += piece.tokens
            stream.last_at = now
            self.metrics.generated_tokens.inc(piece.tokens, model=self.name)
        if piece.finish is None:
            if piece.text and stream.streaming:
                stream.pieces.put_nowait(piece)
            return
        replica.assigned.pop(stream.id, None)
        stream.finish, stream.error = piece.finish, piece.error
        if piece.finish != "error":
            self.metrics.e2e.observe(now - stream.arrived, model=self.name)
            if stream.first_at is not None and stream.tokens > 1:
                self.metrics.tpot.observe((now - stream.first_at) / (stream.tokens - 1), model=self.name)
        self._end(stream, piece)

    def _end(self, stream: TextStream, last: msg.Piece | None = None) -> None:
        """The stream is over: its last piece to the client, and forgotten here."""
        stream.state = "done"
        self.streams.pop(stream.id, None)
        if last is None:
            last = msg.Piece(stream.id, "", 0, stream.finish or "error", stream.error)
        stream.pieces.put_nowait(last)

    def _fail_stream(self, stream: TextStream, why: str) -> None:
        stream.finish, stream.error, stream.error_status = "error", why, 503
        self._end(stream)

    def _retired(self, out: Retired) -> None:
        replica = self.replicas.get(out.worker)
        lost = list(replica.assigned.values()) if isinstance(replica, _TextReplica) else []
        super()._retired(out)
        retry = []
        for s in lost:
            if s.streaming and s.tokens:
                self._fail_stream(
                    s,
                    f"the replica generating this stream was lost after {s.tokens} tokens "
                    f"({out.reason or 'it stopped'}); the text is cut here, retry the request",
                )
            elif s.attempts >= 2:
                self.metrics.shed.inc(model=self.name, reason="replica_lost")
                self._fail_stream(s, "the replicas generating this request were lost twice; retry later")
            else:  # nothing reached the client: start again elsewhere, ahead of the queue
                s.state, s.worker, s.text, s.tokens, s.first_at = "queued", None, "", 0, None
                retry.append(s)
        self.waiting.extendleft(reversed(retry))
        self.metrics.waiting.set(len(self.waiting))

    # -- life cycle ------------------------------------------------------------------------

    def _running(self) -> bool:
        return any(r.assigned for r in self._text_replicas())

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests; let queued and running streams finish, for at most `timeout_s`."""
        self.draining = True
        self._wake.set()
        deadline = self.loop.time() + timeout_s
        while (self.waiting or self._running()) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for stream in list(self.streams.values()):
            self._fail_stream(stream, "the server shut down before the stream ended; retry on another one")
        self.waiting.clear()


def _pick(replicas: list[_TextReplica]) -> _TextReplica:
    """The replica a new sequence goes to: the most free places, then the most free pages."""
    return max(replicas, key=lambda r: (r.max_running + r.spare - len(r.assigned), r.free_pages))


def calibration_scale(ratios: list[float]) -> float:
    """The `TTFT_QUANTILE` of the measured/predicted ratios (nearest rank); 1 before any."""
    if not ratios:
        return 1.0
    ordered = sorted(ratios)
    return ordered[min(len(ordered) - 1, math.ceil(TTFT_QUANTILE * len(ordered)) - 1)]
