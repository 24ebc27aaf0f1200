"""`ServeConfig`: what `distinfer serve` needs. The replica layout (backend, strategy,
stages, ranks, device, memory) is the batch engine's, checked by the same `RunConfig` rules."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..config import RunConfig
from ..errors import ConfigError
from ..messages import BackendName, Device, Strategy, TensorComm
from ..models.family import ModelSpec

__all__ = ["ServeConfig", "served_name"]


@dataclass(frozen=True, slots=True)
class ServeConfig:
    model: str
    replicas: int = 2  # data-parallel workers, or pipeline / tensor-parallel groups
    threads_per_replica: int | None = None  # None: the machine's cores divided among processes
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # the name in URLs; None: from the model (minilm, file stem)
    max_batch_size: int = 32  # rows merged into one model call
    max_queue_delay_ms: float = 10.0  # how long the oldest request waits for more to join it
    max_queue: int = 512  # rows waiting; more are refused with 429
    timeout_ms: float | None = None  # a request's deadline when it names none (see `deadline_s`)
    drain_timeout_s: float = 30.0  # on SIGTERM, how long queued and running requests may take
    max_body_bytes: int = 16 * 2**20  # larger request bodies get 413
    max_restarts: int = 10  # replacement replicas over the server's life
    start_timeout_s: float = 600.0  # no replica warm by then: give up
    backend: BackendName = "local"
    address: str | None = None
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    worker_resources: dict[str, float] | None = None
    device: Device = "cpu"
    strategy: Strategy | Literal["auto"] = "auto"  # auto: the top plan of a cached profile (api.serve)
    stages: int | None = None
    cuts: tuple[int, ...] | None = None
    tensor_parallel: int | None = None
    tensor_comm: TensorComm = "auto"
    worker_memory: str | None = None
    latency_target_s: float | None = None  # strategy auto: plan for one batch within this
    request_rate: float | None = None  # strategy auto: plan for rows/s sustained
    # text generation (gemma3-270m, .gguf files, Hugging Face directories): the OpenAI routes
    max_running: int = 32  # sequences each replica advances together
    kv_cache_memory: str = "1GiB"  # each replica's KV cache
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("missing --model; see 'distinfer serve --help'")
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_running"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535, got {self.port}")
        for name in ("max_queue_delay_ms", "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name, flag in (("latency_target_s", "--latency-target"), ("request_rate", "--request-rate")):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{flag} must be > 0, got {value}")
        if self.timeout_ms is not None and self.timeout_ms <= 0:
            raise ConfigError(f"--timeout-ms must be > 0, got {self.timeout_ms}")
        if self.model_name is not None and not _NAME.fullmatch(self.model_name):
            raise ConfigError(f"--model-name {self.model_name!r}: use letters, digits, '.', '_' and '-'")
        if self.strategy not in ("auto", "data", "pipeline", "tensor"):
            raise ConfigError(
                f"serve --strategy must be auto, data, pipeline or tensor, got {self.strategy!r}"
            )
        self.run_config()  # the shared rules of the replica layout

    def run_config(self) -> RunConfig:
        """The batch engine's view of the replicas, for planning them the same way."""
        return RunConfig(
            model=self.model, input="(requests)", output="(responses)", workers=self.replicas,
            threads_per_worker=self.threads_per_replica, batch_size=self.max_batch_size,
            backend=self.backend, address=self.address, worker_cpus=self.worker_cpus,
            worker_gpus=self.worker_gpus, worker_resources=self.worker_resources, device=self.device,
            strategy=self.strategy, stages=self.stages, cuts=self.cuts, tensor_parallel=self.tensor_parallel,
            tensor_comm=self.tensor_comm, worker_memory=self.worker_memory, max_restarts=self.max_restarts,
            start_timeout_s=self.start_timeout_s, max_running=self.max_running,
            kv_cache_memory=self.kv_cache_memory, dtype=self.dtype,
        )

    @property
    def deadline_s(self) -> float:
        """A KServe request's deadline for its answer, or a generated stream's for its first
        token, when the request names none: --timeout-ms, else 1 s (KServe) or 10 s (generation)."""
        if self.timeout_ms is not None:
            return self.timeout_ms / 1e3
        from ..models.families import parse_model

        return 10.0 if parse_model(self.model).family.generates else 1.0


_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def served_name(spec: ModelSpec) -> str:
    """The model's name in URLs (its family's choice: a built-in's name, a file's stem, a
    factory's function), reduced to URL-safe characters."""
    return _UNSAFE.sub("_", spec.family.served_name(spec)) or "model"
