"""The Llama path, proven without downloading weights: small seeded Llama and Qwen2 models
made with transformers (`save_pretrained` into a directory with a tokenizer.json), loaded from
that directory and run under every strategy, equal to transformers' greedy `generate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from conftest import TIE
from tiny_llm import make_tiny_llm

import distinfer
from distinfer.errors import ModelError, ModelInputError
from distinfer.messages import GenerationOptions
from distinfer.models.llm.engine import Request
from distinfer.models.llm.runner import GenerationRunner, LlmModel, LocalExecutor

transformers = pytest.importorskip("transformers")

NEW = 24
PROMPTS = ["In the beginning", "And God said, Let there be light", "你好 😀", "a", "The Lord is my shepherd; I",
           "Then the LORD answered Job out of the whirlwind, and said, " * 6, "1 2 3", "Who is this"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         corpus_lines: list[str]) -> tuple[Path, list[list[int]], list[list[int]], list[list[float]]]:
    folder = make_tiny_llm(tmp_path_factory.mktemp(request.param), request.param, corpus_lines)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    from distinfer.models.llm.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    prompts = [tok.encode(p) for p in PROMPTS]
    tokens, margins = [], []
    with torch.inference_mode():
        for p in prompts:  # one at a time: no padding
            out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=NEW, do_sample=False,
                                 eos_token_id=0, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            new = out.sequences[0, len(p):].tolist()
            steps = [float(torch.topk(lg[0], 2).values.diff().abs()) for lg in out.logits]
            if 0 in new:
                new = new[: new.index(0)]
            tokens.append(new)
            margins.append(steps)
    return folder, prompts, tokens, margins


def _compare(got: list[list[int]], tokens: list[list[int]], margins: list[list[float]]) -> None:
    for i, (ours, theirs) in enumerate(zip(got, tokens, strict=True)):
        if ours != theirs:
            t = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                     min(len(ours), len(theirs)))
            assert margins[i][t] < TIE, f"prompt {i} diverges at token {t}: ours {ours}, transformers {theirs}"


def test_tiny_models_in_one_process_equal_transformers(tiny: Any) -> None:
    folder, prompts, tokens, margins = tiny
    model = LlmModel(folder, GenerationOptions(max_tokens=NEW))
    engine = model.engine(LocalExecutor(model))
    done = engine.run_all(Request(i, tuple(p), NEW) for i, p in enumerate(prompts))
    _compare([done[i].out for i in range(len(prompts))], tokens, margins)


def test_the_next_block_joins_the_engine_while_one_still_runs(tiny: Any) -> None:
    """Continuous batching across blocks: block 1's prompts take block 0's places as they
    free up, so both together take fewer engine steps than one after the other, and every
    row still equals transformers."""
    folder, _, tokens, margins = tiny
    lengths = [4, NEW, 8, 16, NEW, 4, 12, NEW]
    model = LlmModel(folder, GenerationOptions(max_tokens=NEW, max_running=4))
    inputs = {"prompt": np.array(PROMPTS, dtype=object), "max_tokens": np.array(lengths)}

    def blocks(overlap: bool) -> tuple[dict[int, list[list[int]]], int]:
        runner = GenerationRunner(model, LocalExecutor)
        rows = runner.prepare(inputs, 0).batches[0]
        ended = []
        runner.open(0, rows[:4])
        while not (runner.room if overlap else not runner.busy):
            ended += runner.advance()
        assert not ended or not overlap, "block 0 is still running when block 1 joins"
        runner.open(1, rows[4:])
        while runner.busy:
            ended += runner.advance()
        done = {k: [list(x) for x in out["completion_ids"]] for k, out, _ in ended}
        return done, sum(stats.steps for _, _, stats in ended)

    together, steps_together = blocks(overlap=True)
    apart, steps_apart = blocks(overlap=False)
    assert together == apart
    _compare(together[0] + together[1], [t[:n] for t, n in zip(tokens, lengths, strict=True)], margins)
    assert steps_together < steps_apart


@pytest.mark.parametrize("options", [
    dict(workers=2, threads_per_worker=1),
    dict(workers=1, strategy="pipeline", stages=2, threads_per_worker=1),
    dict(workers=1, strategy="tensor", tensor_parallel=2, threads_per_worker=1),
], ids=["2-data-workers", "2-stages", "2-tensor-ranks"])
def test_tiny_models_under_every_strategy_equal_transformers(
    tiny: Any, options: dict[str, Any], tmp_path: Path
) -> None:
    folder, _, tokens, margins = tiny
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    out = tmp_path / "out"
    distinfer.run(model=str(folder), input=str(source), output=str(out), max_tokens=NEW, block_size=4,
                  min_block_size=4, **options)
    table = ds.dataset(str(out)).to_table().sort_by("row")
    _compare([list(x) for x in table.column("completion_ids").to_pylist()], tokens, margins)


def test_other_architectures_are_refused_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelError, match=r"architecture 'gpt2' is not supported; supported: Gemma 3"):
        distinfer.run(model=str(folder), input=str(tmp_path / "x.jsonl"), output=str(tmp_path / "o"))


@pytest.mark.parametrize(("good", "bad", "message"), [
    ({"prompt": "fine", "temperature": 0.5}, {"prompt": "fine", "temperature": -1},
     r"prompts\.jsonl row 2 \(line 3\): temperature must be >= 0, got -1"),
    ({"messages": [{"role": "user", "content": "hi"}]}, {"messages": []},
     r"prompts\.jsonl row 2 \(line 3\): messages: give a non-empty list"),
    ({"prompt": "fine"}, {"prompt": "word " * 600},
     r"prompts\.jsonl row 2 \(line 3\): the prompt has \d+ tokens; the model's context holds 512"),
    ({"prompt": "fine", "max_tokens": 2}, {"prompt": "fine", "max_tokens": 0},
     r"prompts\.jsonl row 2 \(line 3\): max_tokens must be >= 1, got 0"),
], ids=["temperature", "empty-chat", "too-long", "max-tokens"])
def test_a_bad_row_fails_the_job_naming_its_absolute_row(
    tiny: Any, good: dict[str, Any], bad: dict[str, Any], message: str, tmp_path: Path
) -> None:
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in (good, good, bad)), encoding="utf-8")
    with pytest.raises(ModelInputError, match=message):
        distinfer.run(model=str(tiny[0]), input=str(source), output=str(tmp_path / "out"), max_tokens=4,
                      workers=1, block_size=4, min_block_size=4)


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py permutation of q and k (for its interleaved RoPE)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_a_llama_gguf_file_equals_transformers_reading_it(
    tmp_path: Path, corpus_lines: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Llama GGUF written as llama.cpp's converter writes one (q/k permuted, float32), read by
    transformers (`gguf_file=`) and by us: the same greedy tokens."""
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("DISTINFER_CACHE", str(tmp_path / "cache"))  # read from the file, not a cache
    import numpy as np
    from tiny_llm import tokenizer_for

    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=0, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    tok = tokenizer_for(corpus_lines)
    spec = json.loads(tok.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])]
    tokens += [f"<unused{i}>" for i in range(512 - len(tokens))]
    path = tmp_path / "tiny-llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<|endoftext|>", "<s>") else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(2):
        for ours, theirs in {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}.items():
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    for name, tensor in sd.items():
        if name not in names:
            continue
        if name.endswith("q_proj.weight"):
            tensor = _permute(tensor, 4)
        elif name.endswith("k_proj.weight"):
            tensor = _permute(tensor, 2)
        w.add_tensor(names[name], np.ascontiguousarray(tensor.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    prompts = [[1, 40, 41, 42], [1, 7], [1, *range(100, 160)]]
    model = LlmModel(path, GenerationOptions(max_tokens=NEW))
    engine = model.engine(LocalExecutor(model))
    done = engine.run_all(Request(i, tuple(p), NEW) for i, p in enumerate(prompts))
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            out = reference.generate(input_ids=torch.tensor([p]), max_new_tokens=NEW, do_sample=False,
                                     eos_token_id=0, pad_token_id=0)[0, len(p):].tolist()
            theirs = out[: out.index(0)] if 0 in out else out
            assert done[i].out == theirs, f"prompt {i}"
