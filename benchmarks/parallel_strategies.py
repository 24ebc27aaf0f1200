"""Data, pipeline and tensor parallelism side by side, on `minilm` and on a `decoder`.

For each model, in one run on this machine (nothing else should be running):
  throughput  `distinfer run` over the same verses with
              data     2 replicas x 1 thread (a whole model each)
              pipeline 1 replica of 2 stages x 1 thread
              tensor   1 replica of 2 ranks x 1 thread
              (rows/s once the first worker is ready; each job in its own driver process)
  latency     one batch of --batch-size rows, median of --repeats, in this process:
              single   the whole model, 1 thread (also what one data-parallel replica takes)
              pipeline 2 stages x 1 thread (one batch crosses both stages: no overlap)
              tensor   2 ranks x 1 thread
  bubble      the pipeline job's measured bubble next to (p-1)/(m+p-1)
Targets (2-core machine): pipeline throughput >= 0.85 x data; tensor latency <= 0.7 x
single; measured bubble within 5 points of the theoretical one.

Then (unless --skip-big) the 1.24B-parameter `decoder-1b` under `--worker-memory 2GiB`:
data parallelism is refused, the pipeline runs, and every stage's peak memory is reported
against the limit.

    python benchmarks/parallel_strategies.py [--rows 1000] [--models minilm,decoder-small] [--skip-big]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "kjv-verses.txt"

JOB = r"""
import json, sys
import distinfer
options = json.loads(sys.argv[1])
report = distinfer.run(**options)
w = report.worker_stats[0]
g = w.group
print(json.dumps({
    "rows": report.rows, "steady": report.steady_throughput, "wall_s": report.wall_s,
    "startup_s": report.startup_s,
    "bubble": g.measured_bubble if g else None, "ideal_bubble": g.theoretical_bubble if g else None,
    "busy": [b / g.wall_s for b in g.busy_s] if g else None,
    "comm": [c / g.wall_s for c in g.comm_s] if g else None,
    "peak_rss": g.peak_rss if g else None,
}))
"""


def job(options: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", JOB, json.dumps(options)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"job {options} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def throughputs(model: str, corpus: Path, out: Path, batch_size: int) -> dict[str, dict[str, Any]]:
    common = dict(model=model, input=str(corpus), threads_per_worker=1, batch_size=batch_size, overwrite=True)
    layouts = {
        "data": dict(workers=2, strategy="data"),
        "pipeline": dict(workers=1, strategy="pipeline", stages=2),
        "tensor": dict(workers=1, strategy="tensor", tensor_parallel=2),
    }
    results = {}
    for name, layout in layouts.items():
        results[name] = job({**common, **layout, "output": str(out / f"{model}-{name}")})
        print(f"  {model} {name}: {results[name]['steady']:.1f} rows/s once started", file=sys.stderr)
    return results


def _median_latency(runner: Any, batch: Any, repeats: int) -> float:
    runner.forward_many([batch])  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        runner.forward_many([batch])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def latencies(model: str, lines: list[str], batch_size: int, repeats: int) -> dict[str, float]:
    from distinfer.models import load_runner, parse_model
    from distinfer.planning import balanced_cut
    from distinfer.worker.pipeline import PipelineRunner
    from distinfer.worker.tensor import TensorParallelRunner

    spec = parse_model(model)
    texts = {"text": lines[:batch_size]}
    staged = spec.family.staged(spec)
    # The same rows as one batch for every runner: the stages' longest-first batch of the block
    # (rows of near-equal length, so the whole model, which runs batches packed, does no less work).
    batch = staged.preparer("cpu").prepare(texts, batch_size).batches[0]
    single = load_runner(spec, 1)
    out = {"single": _median_latency(single, batch, repeats)}
    del single
    cut = balanced_cut(staged.layer_costs(batch_size, 64), 2, None)
    pipe = PipelineRunner(staged, tuple((s.start, s.stop) for s in cut.stages), 1)
    out["pipeline"] = _median_latency(pipe, batch, repeats)
    pipe.close()
    tensor = TensorParallelRunner(spec, 2, 1)
    out["tensor"] = _median_latency(tensor, batch, repeats)
    tensor.close()
    return out


def big_decoder(corpus: Path, out: Path) -> dict[str, Any]:
    common = dict(model="decoder-1b", input=str(corpus), worker_memory="2GiB", batch_size=4, overwrite=True)
    refused = subprocess.run(
        [sys.executable, "-m", "distinfer.cli", "run", "--model", "decoder-1b", "--input", str(corpus),
         "--output", str(out / "1b-data"), "--worker-memory", "2GiB", "--strategy", "data"],
        capture_output=True, text=True)
    t = time.perf_counter()
    result = job({**common, "workers": 1, "strategy": "pipeline", "threads_per_worker": 1,
                  "output": str(out / "1b-pipe")})
    result["seconds"] = time.perf_counter() - t
    result["data_refused"] = refused.returncode != 0 and "--strategy pipeline" in refused.stderr
    result["refusal"] = refused.stderr.strip().splitlines()[-1] if refused.stderr.strip() else ""
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1000, help="verses per throughput job")
    parser.add_argument("--models", default="minilm,decoder-small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="batches timed per latency figure")
    parser.add_argument("--skip-big", action="store_true", help="skip the 1.24B decoder under 2 GiB")
    args = parser.parse_args()

    from distinfer.worker.process import limit_threads

    limit_threads(1)
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "verses.txt"
        corpus.write_text("\n".join(lines[: args.rows]) + "\n", encoding="utf-8")
        for model in filter(None, args.models.split(",")):
            print(f"{model}: throughput", file=sys.stderr)
            runs = throughputs(model, corpus, work, args.batch_size)
            print(f"{model}: latency of one batch of {args.batch_size}", file=sys.stderr)
            lat = latencies(model, lines, args.batch_size, args.repeats)
            pipe = runs["pipeline"]
            results[model] = {
                "throughput": {k: v["steady"] for k, v in runs.items()},
                "latency_s": lat,
                "pipeline_vs_data": runs["pipeline"]["steady"] / runs["data"]["steady"],
                "tensor_vs_data": runs["tensor"]["steady"] / runs["data"]["steady"],
                "tensor_latency_vs_single": lat["tensor"] / lat["single"],
                "bubble": {"measured": pipe["bubble"], "theoretical": pipe["ideal_bubble"],
                           "busy": pipe["busy"], "comm": pipe["comm"]},
                "tensor_ranks": {"busy": runs["tensor"]["busy"], "comm": runs["tensor"]["comm"]},
            }
        if not args.skip_big:
            small = work / "short.txt"
            small.write_text("\n".join(lines[:32]) + "\n", encoding="utf-8")
            print("decoder-1b: pipeline under --worker-memory 2GiB", file=sys.stderr)
            results["decoder-1b"] = big_decoder(small, work)

    print(json.dumps(results, indent=2))
    print()
    ok = True
    for model, r in results.items():
        if model == "decoder-1b":
            peaks = ", ".join(f"{p / 2**30:.2f}" for p in r["peak_rss"])
            within = all(p <= 2 * 2**30 for p in r["peak_rss"])
            ok &= within and r["data_refused"]
            print(f"decoder-1b: data refused: {r['data_refused']}; pipeline of {len(r['peak_rss'])} stages, "
                  f"{r['rows']} rows in {r['seconds']:.0f} s; peak memory per stage (GiB): {peaks} "
                  f"{'<=' if within else '>'} 2 GiB")
            continue
        t, lat, b = r["throughput"], r["latency_s"], r["bubble"]
        checks = {
            "pipeline >= 0.85 x data": r["pipeline_vs_data"] >= 0.85,
            "tensor latency <= 0.7 x single": r["tensor_latency_vs_single"] <= 0.7,
            "bubble within 5 points": abs(b["measured"] - b["theoretical"]) <= 0.05,
        }
        ok &= all(checks.values())
        print(f"{model}: rows/s data {t['data']:.1f}, pipeline {t['pipeline']:.1f}, "
              f"tensor {t['tensor']:.1f}; pipeline/data {r['pipeline_vs_data']:.3f}")
        print(f"{model}: latency of one batch single {lat['single'] * 1e3:.0f} ms, pipeline "
              f"{lat['pipeline'] * 1e3:.0f} ms, tensor {lat['tensor'] * 1e3:.0f} ms; tensor/single "
              f"{r['tensor_latency_vs_single']:.3f}")
        print(f"{model}: bubble measured {b['measured']:.1%} vs theoretical {b['theoretical']:.1%}")
        print("  " + "; ".join(f"{k}: {'ok' if v else 'MISSED'}" for k, v in checks.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
