"""Measuring a model on this machine for the planner (`Profile`), once, then cached.

Every figure is measured in fresh spawned processes, as a worker runs: the same runner, the
same preparation and batching (`run_block`), threads pinned before torch loads.

1. One process alone at 1 thread and at all cores, over a sample of the input (runs of rows
   spread over the whole input; as many rows as one thread runs in about 2 s, at least
   16 where they take at most 8 s, 2 to `sample`; an untimed pass at every batch size
   first), at each batch size: rows/s of a worker's whole pass over them (read, run, write
   a part). The first one also gives the start-up cost (spawn, imports, the model's load)
   and a worker's peak memory.
2. `cores` one-thread processes at once, started together after all have loaded: each one's
   rows/s, the measured contention.
3. Per-layer times and sizes (one layer in memory at a time, 1 thread), for the families
   that can be cut into stages: at `layer_batch` rows of 64 tokens, at 1 row, and for text
   models at 16 and 256 tokens too; and the sample's tokens per row, as its batches pad
   them, to which the cost model moves the layers' shares.
4. One tensor-parallel group of 2 (and 4, where the cores allow) one-thread ranks, as a
   worker runs it (`TensorParallelRunner`), over the same sample at each batch size, for
   the families that can be sharded: what the group really gets, which the ideal
   `1/k`-of-the-model formula overstates at small batches (costmodel.tensor_efficiency).
5. The links (driver/links.py): shared-memory and gloo all-reduces between two processes,
   a memory copy's bandwidth (what a shared-memory slot costs) and a pipe's round trip.

A text-generation model (`req.generation` set: the job's max_tokens, dtype...) is measured the
same way with "batch size" read as the sequences running together (`max_running`): each
pass generates the sample's completions, as many rows as the most running sequences, through
the continuous-batching engine; no per-layer or tensor figures (its pipeline and tensor
layouts are not planned yet), and the mean tokens generated per row.

Every profile is also kept as the model's latest on this machine (`profiles/latest/`), which
the default `--strategy auto` plans from when this input has none (see driver/advisor.py).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.blocks import Block
from ..data.sources import SourceSpec
from ..errors import DistinferError, ModelError
from ..logs import log
from ..messages import GenerationOptions
from ..planning.cluster import this_machine
from ..planning.profiles import Profile, Rate, machine_key, profile_path
from ..worker.process import set_worker_environment
from .links import measure_links

if TYPE_CHECKING:
    from ..models.base import Runner
    from ..models.family import ModelSpec

__all__ = ["GENERATION_RUNNING", "LATENCY_BATCHES", "ProfileRequest", "get_profile"]

MIN_SECONDS = 2.0  # each rate is timed over whole passes of the sample, at least this long
SAMPLE_CHUNKS = 8  # the sample is this many runs of rows, spread over the input
PASS_S = 2.0  # ... and as many rows as one process at 1 thread runs in about this long,
FEW_ROWS = 16  # ... but at least this many where a pass of them takes at most
LONG_PASS_S = 8.0  # ... this long,
FULL_BATCH_PASS_S = 40.0  # and at least one batch of the smallest measured size within this
LAYER_SEQ_LENS = (16, 256)  # a text model's layers are also measured at these lengths
LENGTH_BATCH = 32  # the sample's padded length is taken from batches of this many rows


@dataclass(frozen=True, slots=True)
class ProfileRequest:
    model: str
    input: str
    input_format: str | None = None
    column: str | None = None
    sample: int = 256  # rows at most
    rows: int = 0  # rows in the sample; 0: sized by the first measuring process
    batch_sizes: tuple[int, ...] = (8, 32, 64)  # generation: running sequences
    layer_batch: int = 8
    seq_len: int = 64
    generation: GenerationOptions | None = None  # a text-generation job's settings


#: the running sequences a generation model is measured at
GENERATION_RUNNING = (8, 16, 32)

#: batch sizes measured as well when a plan has a latency target (smaller batches, sooner done)
LATENCY_BATCHES = (1, 2, 4)

#: a slow model's sample fills one batch of the smallest measured size at least this large
FULL_BATCH_LEAST = 8


def _sample_blocks(source: SourceSpec, rows: int) -> list[Block]:
    """About `rows` rows in up to `SAMPLE_CHUNKS` runs spread evenly over the input (the
    first rows of a file are often not like the rest: shorter lines, a header's neighbours)."""
    from ..data.sources import plan_blocks

    if source.num_rows <= rows:
        return plan_blocks(source, max(1, source.num_rows), max(1, source.num_rows))
    chunks = min(SAMPLE_CHUNKS, rows)
    size = max(1, rows // chunks)
    every = plan_blocks(source, size, size)
    step = len(every) / chunks
    return [every[int(i * step)] for i in range(chunks)]


def sample_rows(per_row_s: float, most: int, batch: int = 1) -> int:
    """Rows in the sample: a pass of about `PASS_S` at the first process's speed, at least
    2 rows (a slow model is still measured over more than one) and at most `most`. Fewer
    than `FEW_ROWS` are made up to that many where a pass stays within `LONG_PASS_S`: a
    handful of rows is one padded batch, unlike a job's length-sorted batches, and which
    few rows were drawn would swing the rate (by 50% seen on decoder-base). A slow model's
    sample still fills one batch of `batch` rows where that pass stays within
    `FULL_BATCH_PASS_S`: the 1B decoder's 2-row batches ran 25% faster per row than the
    8-row batches of its job, each padded to its longest row."""
    per_row = max(per_row_s, 1e-9)
    rows = int(PASS_S / per_row)
    if rows < FEW_ROWS:
        rows = min(FEW_ROWS, max(rows, int(LONG_PASS_S / per_row)))
    rows = max(rows, min(batch, int(FULL_BATCH_PASS_S / per_row)))
    return max(2, min(most, rows))


def _child(conn: Connection, req: ProfileRequest, threads: int, spawned: float, ranks: int = 1) -> None:
    """One measuring process: load, report ready, wait for 'go', time each batch size. A
    pass is what a worker does with a block: read the rows, run them, write a part. Without
    `req.rows` the process first times one row and sizes the sample from it (`sample_rows`).
    `ranks` > 1: the process is rank 0 of a tensor-parallel group of that many ranks."""
    try:
        from ..models.base import StageTimer, concat_columns, run_block
        from ..worker.process import limit_threads, peak_rss

        limit_threads(threads)
        import numpy as np

        from ..data.sink import write_part
        from ..data.sources import open_source
        from ..models.families import load_runner, parse_model
        from ..models.images import with_image_defaults
        from ..worker.replica import read_inputs

        spec = parse_model(req.model)
        if req.generation is not None:
            spec = replace(spec, generation=req.generation)
        source = open_source(req.input, req.input_format)
        if source.num_rows == 0:
            raise ModelError(f"{req.input}: no rows to profile the model on")
        group = None
        if ranks > 1:  # imported only here: a lone worker's start-up does not pay for it
            from ..worker.tensor import TensorParallelRunner

            group = TensorParallelRunner(spec, ranks, threads)
        runner: Runner = with_image_defaults(group or load_runner(spec, threads), spec,
                                             source.format == "images")
        binding = runner.bind(source.columns, req.column)
        tokens: list[float] = []  # generation: the mean tokens generated per row, each pass

        def one_pass(blocks: list[Block], batch_size: int, out_dir: str) -> None:
            inputs = concat_columns([read_inputs(source, b, binding) for b in blocks])
            engine = getattr(runner, "engine", None)
            if engine is not None:  # a generation runner: batch size = running sequences
                engine.max_running = batch_size
            outputs = run_block(runner, inputs, batch_size, StageTimer())
            if "completion_tokens" in outputs:
                tokens.append(float(np.mean(outputs["completion_tokens"])))
            write_part(out_dir, 0, np.arange(sum(b.rows for b in blocks), dtype=np.int64), outputs)

        with tempfile.TemporaryDirectory(prefix="distinfer-profile-") as out_dir:
            first = _sample_blocks(source, 1)
            one_pass(first, 1, out_dir)  # first-call costs
            startup = time.time() - spawned
            rows = req.rows
            sizing = not rows  # the first measuring process: it also measures the sample's length
            if not rows and req.generation is not None:  # every measured count running at once
                rows = min(req.sample, max(req.batch_sizes))
            if not rows:
                t = time.perf_counter()
                one_pass(first, 1, out_dir)
                asked = req.batch_sizes
                full = min((b for b in asked if b >= FULL_BATCH_LEAST), default=max(asked))
                rows = sample_rows(time.perf_counter() - t, req.sample, full)
            blocks = _sample_blocks(source, rows)
            rows = sum(b.rows for b in blocks)
            # a batch size over the sample's rows runs the sample as one batch, as the
            # largest such size does: measured once
            sizes = sorted({min(b, rows) for b in req.batch_sizes}) if req.generation is None else []
            for b in sizes:  # every batch shape's first calls (oneDNN builds per shape)
                one_pass(blocks, b, out_dir)
            tokens.clear()
            conn.send(("ready", startup, rows))
            conn.recv()  # go
            timed: dict[int, float] = {}
            for b in sizes or req.batch_sizes:
                passes, start = 0, time.perf_counter()
                while passes == 0 or time.perf_counter() - start < MIN_SECONDS:
                    one_pass(blocks, b, out_dir)
                    passes += 1
                timed[b] = passes * rows / (time.perf_counter() - start)
            rates = [(b, timed[b if b in timed else min(b, rows)]) for b in req.batch_sizes]
            length = 0  # the later processes' would be the same: only the first reads it
            if sizing:
                inputs = concat_columns([read_inputs(source, b, binding) for b in blocks])
                length = padded_length(runner.prepare(inputs, min(LENGTH_BATCH, rows)).batches)
        if group is not None:
            group.close()  # its rank processes end before this one answers
        conn.send(("done", rates, peak_rss(), sum(tokens) / len(tokens) if tokens else 0.0, length))
    except BaseException as exc:  # reported to the parent, which raises it with its message
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def padded_length(batches: list[Any]) -> int:
    """Tokens per row as `batches` of a text model pad them (rows-weighted mean of the token
    ids' second axis), or 0 when the batches hold no 2-D integer array first."""
    rows = tokens = 0
    for batch in batches:
        first = batch
        while isinstance(first, (tuple, list, dict)) and first:
            first = next(iter(first.values())) if isinstance(first, dict) else first[0]
        shape: tuple[int, ...] = tuple(getattr(first, "shape", ()))
        dtype = str(getattr(first, "dtype", ""))
        if len(shape) != 2 or "int" not in dtype:
            return 0
        rows, tokens = rows + shape[0], tokens + shape[0] * shape[1]
    return round(tokens / rows) if rows else 0


def _measure(
    req: ProfileRequest, processes: int, threads: int, ranks: int = 1
) -> tuple[list[Rate], float, int, int, float, int]:
    """`processes` processes at once: their mean rates, the first's start-up s, the largest
    RSS, the rows of the sample, (generation) the mean tokens generated per row and the
    sample's padded tokens per row (0: not a text model). `ranks`
    > 1: one tensor-parallel group of that many ranks (rank 0 starts the others, so it is
    not a daemon; it ends them before it answers)."""
    set_worker_environment()  # measured as workers run
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(processes):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(child, req, threads, time.time(), ranks), daemon=ranks == 1)
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    try:
        ready = [_expect(conn, "ready") for conn in pipes]
        for conn in pipes:
            conn.send("go")
        results = [_expect(conn, "done") for conn in pipes]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    rates = []
    for i, b in enumerate(req.batch_sizes):
        mean = sum(r[0][i][1] for r in results) / processes
        rates.append(Rate(threads, b, mean, processes, ranks))
    tokens, length = results[0][2], results[0][3]
    return rates, min(r[0] for r in ready), max(r[1] for r in results), int(ready[0][1]), tokens, length


def _expect(conn: Connection, kind: str) -> list[Any]:
    if not conn.poll(900):
        raise DistinferError("profiling: a measuring process gave no answer within 900 s")
    try:
        message = conn.recv()
    except EOFError:
        raise DistinferError(
            "profiling: a measuring process died; run the model once with 'distinfer bench' to see why"
        ) from None
    if message[0] == "error":
        raise ModelError(f"profiling {message[1]}")
    return list(message[1:])


def _layers_child(conn: Connection, req: ProfileRequest) -> None:
    try:
        from ..worker.process import limit_threads

        limit_threads(1)
        from ..models.families import parse_model

        spec = parse_model(req.model)
        costs = spec.family.layer_costs(spec, req.layer_batch, req.seq_len)
        small = [] if req.layer_batch == 1 else spec.family.layer_costs(spec, 1, req.seq_len)
        lengths = LAYER_SEQ_LENS if spec.family.has_tokens else ()  # its layers' times depend on them
        by_seq = [(n, tuple(c.seconds for c in spec.family.layer_costs(spec, req.layer_batch, n)))
                  for n in lengths]  # fmt: skip
        conn.send(("done", [(c.name, c.seconds, c.weight_bytes, c.activation_bytes) for c in costs],
                   [(1, tuple(c.seconds for c in small))] if small else [], by_seq))  # fmt: skip
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _layers(req: ProfileRequest) -> tuple[list[Any], list[Any], list[Any]]:
    """The layers at `layer_batch` rows, each layer's seconds at a batch of 1, and (a text
    model) at `layer_batch` rows of each of `LAYER_SEQ_LENS` tokens."""
    set_worker_environment()  # measured as workers run
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_layers_child, args=(child, req), daemon=True)
    proc.start()
    child.close()
    try:
        costs, by_batch, by_seq = _expect(parent, "done")
        return list(costs), list(by_batch), list(by_seq)
    finally:
        proc.join(timeout=30)


def get_profile(req: ProfileRequest, refresh: bool = False, measure: bool = True) -> Profile | None:
    """The cached profile of `req.model` on this machine, measured first when there is none.
    With `measure` False nothing is measured: the exact cached profile, else the one last
    measured for the same model (and generation settings) on this machine over another
    input, else None."""
    from ..models.families import parse_model

    spec = parse_model(req.model)
    machine = this_machine().nodes[0]
    key = machine_key(machine.cores, machine.memory)
    settings = {"batch_sizes": req.batch_sizes, "sample": req.sample, "input": os.path.abspath(req.input),
                "pass": "spread sample of a full batch, read + run + write",
                **({"generation": asdict(req.generation)} if req.generation else {})}  # fmt: skip
    path = profile_path(key, spec.family.identity(spec), settings)
    cached = None if refresh else Profile.load(path)
    if cached is not None:
        return cached
    if not measure:
        return Profile.load(_latest_path(key, spec, req.generation))
    started = time.monotonic()
    log.info("profiling %s on this machine (once; cached in %s)", req.model, path)
    alone, startup, rss, rows, tokens, length = _measure(req, 1, 1)
    req = replace(req, rows=rows)  # every later measurement over the same sample
    rates = list(alone)
    if machine.cores > 1:
        rates += _measure(req, 1, machine.cores)[0]
        rates += _measure(req, machine.cores, 1)[0]
    family = spec.family
    strategies = ["data"]
    layers: list[Any] = []
    by_batch: list[Any] = []
    by_seq: list[Any] = []
    if family.no_stages is None and not family.generates:
        try:
            layers, by_batch, by_seq = _layers(req)
            strategies.append("pipeline")
        except ModelError as exc:
            log.info("no per-layer profile of %s: %s", req.model, exc)
    ranks = tuple(
        k
        for k in (2, 4)
        if k <= machine.cores and not family.generates and family.shard_problem(spec, k) is None
    )
    if ranks:
        strategies.append("tensor")
        for k in ranks:  # one group of k one-thread ranks: what sharding really gets
            rates += _measure(req, 1, 1, ranks=k)[0]
    weights = family.weight_bytes(spec)
    from ..planning.cuts import LayerCost

    profile = Profile(
        model=req.model, machine=key, cores=machine.cores, rates=tuple(rates),
        layers=tuple(LayerCost(*c) for c in layers), layer_batch=req.layer_batch,
        layer_seq_len=req.seq_len, seq_len=length,
        layers_by_batch=tuple((int(b), tuple(secs)) for b, secs in by_batch),
        layers_by_seq=tuple((int(n), tuple(secs)) for n, secs in by_seq),
        weight_bytes=sum(weights) if weights else sum(c[2] for c in layers), worker_rss=rss,
        startup_s=startup, links=measure_links(), strategies=tuple(strategies), tensor_ranks=ranks,
        tokens_per_row=tokens,
    )  # fmt: skip
    profile.save(path)
    profile.save(_latest_path(key, spec, req.generation))
    log.info("profiled %s in %.0f s", req.model, time.monotonic() - started)
    return profile


def latest_profile(spec: ModelSpec) -> Profile | None:
    """The last profile measured of the model `spec` (with its generation settings) on this
    machine, over any input; None when there is none."""
    machine = this_machine().nodes[0]
    return Profile.load(_latest_path(machine_key(machine.cores, machine.memory), spec, spec.generation))


def _latest_path(machine: str, spec: ModelSpec, generation: GenerationOptions | None) -> Path:
    """Where the last profile measured of a model on this machine is kept, whatever its
    input, for a run that plans without measuring (the default `--strategy auto`)."""
    gen = {k: getattr(generation, k) for k in ("max_tokens", "ignore_eos", "dtype")} if generation else None
    return profile_path(machine, spec.family.identity(spec), {"generation": gen}, folder="latest")
