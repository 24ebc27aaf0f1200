"""What a decoder LLM is, read from its file: one `LlmConfig` for every supported architecture.

Gemma 3 and Llama-style decoders (Llama, Mistral, Qwen2) differ only in the switches below;
`model.py` implements them all. Values come from a GGUF file's metadata or a Hugging Face
`config.json`; where a GGUF file says nothing (Gemma 3's local RoPE base, its query scale
and its 5:1 pattern of sliding-window layers), the architecture's defaults apply, as in
transformers' `Gemma3TextConfig`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ...errors import ModelError

__all__ = ["SUPPORTED", "LlmConfig", "RopeScaling", "read_config"]

Arch = Literal["gemma3", "llama"]
#: architecture names as files give them -> ours; Llama covers the decoders that differ only in config
SUPPORTED: dict[str, Arch] = {
    "gemma3": "gemma3", "gemma3_text": "gemma3", "Gemma3ForCausalLM": "gemma3",
    "llama": "llama", "LlamaForCausalLM": "llama",
    "mistral": "llama", "MistralForCausalLM": "llama",
    "qwen2": "llama", "Qwen2ForCausalLM": "llama",
}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling: "default" (none), "linear" or "llama3" (Llama 3.1's)."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


@dataclass(frozen=True, slots=True)
class LlmConfig:
    arch: Arch
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context: int
    norm_eps: float
    rope_theta: float
    #: per layer: the sliding window in tokens, or 0 for a global layer
    windows: tuple[int, ...]
    #: RoPE base of sliding-window layers (Gemma 3: 1e4; others: rope_theta)
    rope_local_theta: float
    attn_scale: float
    embed_scale: float
    activation: Literal["gelu_tanh", "silu"]
    qk_norm: bool  # per-head RMSNorm of q and k before RoPE (Gemma 3)
    sandwich_norm: bool  # norms after attention and after the MLP too (Gemma 3)
    qkv_bias: bool  # Qwen2
    tied_embeddings: bool
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    bos_id: int | None = None
    eos_id: int | None = None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_parameters(self) -> list[int]:
        """Parameters per transformer layer (without the embedding and the head)."""
        attn = self.hidden * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.hidden
        return [attn + 3 * self.hidden * self.ffn + 4 * self.hidden] * self.layers

    def kv_bytes_per_token(self, layers: int | None = None, itemsize: int = 4) -> int:
        """KV cache bytes one token takes over `layers` layers (default: all)."""
        n = self.layers if layers is None else layers
        return 2 * self.kv_dim * itemsize * n


def _gemma3_windows(layers: int, window: int, pattern: int = 6) -> tuple[int, ...]:
    return tuple(window if (i + 1) % pattern else 0 for i in range(layers))


def _arch(name: str, where: str) -> Arch:
    arch = SUPPORTED.get(name)
    if arch is None:
        supported = "Gemma 3 (gemma3), Llama (llama, mistral, qwen2)"
        raise ModelError(f"{where}: architecture '{name}' is not supported; supported: {supported}")
    return arch


def from_gguf_metadata(meta: dict[str, Any], where: str) -> LlmConfig:
    """The config of a GGUF file from its metadata (`general.architecture` and its keys)."""
    name = str(meta.get("general.architecture", "?"))
    arch = _arch(name, where)

    def key(k: str, default: Any = None) -> Any:
        value = meta.get(f"{name}.{k}", default)
        if value is None:
            raise ModelError(f"{where}: GGUF metadata has no '{name}.{k}'; the file is incomplete")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(meta.get(f"{name}.attention.key_length") or hidden // heads)
    layers = int(key("block_count"))
    vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else int(key("vocab_size"))
    eps = float(key("attention.layer_norm_rms_epsilon", 1e-6))
    theta = float(meta.get(f"{name}.rope.freq_base", 10000.0))
    common: dict[str, Any] = dict(
        hidden=hidden, layers=layers, heads=heads, kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim, ffn=int(key("feed_forward_length")), vocab=vocab,
        context=int(key("context_length")), norm_eps=eps, rope_theta=theta,
        bos_id=_int_or_none(meta.get("tokenizer.ggml.bos_token_id")),
        eos_id=_int_or_none(meta.get("tokenizer.ggml.eos_token_id")),
    )
    if arch == "gemma3":
        window = int(meta.get(f"{name}.attention.sliding_window", 512))
        return LlmConfig(
            arch=arch, windows=_gemma3_windows(layers, window), rope_local_theta=10000.0,
            attn_scale=head_dim**-0.5, embed_scale=math.sqrt(hidden), activation="gelu_tanh",
            qk_norm=True, sandwich_norm=True, qkv_bias=False, tied_embeddings=True, **common,
        )
    window = int(meta.get(f"{name}.attention.sliding_window", 0) or 0)
    scaling = RopeScaling()
    kind = meta.get(f"{name}.rope.scaling.type")
    if kind == "linear":
        scaling = RopeScaling("linear", float(meta.get(f"{name}.rope.scaling.factor", 1.0)))
    return LlmConfig(
        arch=arch, windows=(window,) * layers, rope_local_theta=theta, attn_scale=head_dim**-0.5,
        embed_scale=1.0, activation="silu", qk_norm=False, sandwich_norm=False,
        qkv_bias=False, tied_embeddings=False, rope_scaling=scaling, **common,
    )


def from_hf_config(raw: dict[str, Any], where: str) -> LlmConfig:
    """The config of a Hugging Face model directory from its `config.json`."""
    names = [*raw.get("architectures", []), raw.get("model_type", "?")]
    arch = next((SUPPORTED[n] for n in names if n in SUPPORTED), None)
    if arch is None:
        _arch(str(raw.get("model_type") or names[0]), where)
    assert arch is not None
    if "text_config" in raw and arch == "gemma3":
        raw = {**raw, **raw["text_config"]}
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    layers = int(raw["num_hidden_layers"])
    head_dim = int(raw.get("head_dim") or hidden // heads)
    rope_params = raw.get("rope_parameters") or {}
    eos = raw.get("eos_token_id")
    common: dict[str, Any] = dict(
        hidden=hidden, layers=layers, heads=heads, kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=head_dim, ffn=int(raw["intermediate_size"]), vocab=int(raw["vocab_size"]),
        context=int(raw.get("max_position_embeddings", 4096)), norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        bos_id=_int_or_none(raw.get("bos_token_id")),
        eos_id=_int_or_none(eos[0] if isinstance(eos, list) and eos else eos),
    )
    if arch == "gemma3":
        full = rope_params.get("full_attention", {}) if "full_attention" in rope_params else {}
        local = rope_params.get("sliding_attention", {}) if "sliding_attention" in rope_params else {}
        window = int(raw.get("sliding_window") or 4096)
        types = raw.get("layer_types")
        windows = (
            tuple(window if t == "sliding_attention" else 0 for t in types) if types
            else _gemma3_windows(layers, window, int(raw.get("sliding_window_pattern", 6)))
        )
        if raw.get("final_logit_softcapping") or raw.get("attn_logit_softcapping"):
            raise ModelError(f"{where}: logit soft-capping (Gemma 2 style) is not supported")
        return LlmConfig(
            arch=arch, windows=windows,
            rope_theta=float(full.get("rope_theta", raw.get("rope_theta", 1_000_000.0))),
            rope_local_theta=float(local.get("rope_theta", raw.get("rope_local_base_freq", 10_000.0))),
            attn_scale=float(raw.get("query_pre_attn_scalar", head_dim)) ** -0.5,
            embed_scale=math.sqrt(hidden), activation="gelu_tanh", qk_norm=True, sandwich_norm=True,
            qkv_bias=False, tied_embeddings=bool(raw.get("tie_word_embeddings", True)), **common,
        )
    theta = float(rope_params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    scaled = rope_params.get("rope_type") not in (None, "default")
    scaling_raw = raw.get("rope_scaling") or (rope_params if scaled else None)
    scaling = RopeScaling()
    if scaling_raw:
        kind = scaling_raw.get("rope_type") or scaling_raw.get("type") or "default"
        if kind not in ("default", "linear", "llama3"):
            raise ModelError(f"{where}: RoPE scaling '{kind}' is not supported (default, linear, llama3)")
        scaling = RopeScaling(
            kind, float(scaling_raw.get("factor", 1.0)), float(scaling_raw.get("low_freq_factor", 1.0)),
            float(scaling_raw.get("high_freq_factor", 4.0)),
            int(scaling_raw.get("original_max_position_embeddings", 8192)),
        )
    window = int(raw.get("sliding_window") or 0) if raw.get("use_sliding_window", True) else 0
    if raw.get("model_type") == "qwen2" and not raw.get("use_sliding_window", False):
        window = 0
    return LlmConfig(
        arch=arch, windows=(window,) * layers, rope_theta=theta, rope_local_theta=theta,
        attn_scale=head_dim**-0.5, embed_scale=1.0, activation="silu", qk_norm=False,
        sandwich_norm=False, qkv_bias=raw.get("model_type") == "qwen2" or bool(raw.get("attention_bias")),
        tied_embeddings=bool(raw.get("tie_word_embeddings", False)), rope_scaling=scaling, **common,
    )


def read_config(path: Path) -> LlmConfig:
    """The config of a GGUF file or a Hugging Face directory (ModelError when unusable)."""
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{path}: a model directory needs config.json, *.safetensors and tokenizer.json")
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{config_file}: cannot read it as JSON ({exc})") from None
        return from_hf_config(raw, str(path))
    # Reading a GGUF file's metadata parses its whole vocabulary (seconds): once per file.
    from dataclasses import asdict

    from .files import entry_dir, write_atomically

    cached = entry_dir(path) / "config.json"
    if cached.is_file():
        try:
            raw = json.loads(cached.read_text(encoding="utf-8"))
            raw["windows"] = tuple(raw["windows"])
            raw["rope_scaling"] = RopeScaling(**raw["rope_scaling"])
            return LlmConfig(**raw)
        except (OSError, ValueError, TypeError, KeyError):
            pass  # written by another version: read the file again
    from .gguf_file import GgufFile

    config = GgufFile.open(path).config
    write_atomically(cached, json.dumps(asdict(config)).encode("utf-8"))
    return config


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
