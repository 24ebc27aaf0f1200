"""llama.cpp peer for benchmarks/generate.py, through llama-cpp-python (built by build_llama_cpp.sh).

Run by generate.py with the peer venv's python (benchmarks/.peers/venv); prints one JSON line:
    {"peer": "llama.cpp", "runs": [{"api": "generate" | "batched", "batch": B, ...}, ...]}

Two ways of generating exactly N greedy tokens per prompt, end-of-generation tokens masked out
(as transformers' min_new_tokens does), every prompt given as token ids (BOS included):
  generate  the high-level API, one sequence: `Llama(...).generate(ids, temp=0)` driven token by
            token for N tokens (the KV cache is reset between runs, so no prefix is reused)
  batched   the low-level API, B sequences in one context (n_seq_max=B, n_ctx >= B*(P+N)): one
            `llama_decode` of all B*P prompt tokens (logits only at each prompt's last token),
            then N-1 `llama_decode`s of B tokens, one per sequence id, each sequence's next token
            the argmax of `llama_get_logits_ith`
Each run: an untimed warm-up of 2 tokens, then --repeats timed runs, keeping the fastest. Time to
first token: the prefill of the whole batch and its first greedy pick. `peak_rss` is this
process's ru_maxrss after the run (so it includes the runs before it).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import time
from typing import Any

import llama_cpp as L
import numpy as np

# llama.cpp's log, silenced (kept referenced: the C side calls it for the life of the process)
_QUIET = L.llama_log_callback(lambda level, text, user_data: None)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def figures(b: int, p: int, n: int, wall: float, ttft: float) -> dict[str, Any]:
    return {
        "batch": b,
        "prompt_tokens": p,
        "new_tokens": n,
        "wall_s": wall,
        "ttft_s": ttft,
        "gen_tok_s": b * n / wall,
        "decode_tok_s": b * (n - 1) / (wall - ttft) if n > 1 and wall > ttft else None,
        "prompt_tok_s": b * p / ttft,
    }


def eog_tokens(model: Any) -> list[int]:
    """End-of-generation token ids (masked out of every greedy pick: EOS is ignored)."""
    vocab = L.llama_model_get_vocab(model)
    return [t for t in range(L.llama_vocab_n_tokens(vocab)) if L.llama_vocab_is_eog(vocab, t)]


def high_level(
    args: argparse.Namespace, prompts: list[list[int]], texts: list[str]
) -> tuple[dict[str, Any], int]:
    """Batch 1 through `Llama.generate`; also checks llama.cpp tokenises the texts to the same ids."""
    p, n = len(prompts[0]), args.new_tokens
    llm = L.Llama(
        model_path=args.model,
        n_ctx=p + n,
        n_batch=512,
        n_ubatch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_gpu_layers=0,
        flash_attn=args.flash_attn == "on",
        logits_all=False,
        verbose=False,
    )
    mismatches = sum(
        llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) != ids
        for t, ids in zip(texts, prompts, strict=True)
    )
    eog = eog_tokens(llm._model.model)

    def mask_eog(_ids: Any, logits: np.ndarray) -> np.ndarray:
        logits[eog] = -np.inf
        return logits

    def run(ids: list[int], new: int) -> tuple[float, float, list[int]]:
        llm.reset()  # n_tokens = 0: generate() evaluates the whole prompt again
        out: list[int] = []
        start = time.perf_counter()
        first = start
        for token in llm.generate(
            ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, logits_processor=[mask_eog]
        ):
            if not out:
                first = time.perf_counter()
            out.append(token)
            if len(out) == new:
                break
        return time.perf_counter() - start, first - start, out

    run(prompts[0], 2)  # warm-up
    wall, ttft, out = min((run(prompts[0], n) for _ in range(args.repeats)), key=lambda r: r[0])
    assert len(out) == n
    result = {
        "api": "generate",
        **figures(1, p, n, wall, ttft),
        "peak_rss": peak_rss(),
        "first_ids": out[:16],
    }
    llm.close()
    return result, mismatches


def batched(
    args: argparse.Namespace, model: Any, prompts: list[list[int]], b: int, eog: list[int]
) -> dict[str, Any]:
    p, n = len(prompts[0]), args.new_tokens
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    cp = L.llama_context_default_params()
    cp.n_ctx = b * (p + n)
    cp.n_batch = cp.n_ubatch = max(b * p, 512)
    cp.n_seq_max = b
    cp.n_threads = cp.n_threads_batch = args.threads
    cp.flash_attn_type = (
        L.LLAMA_FLASH_ATTN_TYPE_ENABLED if args.flash_attn == "on" else (L.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    )
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit(f"llama_init_from_model failed for batch {b}")
    batch = L.llama_batch_init(b * p, 0, 1)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc} (batch {b})")

    def pick(i: int) -> int:
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
        logits[eog] = -np.inf
        return int(logits.argmax())

    def run(new: int) -> tuple[float, float, list[int]]:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        start = time.perf_counter()
        decode([(prompts[s][j], j, s, j == p - 1) for s in range(b) for j in range(p)])
        nxt = [pick(s * p + p - 1) for s in range(b)]
        ttft = time.perf_counter() - start
        first_seq = [nxt[0]]
        for step in range(1, new):
            decode([(nxt[s], p + step - 1, s, True) for s in range(b)])
            nxt = [pick(s) for s in range(b)]
            first_seq.append(nxt[0])
        return time.perf_counter() - start, ttft, first_seq

    try:
        run(2)  # warm-up
        wall, ttft, out = min((run(n) for _ in range(args.repeats)), key=lambda r: r[0])
    finally:
        L.llama_batch_free(batch)
        n_ctx = L.llama_n_ctx(ctx)
        L.llama_free(ctx)
    return {
        "api": "batched",
        **figures(b, p, n, wall, ttft),
        "n_ctx": n_ctx,
        "peak_rss": peak_rss(),
        "first_ids": out[:16],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the .gguf file")
    parser.add_argument("--prompts", required=True, help='JSON file: {"ids": [[...], ...], "texts": [...]}')
    parser.add_argument("--batch-sizes", default="8,32", help="for the low-level batched runs")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--flash-attn", choices=["on", "off"], default="on")
    parser.add_argument("--skip-generate", action="store_true", help="leave out the high-level batch-1 run")
    args = parser.parse_args()
    with open(args.prompts, encoding="utf-8") as f:
        data = json.load(f)
    prompts, texts = data["ids"], data["texts"]

    L.llama_log_set(_QUIET, ctypes.c_void_p(0))
    L.llama_backend_init()
    runs: list[dict[str, Any]] = []
    mismatches = None
    if not args.skip_generate:
        result, mismatches = high_level(args, prompts, texts)
        runs.append(result)
    t = time.perf_counter()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(args.model.encode(), mp)
    if not model:
        raise SystemExit(f"could not load {args.model}")
    load_s = time.perf_counter() - t
    eog = eog_tokens(model)
    for b in sorted(int(x) for x in args.batch_sizes.split(",") if x):
        if b > len(prompts):
            raise SystemExit(f"batch {b} needs {b} prompts, got {len(prompts)}")
        runs.append(batched(args, model, prompts, b, eog))
    L.llama_model_free(model)
    print(
        json.dumps(
            {
                "peer": "llama.cpp",
                "version": L.__version__,
                "threads": args.threads,
                "load_s": load_s,
                "flash_attn": args.flash_attn,
                "eog_tokens": eog,
                "tokenizer_mismatches": mismatches,
                "system_info": L.llama_print_system_info().decode(errors="replace").strip(),
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
