"""What every process of a replica does for itself: pin its math libraries' threads, say
where it runs and how much memory it peaked at."""

from __future__ import annotations

import os
import resource
import sys

__all__ = ["host_label", "limit_threads", "peak_rss"]


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
