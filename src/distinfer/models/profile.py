"""Measuring layers for the planner: time per layer, bytes of weights and of activations.

Layers are plain callables run in sequence (the output of one feeds the next), so any model
that can be written as a list of stages can be measured. When torch is in use the layers run
under `inference_mode`, and a GPU is waited for before the clock is read.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from distinfer.planning.cuts import LayerCost

__all__ = ["measure_layers", "module_bytes", "profile_layers", "tensor_bytes"]


def tensor_bytes(obj: Any) -> int:
    """Bytes held by a tensor, an array, or a tuple / list / dict of them (others count 0).

    Duck-typed so that numpy arrays count too and torch need not be imported. Views of one
    tensor are counted once each, which overstates shared storage; fine for an upper bound.
    """
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return int(obj.numel()) * int(obj.element_size())
    if isinstance(getattr(obj, "nbytes", None), int):
        return int(obj.nbytes)
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def module_bytes(module: Any) -> int:
    """Bytes of a torch module's parameters and buffers (shared parameters once); 0 for others."""
    total = 0
    for attr in ("parameters", "buffers"):
        tensors = getattr(module, attr, None)
        if callable(tensors):
            total += sum(tensor_bytes(t) for t in tensors())
    return total


@contextlib.contextmanager
def _torch_context() -> Iterator[Callable[[], None]]:
    """Inference mode, and a function that waits for queued GPU work (a no-op without a GPU)."""
    # Torch layers or inputs mean torch is imported already; importing it only to time plain
    # callables would cost a second and change nothing.
    torch = sys.modules.get("torch")
    if torch is None:
        yield lambda: None
        return
    # CUDA kernels are queued, not run, when the call returns: the clock must wait for them.
    # Only a CUDA context the layers already made is waited on; none is made here.
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.inference_mode():
        yield torch.cuda.synchronize if cuda else (lambda: None)


def _run(
    layers: Sequence[Callable[[Any], Any]], example_input: Any, repeats: int
) -> tuple[list[float], list[int]]:
    """Median seconds of each layer over `repeats` passes after one warm-up, and output bytes."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    times: list[list[float]] = [[] for _ in layers]
    outputs = [0] * len(layers)
    with _torch_context() as synchronize:
        # Whole passes rather than one layer at a time: each layer then sees the caches and
        # allocator state it sees in a real forward pass, and only one activation is alive.
        for attempt in range(repeats + 1):
            x = example_input
            for i, layer in enumerate(layers):
                synchronize()
                start = time.perf_counter()
                x = layer(x)
                synchronize()
                elapsed = time.perf_counter() - start
                if attempt == 0:  # warm-up: lazy init, autotuning, first-touch allocation
                    outputs[i] = tensor_bytes(x)
                else:
                    times[i].append(elapsed)
    return [statistics.median(t) for t in times], outputs


def measure_layers(
    layers: Sequence[Callable[[Any], Any]], example_input: Any, repeats: int = 3
) -> list[float]:
    """Seconds per layer for `example_input` fed through `layers` in order (median of `repeats`)."""
    return _run(layers, example_input, repeats)[0]


def profile_layers(
    layers: Sequence[Callable[[Any], Any]],
    example_input: Any,
    names: Sequence[str] | None = None,
    repeats: int = 3,
) -> list[LayerCost]:
    """A `LayerCost` per layer, ready for `balanced_cut`: time, weights, output bytes.

    `example_input` should be one micro-batch, since the planner's costs are per micro-batch.
    """
    if names is not None and len(names) != len(layers):
        raise ValueError(f"{len(names)} names for {len(layers)} layers")
    seconds, outputs = _run(layers, example_input, repeats)
    labels = list(names) if names is not None else [str(i) for i in range(len(layers))]
    return [
        LayerCost(label, s, module_bytes(layer), out)
        for label, s, layer, out in zip(labels, seconds, layers, outputs, strict=True)
    ]
