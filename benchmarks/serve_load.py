"""Online serving under open-loop load: `distinfer serve` against LitServe, same model, same machine.

What is measured, for each target server in turn (never two servers at once), one sentence of
examples/kjv-verses.txt per request, cycled:

  * the sustainable rate: Poisson arrivals (open loop: a request is sent at its arrival time whether
    or not earlier ones have been answered; latency counts from that arrival time, so waiting in the
    generator counts too) at rising rates, each step `--warmup-s` of unmeasured arrivals then
    `--step-s` measured; a step passes when every measured request got a 200 and their p99 latency
    is at most 500 ms (these requests carry no deadline of their own: the server's default applies,
    1000 ms for `distinfer serve`). The rate rises by `--factor` until a step fails (a step stops as
    soon as it cannot pass any more), then `--refine` bisection steps narrow it. The highest passing
    rate is the sustainable rate.
  * latency at half that rate: p50 / p90 / p99 over `--half-s` of arrivals.
  * (distinfer only) overload: 3x the sustainable rate for `--overload-s`, every request carrying the
    deadline `"parameters": {"timeout": 500000}` (microseconds, Triton's convention): the responses by
    status (200 / 429 / 503 / 504 / other), how fast a 429 comes back, the p99 latency of the admitted
    (200) requests against their deadline, and whether the server is still alive and ready afterwards.

And twice, before and after the servers: distinfer's own offline batch throughput for the same
sentences (`distinfer run`, 2 workers x 1 thread, rows/s after start-up); their mean is the
ceiling an online server's sustainable rate is compared to.

Targets (2-core machine): distinfer's sustainable rate >= 1.3 x LitServe's and >= 0.85 x the offline
throughput; under 3x overload the server stays up, sheds with 429 and the p99 of admitted requests
stays within their deadline.

The servers:
  distinfer: `distinfer serve --model minilm --replicas R --threads-per-replica 1 --max-batch-size B
             --max-queue-delay-ms D` (see `distinfer_serve_command`), KServe v2
             `POST /v2/models/minilm/infer`, ready when `GET /v2/health/ready` answers 200;
  litserve:  benchmarks/litserve_minilm.py with the same B, D and R inference worker processes,
             `POST /predict`, ready when a warm-up request answers 200.

The generator is asyncio (uvloop when installed) speaking raw HTTP/1.1 over keep-alive connections,
each request pre-encoded, to spend as little of the shared CPU as possible; its own CPU time per
request and how late it sent requests (`lag`) are reported, and so is the server's CPU per request.
Everything binds and connects to 127.0.0.1 only; every loop and wait is bounded; the servers run in
their own process groups and are killed on the way out.

    python benchmarks/serve_load.py                              # both targets, about 10 minutes
    python benchmarks/serve_load.py --targets litserve --quick   # a short smoke run
    python benchmarks/serve_load.py --json serve_load.json --batch-size 32 --delay-ms 10 --replicas 2

Needs `pip install litserve` for the LitServe target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "kjv-verses.txt"
LITSERVE_SCRIPT = Path(__file__).resolve().parent / "litserve_minilm.py"
HOST = "127.0.0.1"  # loopback only, for the servers and the generator
MODEL = "minilm"
SLO_S = 0.5  # p99 latency bound of a sustainable rate
DEADLINE_S = 0.5  # the deadline every overload request carries (`distinfer serve` defaults to 1000 ms)
EMBEDDING_WIDTH = 384

# Outcomes that are not an HTTP status
CONN_ERROR = "conn_error"  # connection refused / reset / closed mid-response
CLIENT_TIMEOUT = "client_timeout"  # no answer within --client-timeout-s (the generator gave up)
OVERFLOW = "overflow"  # the generator's own in-flight bound was hit; the request was never sent
NOT_SENT = "not_sent"  # arrivals after a step was stopped early (it had failed already)

SERVER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def distinfer_executable() -> list[str]:
    exe = Path(sys.executable).parent / "distinfer"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "distinfer.cli"]


def distinfer_serve_command(args: argparse.Namespace, port: int) -> list[str]:
    """The one place that spells the `distinfer serve` command line (adjust here if its flags change)."""
    return [
        *distinfer_executable(), "serve",
        "--model", MODEL,
        "--replicas", str(args.replicas),
        "--threads-per-replica", "1",
        "--max-batch-size", str(args.batch_size),
        "--max-queue-delay-ms", str(args.delay_ms),
        "--port", str(port),
        "--host", HOST,
        *args.serve_arg,
    ]


def litserve_command(args: argparse.Namespace, port: int) -> list[str]:
    cmd = [
        sys.executable, str(LITSERVE_SCRIPT),
        "--port", str(port),
        "--max-batch-size", str(args.batch_size),
        "--batch-timeout-ms", str(args.delay_ms),
        "--workers", str(args.replicas),
    ]
    if args.litserve_fast_queue:
        cmd.append("--fast-queue")
    if args.litserve_api_servers:
        cmd += ["--api-servers", str(args.litserve_api_servers)]
    return cmd


def distinfer_body(sentence: str, timeout_us: int | None) -> dict[str, Any]:
    text = {"name": "text", "shape": [1], "datatype": "BYTES", "data": [sentence]}
    body: dict[str, Any] = {"inputs": [text]}
    if timeout_us is not None:
        body["parameters"] = {"timeout": timeout_us}
    return body


def litserve_body(sentence: str, timeout_us: int | None) -> dict[str, Any]:
    return {"text": sentence}


def distinfer_embedding(doc: Any) -> list[float]:
    """The one embedding of a KServe v2 response (flat `data`, row-major, shape [1, 384])."""
    return list(doc["outputs"][0]["data"])


def litserve_embedding(doc: Any) -> list[float]:
    return list(doc["embedding"])


@dataclass
class TargetSpec:
    name: str
    command: Callable[[argparse.Namespace, int], list[str]]
    infer_path: str
    body: Callable[[str, int | None], dict[str, Any]]
    embedding: Callable[[Any], list[float]]
    ready_path: str | None  # GET answering 200 when ready; None: ready when a warm-up request succeeds
    overload: bool  # run the overload phase


TARGETS = {
    "distinfer": TargetSpec("distinfer", distinfer_serve_command, f"/v2/models/{MODEL}/infer", distinfer_body,
                            distinfer_embedding, "/v2/health/ready", overload=True),
    "litserve": TargetSpec("litserve", litserve_command, "/predict", litserve_body, litserve_embedding,
                           None, overload=False),
}


# ---------------------------------------------------------------------------------------------------------
# HTTP/1.1 over keep-alive connections


def http_request(method: str, path: str, port: int, body: bytes = b"") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class Connection:
    __slots__ = ("last_used", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass  # the transport may be gone already

    async def roundtrip(self, request: bytes) -> tuple[int, bytes, bool]:
        """Send one request; return (status, body, whether the connection may be reused)."""
        self.writer.write(request)
        reader = self.reader
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        keep = head.startswith(b"HTTP/1.1") and b"\r\nconnection: close" not in lower
        i = lower.find(b"\r\ncontent-length:")
        if i >= 0:
            j = lower.index(b"\r\n", i + 2)
            body = await reader.readexactly(int(lower[i + 17 : j]))
        elif b"\r\ntransfer-encoding: chunked" in lower:
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                        pass
                    break
                chunks.append((await reader.readexactly(size + 2))[:-2])
            body = b"".join(chunks)
        else:
            body = await reader.read()
            keep = False
        return status, body, keep


# An idle connection is reused only this soon after its last answer: servers close idle
# keep-alive connections on their own (uvicorn, under LitServe, after 5 s), and a request sent
# as the server closes one is lost. Older idle connections are closed, not reused.
REUSE_IDLE_S = 2.0


class Pool:
    """At most `size` connections to one server, opened on demand and reused (last used first)."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.size = size
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Connection] = []
        self.opened = 0
        self.busy = 0
        self.peak_busy = 0

    async def _open(self) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, self.port, limit=1 << 20)
        self.opened += 1
        return Connection(reader, writer)

    async def request(self, request: bytes) -> tuple[int, bytes]:
        await self._slots.acquire()
        self.busy += 1
        self.peak_busy = max(self.peak_busy, self.busy)
        try:
            for attempt in range(2):
                # a retry always gets a new connection: the other idle ones may be stale too
                conn = self._fresh_idle() if attempt == 0 else None
                conn = conn or await self._open()
                try:
                    status, body, keep = await conn.roundtrip(request)
                except asyncio.IncompleteReadError as exc:
                    conn.close()
                    # a kept-alive connection the server closed while idle (or a connection it
                    # dropped before answering): retry once on a new one
                    if attempt == 0 and not exc.partial:
                        continue
                    raise ConnectionError("connection closed mid-response") from exc
                except (ConnectionResetError, BrokenPipeError):
                    conn.close()
                    if attempt == 0:  # the same race, seen as a reset
                        continue
                    raise
                except BaseException:  # errors and cancellation: the connection's state is unknown
                    conn.close()
                    raise
                if keep:
                    conn.last_used = time.monotonic()
                    self._idle.append(conn)
                else:
                    conn.close()
                return status, body
            raise ConnectionError("unreachable")
        finally:
            self.busy -= 1
            self._slots.release()

    def _fresh_idle(self) -> Connection | None:
        """The most recently used idle connection, closing those idle too long to trust."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.last_used <= REUSE_IDLE_S:
                return conn
            conn.close()
        return None

    def close_idle(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


async def http_once(port: int, method: str, path: str, body: bytes = b"", timeout_s: float = 5.0
                    ) -> tuple[int, bytes]:
    """One request on a fresh connection, bounded; raises OSError/TimeoutError when there is no answer."""
    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
        conn = Connection(reader, writer)
        try:
            status, data, _ = await conn.roundtrip(http_request(method, path, port, body))
            return status, data
        finally:
            conn.close()

    return await asyncio.wait_for(go(), timeout_s)


# ---------------------------------------------------------------------------------------------------------
# statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    if not values:
        return None
    return values[max(0, min(len(values) - 1, math.ceil(q * len(values)) - 1))]


def latency_summary(values: list[float]) -> dict[str, Any]:
    values = sorted(values)
    out: dict[str, Any] = {"n": len(values)}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
        v = percentile(values, q)
        out[f"{name}_ms"] = None if v is None else round(v * 1000, 2)
    out["mean_ms"] = round(sum(values) / len(values) * 1000, 2) if values else None
    return out


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _group_stats(pgid: int) -> Iterator[tuple[int, list[bytes]]]:
    """(pid, the /proc stat fields after the name) of each live process of one process group."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ... utime(11) stime(12)
            yield int(entry), fields


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of one process group."""
    ticks = sum(int(fields[11]) + int(fields[12]) for _, fields in _group_stats(pgid))
    return ticks / os.sysconf("SC_CLK_TCK")


def group_pids(pgid: int) -> list[int]:
    return [pid for pid, _ in _group_stats(pgid)]


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------------------
# one phase of open-loop load


@dataclass
class Phase:
    """Settings of one run of Poisson arrivals."""

    label: str
    rate: float
    duration_s: float
    warmup_s: float
    seed: int
    stop_when_failed: bool = False  # search steps: stop sending once the step cannot pass any more


@dataclass
class Server:
    spec: TargetSpec
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    requests: list[bytes] = field(default_factory=list)  # pre-encoded, one per sentence, no deadline
    deadline_requests: list[bytes] = field(default_factory=list)  # the same with the overload deadline
    probe: bytes = b""
    idle_latency_s: float = 0.05


async def run_phase(server: Server, pool: Pool, phase: Phase, requests: list[bytes],
                    args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(phase.seed)
    span = phase.warmup_s + phase.duration_s
    arrivals: list[float] = []
    t = 0.0
    while len(arrivals) < args.max_requests_per_phase:
        t += rng.expovariate(phase.rate)
        if t >= span:
            break
        arrivals.append(t)
    n = len(arrivals)
    first_measured = next((i for i, a in enumerate(arrivals) if a >= phase.warmup_s), n)
    planned = n - first_measured
    # a measured request that is an error or slower than the SLO; more than 1% of them fail the step
    fail_budget = math.floor(0.01 * planned)
    bad = 0
    stopped_early = False

    outcome: list[str | int | None] = [None] * n
    latency: list[float] = [0.0] * n
    lag: list[float] = [0.0] * n
    tasks: set[asyncio.Task[None]] = set()
    clock = time.perf_counter

    async def one(i: int, due: float) -> None:
        nonlocal bad
        start = clock()
        lag[i] = start - due
        try:
            status, _ = await pool.request(requests[i % len(requests)])
            outcome[i] = status
        except asyncio.CancelledError:
            outcome[i] = CLIENT_TIMEOUT
            raise
        except Exception as exc:  # refused, reset, closed mid-response, unparsable
            outcome[i] = CONN_ERROR
            print(f"[{server.spec.name}] connection error: {type(exc).__name__}: {exc}", flush=True)
        latency[i] = clock() - due
        if i >= first_measured and (outcome[i] != 200 or latency[i] > SLO_S):
            if outcome[i] != 200:
                bad += fail_budget + 1  # any error fails the step
            else:
                bad += 1

    cpu0, server_cpu0 = own_cpu_s(), group_cpu_s(server.proc.pid)
    t0 = clock() + 0.02
    i = 0
    while i < n:
        if phase.stop_when_failed and bad > fail_budget:
            stopped_early = True
            break
        now = clock()
        due = t0 + arrivals[i]
        if due > now:
            await asyncio.sleep(due - now)
            continue
        while i < n and t0 + arrivals[i] <= now:
            if len(tasks) >= args.max_inflight:
                outcome[i] = OVERFLOW
            else:
                task = asyncio.create_task(one(i, t0 + arrivals[i]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            i += 1
    sent_until = clock()
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=2.0 if stopped_early else args.client_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    cpu1, server_cpu1 = own_cpu_s(), group_cpu_s(server.proc.pid)
    pool.close_idle()

    measured = range(first_measured, n)
    counts: Counter[str] = Counter()
    by_status: dict[str, list[float]] = {}
    for j in measured:
        key = NOT_SENT if outcome[j] is None else str(outcome[j])
        counts[key] += 1
        if isinstance(outcome[j], int):
            by_status.setdefault(key, []).append(latency[j])
    ok_latencies = by_status.get("200", [])
    errors = planned - len(ok_latencies)
    lat = latency_summary(ok_latencies)
    lags = sorted(lag[j] for j in measured if outcome[j] not in (None, OVERFLOW))
    p99 = lat["p99_ms"]
    sent = sum(1 for j in range(n) if outcome[j] not in (None, OVERFLOW))
    elapsed = max(sent_until - t0, 1e-9)
    result: dict[str, Any] = {
        "label": phase.label,
        "rate": round(phase.rate, 2),
        "duration_s": phase.duration_s,
        "warmup_s": phase.warmup_s,
        "planned": planned,
        "outcomes": dict(sorted(counts.items())),
        "errors": errors,
        "latency_200": lat,
        "latency_by_status": {k: latency_summary(v) for k, v in sorted(by_status.items())},
        "achieved_send_rate": round(sent / elapsed, 2) if not stopped_early else None,
        "lag_p99_ms": None if not lags else round((percentile(lags, 0.99) or 0.0) * 1000, 2),
        "stopped_early": stopped_early,
        "passed": (not stopped_early and errors == 0 and planned > 0 and p99 is not None
                   and p99 <= SLO_S * 1000),
        "connections_opened": pool.opened,
        "peak_in_flight": pool.peak_busy,
        "generator_cpu_ms_per_request": round((cpu1 - cpu0) / max(sent, 1) * 1000, 3),
        "server_cpu_ms_per_request": round((server_cpu1 - server_cpu0) / max(sent, 1) * 1000, 3),
    }
    pool.opened = 0
    pool.peak_busy = 0
    return result


def describe(step: dict[str, Any]) -> str:
    lat = step["latency_200"]
    verdict = "pass" if step["passed"] else "FAIL"
    extra = " (stopped early)" if step["stopped_early"] else ""
    outcomes = " ".join(f"{k}:{v}" for k, v in step["outcomes"].items())
    return (f"{step['label']:>9s} {step['rate']:7.1f}/s  {verdict}{extra}  p50 {ms(lat['p50_ms'])} "
            f"p99 {ms(lat['p99_ms'])}  [{outcomes}]  lag p99 {ms(step['lag_p99_ms'])}  "
            f"cpu/req gen {step['generator_cpu_ms_per_request']:.2f} ms server "
            f"{step['server_cpu_ms_per_request']:.2f} ms")


async def settle(server: Server, timeout_s: float = 30.0) -> None:
    """Wait (bounded) until a lone request is answered about as fast as on an idle server."""
    end = time.perf_counter() + timeout_s
    threshold = max(0.2, 3 * server.idle_latency_s)
    while time.perf_counter() < end:
        t = time.perf_counter()
        try:
            status, _ = await http_once(server.port, "POST", server.spec.infer_path, server.probe,
                                        timeout_s=max(0.5, end - t))
        except (OSError, asyncio.TimeoutError, ValueError):
            status = 0
        if status == 200 and time.perf_counter() - t <= threshold:
            return
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_server(spec: TargetSpec, args: argparse.Namespace, workdir: Path) -> Server:
    port = free_port()
    cmd = spec.command(args, port)
    log_path = workdir / f"{spec.name}.log"
    print(f"[{spec.name}] starting: {' '.join(cmd)}", flush=True)
    with open(log_path, "wb") as log:
        proc = start_group(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    return Server(spec, proc, port, log_path)


_STARTED: list[subprocess.Popen[Any]] = []  # process-group leaders this run started and has not ended


def start_group(cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start `cmd` as the leader of a new process group (so that it and its children can be ended)."""
    proc: subprocess.Popen[Any] = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL,
                                                   env={**os.environ, **SERVER_ENV}, **kwargs)
    _STARTED.append(proc)
    return proc


def end_group(proc: subprocess.Popen[Any], grace_s: float = 15.0) -> None:
    """SIGTERM the process group this run started, SIGKILL whatever is left of it after a grace period."""
    pgid = proc.pid
    for sig, grace in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        proc.poll()
        if not group_pids(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        end = time.monotonic() + grace
        while time.monotonic() < end:
            if proc.poll() is not None and not group_pids(pgid):
                break
            time.sleep(0.1)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    if proc in _STARTED:
        _STARTED.remove(proc)


def stop_server(server: Server) -> None:
    end_group(server.proc)


def log_tail(server: Server, lines: int = 30) -> str:
    try:
        return "\n".join(server.log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def wait_ready(server: Server, timeout_s: float) -> float:
    """Seconds until the server is ready: GET ready_path answers 200, and a warm-up request too."""
    t0 = time.perf_counter()
    end = t0 + timeout_s
    ready_path = server.spec.ready_path
    while True:
        if server.proc.poll() is not None:
            code = server.proc.returncode
            raise RuntimeError(f"{server.spec.name} exited with {code}:\n{log_tail(server)}")
        if time.perf_counter() > end:
            raise RuntimeError(f"{server.spec.name} not ready after {timeout_s:.0f} s:\n{log_tail(server)}")
        try:
            if ready_path is not None:
                status, _ = await http_once(server.port, "GET", ready_path, timeout_s=5.0)
                if status != 200:
                    raise ConnectionError(f"ready: {status}")
            status, _ = await http_once(server.port, "POST", server.spec.infer_path, server.probe,
                                        timeout_s=30.0)
            if status == 200:
                return time.perf_counter() - t0
        except (OSError, asyncio.TimeoutError, ValueError):
            pass
        await asyncio.sleep(0.5)


async def check_response(server: Server, sentence: str) -> dict[str, Any]:
    """Check once that the server answers with one embedding of the expected width."""
    body = json.dumps(server.spec.body(sentence, None)).encode()
    try:
        status, data = await http_once(server.port, "POST", server.spec.infer_path, body, timeout_s=30.0)
        embedding = server.spec.embedding(json.loads(data))
        ok = status == 200 and len(embedding) == EMBEDDING_WIDTH
        return {"ok": ok, "status": status, "width": len(embedding)}
    except Exception as exc:  # report it; the load phases count statuses only
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


async def idle_latency(server: Server, n: int = 10) -> float:
    """Median latency of lone requests on the idle server (also warms every replica up)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await http_once(server.port, "POST", server.spec.infer_path, server.probe, timeout_s=30.0)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


async def warm_batches(server: Server, pool: Pool, n: int) -> None:
    """A burst of concurrent requests so that every replica has run full batches before measuring."""
    await asyncio.wait_for(asyncio.gather(*(pool.request(server.requests[i]) for i in range(n)),
                                          return_exceptions=True), timeout=60)
    pool.close_idle()


async def search_rate(server: Server, pool: Pool, args: argparse.Namespace) -> dict[str, Any]:
    """The highest rate whose step passes: climb by --factor, then bisect --refine times."""
    steps: list[dict[str, Any]] = []
    best: float | None = None
    worst: float | None = None  # the lowest failing rate

    async def step(rate: float) -> bool:
        phase = Phase("search", rate, args.step_s, args.warmup_s, args.seed + round(rate * 1000),
                      stop_when_failed=True)
        result = await run_phase(server, pool, phase, server.requests, args)
        steps.append(result)
        print(f"[{server.spec.name}] {describe(result)}", flush=True)
        await settle(server)
        return bool(result["passed"])

    rate = args.start_rate
    while len(steps) < 60 and rate <= args.max_rate:  # climb
        if await step(rate):
            best = rate
            rate *= args.factor
        else:
            worst = rate
            break
    while best is None and worst is not None and worst > args.min_rate and len(steps) < 60:  # or descend
        rate = worst / 2
        if await step(rate):
            best = rate
        else:
            worst = rate
    for _ in range(args.refine):  # bisect between the highest pass and the lowest failure
        if best is None or worst is None or worst / best < 1.04:
            break
        rate = (best + worst) / 2
        if await step(rate):
            best = rate
        else:
            worst = rate
    return {"sustainable_rate": best or 0.0, "lowest_failing_rate": worst,
            "hit_max_rate": worst is None, "steps": steps}


async def measure_target(spec: TargetSpec, args: argparse.Namespace, sentences: list[str],
                         workdir: Path) -> dict[str, Any]:
    server = start_server(spec, args, workdir)
    out: dict[str, Any] = {"command": spec.command(args, server.port)}
    try:
        server.requests = [
            http_request("POST", spec.infer_path, server.port, json.dumps(spec.body(s, None)).encode())
            for s in sentences
        ]
        deadline_us = round(DEADLINE_S * 1e6)
        server.deadline_requests = [
            http_request("POST", spec.infer_path, server.port, json.dumps(spec.body(s, deadline_us)).encode())
            for s in sentences
        ]
        server.probe = json.dumps(spec.body(sentences[0], None)).encode()
        out["start_s"] = round(await wait_ready(server, args.start_timeout_s), 2)
        pids = group_pids(server.proc.pid)
        out["processes"] = len(pids)
        out["response_check"] = await check_response(server, sentences[1])
        print(f"[{spec.name}] ready in {out['start_s']:.1f} s, {len(pids)} processes, response check: "
              f"{out['response_check']}", flush=True)
        pool = Pool(server.port, args.connections)
        await warm_batches(server, pool, 4 * args.batch_size * args.replicas)
        server.idle_latency_s = await idle_latency(server)
        out["idle_latency_ms"] = round(server.idle_latency_s * 1000, 2)

        out["search"] = await search_rate(server, pool, args)
        best = out["search"]["sustainable_rate"]
        out["sustainable_rate"] = best
        print(f"[{spec.name}] sustainable rate: {best:.1f} req/s", flush=True)
        if best > 0:
            half = Phase("half", best / 2, args.half_s, args.warmup_s, args.seed + 1)
            out["half_rate"] = await run_phase(server, pool, half, server.requests, args)
            print(f"[{spec.name}] {describe(out['half_rate'])}", flush=True)
            await settle(server)
        if spec.overload and best > 0 and args.overload_s > 0:
            phase = Phase("overload", 3 * best, args.overload_s, 0.0, args.seed + 2)
            result = await run_phase(server, pool, phase, server.deadline_requests, args)
            print(f"[{spec.name}] {describe(result)}", flush=True)
            result["deadline_ms"] = DEADLINE_S * 1000
            result["alive_after"] = server.proc.poll() is None
            result["ready_after"] = False
            end = time.perf_counter() + 15.0
            while result["alive_after"] and time.perf_counter() < end:
                try:
                    status, _ = await http_once(server.port, "GET", spec.ready_path or "/", timeout_s=5.0)
                    if status == 200:
                        result["ready_after"] = True
                        break
                except (OSError, asyncio.TimeoutError, ValueError):
                    pass
                await asyncio.sleep(0.5)
            out["overload"] = result
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{spec.name}] ERROR {out['error']}", flush=True)
    finally:
        out["alive_at_end"] = server.proc.poll() is None
        stop_server(server)
        out["log_tail"] = log_tail(server, 15)
    return out


# ---------------------------------------------------------------------------------------------------------
# the offline reference


def offline_throughput(sentences: list[str], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """`distinfer run` over the same sentences: rows/s after start-up, from _report.json or the summary."""
    corpus = workdir / "offline.txt"
    corpus.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    out_dir = workdir / "offline-out"
    cmd = [*distinfer_executable(), "run", "--model", MODEL, "--input", str(corpus), "--output", str(out_dir),
           "--strategy", "data", "--workers", str(args.replicas), "--threads-per-worker", "1",
           "--no-progress", "--overwrite"]
    if args.offline_batch_size:
        cmd += ["--batch-size", str(args.offline_batch_size)]
    print(f"[offline] {' '.join(cmd)}", flush=True)
    proc = start_group(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=workdir)
    try:
        _, stderr = proc.communicate(timeout=args.offline_timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.offline_timeout_s} s", "command": cmd}
    finally:
        end_group(proc, grace_s=5.0)
    result: dict[str, Any] = {"command": cmd, "rows": len(sentences)}
    match = re.search(r"distinfer: (\d+) rows in ([\d.]+) s \(([\d.]+) rows/s; ([\d.]+) rows/s after "
                      r"([\d.]+) s start-up\)", stderr)
    if match:
        result.update(wall_s=float(match[2]), throughput=float(match[3]), steady_throughput=float(match[4]),
                      startup_s=float(match[5]))
    try:
        report = json.loads((out_dir / "_report.json").read_text())
        result.update(throughput=report["throughput"], steady_throughput=report["steady_throughput"],
                      startup_s=report["startup_s"], wall_s=report["wall_s"])
    except (OSError, KeyError, ValueError):
        pass
    if proc.returncode != 0 or "steady_throughput" not in result:
        result["error"] = f"exit {proc.returncode}: {stderr.strip()[-2000:]}"
    else:
        print(f"[offline] {result['steady_throughput']:.1f} rows/s after {result['startup_s']:.1f} s "
              "start-up", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------


def checks(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(line, verdict) per target figure; verdict PASS, FAIL or n/a."""
    targets = doc["targets"]
    d = targets.get("distinfer", {})
    lit = targets.get("litserve", {})
    offline = doc.get("offline") or {}
    d_rate = d.get("sustainable_rate")
    lines: list[tuple[str, str]] = []

    def ratio(name: str, num: float | None, den: float | None, target: float, what: str) -> None:
        if not num or not den:
            lines.append((f"{name} >= {target}: n/a ({what})", "n/a"))
            return
        value = num / den
        lines.append((f"{name} >= {target}: {num:.1f} / {den:.1f} = {value:.2f}",
                      "PASS" if value >= target else "FAIL"))

    ratio("distinfer / LitServe sustainable rate", d_rate, lit.get("sustainable_rate"), 1.3,
          "both targets needed")
    ratio("distinfer sustainable rate / offline rows/s", d_rate, offline.get("steady_throughput"), 0.85,
          "distinfer and the offline run needed")
    over = d.get("overload")
    if over:
        lat = over["latency_by_status"]
        p99_200 = lat.get("200", {}).get("p99_ms")
        p99_429 = lat.get("429", {}).get("p99_ms")
        p50_429 = lat.get("429", {}).get("p50_ms")
        n429 = over["outcomes"].get("429", 0)
        others = {k: v for k, v in over["outcomes"].items() if k not in ("200", "429", "503", "504")}
        # admitted = answered 200 or, past the deadline, 504: at most 1 % of them may be late
        admitted = over["outcomes"].get("200", 0) + over["outcomes"].get("504", 0)
        late = over["outcomes"].get("504", 0) / admitted if admitted else 1.0
        ok = (over["alive_after"] and over["ready_after"] and n429 > 0 and p99_200 is not None
              and p99_200 <= over["deadline_ms"] and late <= 0.01 and not others)
        lines.append((
            f"overload 3x = {over['rate']:.0f}/s for {over['duration_s']:.0f} s: "
            f"alive {over['alive_after']}, "
            f"ready {over['ready_after']}, outcomes {over['outcomes']}, p99 of 200s {ms(p99_200)} "
            f"(deadline {over['deadline_ms']:.0f} ms; generator lag p99 {ms(over['lag_p99_ms'])}), "
            f"admitted but late (504) {late:.1%}, "
            f"429 answered in p50 {ms(p50_429)} / p99 {ms(p99_429)}",
            "PASS" if ok else "FAIL"))
    else:
        lines.append(("overload at 3x: n/a (not run)", "n/a"))
    return lines


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    sentences = [s for s in CORPUS.read_text(encoding="utf-8").splitlines() if s.strip()]
    doc: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "cores": os.cpu_count(),
        "slo_p99_ms": SLO_S * 1000,
        "targets": {},
    }
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        workdir = Path(tmp)
        offline = "distinfer" in args.targets and args.offline_rows > 0
        runs = []
        if offline:
            runs.append(offline_throughput(sentences[: args.offline_rows], args, workdir))
        for name in args.targets:
            doc["targets"][name] = await measure_target(TARGETS[name], args, sentences, workdir)
        if offline:  # once before and once after the servers: this machine's noise shows in both
            runs.append(offline_throughput(sentences[: args.offline_rows], args, workdir))
            rates = [r["steady_throughput"] for r in runs if "steady_throughput" in r]
            doc["offline"] = {**runs[-1], "runs": runs,
                              "steady_throughput": sum(rates) / len(rates) if rates else None}
    return doc


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="distinfer,litserve", help="comma-separated: distinfer, litserve")
    p.add_argument("--batch-size", type=int, default=32, help="max rows per batch, both servers")
    p.add_argument("--delay-ms", type=float, default=10.0,
                   help="max queue delay to fill a batch, both servers")
    p.add_argument("--replicas", type=int, default=2, help="model replicas / inference workers, both servers")
    p.add_argument("--step-s", type=float, default=8.0, help="measured seconds of arrivals per search step")
    p.add_argument("--warmup-s", type=float, default=2.0,
                   help="unmeasured seconds of arrivals before each step")
    p.add_argument("--half-s", type=float, default=15.0, help="measured seconds at half the sustainable rate")
    p.add_argument("--overload-s", type=float, default=20.0,
                   help="seconds at 3x the sustainable rate (0: skip)")
    p.add_argument("--start-rate", type=float, default=20.0, help="first search rate, requests/s")
    p.add_argument("--factor", type=float, default=1.25, help="rate multiplier between search steps")
    p.add_argument("--refine", type=int, default=3, help="bisection steps after the first failing rate")
    p.add_argument("--max-rate", type=float, default=2000.0, help="the search stops here")
    p.add_argument("--min-rate", type=float, default=1.0, help="lowest rate tried when the start rate fails")
    p.add_argument("--offline-rows", type=int, default=4000,
                   help="sentences for the offline reference (0: skip)")
    p.add_argument("--offline-batch-size", type=int, default=None,
                   help="batch size of the offline run (default: distinfer run's own)")
    p.add_argument("--offline-timeout-s", type=float, default=600.0)
    p.add_argument("--connections", type=int, default=512, help="keep-alive connections at most, per server")
    p.add_argument("--max-inflight", type=int, default=4096,
                   help="requests in flight at most (generator bound)")
    p.add_argument("--max-requests-per-phase", type=int, default=200_000)
    p.add_argument("--client-timeout-s", type=float, default=10.0,
                   help="give up on a request after this long")
    p.add_argument("--start-timeout-s", type=float, default=180.0,
                   help="wait this long for a server to be ready")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for 'distinfer serve' (repeatable, "
                   "e.g. --serve-arg=--timeout-ms=500)")
    p.add_argument("--litserve-fast-queue", action="store_true", help="LitServe with its ZeroMQ queues")
    p.add_argument("--litserve-api-servers", type=int, default=0,
                   help="LitServe HTTP processes (default 0: LitServe's own default, one per worker)")
    p.add_argument("--no-uvloop", action="store_true", help="the standard asyncio loop for the generator")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run (for options left at their defaults): 3 s steps, x1.5, no bisection, "
                   "5 s half-rate and overload, 1000 offline rows")
    p.add_argument("--json", metavar="PATH", help="write all figures here")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown or not args.targets:
        p.error(f"unknown targets {unknown}; choose from {sorted(TARGETS)}")
    if args.quick:  # shorter settings, for the options left at their defaults
        quick = {"step_s": 3.0, "warmup_s": 1.0, "half_s": 5.0, "overload_s": 5.0, "factor": 1.5, "refine": 0,
                 "offline_rows": 1000}
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    if args.factor <= 1.0 or args.start_rate <= 0 or args.step_s <= 0:
        p.error("--factor must be > 1, --start-rate and --step-s > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so that the servers are stopped on the way out
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not args.no_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    try:
        if loop_factory is not None and sys.version_info >= (3, 11):
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                doc = runner.run(run_all(args))
        else:
            doc = asyncio.run(run_all(args))
    finally:
        for proc in list(_STARTED):  # only if an error or a signal skipped the usual stop
            end_group(proc, grace_s=5.0)
    doc["checks"] = [{"check": line, "verdict": verdict} for line, verdict in checks(doc)]

    print()
    print(f"batch size {args.batch_size}, queue delay {args.delay_ms} ms, {args.replicas} replicas, "
          f"{os.cpu_count()} cores; sustainable = highest rate with no errors and "
          f"p99 <= {SLO_S * 1000:.0f} ms")
    offline = doc.get("offline")
    if offline:
        each = ", ".join(f"{r['steady_throughput']:.1f}" for r in offline.get("runs", [])
                         if "steady_throughput" in r)
        print(f"  offline distinfer run: {offline.get('steady_throughput') or 0:.1f} rows/s after start-up"
              f" (mean of {each})" + (f"  ({offline['error']})" if "error" in offline else ""))
    for name, t in doc["targets"].items():
        if "error" in t:
            print(f"  {name}: ERROR {t['error']}")
        rate = t.get("sustainable_rate")
        half = (t.get("half_rate") or {}).get("latency_200", {})
        if rate is not None:
            print(f"  {name}: sustainable {rate:.1f} req/s; at half that: p50 {ms(half.get('p50_ms'))}, "
                  f"p90 {ms(half.get('p90_ms'))}, p99 {ms(half.get('p99_ms'))}")
    for line, verdict in checks(doc):
        print(f"  [{verdict}] {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"  figures: {args.json}")
    return 1 if any(v == "FAIL" for _, v in checks(doc)) else 0


if __name__ == "__main__":
    sys.exit(main())
