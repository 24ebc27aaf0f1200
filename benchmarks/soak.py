"""Serving soak: `distinfer serve` for `--minutes` (10) at 80% of its sustainable rate, with a
mix of good requests, malformed ones and clients that disconnect.

Steps (one server, loopback only, every loop bounded):

1. Start `distinfer serve --model minilm` (2 replicas x 1 thread, as benchmarks/serve_load.py
   starts it) and find its sustainable rate with serve_load's search (the highest Poisson rate
   with no error and p99 <= 500 ms), unless `--rate` gives it.
2. Soak: open-loop Poisson arrivals at `--fraction` (0.8) of that rate. Each arrival is, at
   random (seeded): a good KServe v2 request (85%), a malformed one (10%: broken JSON, no
   inputs, a wrong datatype, a shape that does not match the data, an unknown input name, a
   text given as a number, an empty body, a body over the server's size limit), or a client
   that goes away (5%: it sends a good request and closes before the answer, sends half a
   request and closes, or connects and closes).
3. Every `--sample-s` seconds: the resident memory (VmRSS) of every process of the server's
   process group (the HTTP front and its replicas), and their pids.

Targets: after the first `--warmup-min` minutes, RSS grows by under 5% (the median of the last
five samples against the median of the five after warm-up), no 5xx answer to anything, no
replica lost (the same replica pids at the end, and `distinfer_replicas_ready` still equal to
the replicas), every good request answered 200, every malformed one answered 4xx, and the server
still ready.

    .venv/bin/python benchmarks/soak.py                       # about 14 minutes
    .venv/bin/python benchmarks/soak.py --minutes 2 --rate 60  # a short run at a given rate
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as sl  # the load generator, server start and rate search

GOOD, MALFORMED, DISCONNECT = "good", "malformed", "disconnect"
MIX = {GOOD: 0.85, MALFORMED: 0.10, DISCONNECT: 0.05}
OVERSIZE_BYTES = 17 * 2**20  # over `distinfer serve`'s default --max-body-bytes (16 MiB)


def _text(name: str = "text", datatype: str = "BYTES", shape: list[int] | None = None,
          data: Any = None) -> bytes:  # fmt: skip
    data = ["a short verse"] if data is None else data
    tensor = {"name": name, "shape": shape or [1], "datatype": datatype, "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


MALFORMED_BODIES: dict[str, bytes] = {
    "broken_json": b'{"inputs": [{"name": "text", ',
    "no_inputs": json.dumps({"inputs": []}).encode(),
    "wrong_datatype": _text(datatype="FP32", data=[1.5]),
    "shape_mismatch": _text(shape=[3]),
    "unknown_input": _text(name="pixels"),
    "number_as_text": _text(data=[12]),
    "empty_body": b"",
    "not_an_object": b"[1, 2, 3]",
}


def rss_kib(pids: list[int]) -> dict[int, int]:
    """VmRSS (KiB) of each of `pids` still alive."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        out[pid] = int(line.split()[1])
                        break
        except OSError:
            continue
    return out


class Soak:
    """One soak phase against a started server: arrivals, outcomes, memory samples."""

    def __init__(self, server: sl.Server, pool: sl.Pool, args: argparse.Namespace, rate: float) -> None:
        self.server, self.pool, self.args, self.rate = server, pool, args, rate
        self.rng = random.Random(args.seed)
        kinds = (*MIX, *MALFORMED_BODIES, "oversize")
        self.outcomes: dict[str, Counter[str]] = {kind: Counter() for kind in kinds}
        self.latency_ms: list[float] = []
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.oversize = sl.http_request("POST", server.spec.infer_path, server.port, b" " * OVERSIZE_BYTES)

    def _record(self, kind: str, outcome: str) -> None:
        self.outcomes[kind][outcome] += 1

    async def good(self, request: bytes, due: float) -> None:
        try:
            status, _ = await asyncio.wait_for(self.pool.request(request), self.args.client_timeout_s)
            self._record(GOOD, str(status))
            if status == 200:
                self.latency_ms.append((time.perf_counter() - due) * 1000)
        except asyncio.TimeoutError:
            self._record(GOOD, sl.CLIENT_TIMEOUT)
        except Exception as exc:
            self._record(GOOD, sl.CONN_ERROR)
            self.errors.append(f"good: {type(exc).__name__}: {exc}")

    async def malformed(self, name: str) -> None:
        body = MALFORMED_BODIES.get(name)
        request = self.oversize if body is None else sl.http_request("POST", self.server.spec.infer_path,
                                                                     self.server.port, body)  # fmt: skip
        try:
            status, _ = await asyncio.wait_for(self.pool.request(request), self.args.client_timeout_s)
            outcome = str(status)
        except asyncio.TimeoutError:
            outcome = sl.CLIENT_TIMEOUT
        except Exception as exc:  # the server may close the connection after a 413 body it did not read
            outcome = sl.CONN_ERROR
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        self._record(MALFORMED, outcome)
        self._record(name, outcome)

    async def disconnect(self, request: bytes, how: int) -> None:
        """A client that leaves: after sending a good request, halfway through one, or at once."""
        try:
            _, writer = await asyncio.open_connection(sl.HOST, self.server.port)
        except OSError as exc:
            self._record(DISCONNECT, sl.CONN_ERROR)
            self.errors.append(f"disconnect: {type(exc).__name__}: {exc}")
            return
        try:
            if how == 0:
                writer.write(request)
                await writer.drain()
                await asyncio.sleep(self.rng.uniform(0.0, 0.05))  # gone before (most) answers
            elif how == 1:
                writer.write(request[: len(request) // 2])
                await writer.drain()
            self._record(DISCONNECT, ("after_request", "mid_request", "at_once")[how])
        finally:
            writer.close()

    async def sample(self, t0: float) -> None:
        pids = sl.group_pids(self.server.proc.pid)
        rss = rss_kib(pids)
        self.samples.append({"t_s": round(time.perf_counter() - t0, 1), "pids": sorted(rss),
                             "rss_kib": sum(rss.values()), "per_pid_kib": rss})  # fmt: skip

    async def run(self) -> None:
        span = self.args.minutes * 60.0
        tasks: set[asyncio.Task[None]] = set()
        kinds, weights = list(MIX), list(MIX.values())
        names = [*MALFORMED_BODIES, "oversize"]
        t0 = time.perf_counter()
        next_arrival, next_sample, n = 0.0, 0.0, 0
        while (now := time.perf_counter() - t0) < span:
            if now >= next_sample:
                await self.sample(t0)
                next_sample += self.args.sample_s
            if now < next_arrival:
                await asyncio.sleep(min(next_arrival, next_sample) - now)
                continue
            kind = self.rng.choices(kinds, weights)[0]
            request = self.server.requests[n % len(self.server.requests)]
            n += 1
            if len(tasks) >= self.args.max_inflight:
                self._record(kind, sl.OVERFLOW)
            else:
                if kind == GOOD:
                    job = self.good(request, t0 + next_arrival)
                elif kind == MALFORMED:
                    name = names[-1] if self.rng.random() < 0.01 else self.rng.choice(names[:-1])
                    job = self.malformed(name)
                else:
                    job = self.disconnect(request, self.rng.randrange(3))
                task = asyncio.create_task(job)
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            next_arrival += self.rng.expovariate(self.rate)
        if tasks:
            await asyncio.wait(set(tasks), timeout=self.args.client_timeout_s + 5)
        await self.sample(t0)


def memory_growth(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    after = [s["rss_kib"] for s in samples if s["t_s"] >= warmup_s]
    if len(after) < 10:
        return {"growth": None, "why": f"only {len(after)} samples after warm-up; run longer"}
    start, end = statistics.median(after[:5]), statistics.median(after[-5:])
    return {"start_mib": round(start / 1024, 1), "end_mib": round(end / 1024, 1),
            "peak_mib": round(max(after) / 1024, 1), "growth": (end - start) / start}  # fmt: skip


async def metric(server: sl.Server, name: str) -> float | None:
    try:
        _, body = await sl.http_once(server.port, "GET", "/metrics", timeout_s=5.0)
    except (OSError, asyncio.TimeoutError, ValueError):
        return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith(name) and not line.startswith("#"):
            return float(line.rsplit(None, 1)[1])
    return None


async def soak(args: argparse.Namespace, base: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    spec = sl.TARGETS["distinfer"]
    sentences = sl.CORPUS.read_text(encoding="utf-8").splitlines()[:2000]
    server = sl.start_server(spec, base, workdir)
    doc: dict[str, Any] = {"command": spec.command(base, server.port)}
    try:
        bodies = [json.dumps(spec.body(s, None)).encode() for s in sentences]
        server.requests = [sl.http_request("POST", spec.infer_path, server.port, b) for b in bodies]
        server.probe = json.dumps(spec.body(sentences[0], None)).encode()
        doc["start_s"] = round(await sl.wait_ready(server, base.start_timeout_s), 1)
        pool = sl.Pool(server.port, base.connections)
        await sl.warm_batches(server, pool, 4 * base.batch_size * base.replicas)
        server.idle_latency_s = await sl.idle_latency(server)
        if args.rate:
            sustainable = args.rate
        else:
            search = await sl.search_rate(server, pool, base)
            sustainable = search["sustainable_rate"]
            doc["search_steps"] = [sl.describe(s) for s in search["steps"]]
        doc["sustainable_rate"] = sustainable
        rate = args.fraction * sustainable
        doc["soak_rate"] = rate
        if rate <= 0:
            raise RuntimeError("no sustainable rate was found")
        await sl.settle(server)
        replicas_before = sl.group_pids(server.proc.pid)
        print(f"soak: {args.minutes:g} min at {rate:.1f} req/s ({args.fraction:.0%} of {sustainable:.1f})",
              flush=True)
        run = Soak(server, pool, args, rate)
        await run.run()
        doc["alive"] = server.proc.poll() is None
        doc["ready"] = (await sl.http_once(server.port, "GET", "/v2/health/ready", timeout_s=5.0))[0] == 200
        doc["replicas_ready"] = await metric(server, "distinfer_replicas_ready")
        doc["pids_before"] = sorted(replicas_before)
        doc["pids_after"] = sorted(sl.group_pids(server.proc.pid))
        doc["outcomes"] = {k: dict(sorted(v.items())) for k, v in run.outcomes.items() if v}
        latency = sorted(run.latency_ms)
        doc["good_latency_ms"] = {"p50": round(statistics.median(latency), 1),
                                  "p99": round(sl.percentile(latency, 0.99) or 0.0, 1)}  # fmt: skip
        doc["memory"] = memory_growth(run.samples, args.warmup_min * 60)
        doc["samples"] = run.samples
        doc["client_errors"] = run.errors[:20]
    finally:
        doc["alive_at_end"] = server.proc.poll() is None
        sl.stop_server(server)
        doc["log_tail"] = sl.log_tail(server, 15)
    return doc


def checks(doc: dict[str, Any], replicas: int) -> list[tuple[str, bool]]:
    outcomes = doc.get("outcomes", {})
    every = Counter[str]()
    for kind in MIX:
        every.update(outcomes.get(kind, {}))
    five = sum(v for k, v in every.items() if k.isdigit() and k.startswith("5"))
    good = outcomes.get(GOOD, {})
    bad = outcomes.get(MALFORMED, {})
    growth = doc.get("memory", {}).get("growth")
    return [
        (f"no 5xx answer ({five})", five == 0),
        (f"every good request answered 200 ({good.get('200', 0)} of {sum(good.values())})",
         good.get("200", 0) == sum(good.values()) > 0),
        ("every malformed request answered 4xx (" + ", ".join(f"{k}: {v}" for k, v in bad.items()) + ")",
         sum(v for k, v in bad.items() if k.isdigit() and k.startswith("4")) == sum(bad.values()) > 0),
        (f"no replica lost (pids {doc.get('pids_before')} -> {doc.get('pids_after')}, "
         f"replicas ready {doc.get('replicas_ready')})",
         doc.get("pids_before") == doc.get("pids_after") and doc.get("replicas_ready") == replicas),
        ("RSS growth after warm-up under 5% (" + ("n/a" if growth is None else f"{growth:+.2%}") + ")",
         growth is not None and growth < 0.05),
        ("server alive and ready at the end", bool(doc.get("alive") and doc.get("ready"))),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    parser.add_argument("--warmup-min", type=float, default=2.0, help="minutes before memory is compared")
    parser.add_argument("--rate", type=float, default=0.0, help="the sustainable rate (default: search it)")
    parser.add_argument("--fraction", type=float, default=0.8, help="soak at this share of the rate")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    base = sl.parse_args(["--targets", "distinfer", "--replicas", str(args.replicas)])
    args.client_timeout_s, args.max_inflight = base.client_timeout_s, base.max_inflight
    if args.minutes * 60 < args.warmup_min * 60 + 10 * args.sample_s:
        parser.error("--minutes leaves fewer than 10 memory samples after --warmup-min")
    with tempfile.TemporaryDirectory(prefix="distinfer-soak-") as folder:
        try:
            doc = asyncio.run(soak(args, base, Path(folder)))
        finally:
            for proc in list(sl._STARTED):
                sl.end_group(proc, grace_s=5.0)
    results = checks(doc, args.replicas)
    doc["checks"] = [{"check": line, "passed": ok} for line, ok in results]
    lat = doc.get("good_latency_ms", {})
    memory = doc.get("memory", {})
    print(f"soak {args.minutes:g} min at {doc.get('soak_rate', 0):.1f} req/s "
          f"({args.fraction:.0%} of the sustainable {doc.get('sustainable_rate', 0):.1f} req/s); "
          f"good requests p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms; RSS {memory.get('start_mib')} -> "
          f"{memory.get('end_mib')} MiB (peak {memory.get('peak_mib')})")
    for kind, counts in doc.get("outcomes", {}).items():
        print(f"  {kind}: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    for line, ok in results:
        print(f"  [{'met' if ok else 'MISSED'}] {line}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
