"""What the planner knows about one model on one machine: measured, cached, pure data.

A `Profile` holds only measurements (driver/profiling.py takes them): one process's rows/s
at a few thread counts and batch sizes, what several such processes get when they run at
once (the contention of shared cores and memory bandwidth), what one tensor-parallel group
gets, per-layer times and sizes (for pipeline cuts and tensor shards), the links between
processes, the start-up cost and the peak memory of a worker. The cost model
(costmodel.py) predicts every layout from these figures alone, so a plan is instant once
the profile is cached.

Profiles are cached as JSON under `~/.cache/distinfer/profiles/` (or `$DISTINFER_CACHE`),
one file per machine and model: the key names the CPU model, the cores, the memory and the
model's identity, so a profile from another machine or another model is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distinfer.planning.cuts import LayerCost

__all__ = ["PROFILE_VERSION", "Links", "Profile", "Rate", "cache_dir", "machine_key", "profile_path"]

PROFILE_VERSION = 3  # 2: tensor-parallel groups measured (`Rate.ranks`); 3: layers at several lengths


@dataclass(frozen=True, slots=True)
class Rate:
    """Rows/s of each of `processes` processes running at once, each with `threads` threads
    and batches of `batch_size` rows (processes == 1: one process alone). `ranks` > 1: one
    tensor-parallel group of that many rank processes, `threads` threads each, instead."""

    threads: int
    batch_size: int
    rows_per_s: float
    processes: int = 1
    ranks: int = 1


@dataclass(frozen=True, slots=True)
class Links:
    """Moving data between processes: a fixed latency and a bandwidth per link kind."""

    shm_latency_s: float = 50e-6  # one message through the shared-memory ring (stage to stage)
    shm_bytes_per_s: float = 2e9
    # a tensor-parallel all-reduce through shared memory (the CPU default; `allreduce_s`)
    allreduce_latency_s: float = 100e-6
    allreduce_bytes_per_s: float = 1e9
    # ... and through gloo over loopback TCP (`--tensor-comm gloo`), for comparison
    gloo_allreduce_latency_s: float = 0.0
    gloo_allreduce_bytes_per_s: float = 0.0
    # an actor call through Ray's object store, on one node (0: Ray not installed here)
    ray_latency_s: float = 0.0
    ray_bytes_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Profile:
    """Measured figures of one model on one machine (see the module's docstring)."""

    model: str
    machine: str
    cores: int
    rates: tuple[Rate, ...]
    layers: tuple[LayerCost, ...] = ()  # per layer, `layer_batch` rows of `layer_seq_len` tokens, 1 thread
    layer_batch: int = 8
    layer_seq_len: int = 64
    seq_len: int = 0  # the sample's tokens per row as its batches pad them (0: not known, not text)
    # each layer's seconds at other batch sizes (same order as `layers`): how the layers'
    # shares of the time move with the batch (the head weighs more in a batch of 1)
    layers_by_batch: tuple[tuple[int, tuple[float, ...]], ...] = ()
    # ... and at other sequence lengths, `layer_batch` rows (attention grows faster than the rest)
    layers_by_seq: tuple[tuple[int, tuple[float, ...]], ...] = ()
    weight_bytes: int = 0
    worker_rss: int = 0  # peak resident bytes of one data-parallel worker process
    startup_s: float = 0.0  # spawning a worker process, its imports and the model's load
    links: Links = field(default_factory=Links)
    strategies: tuple[str, ...] = ("data",)  # what the model's family supports
    tensor_ranks: tuple[int, ...] = ()  # rank counts the family can shard over
    tokens_per_row: float = 0.0  # text generation: mean tokens generated per row (0: not generation)
    version: int = PROFILE_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        return cls(
            model=data["model"],
            machine=data["machine"],
            cores=int(data["cores"]),
            rates=tuple(Rate(**r) for r in data["rates"]),
            layers=tuple(LayerCost(**c) for c in data.get("layers", ())),
            layer_batch=int(data.get("layer_batch", 8)),
            layer_seq_len=int(data.get("layer_seq_len", 64)),
            seq_len=int(data.get("seq_len", 0)),
            layers_by_batch=tuple(
                (int(b), tuple(float(x) for x in secs)) for b, secs in data.get("layers_by_batch", ())
            ),
            layers_by_seq=tuple(
                (int(n), tuple(float(x) for x in secs)) for n, secs in data.get("layers_by_seq", ())
            ),
            weight_bytes=int(data.get("weight_bytes", 0)),
            worker_rss=int(data.get("worker_rss", 0)),
            startup_s=float(data.get("startup_s", 0.0)),
            links=Links(**data.get("links", {})),
            strategies=tuple(data.get("strategies", ("data",))),
            tensor_ranks=tuple(data.get("tensor_ranks", ())),
            tokens_per_row=float(data.get("tokens_per_row", 0.0)),
            version=int(data.get("version", 0)),
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Profile | None:
        """The cached profile, or None when there is none, it is unreadable or of an older version."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            profile = cls.from_json(data)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return profile if profile.version == PROFILE_VERSION else None


def cache_dir() -> Path:
    root = os.environ.get("DISTINFER_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "distinfer"


def profiles_dir() -> Path:
    """Where profiles are kept: `$DISTINFER_PROFILES`, else `profiles/` in the cache folder."""
    root = os.environ.get("DISTINFER_PROFILES")
    return Path(root) if root else cache_dir() / "profiles"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def machine_key(cores: int, memory: int) -> str:
    """This machine's CPU model, cores and memory (GiB), as one readable string."""
    return f"{_cpu_model()} / {cores} cores / {memory / 2**30:.0f} GiB"


def profile_path(
    machine: str, model_identity: dict[str, Any], settings: dict[str, Any], folder: str = ""
) -> Path:
    """Where the profile of a model (its family's identity) on a machine is cached."""
    text = json.dumps({"machine": machine, "model": model_identity, "settings": settings}, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return profiles_dir() / folder / f"{digest}.json"
