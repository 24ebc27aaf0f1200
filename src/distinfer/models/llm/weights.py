"""A model's weights by part, in one naming for every source: what a process builds (a whole
model, a pipeline stage's layers, a tensor-parallel rank's shards) asks only for its parts.

Parts are "embed" (token embeddings), "layer.I" (one transformer layer's tensors), "norm"
(the final norm) and "head" (an untied LM head). Norm weights are the multiplier itself
(Gemma's `1 + w` is stored that way in GGUF files; a Hugging Face Gemma checkpoint gets its
`+ 1` here, once), so the model computes `x * w` for every architecture.

GGUF tensors are dequantised once and cached as float32 safetensors, a file per part, under
the model file's cache entry (`files.entry_dir`); later loads memory-map them. Hugging Face
safetensors are read directly (converted to float32).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ...errors import ModelError
from .config import LlmConfig
from .files import entry_dir, write_atomically

__all__ = ["WeightStore"]

#: our tensor name in a layer -> the GGUF name's suffix after "blk.I."
_GGUF_LAYER = {
    "attn_norm": "attn_norm.weight", "q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight",
    "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
    "o": "attn_output.weight", "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    "post_attn_norm": "post_attention_norm.weight", "ffn_norm": "ffn_norm.weight",
    "post_ffn_norm": "post_ffw_norm.weight",
    "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
}
_HF_LAYER_COMMON = {
    "attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight", "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias", "o": "self_attn.o_proj.weight",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
}
_HF_LAYER = {
    "gemma3": {**_HF_LAYER_COMMON, "post_attn_norm": "post_attention_layernorm.weight",
               "ffn_norm": "pre_feedforward_layernorm.weight",
               "post_ffn_norm": "post_feedforward_layernorm.weight"},
    "llama": {**_HF_LAYER_COMMON, "ffn_norm": "post_attention_layernorm.weight"},
}
_NORMS = {"attn_norm", "q_norm", "k_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm", "norm"}


class WeightStore:
    """The weights of the model at `path` (a .gguf file or a Hugging Face directory)."""

    def __init__(self, path: Path, config: LlmConfig) -> None:
        self.path = path
        self.config = config
        self._hf: dict[str, Path] | None = _hf_index(path) if path.is_dir() else None

    def part(self, part: str) -> dict[str, torch.Tensor]:
        """One part's tensors, float32 (see the module docstring for the part names)."""
        if self._hf is not None:
            return self._from_hf(part)
        cached = entry_dir(self.path) / "f32" / f"{part}.safetensors"
        if cached.is_file():
            from safetensors.torch import load_file

            return load_file(str(cached))
        tensors = self._from_gguf(part)
        from safetensors.torch import save

        write_atomically(cached, save(tensors))
        return tensors

    def rows(self, part: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of a one-tensor part ("embed", "head"), read alone from the cache
        where it can be (a tensor-parallel rank's or a pipeline stage's share of the
        vocabulary), so the rest of the table never enters this process's memory."""
        if self._hf is None:
            cached = entry_dir(self.path) / "f32" / f"{part}.safetensors"
            if not cached.is_file():
                self.part(part)  # dequantise and cache it first
            from safetensors import safe_open

            with safe_open(str(cached), framework="pt") as f:
                rows: torch.Tensor = f.get_slice(part)[lo:hi]
                return rows.contiguous()
        return self.part(part)[part][lo:hi].contiguous()

    # --- sources ------------------------------------------------------------------------

    def _from_gguf(self, part: str) -> dict[str, torch.Tensor]:
        from .gguf_file import GgufFile

        gguf = GgufFile.open(self.path)

        def get(name: str) -> torch.Tensor:
            return torch.from_numpy(gguf.tensor(name))

        if part == "embed":
            return {"embed": get("token_embd.weight")}
        if part == "norm":
            return {"norm": get("output_norm.weight")}
        if part == "head":
            return {"head": get("output.weight" if gguf.has("output.weight") else "token_embd.weight")}
        index = _layer_index(part, self.config)
        out = {ours: get(f"blk.{index}.{theirs}") for ours, theirs in _GGUF_LAYER.items()
               if gguf.has(f"blk.{index}.{theirs}")}
        if self.config.arch == "llama":  # llama.cpp's converter permutes q and k for its RoPE
            out["q"] = _unpermute(out["q"], self.config.heads)
            out["k"] = _unpermute(out["k"], self.config.kv_heads)
            for name in ("q_bias", "k_bias"):
                if name in out:
                    heads = self.config.heads if name == "q_bias" else self.config.kv_heads
                    out[name] = _unpermute(out[name][:, None], heads)[:, 0]
        return out

    def _from_hf(self, part: str) -> dict[str, torch.Tensor]:
        assert self._hf is not None
        if part == "embed":
            names = {"embed": "model.embed_tokens.weight"}
        elif part == "norm":
            names = {"norm": "model.norm.weight"}
        elif part == "head":
            head = "lm_head.weight" if "lm_head.weight" in self._hf else "model.embed_tokens.weight"
            names = {"head": head}
        else:
            index = _layer_index(part, self.config)
            names = {ours: f"model.layers.{index}.{theirs}"
                     for ours, theirs in _HF_LAYER[self.config.arch].items()
                     if f"model.layers.{index}.{theirs}" in self._hf}
        out = {}
        from safetensors import safe_open

        for ours, theirs in names.items():
            if theirs not in self._hf:
                raise ModelError(f"{self.path}: tensor '{theirs}' is missing from the safetensors files")
            with safe_open(str(self._hf[theirs]), framework="pt") as f:
                tensor = f.get_tensor(_stored_name(f, theirs)).to(torch.float32)
            if self.config.arch == "gemma3" and ours in _NORMS:
                tensor = tensor + 1.0
            out[ours] = tensor
        return out


def _layer_index(part: str, config: LlmConfig) -> int:
    match = re.fullmatch(r"layer\.(\d+)", part)
    if match is None or int(match.group(1)) >= config.layers:
        raise ValueError(f"unknown weight part '{part}'")
    return int(match.group(1))


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (interleaved RoPE pairs back to rotate-half halves)."""
    half = w.shape[0] // heads // 2  # as transformers' GGUF loader undoes it
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_index(path: Path) -> dict[str, Path]:
    """Tensor name (prefix "model." as in Gemma3ForCausalLM and LlamaForCausalLM) -> file."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors files; a model directory needs config.json, "
                         "*.safetensors and tokenizer.json")
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    index[_canonical(name)] = file
        except Exception as exc:
            raise ModelError(f"{file}: not a readable safetensors file ({exc})") from None
    return index


def _canonical(name: str) -> str:
    return re.sub(r"^(model\.language_model\.|language_model\.model\.)", "model.", name)


def _stored_name(f: object, canonical: str) -> str:
    keys = f.keys()  # type: ignore[attr-defined]
    if canonical in keys:
        return canonical
    for key in keys:
        if _canonical(key) == canonical:
            return str(key)
    raise KeyError(canonical)

