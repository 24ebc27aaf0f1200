"""Per-layer costs of the built-in layered models (decoder-SIZE, BERT), one layer at a time.

Only one layer is alive at a time: it is built (with its own seeded or stored weights),
timed on the activation the previous layer produced, measured, and freed. So a plan for a
model far larger than this machine's memory can be made here (`distinfer plan`), with the
same `LayerCost`s a pipeline run uses.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..planning.cuts import LayerCost
from .profile import measure_layers, module_bytes, tensor_bytes

if TYPE_CHECKING:
    from .decoder import DecoderConfig

__all__ = ["bert_layer_costs", "decoder_layer_costs"]


def decoder_layer_costs(
    config: DecoderConfig, batch_size: int, seq_len: int, repeats: int = 2
) -> list[LayerCost]:
    """`LayerCost`s of a `decoder-SIZE` model for one micro-batch of `batch_size` rows of
    `seq_len` tokens, one seeded layer alive at a time."""
    import torch

    from .decoder import build_layer

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, config.vocab_size, (batch_size, seq_len), generator=generator)
    names = ["embedding", *(f"block {i}" for i in range(config.n_layers)), "head"]
    builders = [lambda i=i: build_layer(config, i) for i in range(config.total_layers)]
    return _measure(builders, names, (ids, torch.ones(batch_size, seq_len, dtype=torch.bool)), repeats)


def bert_layer_costs(model_dir: Path, batch_size: int, seq_len: int, repeats: int = 2) -> list[LayerCost]:
    """`LayerCost`s of a BERT encoder (`minilm`) read from `model_dir`: embeddings, then each layer."""
    import torch

    from .bert import load_bert

    generator = torch.Generator().manual_seed(0)
    bert = load_bert(model_dir)
    ids = torch.randint(1000, 2000, (batch_size, seq_len), generator=generator)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    layers: list[Any] = [lambda: _BertEmbed(bert.embeddings)]
    layers += [lambda layer=layer: _BertLayer(layer, additive) for layer in bert.layers]
    names = ["embeddings", *(f"layer {i}" for i in range(len(bert.layers)))]
    return _measure(layers, names, (ids, mask), repeats)


class _BertEmbed:
    def __init__(self, embeddings: Any) -> None:
        self.module = embeddings

    def __call__(self, x: Any) -> Any:
        ids, mask = x
        return self.module(ids, ids.new_zeros(ids.shape)), mask


class _BertLayer:
    def __init__(self, layer: Any, mask: Any) -> None:
        self.module, self.mask = layer, mask

    def __call__(self, x: Any) -> Any:
        hidden, mask = x
        return self.module(hidden, self.mask), mask


def _measure(builders: list[Any], names: list[str], example: Any, repeats: int) -> list[LayerCost]:
    import torch

    costs: list[LayerCost] = []
    x = example
    for build, name in zip(builders, names, strict=True):
        built = build()
        module = getattr(built, "module", built)

        def step(a: Any, f: Any = built) -> Any:
            """(hidden or ids, mask) in; (hidden, mask) or the last layer's outputs dict out."""
            if not isinstance(f, torch.nn.Module):
                return f(a)
            out = f(*a)  # a decoder layer
            return out if isinstance(out, dict) else (out, a[1])

        [seconds] = measure_layers([step], x, repeats)
        with torch.inference_mode():
            y = step(x)
        costs.append(LayerCost(name, seconds, module_bytes(module), tensor_bytes(y)))
        x = y
        del built, module
        gc.collect()
    return costs
