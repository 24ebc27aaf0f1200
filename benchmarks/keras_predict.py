"""A Keras model over 20,000 rows: `model.predict()`, `MirroredStrategy` + `predict()`, and
distinfer with 2 workers, in one run.

The model: an MLP over 256 float features, Dense 1024 -> 1024 -> 512 (ReLU) -> 64 (the
embedding written), 1.87M parameters, about 3.7 MFLOP a row, seeded weights, saved as a
`.keras` file. Why this one: it is the shape of a tabular or embedding tower (a ranking model's
user or item tower), and its rows are whole matrix products that TensorFlow's oneDNN kernels
spread well over threads, so a single `predict()` on all cores is at its best. A tiny model
would flatter distinfer (`predict()`'s per-step cost would dominate); a convolution net is
not what tabular work runs.

Contenders, each in a fresh subprocess (so that no thread setting leaks), one after another,
each reading the same `.npy` input and writing its outputs as Parquet:
  P. `model.predict(x, batch_size=B)` in one process on all cores (TensorFlow's own pools)
  M. `tf.distribute.MirroredStrategy` over the CPU devices TensorFlow sees (one, /CPU:0;
     `--mirrored-cpus N` splits the CPU into N logical devices), the model loaded in
     `strategy.scope()`, then `predict` as in P: the classic data-parallel example
  D. `distinfer run --workers 2` (the cores divided among the workers, 1 thread each here)
The same batch size B (`--batch-size`, default 256) for all three.

Throughput "once started" leaves out the constant costs that a long job amortizes: importing
TensorFlow and loading the model in each process, and for D its workers' shutdown. P and M
count from the model loaded and warmed up (one batch) to their Parquet file written, reading
the input included. D counts from its first block committed to its last (the part files'
times), over the rows after the first block: both workers' steady rate. The whole command
(process start to exit, everything included) is reported beside it, and D's own report figure
(`steady_throughput`, from the first worker ready to the job's end, shutdown included).
Target: D >= 1.2 x the better of P and M, once started. Every output is checked against P's.

    python benchmarks/keras_predict.py [--rows 20000] [--batch-size 256] [--mirrored-cpus 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds

QUIET = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

BUILD = r"""
import sys
import numpy as np
import keras
keras.utils.set_random_seed(0)
x = keras.Input((256,), name="features")
h = x
for width in (1024, 1024, 512):
    h = keras.layers.Dense(width, activation="relu")(h)
model = keras.Model(x, keras.layers.Dense(64, name="embedding")(h))
model.save(sys.argv[1])
np.save(sys.argv[2], np.random.default_rng(0).standard_normal((int(sys.argv[3]), 256)).astype(np.float32))
"""

PREDICT = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
import keras, tensorflow as tf
model_file, input_file, out_file, batch, mode, cpus = sys.argv[1:7]
batch, cpus = int(batch), int(cpus)
replicas = 1
if mode == "mirrored":
    if cpus > 1:
        tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                                   [tf.config.LogicalDeviceConfiguration()] * cpus)
    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        model = keras.saving.load_model(model_file, compile=False)
else:
    model = keras.saving.load_model(model_file, compile=False)
model.predict(np.load(input_file, mmap_mode="r")[:batch], batch_size=batch, verbose=0)  # warm-up
t = time.perf_counter()
x = np.load(input_file)
y = model.predict(x, batch_size=batch, verbose=0)
embedding = pa.FixedSizeListArray.from_arrays(y.reshape(-1), y.shape[1])
pq.write_table(pa.table({"row": np.arange(len(y)), "embedding": embedding}), out_file)
run_s = time.perf_counter() - t
print(json.dumps({"rows": len(y), "started_s": t - t0, "run_s": run_s, "replicas": replicas,
                  "threads": tf.config.threading.get_intra_op_parallelism_threads()}))
"""


def predict(model: Path, data: Path, out: Path, batch: int, mode: str, cpus: int) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PREDICT, str(model), str(data), str(out), str(batch), mode,
                           str(cpus)], capture_output=True, text=True, env=QUIET)
    command_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "steady": result["rows"] / result["run_s"], "command_s": command_s}


def distinfer(model: Path, data: Path, out: Path, batch: int, workers: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "distinfer.cli", "run", "--model", str(model), "--input", str(data),
           "--output", str(out), "--workers", str(workers), "--batch-size", str(batch), "--strategy", "data",
           "--overwrite", "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    command_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"distinfer failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "_report.json").read_text())
    manifest = json.loads((out / "_manifest.json").read_text())
    parts = sorted((p.stat().st_mtime_ns, int(p.name[5:11])) for p in out.glob("part-*.parquet"))
    first, last = parts[0], parts[-1]
    after_first = report["rows"] - manifest["committed"][str(first[1])]
    window_s = (last[0] - first[0]) / 1e9
    return {"rows": report["rows"], "steady": after_first / window_s if window_s > 0 else float("nan"),
            "report_steady": report["steady_throughput"], "startup_s": report["startup_s"],
            "threads": report["threads_per_worker"], "blocks": len(parts), "command_s": command_s,
            "worker_rows": [w["rows"] for w in report["worker_stats"]]}


def outputs(out: Path) -> np.ndarray:
    table = ds.dataset(str(out)).to_table().sort_by("row")
    return np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mirrored-cpus", type=int, default=1,
                        help="logical CPU devices for MirroredStrategy (default: the one TensorFlow sees)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, data = folder / "mlp.keras", folder / "rows.npy"
        subprocess.run([sys.executable, "-c", BUILD, str(model), str(data), str(args.rows)], env=QUIET,
                       check=True, capture_output=True)
        p = predict(model, data, folder / "p.parquet", args.batch_size, "predict", 1)
        m = predict(model, data, folder / "m.parquet", args.batch_size, "mirrored", args.mirrored_cpus)
        d = distinfer(model, data, folder / "d", args.batch_size, args.workers)
        want = outputs(folder / "p.parquet")
        diffs = {k: float(np.abs(outputs(path) - want).max()) for k, path in
                 (("M", folder / "m.parquet"), ("D", folder / "d"))}
    print(f"{args.rows} rows, MLP 256-1024-1024-512-64 (.keras), batch size {args.batch_size}, "
          f"{os.cpu_count()} cores")
    print(f"{'':44s} {'once started':>14s} {'D / this':>9s} {'whole command':>14s} {'D / this':>9s}")
    rows = [("P predict(), all cores (TensorFlow's own pools)", p),
            (f"M MirroredStrategy + predict ({m['replicas']} replica(s))", m),
            (f"D distinfer, {args.workers} workers x {d['threads']} thread(s)", d)]
    for name, r in rows:
        whole = r["rows"] / r["command_s"]
        print(f"{name:44s} {r['steady']:9.0f} r/s {d['steady'] / r['steady']:9.2f} "
              f"{r['command_s']:7.1f} s ({whole:5.0f} r/s) {d['rows'] / d['command_s'] / whole:5.2f}")
    print(f"D: report steady_throughput {d['report_steady']:.0f} rows/s (first worker ready after "
          f"{d['startup_s']:.1f} s, shutdown included); {d['blocks']} blocks, rows per worker "
          f"{d['worker_rows']}")
    print(f"largest difference from P's outputs: M {diffs['M']:.2e}, D {diffs['D']:.2e}")
    ratio = d["steady"] / max(p["steady"], m["steady"])
    ok = ratio >= 1.2
    print(f"target D >= 1.2 x max(P, M) once started: {ratio:.2f}  {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
