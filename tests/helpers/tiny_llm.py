"""Small seeded Llama-architecture models made with transformers and saved as a Hugging Face
directory (config.json, model.safetensors, tokenizer.json): the Llama path without downloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["make_tiny_llm", "tokenizer_for"]

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<s>' + m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def tokenizer_for(corpus: list[str]) -> Tokenizer:
    """A byte-level BPE of 500 tokens trained on `corpus`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([*corpus[:2000], "你好 😀"], trainer)
    return tok


def make_tiny_llm(folder: Path, kind: str, corpus: list[str]) -> Path:
    """A 4-layer `kind` ("llama" or "qwen2") model with seeded weights, saved in `folder`."""
    import transformers

    torch.manual_seed(0)
    common: dict[str, Any] = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  bos_token_id=1, eos_token_id=0, tie_word_embeddings=False)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, rope_theta=10000.0,
                                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64})
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**common, rope_theta=1_000_000.0, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so the logits are far from ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(folder)
    tokenizer_for(corpus).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast",
         "chat_template": CHAT_TEMPLATE}))
    return folder
