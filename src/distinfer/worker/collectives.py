"""How the ranks of a tensor-parallel group exchange tensors.

- `_TorchComm` ("nccl" on CUDA, rank r on cuda:r; "gloo" on the CPU over loopback TCP): a
  `torch.distributed` process group of the ranks alone, created directly from a `FileStore`
  in a fresh temporary directory rather than through `init_process_group`, so nothing
  process-global is touched and several groups can live in one process.
- `_ShmComm` ("shm", the CPU default): shared memory plus one semaphore per pair of ranks.
  The ranks are always processes of one machine, and this is about 6x faster than gloo for
  the activations of a micro-batch (0.3 ms against 1.7 ms per 0.5 MB all-reduce, measured on
  2 cores): with gloo, minilm on 2 ranks was no faster than one process.

Both time themselves (`seconds`: communication, waiting for the other ranks included) and
count what they took part in (`progress`: collectives, and shared-memory barriers): ranks in
step have the same progress, which rank 0 checks after a block.
"""

from __future__ import annotations

import datetime
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["Comm", "GroupLost", "make_comm"]

_COLLECTIVE_TIMEOUT_S = 300.0  # one collective: bounded by how far the ranks drift apart
_POLL_S = 1.0
_CONNECT_TIMEOUT_S = 120.0  # forming the process group, once every rank has loaded
CHUNK_BYTES = 4 << 20  # shared-memory collectives move tensors in pieces of at most this size


class GroupLost(Exception):
    """A rank of the group is gone (or stuck); the group cannot go on."""


class Comm(ABC):
    """One rank's end of the group: broadcast and all-reduce, timed (`seconds`)."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank = rank
        self.world = world
        self.device = device
        self.seconds = 0.0
        self.calls = 0  # collectives entered: equal on every rank while the group is in step

    @property
    def progress(self) -> tuple[int, int]:
        """(collectives entered, barriers passed): equal on every rank while the group is in step."""
        return self.calls, self.calls

    def connect(self) -> None:
        """Join the other ranks (all of them call it at about the same time)."""
        return None

    def release(self) -> None:
        """Drop what links this rank to the others; no collective may follow."""
        return None

    @abstractmethod
    def _all_reduce(self, t: torch.Tensor) -> None: ...

    @abstractmethod
    def _broadcast(self, t: torch.Tensor) -> None: ...

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place; every rank gets the same bits."""
        start = time.perf_counter()
        self.calls += 1
        self._all_reduce(t)
        self.seconds += time.perf_counter() - start
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` into every rank's `t`, in place."""
        start = time.perf_counter()
        self.calls += 1
        self._broadcast(t)
        self.seconds += time.perf_counter() - start
        return t


class _TorchComm(Comm):
    """A `torch.distributed` process group of the ranks alone: gloo (CPU tensors, loopback TCP)
    or NCCL (rank r on cuda:r). Built from a FileStore, not `init_process_group`: nothing global."""

    def __init__(self, rank: int, world: int, device: torch.device, backend: str, store_path: str) -> None:
        super().__init__(rank, world, device)
        self.backend = backend
        self.store_path = store_path
        self.group: Any = None

    def connect(self) -> None:
        import torch.distributed

        # The stubs lag the bindings (Gloo's options live in `_Options` at run time).
        dist: Any = torch.distributed
        store = dist.FileStore(self.store_path, self.world)
        store.set_timeout(datetime.timedelta(seconds=_CONNECT_TIMEOUT_S))
        timeout = datetime.timedelta(seconds=_COLLECTIVE_TIMEOUT_S)
        if self.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(store, self.rank, self.world, options)
        else:
            options = dist.ProcessGroupGloo._Options()
            options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]  # loopback only
            options._timeout = timeout
            options._threads = 1
            self.group = dist.ProcessGroupGloo(store, self.rank, self.world, options)

    def release(self) -> None:
        if self.group is not None:
            try:
                self.group.shutdown()  # NCCL warns at exit about a group never shut down
            except Exception:  # a peer already gone: nothing left to release cleanly
                pass
        self.group = None

    def _run(self, work: Any) -> None:
        try:
            work.wait()
        except Exception as exc:  # gloo raises when a peer's connection closes
            raise GroupLost(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _all_reduce(self, t: torch.Tensor) -> None:
        self._run(self.group.allreduce([t]))

    def _broadcast(self, t: torch.Tensor) -> None:
        self._run(self.group.broadcast(t, 0))


class _ShmComm(Comm):
    """Collectives through shared memory, for CPU ranks on one machine (they always are: ranks
    1..N-1 are children of rank 0). Loopback TCP (gloo) costs about 1.7 ms per all-reduce of
    0.5 MB here; this about 0.3 ms, which decides whether a small model gains at all.

    `slots` is a shared uint8 tensor [2, world, chunk]: two sets of one slot per rank, used
    alternately. A collective moves a tensor in chunks; per chunk, each rank copies its part
    into its slot of the current set, all ranks meet at a barrier, then each reads the slots
    it needs (all-reduce: sums every rank's slot, in rank order, so all ranks get the same
    bits; broadcast: copies rank 0's slot). A rank can only write a set again after the next
    barrier, which every rank reaches only once done reading that set: one barrier per chunk.

    The barrier is one semaphore per ordered pair of ranks (`sems[i][j]`: i has arrived, for
    j), so arrivals are never mistaken across barriers. Waits poll `check` every second, which
    returns why the group is lost (a rank died), if it is; `GroupLost` is raised then.
    """

    def __init__(self, rank: int, world: int, slots: torch.Tensor, sems: list[list[Any]],
                 check: Callable[[], str | None]) -> None:
        super().__init__(rank, world, torch.device("cpu"))
        self.slots = slots
        self.sems = sems
        self.check = check
        self.chunk = slots.shape[2]
        self.turn = 0

    @property
    def progress(self) -> tuple[int, int]:
        return self.calls, self.turn  # a barrier per chunk; the turn picks the set of slots

    def release(self) -> None:
        self.slots = torch.empty((2, self.world, 0), dtype=torch.uint8)
        self.sems = []

    def _barrier(self) -> None:
        others = [r for r in range(self.world) if r != self.rank]
        for j in others:
            self.sems[self.rank][j].release()
        for i in others:
            sem = self.sems[i][self.rank]
            waited = 0.0
            while not sem.acquire(timeout=_POLL_S):
                waited += _POLL_S
                problem = self.check()
                if problem is None and waited >= _COLLECTIVE_TIMEOUT_S:
                    problem = f"rank {i} did not reach a collective within {_COLLECTIVE_TIMEOUT_S:.0f} s"
                if problem is not None:
                    raise GroupLost(problem)

    def _chunks(self, t: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(piece of t, this turn's slots viewed as t's dtype [world, >= piece size]) per chunk."""
        if not t.is_contiguous():
            raise ValueError("shared-memory collectives need contiguous tensors")
        flat = t.view(-1)
        per = self.chunk // t.element_size()
        for start in range(0, flat.numel(), per):
            piece = flat[start:start + per]
            slots = self.slots[self.turn % 2].view(t.dtype)[:, : piece.numel()]
            self.turn += 1
            yield piece, slots

    def _all_reduce(self, t: torch.Tensor) -> None:
        for piece, slots in self._chunks(t):
            slots[self.rank].copy_(piece)
            self._barrier()
            torch.add(slots[0], slots[1], out=piece)
            for r in range(2, self.world):
                piece += slots[r]

    def _broadcast(self, t: torch.Tensor) -> None:
        for piece, slots in self._chunks(t):
            if self.rank == 0:
                slots[0].copy_(piece)
            self._barrier()
            if self.rank != 0:
                piece.copy_(slots[0])


def make_comm(plan: tuple[Any, ...], rank: int, world: int, device: torch.device,
               check: Callable[[], str | None]) -> Comm:
    """A rank's `Comm` from rank 0's plan: ("shm", slots, sems) or (backend, store path)."""
    if plan[0] == "shm":
        return _ShmComm(rank, world, plan[1], plan[2], check)
    return _TorchComm(rank, world, device, plan[0], plan[1])


