"""The serving simulator: the server's real `RequestQueue` against simulated replicas.

Model
-----
Requests arrive as a Poisson stream of `rate` per second for `duration_s` seconds, each of
`rows_per_request` rows and a deadline `timeout_s` after its arrival. The queue is the
server's own (`serving/batcher.py`): `admit` refuses a request when the queue is full or its
predicted answer (`predict_finish`, from the replicas' measured rates) misses its deadline,
`take` forms the batch. The dispatch rules are `InferenceServer._dispatch`'s, step for step:
a free replica takes the next batch at once when it is full, else once the oldest request
has waited `max_queue_delay_s`; a full batch may wait in the pipe of a replica busy with one
batch; the least-loaded replica is chosen. A replica runs the batches of its pipe in order,
each taking `(batch_overhead_s + rows * per_row_s) * spread` (a lognormal spread per
replica); each message takes `latency_s`. A request whose deadline passes is answered 504
(queued: never computed). Latency is from arrival to the answer reaching the server.

Not simulated: HTTP and JSON (about 2 ms of CPU a request on this machine, DESIGN.md), lost
replicas, and text generation (continuous batching).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from distinfer.errors import ConfigError
from distinfer.serving.batcher import Pending, RateEstimate, RequestQueue, Shed

__all__ = ["ServeResult", "ServeSpec", "simulate_serving"]

_NO_FUTURE: Any = None  # the queue never touches a request's future
_ARRIVE, _DONE, _EXPIRE, _WAKE = range(4)


@dataclass(frozen=True, slots=True)
class ServeSpec:
    """A request stream and the replicas serving it; the knobs are `distinfer serve`'s."""

    rate: float
    per_row_s: float
    replicas: int = 2
    duration_s: float = 30.0
    batch_overhead_s: float = 0.0
    rows_per_request: int = 1
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.010
    max_queue: int = 512
    timeout_s: float = 1.0
    speed_sigma: float = 0.0
    latency_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, flag in (
            ("rate", "--rate"),
            ("per_row_s", "--per-row-ms"),
            ("duration_s", "--duration-s"),
            ("timeout_s", "--timeout-ms"),
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be a number > 0, got {value!r}")
        for name, flag in (
            ("batch_overhead_s", "--batch-overhead-ms"),
            ("max_queue_delay_s", "--max-queue-delay-ms"),
            ("speed_sigma", "--speed-sigma"),
            ("latency_s", "--latency-ms"),
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{flag} must be a number >= 0, got {value!r}")
        for name, flag in (
            ("replicas", "--replicas"),
            ("rows_per_request", "--rows-per-request"),
            ("max_batch_size", "--max-batch-size"),
            ("max_queue", "--max-queue"),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{flag} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be a whole number >= 0, got {self.seed!r}")

    @property
    def capacity(self) -> float:
        """Requests/s the replicas answer with full batches (at nominal speed)."""
        batch_s = self.batch_overhead_s + self.max_batch_size * self.per_row_s
        return self.replicas * self.max_batch_size / self.rows_per_request / batch_s


@dataclass
class ServeResult:
    offered: int
    answered: int
    shed: dict[str, int]  # reason -> requests (queue_full, deadline: 429; timeout: 504)
    latency_s: dict[str, float]  # p50, p90, p99, max of the answered requests
    capacity: float
    offered_rate: float
    mean_batch_rows: float
    replica_busy: float  # share of the replicas' time spent computing
    duration_s: float  # until the last answer
    events: int
    latencies: list[float] = field(default_factory=list, repr=False)

    @property
    def shed_share(self) -> float:
        return sum(self.shed.values()) / self.offered if self.offered else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("latencies")
        data["shed_share"] = self.shed_share
        return data

    def describe(self) -> str:
        lat = self.latency_s
        shed = ", ".join(f"{k} {v}" for k, v in sorted(self.shed.items())) or "none"
        return "\n".join(
            [
                f"serving: {self.offered:,} requests at {self.offered_rate:g}/s against a capacity of "
                f"{self.capacity:.1f}/s ({self.offered_rate / self.capacity:.0%} load)",
                f"  answered   {self.answered:,}; shed {self.shed_share:.1%} ({shed})",
                f"  latency    p50 {lat['p50'] * 1e3:.1f} ms, p90 {lat['p90'] * 1e3:.1f} ms, "
                f"p99 {lat['p99'] * 1e3:.1f} ms, max {lat['max'] * 1e3:.1f} ms",
                f"  batches    {self.mean_batch_rows:.1f} rows on average; "
                f"replicas {self.replica_busy:.1%} busy",
                f"  events     {self.events:,} simulated over {self.duration_s:.2f} s",
            ]
        )


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile of sorted `values` (0 when empty)."""
    if not values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[rank - 1]


@dataclass
class _Replica:
    worker: int
    spread: float
    batches: dict[int, tuple[list[Pending], float]] = field(default_factory=dict)
    rate: RateEstimate = field(default_factory=RateEstimate)
    last_done: float = 0.0
    free_at: float = 0.0  # when its compute is free (the simulator's knowledge, not the server's)
    busy_s: float = 0.0


def simulate_serving(spec: ServeSpec) -> ServeResult:
    """Run the request stream through the queue and the replicas; see the module docstring."""
    return _Serving(spec).run()


class _Serving:
    def __init__(self, spec: ServeSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.queue = RequestQueue(spec.max_batch_size, spec.max_queue)
        sigma = spec.speed_sigma
        self.replicas = [
            _Replica(w, math.exp(self.rng.gauss(0, sigma)) if sigma else 1.0) for w in range(spec.replicas)
        ]
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.wake_at = math.inf
        self.next_batch = 0
        self.offered = 0
        self.latencies: list[float] = []
        self.shed: dict[str, int] = {}
        self.batch_rows: list[int] = []

    def post(self, t: float, kind: int, item: Any) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, item))

    def run(self) -> ServeResult:
        spec = self.spec
        self.post(self.rng.expovariate(spec.rate), _ARRIVE, None)
        events = 0
        while self.heap:
            self.now, _, kind, item = heapq.heappop(self.heap)
            events += 1
            if kind == _ARRIVE:
                self.arrive()
            elif kind == _DONE:
                self.done(*item)
            elif kind == _EXPIRE:
                self.expire(item)
            else:
                self.wake_at = math.inf
            self.dispatch()
        self.latencies.sort()
        lat = self.latencies
        busy = sum(r.busy_s for r in self.replicas)
        return ServeResult(
            offered=self.offered,
            answered=len(lat),
            shed=dict(sorted(self.shed.items())),
            latency_s={
                "p50": percentile(lat, 50),
                "p90": percentile(lat, 90),
                "p99": percentile(lat, 99),
                "max": lat[-1] if lat else 0.0,
            },
            capacity=spec.capacity,
            offered_rate=spec.rate,
            mean_batch_rows=sum(self.batch_rows) / len(self.batch_rows) if self.batch_rows else 0.0,
            replica_busy=busy / (len(self.replicas) * self.now) if self.now > 0 else 0.0,
            duration_s=self.now,
            events=events,
            latencies=lat,
        )

    # --- requests ---------------------------------------------------------------------

    def arrive(self) -> None:
        spec, now = self.spec, self.now
        following = now + self.rng.expovariate(spec.rate)
        if following < spec.duration_s:
            self.post(following, _ARRIVE, None)
        self.offered += 1
        pending = Pending({}, spec.rows_per_request, now, now + spec.timeout_s, _NO_FUTURE)
        free_at, rate = self.capacity()
        try:
            self.queue.admit(pending, now, free_at, rate)
        except Shed as shed:
            self.shed[shed.reason] = self.shed.get(shed.reason, 0) + 1
            return
        self.post(pending.deadline, _EXPIRE, pending)

    def expire(self, pending: Pending) -> None:
        if pending.state == "queued":
            self.queue.drop(pending)
        elif pending.state != "running":
            return
        pending.state = "answered"
        self.shed["timeout"] = self.shed.get("timeout", 0) + 1

    # --- the server's dispatch (InferenceServer._dispatch, _capacity, _rate) -----------

    def rate(self) -> float | None:
        rates = [r.rate.per_s for r in self.replicas if r.rate.per_s]
        return sum(rates) / len(rates) if rates else None

    def capacity(self) -> tuple[list[float], float | None]:
        rate = self.rate()
        if rate is None:
            return [], None
        now = self.now
        free_at = []
        for r in self.replicas:
            end = now
            for batch, sent in r.batches.values():
                end = max(end, sent) + sum(p.work for p in batch) / rate
            free_at.append(max(now, end))
        return free_at, rate

    def dispatch(self) -> None:
        queue, now = self.queue, self.now
        delay = self.spec.max_queue_delay_s
        while True:
            first = queue.oldest()
            if first is None:
                return
            full = queue.ready_rows() >= queue.max_batch
            free = [r for r in self.replicas if not r.batches]
            if not free and full:
                free = [r for r in self.replicas if len(r.batches) == 1]
            if not free:
                return
            due = first.arrived + delay
            if not full and now < due:  # the server's `age < delay`, without rounding's endless wake-ups
                if due < self.wake_at:
                    self.wake_at = due
                    self.post(due, _WAKE, None)
                return
            rate = self.rate()
            row_work = queue.work / max(queue.rows, 1)
            full_batch_s = queue.max_batch * row_work / rate if rate else 0.0
            batch = queue.take(now, urgent_before=now + 2 * full_batch_s)
            replica = min(free, key=lambda r: min((sent for _, sent in r.batches.values()), default=0.0))
            self.send(replica, batch)

    def send(self, replica: _Replica, batch: list[Pending]) -> None:
        spec, now = self.spec, self.now
        batch_id = self.next_batch
        self.next_batch += 1
        replica.batches[batch_id] = (batch, now)
        rows = sum(p.rows for p in batch)
        self.batch_rows.append(rows)
        service = (spec.batch_overhead_s + rows * spec.per_row_s) * replica.spread
        start = max(now + spec.latency_s, replica.free_at)
        replica.free_at = start + service
        replica.busy_s += service
        self.post(replica.free_at + spec.latency_s, _DONE, (replica.worker, batch_id))

    def done(self, worker: int, batch_id: int) -> None:
        replica = self.replicas[worker]
        batch, sent = replica.batches.pop(batch_id)
        now = self.now
        started = max(sent, replica.last_done)
        replica.last_done = now
        replica.rate.add(sum(p.work for p in batch), now - started)
        for p in batch:
            if p.state == "running":
                p.state = "answered"
                self.latencies.append(now - p.arrived)
