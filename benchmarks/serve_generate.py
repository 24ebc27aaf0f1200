"""Serving text generation under open-loop load: `distinfer serve` against llama.cpp's
`llama-server`, on the same GGUF file (Gemma 3 270M Q4_K_M), with the same threads and the
same number of sequences decoded together, in one run, on this machine only (127.0.0.1).

Load. Requests arrive as a Poisson process at a fixed rate for `--probe-seconds` (open loop:
a request is sent at its arrival time whether or not earlier ones have been answered, and
its latency counts from that time). Each is a streamed `POST /v1/completions` with a real
prompt (1-3 consecutive verses of examples/kjv-verses.txt: 4-145 words, median 49), greedy
(`temperature: 0`), `ignore_eos: true` and `max_tokens` drawn uniformly from {16, 32, 64,
128}, so every completion is exactly as long as drawn. Arrivals, prompts and lengths come
from a fixed seed: every server sees the same requests, in the same order, at a given rate.
At most `--max-in-flight` requests are open at once; arrivals beyond that are dropped by the
client and count as failed. Every wait is bounded: a probe's stragglers get `--drain-seconds`,
then are cancelled (and count as failed).

Per request: the status (200, 429, 4xx, 5xx, a connection error or a broken stream), the
time to first token (TTFT: to the first event with text), the time per output token (TPOT:
last text event - first, over tokens - 1; the token count is the usage chunk's
`completion_tokens`, or `max_tokens` when the stream ends with finish_reason "length") and
the end-to-end time. A probe's output tokens/s is the output tokens of its completed
requests over its arrival window (in a steady state: rate x mean tokens).

A rate is sustainable when p99 TTFT < `--ttft-s` (2 s), p99 TPOT < `--tpot-s` (0.2 s) and at
most `--max-fail` (0: none) of its requests were not completed (429, errors, drops); percentiles
are nearest-rank. A probe that is clearly failing (5% of its expected requests late or
failed) stops early. Each server's highest sustainable rate is searched by doubling from
`--start-rate` (halving when that already fails), then `--bisect` bisection steps; between
probes the server is given time to go idle (a 2-token request must answer fast). At half
the sustainable rate a further probe reports p50, p90 and p99 of TTFT and TPOT.

The servers (the same total threads `--threads` (2), the same `--sequences` (16) running
together):
  distinfer     `distinfer serve --model gemma3-270m --replicas R --threads-per-replica T
                --max-running S/R --max-queue Q --timeout-ms D`, for each layout RxT of `--layouts`
                (default 1x2 and 2x1), D = `--deadline-s` (2 s, the TTFT target): a
                request that cannot start by then is shed with 429 at once; ready when
                GET /v2/health/ready answers 200
  llama-server  `llama-server -m GGUF -np S -c S*CTX -t T -tb T`, built from the llama.cpp
                that llama-cpp-python (the version of benchmarks/peers/build_llama_cpp.sh)
                vendors, by benchmarks/peers/build_llama_server.sh (run when missing, ~10
                minutes on 2 cores); ready when GET /health answers 200

Also measured, for distinfer:
  offline   the batch engine on the same layout and the same kind of requests, `distinfer run
            --workers R --threads-per-worker T --max-running S/R --ignore-eos` over
            `--offline-rows` prompts with per-row max_tokens: its generated tokens/s (the
            job's `_report.json`), against the served output tokens/s at the sustainable rate
  overload  `--overload-factor` (3) x the best layout's sustainable rate for
            `--overload-seconds`: whether it stays up (ready afterwards), its share of 429s,
            whether every admitted request completed (no 5xx, no broken stream), and its
            resident memory (the server process and its children) before, at peak and after

Targets (2-core machine): distinfer's sustainable rate (best layout) >= 1.3 x llama-server's;
its output tokens/s at that rate >= 0.8 x the offline tokens/s of the same layout; at 3 x that
rate it stays up, sheds with 429, answers no 5xx, completes what it admits within its
deadline (p99 TTFT of the admitted <= D), and its memory
stays flat (after <= 1.1 x before).

Run it on an otherwise idle machine: each probe accounts the CPU time of the server and of
this client, and flags the probe when other processes kept more than 0.25 cores busy
(ggml's spinning threads in particular slow down many times over when a core is taken).

With the defaults the whole run takes about 20-25 minutes (three servers searched, an
offline job per layout, one overload probe):

    benchmarks/peers/build_llama_server.sh                  # once, ~10 minutes
    .venv/bin/python benchmarks/serve_generate.py --json serve_generate.json
    .venv/bin/python benchmarks/serve_generate.py --servers llama --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CORPUS = REPO / "examples" / "kjv-verses.txt"
PEERS = HERE / ".peers"  # gitignored
LLAMA_SERVER = PEERS / "llama-server"
BUILD = HERE / "peers" / "build_llama_server.sh"
HOST = "127.0.0.1"  # loopback only, for the servers and the generator
MODEL = "gemma3-270m"
MAX_TOKENS = (16, 32, 64, 128)
OTHER_CORES_WARN = 0.25  # other processes busier than this during a probe: its figures are suspect
SERVER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

# Outcomes of one request
OK = "ok"  # 200, the whole stream (to its finish_reason or [DONE])
SHED = "429"
SERVER_ERROR = "5xx"
CLIENT_ERROR = "4xx"
BROKEN = "broken"  # connection refused or reset, an error event, a stream cut short
TIMEOUT = "timeout"  # no answer in time, or still open when the probe's drain time ran out
DROPPED = "dropped"  # the client's in-flight cap was hit: never sent
CANCELLED = "cancelled"  # open when a failing probe was stopped early


# --- requests ------------------------------------------------------------------------------


def load_prompts(count: int = 2000, seed: int = 0) -> list[str]:
    """Short real prompts: 1-3 consecutive verses each, from a seeded walk through the corpus."""
    verses = [v.strip() for v in CORPUS.read_text(encoding="utf-8").splitlines() if v.strip()]
    rng = random.Random(seed)
    out: list[str] = []
    i = 0
    while len(out) < count and i < len(verses):
        n = rng.randint(1, 3)
        out.append(" ".join(verses[i : i + n]))
        i += n
    return out


def request_body(prompt: str, max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
    ).encode()


@dataclass
class Live:
    """A request in flight, as the probe's early-stop monitor sees it."""

    arrival: float
    first: float | None = None
    done: bool = False


@dataclass
class Outcome:
    status: str
    max_tokens: int = 0
    tokens: int = 0
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None


async def one_request(
    session: aiohttp.ClientSession, url: str, body: bytes, max_tokens: int, live: Live
) -> Outcome:
    """Send one streamed completion; time its first and last text events."""
    clock = time.perf_counter
    last: float | None = None
    events = 0
    usage_tokens: int | None = None
    finish: str | None = None
    done = False
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            if r.status != 200:
                await r.read()
                status = SHED if r.status == 429 else SERVER_ERROR if r.status >= 500 else CLIENT_ERROR
                return Outcome(status, max_tokens)
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return Outcome(BROKEN, max_tokens)
                usage = event.get("usage") or {}
                if usage.get("completion_tokens"):
                    usage_tokens = int(usage["completion_tokens"])
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        now = clock()
                        live.first = live.first or now
                        last = now
                        events += 1
                    finish = choice.get("finish_reason") or finish
    except asyncio.TimeoutError:
        return Outcome(TIMEOUT, max_tokens)
    except (aiohttp.ClientError, OSError, ValueError):
        return Outcome(BROKEN, max_tokens)
    finally:
        live.done = True
    end = clock()
    if not (done or finish) or live.first is None or last is None:  # [DONE] or a finish_reason
        return Outcome(BROKEN, max_tokens)
    tokens = usage_tokens or (max_tokens if finish == "length" else events)
    tpot = (last - live.first) / (tokens - 1) if tokens > 1 else None
    return Outcome(OK, max_tokens, tokens, live.first - live.arrival, tpot, end - live.arrival)


# --- a probe: one rate for a fixed time ------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Probe:
    rate: float
    seconds: float
    sent: int
    counts: dict[str, int]
    tokens: int
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p90: float | None
    tpot_p99: float | None
    e2e_p50: float | None
    e2e_p99: float | None
    stopped_early: bool
    wall_s: float
    client_cpu_s: float
    lag_p99_s: float | None
    short: int = 0  # completed with fewer tokens than max_tokens (ignore_eos not honoured)
    server_cpu_s: float | None = None  # the server and its children
    other_cores: float | None = None  # mean cores busy outside the server and this client
    passed: bool = False

    @property
    def ok(self) -> int:
        return self.counts.get(OK, 0)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def fail_share(self) -> float:
        return (self.sent - self.ok) / self.sent if self.sent else 0.0

    def judge(self, ttft_s: float, tpot_s: float, max_fail: float) -> bool:
        self.passed = (
            not self.stopped_early
            and self.ok > 0
            and self.fail_share <= max_fail
            and self.ttft_p99 is not None
            and self.ttft_p99 < ttft_s
            and (self.tpot_p99 or 0.0) < tpot_s
        )
        return self.passed

    def line(self) -> str:
        bad = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()) if k != OK)
        if self.short:
            bad += f"{', ' if bad else ''}{self.short} short"
        busy = self.other_cores or 0.0
        noisy = f", OTHER PROCESSES BUSY {busy:.1f} cores" if busy > OTHER_CORES_WARN else ""
        return (
            f"{self.rate:6.2f} req/s: {self.ok}/{self.sent} ok{f' ({bad})' if bad else ''}, "
            f"TTFT p50/p99 {_s(self.ttft_p50)}/{_s(self.ttft_p99)} s, "
            f"TPOT p50/p99 {_ms(self.tpot_p50)}/{_ms(self.tpot_p99)} ms, {self.tok_s:.0f} tok/s"
            f"{', stopped early' if self.stopped_early else ''}{noisy} -> {'pass' if self.passed else 'fail'}"
        )


def schedule(rate: float, seconds: float, prompts: list[str], seed: int) -> list[tuple[float, bytes, int]]:
    """Poisson arrival times in [0, seconds) with their bodies; the same seed, the same
    requests at any rate (the times scale as 1/rate)."""
    rng = random.Random(seed)
    out: list[tuple[float, bytes, int]] = []
    t = rng.expovariate(1.0) / rate
    while t < seconds:
        n = rng.choice(MAX_TOKENS)
        out.append((t, request_body(rng.choice(prompts), n), n))
        t += rng.expovariate(1.0) / rate
    return out


async def run_probe(
    base: str,
    rate: float,
    seconds: float,
    args: argparse.Namespace,
    prompts: list[str],
    seed: int,
    stop_early: bool = True,
    pid: int | None = None,
) -> Probe:
    """Send `rate` req/s for `seconds`; with the server's `pid`, also account its CPU time."""
    plan = schedule(rate, seconds, prompts, seed)
    url = base + "/v1/completions"
    # A probe is certainly failing once this many requests are late (no first token within
    # --ttft-s) or failed: five times what the p99 and --max-fail allow.
    limit = 2 + 0.05 * len(plan)
    clock = time.perf_counter
    outcomes: list[Outcome] = []
    lives: list[Live] = []
    tasks: set[asyncio.Task[None]] = set()
    lags: list[float] = []
    stopped = False

    def failing() -> bool:
        now = clock()
        late = sum(
            1
            for v in lives
            if (v.first is None and (v.done or now - v.arrival > args.ttft_s))
            or (v.first is not None and v.first - v.arrival > args.ttft_s)
        )
        return late + sum(o.status == DROPPED for o in outcomes) > limit

    async def send(session: aiohttp.ClientSession, body: bytes, n: int, live: Live) -> None:
        try:
            outcomes.append(await one_request(session, url, body, n, live))
        except asyncio.CancelledError:
            outcomes.append(Outcome(CANCELLED if stopped else TIMEOUT, n))
            raise

    timeout = aiohttp.ClientTimeout(total=args.request_timeout_s, sock_connect=10, sock_read=60)
    # A fresh connection per request (Connection: close): llama-server's HTTP threads would
    # otherwise sit on idle keep-alive connections.
    connector = aiohttp.TCPConnector(limit=args.max_in_flight, force_close=True)
    cpu0 = time.process_time()
    machine0, server0 = machine_busy_s(), tree_cpu_s(pid)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = clock() + 0.05
        for i, (at, body, n) in enumerate(plan):
            due = t0 + at
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if stop_early and i % 4 == 0 and failing():
                stopped = True
                break
            lags.append(clock() - due)
            if len(tasks) >= args.max_in_flight:
                outcomes.append(Outcome(DROPPED, n))
                continue
            live = Live(due)
            lives.append(live)
            task = asyncio.create_task(send(session, body, n, live))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        deadline = clock() + args.drain_seconds
        while tasks and not stopped and clock() < deadline:
            if stop_early and failing():
                stopped = True
                break
            await asyncio.wait(list(tasks), timeout=min(1.0, max(0.01, deadline - clock())))
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.wait(list(tasks), timeout=10)
        wall = clock() - t0
    client_cpu = time.process_time() - cpu0
    machine1, server1 = machine_busy_s(), tree_cpu_s(pid)
    server_cpu = server1 - server0 if server0 is not None and server1 is not None else None
    other = None
    if server_cpu is not None and machine0 is not None and machine1 is not None and wall > 0:
        other = max(0.0, (machine1 - machine0 - server_cpu - client_cpu) / wall)
    ok = [o for o in outcomes if o.status == OK]

    def pct(values: list[float | None], q: float) -> float | None:
        return percentile([v for v in values if v is not None], q)

    return Probe(
        rate=rate,
        seconds=seconds,
        sent=len(outcomes),
        counts=dict(Counter(o.status for o in outcomes)),
        tokens=sum(o.tokens for o in ok),
        ttft_p50=pct([o.ttft for o in ok], 0.50),
        ttft_p90=pct([o.ttft for o in ok], 0.90),
        ttft_p99=pct([o.ttft for o in ok], 0.99),
        tpot_p50=pct([o.tpot for o in ok], 0.50),
        tpot_p90=pct([o.tpot for o in ok], 0.90),
        tpot_p99=pct([o.tpot for o in ok], 0.99),
        e2e_p50=pct([o.e2e for o in ok], 0.50),
        e2e_p99=pct([o.e2e for o in ok], 0.99),
        stopped_early=stopped,
        wall_s=wall,
        client_cpu_s=client_cpu,
        lag_p99_s=percentile(lags, 0.99),
        short=sum(o.tokens < o.max_tokens for o in ok),
        server_cpu_s=server_cpu,
        other_cores=other,
    )


def machine_busy_s() -> float | None:
    """CPU seconds this machine has been busy (all cores, /proc/stat), None where unknown."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[Any] | None:
    """The process and its live descendants (psutil), None when it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return None


def tree_cpu_s(pid: int | None) -> float | None:
    """CPU seconds of a process and its live descendants."""
    import psutil

    procs = None if pid is None else process_tree(pid)
    if procs is None:
        return None
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


# --- servers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    """One server configuration to search."""

    name: str  # "distinfer 1x2", "llama-server"
    kind: str  # "distinfer" or "llama"
    replicas: int
    threads: int  # per replica
    sequences: int  # running together, all replicas
    health: str

    def command(self, args: argparse.Namespace, gguf: Path, port: int) -> list[str]:
        if self.kind == "distinfer":
            return [
                *distinfer_executable(), "serve",
                "--model", MODEL,
                "--host", HOST,
                "--port", str(port),
                "--replicas", str(self.replicas),
                "--threads-per-replica", str(self.threads),
                "--max-running", str(self.sequences // self.replicas),
                "--max-queue", str(args.max_queue),
                "--drain-timeout", "5",
                "--timeout-ms", f"{args.deadline_s * 1e3:g}",
                *shlex.split(args.distinfer_args),
            ]  # fmt: skip
        return [
            str(LLAMA_SERVER),
            "-m", str(gguf),
            "--host", HOST,
            "--port", str(port),
            "-np", str(self.sequences),
            "-c", str(self.sequences * args.ctx_per_seq),
            "-t", str(self.threads),
            "-tb", str(self.threads),
            "--no-webui",
            *shlex.split(args.llama_args),
        ]  # fmt: skip


def distinfer_executable() -> list[str]:
    exe = Path(sys.executable).parent / "distinfer"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "distinfer.cli"]


@dataclass
class Running:
    target: Target
    proc: subprocess.Popen[bytes]
    base: str
    log_path: Path
    command: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_server(target: Target, args: argparse.Namespace, gguf: Path, log_dir: Path) -> Running:
    port = free_port()
    cmd = target.command(args, gguf, port)
    log_path = log_dir / f"{target.name.replace(' ', '-')}.log"
    log(f"[{target.name}] {shlex.join(cmd)}")
    with log_path.open("wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **SERVER_ENV},
            start_new_session=True,  # its own process group: stopped with all its children
        )
    return Running(target, proc, f"http://{HOST}:{port}", log_path, cmd)


def stop_server(server: Running) -> None:
    """SIGTERM the server's process group, SIGKILL it after 30 s."""
    if server.proc.poll() is None:
        try:
            os.killpg(server.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:  # whatever is left of the group (replicas that outlived their parent)
        os.killpg(server.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


async def get_status(base: str, path: str, timeout_s: float = 5.0) -> int | None:
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as s, s.get(base + path) as r:
            await r.read()
            return r.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None


async def wait_ready(server: Running, limit_s: float) -> float:
    """Seconds until the health route answers 200; SystemExit when the server exits or is late."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        if server.proc.poll() is not None:
            raise SystemExit(
                f"[{server.target.name}] exited with code {server.proc.returncode} before it was "
                f"ready; last lines of {server.log_path}:\n{server.log_tail()}"
            )
        if await get_status(server.base, server.target.health, 2.0) == 200:
            return time.perf_counter() - start
        await asyncio.sleep(0.5)
    raise SystemExit(f"[{server.target.name}] not ready after {limit_s:.0f} s; see {server.log_path}")


async def tiny_ttft(base: str) -> float | None:
    """TTFT of one 2-token request, None when it does not complete."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        live = Live(time.perf_counter())
        o = await one_request(session, base + "/v1/completions", request_body("In the beginning", 2), 2, live)
    return o.ttft if o.status == OK else None


async def settle(base: str, limit_s: float = 90.0) -> None:
    """Wait (bounded) until the server is idle again: a 2-token request answers within 0.5 s."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        ttft = await tiny_ttft(base)
        if ttft is not None and ttft < 0.5:
            return
        await asyncio.sleep(1.0)
    log(f"  (the server was not idle {limit_s:.0f} s after the probe)")


async def warm_up(base: str, sequences: int, prompts: list[str]) -> None:
    """A burst of `sequences` concurrent requests, then a few single ones; not measured."""
    timeout = aiohttp.ClientTimeout(total=180)
    url = base + "/v1/completions"
    async with aiohttp.ClientSession(timeout=timeout) as session:
        burst = [
            one_request(
                session, url, request_body(prompts[i % len(prompts)], 16), 16, Live(time.perf_counter())
            )
            for i in range(sequences)
        ]
        await asyncio.gather(*burst)
        for i in range(3):
            await one_request(session, url, request_body(prompts[i], 32), 32, Live(time.perf_counter()))
    await settle(base)


def rss_mib(pid: int) -> float | None:
    """Resident memory of the process and all its descendants, MiB."""
    import psutil

    procs = process_tree(pid)
    if procs is None:
        return None
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def llama_server_version() -> str | None:
    try:
        done = subprocess.run([str(LLAMA_SERVER), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip().splitlines()
    return next((line for line in text if line.startswith("version")), text[0] if text else None)


def ensure_llama_server() -> None:
    """Build llama-server when missing (the build script is idempotent: at once when built)."""
    if LLAMA_SERVER.exists() and llama_server_version():
        return
    log(f"llama-server: {BUILD.relative_to(REPO)} (builds it into {PEERS.relative_to(REPO)}: ~10 minutes)")
    subprocess.run(["bash", str(BUILD)], check=True, stdout=sys.stderr)


# --- the search -----------------------------------------------------------------------------


async def search(
    server: Running, args: argparse.Namespace, prompts: list[str], deadline: float
) -> tuple[Probe | None, list[Probe]]:
    """The highest sustainable rate: doubling from --start-rate (halving when that fails),
    then --bisect steps between the highest passing and the lowest failing rate."""
    probes: list[Probe] = []

    async def probe(rate: float) -> bool:
        p = await run_probe(
            server.base, rate, args.probe_seconds, args, prompts, args.seed, pid=server.proc.pid
        )
        p.judge(args.ttft_s, args.tpot_s, args.max_fail)
        probes.append(p)
        log(f"  [{server.target.name}] {p.line()}")
        if server.proc.poll() is not None:
            raise SystemExit(f"[{server.target.name}] exited during a probe:\n{server.log_tail()}")
        await settle(server.base)
        return p.passed

    good: float | None = None
    bad: float | None = None
    rate = args.start_rate
    for _ in range(args.max_doublings):
        if time.monotonic() > deadline:
            break
        if await probe(rate):
            good = rate
            if bad is not None or rate * 2 > args.max_rate:
                break
            rate *= 2
        else:
            bad = rate
            if good is not None or rate / 2 < args.min_rate:
                break
            rate /= 2
    if good is not None and bad is not None:
        for _ in range(args.bisect):
            if time.monotonic() > deadline:
                log(f"  [{server.target.name}] --budget-minutes reached: no more bisection")
                break
            mid = (good + bad) / 2
            if await probe(mid):
                good = mid
            else:
                bad = mid
    best = max((p for p in probes if p.passed), key=lambda p: p.rate, default=None)
    return best, probes


async def overload(
    server: Running, rate: float, args: argparse.Namespace, prompts: list[str]
) -> dict[str, Any]:
    """--overload-factor x the sustainable rate for --overload-seconds: up, 429s, 5xx, memory."""
    pid = server.proc.pid
    before = rss_mib(pid)
    peak = before or 0.0
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss_mib(pid) or 0.0)
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    try:
        p = await run_probe(
            server.base, rate, args.overload_seconds, args, prompts, args.seed + 1, False, server.proc.pid
        )
    finally:
        sampling = False
        await sampler
    log(f"  [{server.target.name}] overload {p.line()}")
    alive = server.proc.poll() is None
    await settle(server.base)
    ready = alive and await get_status(server.base, server.target.health) == 200
    after = rss_mib(pid)
    admitted = p.sent - p.counts.get(SHED, 0) - p.counts.get(DROPPED, 0)
    return {
        "rate": rate,
        "probe": asdict(p),
        "alive": alive,
        "ready_after": ready,
        "shed_share": p.counts.get(SHED, 0) / p.sent if p.sent else 0.0,
        "server_errors": p.counts.get(SERVER_ERROR, 0),
        "admitted": admitted,
        "admitted_completed": p.ok,
        "deadline_s": args.deadline_s,
        "rss_before_mib": before,
        "rss_peak_mib": peak,
        "rss_after_mib": after,
    }


# --- offline --------------------------------------------------------------------------------


def offline_tok_s(target: Target, args: argparse.Namespace, prompts: list[str], work: Path) -> dict[str, Any]:
    """The batch engine's generated tokens/s on the same layout and the same kind of requests."""
    rng = random.Random(args.seed + 2)
    rows = work / f"offline-{target.replicas}x{target.threads}.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": rng.choice(prompts), "max_tokens": rng.choice(MAX_TOKENS)}) + "\n"
            for _ in range(args.offline_rows)
        ),
        encoding="utf-8",
    )
    per_replica = target.sequences // target.replicas
    out_dir = work / f"offline-{target.replicas}x{target.threads}"
    cmd = [
        *distinfer_executable(), "run",
        "--model", MODEL,
        "--task", "generate",
        "--input", str(rows),
        "--output", str(out_dir),
        "--overwrite",
        "--max-tokens", str(max(MAX_TOKENS)),
        "--ignore-eos",
        "--temperature", "0",
        "--workers", str(target.replicas),
        "--threads-per-worker", str(target.threads),
        "--max-running", str(per_replica),
        "--block-size", str(args.offline_block_size or 4 * per_replica),
        *shlex.split(args.distinfer_args),
    ]  # fmt: skip
    log(f"[{target.name}] offline: {shlex.join(cmd)}")
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.offline_timeout_s,
            env={**os.environ, **SERVER_ENV},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"command": shlex.join(cmd), "failed": f"timed out after {args.offline_timeout_s} s"}
    if done.returncode != 0:
        log(f"[{target.name}] offline run FAILED (exit {done.returncode}):\n{done.stderr[-2000:]}")
        return {"command": shlex.join(cmd), "failed": done.stderr[-2000:]}
    report = json.loads((out_dir / "_report.json").read_text())
    gen = report.get("generation") or {}
    return {
        "command": shlex.join(cmd),
        "gen_tok_s": gen.get("generated_tokens_per_s"),
        "generated_tokens": gen.get("generated_tokens"),
        "summary": done.stderr.strip()[-1500:],
    }


# --- output ---------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def print_table(results: dict[str, Any]) -> None:
    o = results["options"]
    print(
        f"\nGemma 3 270M Q4_K_M, streamed /v1/completions, max_tokens from {list(MAX_TOKENS)} (EOS "
        f"ignored), Poisson arrivals, {o['probe_seconds']:.0f} s probes; sustainable: p99 TTFT < "
        f"{o['ttft_s']} s, p99 TPOT < {o['tpot_s'] * 1e3:.0f} ms, <= {o['max_fail']:.0%} failed; "
        f"{os.cpu_count()} cores"
    )
    head = (
        f"{'server':<16} {'procs':<6} {'seqs':>5} {'req/s':>7} {'out tok/s':>9} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'failed':>7} {'probes':>6}"
    )
    print(head)
    print(f"{'':<16} {'':<6} {'':>5} {'':>7} {'':>9} {'s':>9} {'s':>9} {'ms':>9} {'ms':>9}")
    print("-" * len(head))
    for name, r in results["servers"].items():
        best = r.get("sustainable")
        procs = f"{r['replicas']}x{r['threads']}"
        if best is None:
            print(f"{name:<16} {procs:<6} {r['sequences']:>5} {'none':>7}  (no probed rate passed)")
            continue
        print(
            f"{name:<16} {procs:<6} {r['sequences']:>5} {best['rate']:>7.2f} {best['tok_s']:>9.0f} "
            f"{_s(best['ttft_p50']):>9} {_s(best['ttft_p99']):>9} {_ms(best['tpot_p50']):>9} "
            f"{_ms(best['tpot_p99']):>9} {best['fail_share']:>7.1%} {len(r['probes']):>6}"
        )
    noisy = [
        f"{name} at {p['rate']:.2f} req/s ({p['other_cores']:.1f} cores)"
        for name, r in results["servers"].items()
        for p in r.get("probes", [])
        if (p.get("other_cores") or 0.0) > OTHER_CORES_WARN
    ]
    if noisy:
        print(f"WARNING: other processes were busy during {len(noisy)} probes: {'; '.join(noisy)}")
    halves = {n: r["half"] for n, r in results["servers"].items() if r.get("half")}
    if halves:
        print("\nat half the sustainable rate:")
        head = (
            f"{'server':<16} {'req/s':>7} {'ok':>9} {'TTFT p50':>9} {'p90':>6} {'p99':>6} "
            f"{'TPOT p50':>9} {'p90':>6} {'p99':>6}"
        )
        print(head)
        print(f"{'':<16} {'':>7} {'':>9} {'s':>9} {'s':>6} {'s':>6} {'ms':>9} {'ms':>6} {'ms':>6}")
        print("-" * len(head))
        for name, h in halves.items():
            print(
                f"{name:<16} {h['rate']:>7.2f} {h['counts'].get(OK, 0):>4}/{h['sent']:<4} "
                f"{_s(h['ttft_p50']):>9} {_s(h['ttft_p90']):>6} {_s(h['ttft_p99']):>6} "
                f"{_ms(h['tpot_p50']):>9} {_ms(h['tpot_p90']):>6} {_ms(h['tpot_p99']):>6}"
            )
    for name, r in results["servers"].items():
        off = r.get("offline")
        if off:
            print(f"{name}: offline `distinfer run` {_f(off.get('gen_tok_s'), '.0f')} generated tok/s")
        ov = r.get("overload")
        if ov:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(ov["probe"]["counts"].items()))
            print(
                f"{name}: overload {ov['rate']:.2f} req/s for {ov['probe']['seconds']:.0f} s: {counts}; "
                f"ready after: {ov['ready_after']}; RSS {_f(ov['rss_before_mib'], '.0f')} -> "
                f"{_f(ov['rss_after_mib'], '.0f')} MiB (peak {_f(ov['rss_peak_mib'], '.0f')})"
            )


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per target: ok True (met), False (MISSED) or None (not measured)."""
    servers: dict[str, Any] = results["servers"]
    rate = {n: (r["sustainable"] or {}).get("rate") for n, r in servers.items()}
    out: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, figure: str) -> None:
        out.append({"target": name, "ok": ok, "figure": figure})

    dist = {n: v for n, v in rate.items() if n.startswith("distinfer")}
    llama = rate.get("llama-server")
    if dist and "llama-server" in servers:
        best_name = max(dist, key=lambda n: dist[n] or 0.0)
        d = dist[best_name]
        ratio = d / llama if d and llama else None
        add(
            f"sustainable rate: {best_name} (best) >= 1.3 x llama-server",
            None if ratio is None else ratio >= 1.3,
            f"{_f(d, '.2f')} / {_f(llama, '.2f')} req/s = {_f(ratio, '.2f')}x",
        )
    for name, r in servers.items():
        off = r.get("offline")
        if off is not None:
            served = (r["sustainable"] or {}).get("tok_s")
            base = off.get("gen_tok_s")
            ratio = served / base if served and base else None
            add(
                f"{name}: served tok/s at the sustainable rate >= 0.8 x offline",
                None if ratio is None else ratio >= 0.8,
                f"{_f(served, '.0f')} / {_f(base, '.0f')} tok/s = {_f(ratio, '.2f')}",
            )
        ov = r.get("overload")
        if ov is not None:
            f = results["options"]["overload_factor"]
            add(
                f"{name}: {f:g}x overload: stays up (ready after)",
                bool(ov["ready_after"]),
                f"alive {ov['alive']}, ready {ov['ready_after']}",
            )
            add(
                f"{name}: {f:g}x overload: sheds with 429",
                ov["shed_share"] > 0,
                f"{ov['shed_share']:.0%} of {ov['probe']['sent']} requests 429",
            )
            add(
                f"{name}: {f:g}x overload: no 5xx, every admitted request completed",
                ov["server_errors"] == 0 and ov["admitted_completed"] == ov["admitted"],
                f"5xx {ov['server_errors']}, completed {ov['admitted_completed']}/{ov['admitted']} admitted",
            )
            p99 = ov["probe"]["ttft_p99"]
            add(
                f"{name}: {f:g}x overload: admitted requests' p99 TTFT within the deadline",
                None if p99 is None else p99 <= ov["deadline_s"],
                f"p99 TTFT {_s(p99)} s, deadline {ov['deadline_s']:g} s",
            )
            before, after = ov["rss_before_mib"], ov["rss_after_mib"]
            add(
                f"{name}: {f:g}x overload: memory flat (after <= 1.1 x before)",
                None if not before or not after else after <= 1.1 * before,
                f"RSS {_f(before, '.0f')} -> {_f(after, '.0f')} MiB, peak {_f(ov['rss_peak_mib'], '.0f')}",
            )
    return out


# --- main -----------------------------------------------------------------------------------


def targets_of(args: argparse.Namespace) -> list[Target]:
    out: list[Target] = []
    for name in args.servers:
        if name == "llama":
            out.append(Target("llama-server", "llama", 1, args.threads, args.sequences, "/health"))
            continue
        for layout in args.layouts:
            r, t = layout
            out.append(Target(f"distinfer {r}x{t}", "distinfer", r, t, args.sequences, "/v2/health/ready"))
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.model_path:
        gguf = Path(args.model_path)
    else:
        from distinfer.models.llm.files import builtin_path

        log("the GGUF: builtin_path('gemma3-270m') (assembled on first use) ...")
        gguf = builtin_path(MODEL)
    prompts = load_prompts()
    targets = targets_of(args)
    if any(t.kind == "llama" for t in targets):
        ensure_llama_server()
    results: dict[str, Any] = {
        "options": {k: v for k, v in vars(args).items() if k not in ("json",)}
        | {"model": str(gguf), "cores": os.cpu_count(), "max_tokens": list(MAX_TOKENS)},
        "llama_server_version": llama_server_version() if LLAMA_SERVER.exists() else None,
        "servers": {},
    }
    start = time.monotonic()
    budget = args.budget_minutes * 60
    with tempfile.TemporaryDirectory(prefix="serve-generate-") as tmp:
        work = Path(tmp)
        log_dir = Path(args.log_dir) if args.log_dir else work
        log_dir.mkdir(parents=True, exist_ok=True)
        for i, target in enumerate(targets):
            # each server's search gets an equal share of what is left of the budget
            left = budget - (time.monotonic() - start)
            deadline = time.monotonic() + max(0.0, left) / (len(targets) - i)
            server = start_server(target, args, gguf, log_dir)
            entry: dict[str, Any] = {
                "kind": target.kind,
                "replicas": target.replicas,
                "threads": target.threads,
                "sequences": target.sequences,
                "command": shlex.join(server.command),
            }
            results["servers"][target.name] = entry
            try:
                entry["ready_s"] = await wait_ready(server, args.start_timeout_s)
                log(f"[{target.name}] ready after {entry['ready_s']:.1f} s; warming up")
                await warm_up(server.base, target.sequences, prompts)
                entry["rss_idle_mib"] = rss_mib(server.proc.pid)
                if args.overload_rate and target.kind == "distinfer":  # no search: overload alone
                    entry["sustainable"], entry["probes"] = None, []
                    entry["overload"] = await overload(server, args.overload_rate, args, prompts)
                    continue
                best, probes = await search(server, args, prompts, deadline)
                entry["sustainable"] = (
                    asdict(best) | {"tok_s": best.tok_s, "fail_share": best.fail_share} if best else None
                )
                entry["probes"] = [asdict(p) | {"tok_s": p.tok_s} for p in probes]
                if best is not None and not args.no_half:
                    half = await run_probe(
                        server.base, best.rate / 2, args.probe_seconds, args, prompts, args.seed + 3,
                        False, server.proc.pid,
                    )  # fmt: skip
                    half.judge(args.ttft_s, args.tpot_s, args.max_fail)
                    log(f"  [{target.name}] half rate {half.line()}")
                    entry["half"] = asdict(half) | {"tok_s": half.tok_s, "fail_share": half.fail_share}
                    await settle(server.base)
                if target.kind == "distinfer" and best is not None and not args.no_overload:
                    entry["overload"] = await overload(
                        server, args.overload_factor * best.rate, args, prompts
                    )
            finally:
                stop_server(server)
                entry["log_tail"] = server.log_tail(15)
        if not args.no_offline:  # with every server stopped
            for target in targets:
                entry = results["servers"][target.name]
                if target.kind == "distinfer" and entry.get("sustainable"):
                    entry["offline"] = offline_tok_s(target, args, prompts, work)
    results["wall_s"] = time.monotonic() - start
    results["checks"] = checks(results)
    return results


def parse_layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        r, _, t = part.strip().partition("x")
        out.append((int(r), int(t)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--servers",
        default="distinfer,llama",
        help="comma-separated, searched in this order: distinfer, llama (default both)",
    )
    p.add_argument(
        "--layouts",
        default="1x2,2x1",
        help="distinfer layouts, REPLICASxTHREADS each, comma-separated; every layout's "
        "replicas x threads must equal --threads (default 1x2,2x1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="total threads of every server: llama-server's -t/-tb (default 2)",
    )
    p.add_argument(
        "--sequences",
        type=int,
        default=16,
        help="sequences decoded together, all replicas: llama-server's -np, distinfer's "
        "--max-running x replicas (default 16)",
    )
    p.add_argument("--max-queue", type=int, default=64, help="distinfer serve --max-queue (default 64)")
    p.add_argument(
        "--ctx-per-seq",
        type=int,
        default=512,
        help="llama-server context per slot: -c is sequences x this (default 512)",
    )
    p.add_argument(
        "--distinfer-args",
        default="",
        help="more flags for `distinfer serve` and `distinfer run`, e.g. '--dtype bfloat16'",
    )
    p.add_argument("--llama-args", default="", help="more llama-server flags, e.g. '-fa off'")
    p.add_argument(
        "--probe-seconds", type=float, default=30.0, help="seconds of arrivals per probed rate (default 30)"
    )
    p.add_argument("--start-rate", type=float, default=1.0, help="first probed rate, req/s (default 1)")
    p.add_argument("--min-rate", type=float, default=0.1, help="lowest rate the halving tries (default 0.1)")
    p.add_argument(
        "--max-rate", type=float, default=64.0, help="highest rate the doubling tries (default 64)"
    )
    p.add_argument("--max-doublings", type=int, default=6, help="doubling/halving probes at most (default 6)")
    p.add_argument("--bisect", type=int, default=2, help="bisection probes after the doubling (default 2)")
    p.add_argument("--ttft-s", type=float, default=2.0, help="p99 time to first token allowed, s (default 2)")
    p.add_argument(
        "--tpot-s", type=float, default=0.2, help="p99 time per output token allowed, s (default 0.2)"
    )
    p.add_argument(
        "--max-fail",
        type=float,
        default=0.0,
        help="share of requests allowed to fail or be shed at a sustainable rate (default 0: none)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=256,
        help="client-side cap on open requests; arrivals beyond it are dropped (default 256)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=60.0,
        help="after a probe's arrivals, how long its open requests may take (default 60)",
    )
    p.add_argument("--request-timeout-s", type=float, default=120.0, help="one request at most (default 120)")
    p.add_argument(
        "--start-timeout-s", type=float, default=600.0, help="a server's start at most (default 600)"
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=20.0,
        help="searches stop probing after this, shared evenly between servers (default 20)",
    )
    p.add_argument(
        "--overload-factor",
        type=float,
        default=3.0,
        help="the overload probe's rate over the sustainable rate (default 3)",
    )
    p.add_argument("--overload-seconds", type=float, default=30.0, help="overload probe length (default 30)")
    p.add_argument("--overload-rate", type=float, default=0.0,
                   help="distinfer: skip the search and run only the overload probe, at this rate (req/s)")
    p.add_argument("--no-overload", action="store_true", help="skip the overload probe")
    p.add_argument("--no-half", action="store_true", help="skip the probe at half the sustainable rate")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=2.0,
        help="distinfer serve --timeout-ms: the first token's deadline, beyond which it sheds (default 2)",
    )
    p.add_argument("--offline-rows", type=int, default=256, help="prompts in the offline job (default 256)")
    p.add_argument(
        "--offline-block-size",
        type=int,
        default=0,
        help="offline --block-size (default 4 x --max-running per replica)",
    )
    p.add_argument("--offline-timeout-s", type=float, default=900.0, help="offline job at most (default 900)")
    p.add_argument("--no-offline", action="store_true", help="skip the offline `distinfer run` comparison")
    p.add_argument("--seed", type=int, default=1, help="arrivals, prompts and lengths (default 1)")
    p.add_argument("--model-path", help="the GGUF (default: distinfer's built-in gemma3-270m)")
    p.add_argument("--log-dir", help="keep the servers' logs here (default: a temporary directory)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 6 s probes, 2 doublings, 1 bisection, 6 s overload, 32 offline rows",
    )
    p.add_argument("--json", metavar="PATH", help="write every figure here")
    args = p.parse_args()
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if bad := [s for s in args.servers if s not in ("distinfer", "llama")]:
        p.error(f"--servers: unknown {bad}")
    try:
        args.layouts = parse_layouts(args.layouts)
    except ValueError:
        p.error("--layouts: REPLICASxTHREADS, comma-separated, e.g. 1x2,2x1")
    for r, t in args.layouts:
        if r * t != args.threads:
            p.error(f"--layouts: {r}x{t} is {r * t} threads, not --threads {args.threads}")
        if args.sequences % r:
            p.error(f"--sequences {args.sequences} does not divide among {r} replicas")
    if args.quick:
        args.probe_seconds, args.max_doublings, args.bisect = 6.0, 2, 1
        args.overload_seconds, args.offline_rows, args.drain_seconds = 6.0, 32, 30.0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results = asyncio.run(main_async(args))
    print_table(results)
    print()
    ok = True
    for c in results["checks"]:
        verdict = "n/a" if c["ok"] is None else "met" if c["ok"] else "MISSED"
        ok &= c["ok"] is not False
        print(f"  {c['target']:<70} {c['figure']}  {verdict}")
    if results.get("llama_server_version"):
        print(f"llama-server {results['llama_server_version']}; whole run {results['wall_s'] / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
