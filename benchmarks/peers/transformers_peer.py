"""transformers peer for benchmarks/generate.py: greedy `generate()` on the GGUF, batch by batch.

Run by generate.py in its own process (the main venv's python); prints one JSON line:
    {"peer": "transformers", "load_s": ..., "runs": [{"batch": B, ...}, ...]}

The model is `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)` (the GGUF
de-quantised to float32), `torch.set_num_threads(--threads)`. For each batch size, ascending: the
first B prompts (token ids, all of the same length, so no padding; left padding is set all the
same) go through one untimed warm-up `generate()` of 2 tokens, then --repeats timed
`generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)`, keeping the fastest. A streamer
time-stamps the first new token (time to first token: the prefill of the whole batch and its first
greedy pick). `peak_rss` is this process's ru_maxrss after the batch: it includes the load and the
smaller batches before it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the .gguf file")
    parser.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):  # type: ignore[misc]
        """Time of the first put() after the prompt's."""

        def __init__(self) -> None:
            self.puts = 0
            self.first: float | None = None

        def put(self, value: torch.Tensor) -> None:
            self.puts += 1
            if self.puts == 2 and self.first is None:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    t = time.perf_counter()
    directory, name = os.path.split(os.path.abspath(args.model))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.pad_token_id or 0
    with open(args.prompts, encoding="utf-8") as f:
        prompts: list[list[int]] = json.load(f)
    n = args.new_tokens

    def generate(ids: torch.Tensor, new: int, streamer: BaseStreamer | None = None) -> torch.Tensor:
        out: torch.Tensor = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            min_new_tokens=new,
            max_new_tokens=new,
            pad_token_id=pad,
            streamer=streamer,
        )
        return out

    runs = []
    for b in sorted(int(x) for x in args.batch_sizes.split(",") if x):
        if b > len(prompts):
            raise SystemExit(f"batch {b} needs {b} prompts, got {len(prompts)}")
        ids = torch.tensor(prompts[:b], dtype=torch.long)
        p = ids.shape[1]
        with torch.inference_mode():
            generate(ids, 2)  # warm-up
            best = None
            for _ in range(args.repeats):
                streamer = FirstToken()
                start = time.perf_counter()
                out = generate(ids, n, streamer)
                wall = time.perf_counter() - start
                if best is None or wall < best[0]:
                    best = (wall, (streamer.first or start + wall) - start, out)
        assert best is not None
        wall, ttft, out = best
        new_tokens = out[:, p:]
        if new_tokens.shape[1] != n:
            raise SystemExit(f"batch {b}: generated {new_tokens.shape[1]} tokens, not {n}")
        runs.append(
            {
                "batch": b,
                "prompt_tokens": p,
                "new_tokens": n,
                "wall_s": wall,
                "ttft_s": ttft,
                "gen_tok_s": b * n / wall,
                "decode_tok_s": b * (n - 1) / (wall - ttft) if n > 1 and wall > ttft else None,
                "prompt_tok_s": b * p / ttft,
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "first_ids": new_tokens[0, :16].tolist(),
            }
        )
    print(
        json.dumps(
            {
                "peer": "transformers",
                "threads": args.threads,
                "load_s": load_s,
                "torch": torch.__version__,
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
