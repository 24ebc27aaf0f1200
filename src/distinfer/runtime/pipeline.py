"""Pipeline parallelism inside one replica: the model cut into stages, one process each.

The replica's own process (the one the backend started) is stage 0: it reads the block,
prepares micro-batches, runs its layers and streams each activation to stage 1. Stages
1..K-1 are child processes that each build only their own layers and pass activations on
through torch queues (tensors travel in shared memory, not as pickled bytes); the last
stage sends each micro-batch's outputs back to stage 0, which reassembles the block and
writes the part. While stage 1 works on micro-batch i, stage 0 already computes i+1, so
with m micro-batches per block and p stages the idle share is (p-1)/(m+p-1).

To the scheduler and the backend the group is one worker: if any stage process dies,
stage 0 exits, the backend reports the worker lost, and its blocks are assigned again.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import ModelError
from ..models._batching import padded_batches
from ..models.base import Batches, Column, Runner
from ..models.decoder import DecoderConfig, DecoderStage, decoder_rows

__all__ = ["PipelineRunner"]

_READY_TIMEOUT_S = 600.0
_IN_FLIGHT = 4  # activations queued between two stages


def _stage_main(
    config: DecoderConfig, start: int, stop: int, threads: int, device: str,
    inbox: Any, outbox: Any, status: Any,
) -> None:
    from .replica import limit_threads

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_threads(threads)
    try:
        stage = DecoderStage(config, start, stop, device=device)
    except Exception as exc:
        status.put(("error", start, f"{type(exc).__name__}: {exc}"))
        return
    status.put(("ready", start, ""))
    parent = os.getppid()
    while True:
        try:
            item = inbox.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # stage 0 is gone: nobody will read our results
                return
            continue
        if item is None:
            return
        hidden, mask = item
        with torch.inference_mode():
            out = stage((hidden.to(device), mask.to(device)))
        if isinstance(out, dict):
            outbox.put({name: value.cpu().numpy() for name, value in out.items()})
        else:
            outbox.put((out[0].cpu(), out[1].cpu()))


class PipelineRunner(Runner):
    """A `decoder-SIZE` model split at `stages` ((start, stop) layer ranges, in order)."""

    input_names = ("text",)

    def __init__(self, config: DecoderConfig, stages: tuple[tuple[int, int], ...], threads: int,
                 device: str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        ctx = torch.multiprocessing.get_context("spawn")
        self.head = DecoderStage(config, *stages[0], device=self.device)
        links = [ctx.Queue(maxsize=_IN_FLIGHT) for _ in stages[1:]]
        self.results = ctx.Queue()
        status = ctx.Queue()
        self.inbox = links[0]
        self.procs = []
        for k, (start, stop) in enumerate(stages[1:]):
            outbox = links[k + 1] if k + 1 < len(links) else self.results
            proc = ctx.Process(
                target=_stage_main, args=(config, start, stop, threads, device, links[k], outbox, status),
                name=f"distinfer-stage-{k + 1}", daemon=True,
            )
            proc.start()
            self.procs.append(proc)
        for _ in self.procs:
            try:
                kind, start, text = status.get(timeout=_READY_TIMEOUT_S)
            except queue.Empty:
                raise ModelError("a pipeline stage did not load within 10 minutes") from None
            if kind == "error":
                raise ModelError(f"pipeline stage starting at layer {start} could not load: {text}")

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        rows = decoder_rows(self.config, inputs["text"])
        return padded_batches(rows, batch_size, self.device.type, torch.bool)

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        return self.forward_many([batch])[0]

    def forward_many(self, batches: list[Any]) -> list[dict[str, np.ndarray]]:
        """Stream every micro-batch through the stages; results come back in order."""
        results: list[dict[str, np.ndarray]] = []
        for ids, mask in batches:
            with torch.inference_mode():
                hidden, mask_out = self.head((ids.to(self.device), mask.to(self.device)))
            self.inbox.put((hidden.cpu(), mask_out.cpu()))
            while True:  # collect what is ready without waiting
                try:
                    results.append(self.results.get_nowait())
                except queue.Empty:
                    break
        while len(results) < len(batches):
            try:
                results.append(self.results.get(timeout=1.0))
            except queue.Empty:
                self._check_stages()
        return results

    def _check_stages(self) -> None:
        for k, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                # The group cannot go on without that stage: end this worker so that the
                # backend sees it lost and the scheduler assigns its blocks again.
                print(f"distinfer: pipeline stage {k} died (exit code {proc.exitcode})", file=sys.stderr)
                os._exit(3)
