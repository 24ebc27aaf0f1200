"""What every process of a replica does for itself: pin its math libraries' threads, say
where it runs and how much memory it peaked at."""

from __future__ import annotations

import os
import resource
import sys

__all__ = ["host_label", "limit_threads", "peak_rss"]


#: glibc's malloc, as worker processes run it (read from their environment when they start).
#: By default glibc gives every allocation over 32 MiB (at most; a batch's activation, say
#: 64 x 32 x 112 x 112 floats) its own mmap and unmaps it when freed, and trims the heap's
#: free top, so every layer of every batch maps fresh pages and the kernel zeroes them: 60%
#: of efficientnet-lite0's time at batch 64 on one thread was the kernel's (2.7x slower than
#: with these settings; 2x at batch 8). Kept in the heap and never trimmed, freed activations
#: are reused by the next batch. The cost: a worker keeps its peak memory (it would reach it
#: again at the next batch anyway). A value the user set is kept; other C libraries ignore them.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),  # only allocations over 1 GiB get their own mmap
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),  # never give the heap's free top back
    "MALLOC_TOP_PAD_": str(1 << 28),  # grow the heap 256 MiB at a time
}


def worker_environment() -> dict[str, str]:
    """`MALLOC_ENV` but what the user set, for the environment of a process to start."""
    return {name: value for name, value in MALLOC_ENV.items() if name not in os.environ}


def set_worker_environment() -> None:
    """Put `MALLOC_ENV` in this process's environment (but what the user set), so that the
    processes it starts from now on (spawned workers, stages, ranks, profilers) run with it."""
    os.environ.update(worker_environment())


def limit_threads(threads: int) -> None:
    """Pin every math library of this process to `threads` threads, before they load."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set once in this process
            pass


def peak_rss() -> int:
    """This process's peak resident memory in bytes. On Linux VmHWM, which counts from the
    program's start: `ru_maxrss` of a spawned process starts at its parent's size at the
    fork (a worker spawned by a 1 GiB driver would report 1 GiB before loading anything)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024  # macOS reports bytes, Linux KiB


def host_label() -> str:
    import socket

    return f"{socket.gethostname()} pid {os.getpid()}"
