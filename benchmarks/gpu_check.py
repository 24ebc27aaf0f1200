"""A short check for a machine with a CUDA GPU (a few minutes; never needed by the tests).

1. The `decoder` runner on the GPU equals the CPU within float32-on-GPU tolerances.
2. `minilm` on the GPU equals the CPU (skipped when the weights package is missing), and
   a BERT of minilm's shapes with seeded weights runs packed batches (random lengths) on the
   GPU equal to its padded forward and to the CPU.
3. `distinfer run --device cuda` end to end with 1 and 2 workers sharing the GPU, and with
   a 2-stage pipeline (stages share the GPU when there is one; stage i on GPU i % count):
   every row exactly once, outputs equal to the in-process GPU runner, throughput printed.
4. Tensor parallel with 2 ranks: run when there are 2 GPUs, else the refusal is checked.

    PYTHONPATH=src python benchmarks/gpu_check.py [--rows 2000] [--size base]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "kjv-verses.txt"


def timed_block(runner: object, texts: list[str]) -> tuple[dict[str, np.ndarray], float]:
    from distinfer.models.base import StageTimer, run_block

    run_block(runner, {"text": texts[:64]}, 64, StageTimer())  # type: ignore[arg-type]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = run_block(runner, {"text": texts}, 64, StageTimer())  # type: ignore[arg-type]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, len(texts) / (time.perf_counter() - start)


def check_packed_bert(device: str = "cuda") -> bool:
    """Packed BERT batches on the GPU: equal to the padded forward there and to the CPU."""
    from distinfer.models.bert import BertConfig, BertEncoder
    from distinfer.models.minilm import mean_pool
    from distinfer.models.packing import Packing

    torch.manual_seed(0)
    model = BertEncoder(BertConfig(30522, 384, 6, 12, 1536, 512, 2, 1e-12)).eval()
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.05)
    lengths = torch.randint(2, 90, (48,))
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 30522, (48, width)) * mask
    out = {}
    with torch.inference_mode():
        for where in ("cpu", device):
            m, i, k = model.to(where), ids.to(where), mask.to(where)
            packing = Packing.from_mask(k)
            packed = torch.nn.functional.normalize(packing.mean_rows(m.forward_packed(i, packing)), dim=1)
            out[where] = packed.cpu().numpy()
            out[where + " padded"] = mean_pool(m(i, k, torch.zeros_like(i)), k)["embedding"]
    vs_padded = float(np.abs(out[device] - out[device + " padded"]).max())
    vs_cpu = float(np.abs(out[device] - out["cpu"]).max())
    ok = vs_padded < 1e-5 and vs_cpu < 1e-4
    print(f"packed BERT (minilm shapes, seeded) on {device}: max |diff| vs padded {vs_padded:.2e}, vs cpu "
          f"{vs_cpu:.2e}  {'PASS' if ok else 'FAIL'}")
    return ok


def check_run(size: str, corpus: Path, out: Path, extra: list[str], label: str, want: np.ndarray,
              n_rows: int, expect_refusal: bool) -> bool:
    """`distinfer run --device cuda` with `extra`; every row once, equal to the in-process runner."""
    import pyarrow.dataset as ds

    cmd = [sys.executable, "-m", "distinfer.cli", "run", "--model", f"decoder-{size}", "--input", str(corpus),
           "--output", str(out), "--device", "cuda", "--threads-per-worker", "2", "--no-progress",
           *([] if "--strategy" in extra else ["--strategy", "data"]), *extra]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if expect_refusal:
        ok = result.returncode != 0 and "GPU" in result.stderr and not out.exists()
        verdict = "PASS" if ok else "FAIL"
        print(f"{label}: exit {result.returncode}, {result.stderr.strip()[-300:]}  {verdict}")
        return ok
    if result.returncode != 0:
        print(f"distinfer run --device cuda, {label}: FAIL\n{result.stderr[-2000:]}")
        return False
    table = ds.dataset(str(out)).to_table().sort_by("row")
    rows = table.column("row").to_numpy()
    hidden = np.asarray(table.column("hidden").to_pylist(), dtype=np.float32)
    once = bool(np.array_equal(rows, np.arange(n_rows)))
    diff = float(np.abs(hidden - want).max()) if once else float("inf")
    ok = once and diff < 1e-3
    print(f"distinfer run --device cuda, {label}: rows exactly once {once}, max |diff| vs in-process "
          f"{diff:.2e}, {n_rows / wall:.1f} rows/s with start-up  {'PASS' if ok else 'FAIL'}")
    for line in result.stderr.strip().splitlines():
        if any(word in line for word in ("rows/s", "stage", "rank", "bubble")):
            print("   " + line.strip())
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--size", default="base")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    torch.backends.cuda.matmul.allow_tf32 = False
    from distinfer.models.decoder import DecoderRunner

    texts = CORPUS.read_text(encoding="utf-8").splitlines()[: args.rows]
    failed = False
    cpu, cpu_rate = timed_block(DecoderRunner(args.size, device="cpu"), texts[:256])
    gpu_runner = DecoderRunner(args.size, device="cuda")
    gpu, _ = timed_block(gpu_runner, texts[:256])
    diff = float(np.abs(cpu["hidden"] - gpu["hidden"]).max())
    agree = float((cpu["next_token"] == gpu["next_token"]).mean())
    ok = diff < 1e-3 and agree >= 0.99
    failed |= not ok
    print(f"decoder-{args.size} cuda vs cpu: max |diff| {diff:.2e}, next_token agreement {agree:.1%}, "
          f"cpu {cpu_rate:.1f} rows/s  {'PASS' if ok else 'FAIL'}")
    full, gpu_rate = timed_block(gpu_runner, texts)
    print(f"decoder-{args.size} one process on the GPU: {gpu_rate:.1f} rows/s")

    try:
        from distinfer.models.minilm import MiniLMRunner

        m_cpu, _ = timed_block(MiniLMRunner(device="cpu"), texts[:256])
        m_gpu, m_rate = timed_block(MiniLMRunner(device="cuda"), texts)
        diff = float(np.abs(m_cpu["embedding"] - m_gpu["embedding"][:256]).max())
        ok = diff < 1e-4
        failed |= not ok
        print(f"minilm cuda vs cpu: max |diff| {diff:.2e}, {m_rate:.1f} rows/s on the GPU  "
              f"{'PASS' if ok else 'FAIL'}")
    except Exception as exc:  # the weights package may be missing on this machine
        print(f"minilm: SKIP ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")

    failed |= not check_packed_bert()

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "in.txt"
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
        runs = [("data, 1 worker", ["--workers", "1"]), ("data, 2 workers", ["--workers", "2"]),
                ("pipeline, 2 stages", ["--workers", "1", "--strategy", "pipeline", "--stages", "2"])]
        tensor = ["--workers", "1", "--strategy", "tensor", "--tensor-parallel", "2"]
        if torch.cuda.device_count() >= 2:
            runs.append(("tensor, 2 ranks", tensor))
        else:
            runs.append(("tensor, 2 ranks (refused: one GPU per rank)", tensor))
        for i, (label, extra) in enumerate(runs):
            expect_refusal = "refused" in label
            failed |= not check_run(args.size, corpus, Path(tmp) / f"out{i}", extra, label, full["hidden"],
                                    len(texts), expect_refusal)
    print("FAIL" if failed else "ALL PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
