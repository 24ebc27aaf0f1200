"""Prometheus metrics for `distinfer serve`, without a dependency on prometheus_client.

A `Registry` holds counters, gauges and histograms and renders them in the Prometheus text
exposition format 0.0.4 (`GET /metrics`, content type `CONTENT_TYPE`): `# HELP` and `# TYPE` lines,
one sample per label set, label values escaped (backslash, double quote, newline) and histograms as
cumulative `_bucket{le="..."}` samples ending with `le="+Inf"`, then `_sum` and `_count`.

Every update and `render()` take the registry's one lock, so the HTTP app, the batcher and a
replica's receiver thread may update metrics concurrently and a scrape sees a consistent snapshot.

`ServerMetrics` is the set the serving app records: requests by route and status, latency, queue
time, batch sizes, shed requests by reason, replica busy time, ready replicas and queued rows.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import threading
from collections.abc import Sequence

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "CONTENT_TYPE",
    "LATENCY_BUCKETS",
    "QUEUE_TIME_BUCKETS",
    "SHED_REASONS",
    "TOKEN_TIME_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "ServerMetrics",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)
QUEUE_TIME_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_TIME_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
)
SHED_REASONS: tuple[str, ...] = ("queue_full", "deadline", "draining", "timeout", "disconnected",
                                 "replica_lost")

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelKey = tuple[str, ...]


def _format_value(value: float) -> str:
    """A sample value or bucket bound as Prometheus writes it: `+Inf`, `-Inf`, `NaN` or a float."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label_value(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    """What the three kinds share: name, help, declared label names, the registry's lock."""

    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str], lock: threading.Lock) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        names = tuple(labels)
        for label in names:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"{name}: invalid label name {label!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"{name}: duplicate label names in {list(names)}")
        self.name = name
        self.help = help
        self.label_names: tuple[str, ...] = names
        self._lock = lock

    def _key(self, labels: dict[str, str]) -> LabelKey:
        """The label values in declared order; ValueError unless exactly the declared names are given."""
        if labels.keys() != set(self.label_names):
            missing = [n for n in self.label_names if n not in labels]
            unexpected = sorted(n for n in labels if n not in self.label_names)
            problems = []
            if missing:
                problems.append(f"missing label(s) {', '.join(missing)}")
            if unexpected:
                problems.append(f"unexpected label(s) {', '.join(unexpected)}")
            declared = ", ".join(self.label_names) if self.label_names else "none"
            raise ValueError(f"{self.name}: {'; '.join(problems)} (declared: {declared})")
        return tuple(str(labels[n]) for n in self.label_names)

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def _render(self) -> list[str]:  # called with the lock held
        raise NotImplementedError


class _ScalarMetric(_Metric):
    """A counter or a gauge: one float per label set."""

    def __init__(self, name: str, help: str, labels: Sequence[str], lock: threading.Lock) -> None:
        super().__init__(name, help, labels, lock)
        # An unlabelled metric has its one sample from the start, so it renders as 0 before any update.
        self._values: dict[LabelKey, float] = {} if self.label_names else {(): 0.0}

    def get(self, **labels: str) -> float:
        """The current value for these labels (0 when never updated)."""
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def _render(self) -> list[str]:
        lines = self._header()
        for key, value in self._values.items():
            lines.append(f"{self.name}{_label_text(self.label_names, key)} {_format_value(value)}")
        return lines


class Counter(_ScalarMetric):
    """A monotonically increasing count."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0 or math.isnan(amount):
            raise ValueError(f"{self.name}: a counter only goes up (inc by {amount})")
        self._add(amount, labels)


class Gauge(_ScalarMetric):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self._add(-amount, labels)


class _HistogramSeries:
    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0


class Histogram(_Metric):
    """Observations counted into buckets with inclusive upper bounds (`le`), plus their sum and count."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str], lock: threading.Lock
    ) -> None:
        super().__init__(name, help, labels, lock)
        if "le" in self.label_names:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        bounds = [float(b) for b in buckets]
        if any(math.isnan(b) for b in bounds):
            raise ValueError(f"{name}: NaN bucket bound")
        if bounds and bounds[-1] == math.inf:
            bounds.pop()
        if not bounds:
            raise ValueError(f"{name}: a histogram needs at least one finite bucket bound")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"{name}: bucket bounds must be strictly increasing, got {list(buckets)}")
        self.buckets: tuple[float, ...] = (*bounds, math.inf)
        self._series: dict[LabelKey, _HistogramSeries] = (
            {} if self.label_names else {(): _HistogramSeries(len(self.buckets))}
        )

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        value = float(value)
        # le is inclusive: the first bound >= value; NaN lands in +Inf.
        index = len(self.buckets) - 1 if math.isnan(value) else bisect.bisect_left(self.buckets, value)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _HistogramSeries(len(self.buckets))
            series.counts[index] += 1
            series.sum += value

    def count(self, **labels: str) -> int:
        """Observations so far for these labels."""
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            return sum(series.counts) if series else 0

    def _render(self) -> list[str]:
        lines = self._header()
        for key, series in self._series.items():
            cumulative = 0
            for bound, n in zip(self.buckets, series.counts, strict=True):
                cumulative += n
                le = f'le="{_format_value(bound)}"'
                lines.append(f"{self.name}_bucket{_label_text(self.label_names, key, le)} {cumulative}")
            labels = _label_text(self.label_names, key)
            lines.append(f"{self.name}_sum{labels} {_format_value(series.sum)}")
            lines.append(f"{self.name}_count{labels} {cumulative}")
        return lines


class Registry:
    """Metrics by name, rendered in registration order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}

    def _register(self, metric: _Metric) -> None:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name!r} is already registered")
            self._metrics[metric.name] = metric

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help, labels, self._lock)
        self._register(metric)
        return metric

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        metric = Gauge(name, help, labels, self._lock)
        self._register(metric)
        return metric

    def histogram(
        self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Histogram:
        metric = Histogram(name, help, buckets, labels, self._lock)
        self._register(metric)
        return metric

    def render(self) -> str:
        """All metrics in the text exposition format 0.0.4, ending with a newline."""
        with self._lock:
            lines = [line for metric in self._metrics.values() for line in metric._render()]
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """The metrics `distinfer serve` exposes on `GET /metrics`."""

    def __init__(self) -> None:
        self.registry = Registry()
        r = self.registry
        self.requests = r.counter(
            "distinfer_requests_total", "HTTP requests answered, by model, route and status code.",
            ("model", "route", "status"),
        )
        self.latency = r.histogram(
            "distinfer_request_latency_seconds",
            "Time from receiving an inference request to sending its response.",
            LATENCY_BUCKETS, ("model",),
        )
        self.queue_time = r.histogram(
            "distinfer_queue_time_seconds", "Time a request waited in the queue before its batch was sent.",
            QUEUE_TIME_BUCKETS, ("model",),
        )
        self.batch_size = r.histogram(
            "distinfer_batch_size", "Rows per batch sent to a replica.", BATCH_SIZE_BUCKETS, ("model",),
        )
        self.shed = r.counter(
            "distinfer_shed_requests_total",
            "Requests refused or dropped without a result, by reason "
            "(queue_full, deadline, draining, timeout, disconnected).",
            ("model", "reason"),
        )
        self.replica_busy = r.counter(
            "distinfer_replica_busy_seconds_total", "Seconds each replica spent computing batches.",
            ("replica",),
        )
        self.replicas_ready = r.gauge("distinfer_replicas_ready", "Replicas ready to take batches.")
        self.queue_depth = r.gauge("distinfer_queue_rows", "Rows waiting in the queue.")
        # text generation (the OpenAI routes)
        self.ttft = r.histogram("distinfer_time_to_first_token_seconds",
                                "Time from receiving a generation request to its first token.",
                                LATENCY_BUCKETS, ("model",))
        self.tpot = r.histogram("distinfer_time_per_output_token_seconds",
                                "A finished sequence's mean time between two of its tokens.",
                                TOKEN_TIME_BUCKETS, ("model",))
        self.e2e = r.histogram("distinfer_e2e_request_latency_seconds",
                               "Time from receiving a generation request to its last token.",
                               LATENCY_BUCKETS, ("model",))
        self.generated_tokens = r.counter("distinfer_generation_tokens_total", "Tokens generated.",
                                          ("model",))
        self.prompt_tokens = r.counter("distinfer_prompt_tokens_total", "Prompt tokens prefilled.",
                                       ("model",))
        self.waiting = r.gauge("distinfer_waiting_sequences", "Sequences waiting in the server's queue.")
        self.running = r.gauge("distinfer_running_sequences", "Sequences in each replica's running batch.",
                               ("replica",))
        self.replica_waiting = r.gauge("distinfer_replica_waiting_sequences",
                                       "Sequences handed to each replica and not yet started there.",
                                       ("replica",))
        self.kv_use = r.gauge("distinfer_kv_cache_usage_ratio",
                              "Share of each replica's KV cache pages in use.", ("replica",))
        self.preemptions = r.counter("distinfer_preemptions_total",
                                     "Sequences preempted (pages freed, recomputed later), by replica.",
                                     ("replica",))

    def render(self) -> str:
        return self.registry.render()
