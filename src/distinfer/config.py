"""Job configuration: one frozen `RunConfig`, built from defaults, a job file and flags.

Precedence: defaults < job file (`--config job.toml|yaml`) < command-line flags. Option
names are the long flag names with `_` or `-` (`batch_size` or `batch-size`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import tomllib

from .errors import ConfigError
from .messages import BackendName, Device, ImageOptions, Strategy, TensorComm, sampling_problem

__all__ = ["RunConfig", "load_job_file"]


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything a batch job needs. Only `model`, `input` and `output` are required."""

    model: str
    input: str
    output: str
    workers: int = 2  # replicas: a whole model each, or one pipeline / tensor-parallel group each
    threads_per_worker: int | None = None  # None: the machine's cores divided among workers
    batch_size: int = 64
    block_size: int | None = None  # rows per block once under way (None: 1024; generation: 4 x max_running)
    min_block_size: int | None = None  # first and last blocks; None: batch_size
    column: str | None = None
    input_format: str | None = None
    overwrite: bool = False
    backend: BackendName = "local"  # "local" processes or "ray"
    address: str | None = None  # ray: "auto", "ray://host:port", or None to start a local Ray
    worker_cpus: float = 1.0  # ray: CPUs each worker actor asks for
    worker_gpus: float = 0.0  # ray: GPUs each worker actor asks for
    worker_resources: dict[str, float] | None = None  # ray: custom resources per worker actor
    device: Device = "cpu"
    # "data" (whole model per worker), "pipeline" (stages), "tensor" (ranks), "auto" (the top
    # plan; the default, which plans from a cached profile only: driver/advisor.py)
    strategy: Strategy | Literal["auto"] = "auto"
    stages: int | None = None  # pipeline: stages per replica (None: 2, or the fewest that fit)
    cuts: tuple[int, ...] | None = None  # pipeline: explicit first layer of stages 2..K
    tensor_parallel: int | None = None  # tensor: ranks per replica (None: 2)
    tensor_comm: TensorComm = "auto"  # tensor: "auto" (shm on CPU, nccl on GPU), "shm", "gloo", "nccl"
    worker_memory: str | None = None  # per-process memory limit for planning, e.g. "3GiB"
    prefetch: int = 2
    max_restarts: int = 3
    start_timeout_s: float = 600.0
    baseline_throughput: float | None = None  # rows/s of one worker, for the efficiency figure
    # rows that may fail and be set aside in DIR/_errors/: "N" rows or "P%" of the input's
    # rows; 0 (the default): the first bad row fails the job
    max_bad_rows: int | str = 0
    retry_bad_rows: bool = False  # a resumed job computes the rows set aside before again
    speculation: bool = True  # copies of slow blocks for idle workers at the tail (scheduler.py)
    progress: bool | None = False  # None: a progress bar when stderr is a terminal (the CLI's default)
    # text generation (--task generate, the default for generation models)
    task: str | None = None  # "generate", or None: the model's own task
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    max_running: int = 32
    kv_cache_memory: str = "1GiB"
    dtype: str = "float32"
    # image rows (an image directory or glob, a column of image bytes or paths): models/images.py;
    # None: the model family's own preprocessing, the model's input shape, or the defaults there
    image_size: int | str | tuple[int, int] | None = None  # 224, "224x320" (height x width)
    resize: int | None = None  # the shorter side before the centre crop (default: size / 0.875)
    crop: str | None = None  # "center" (default) or "none": the whole image scaled to image_size
    mean: float | str | tuple[float, ...] | None = None  # per RGB channel, of pixels scaled to [0, 1]
    std: float | str | tuple[float, ...] | None = None
    layout: str | None = None  # "NCHW" or "NHWC" (default: the model input's shape, else NCHW)
    jpeg_draft: bool = True  # JPEG: decode at a reduced scale when much larger than needed

    def __post_init__(self) -> None:
        for name in ("model", "input", "output"):
            if not getattr(self, name):
                raise ConfigError(f"missing --{name}; see 'distinfer run --help'")
        positive = {
            "workers": self.workers,
            "batch_size": self.batch_size,
            "block_size": self.block_size or 1,
            "prefetch": self.prefetch,
            "threads_per_worker": self.threads_per_worker or 1,
            "min_block_size": self.min_block_size or 1,
            "max_tokens": self.max_tokens,
            "max_running": self.max_running,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.min_block_size is not None and self.min_block_size > (self.block_size or 1024):
            raise ConfigError("--min-block-size must not exceed --block-size")
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"--backend must be local or ray, got {self.backend!r}")
        if self.worker_cpus < 0 or self.worker_gpus < 0:
            raise ConfigError("--worker-cpus and --worker-gpus must be >= 0")
        if self.start_timeout_s <= 0:
            raise ConfigError(f"--start-timeout must be > 0 seconds, got {self.start_timeout_s}")
        for name, amount in (self.worker_resources or {}).items():
            if not isinstance(amount, (int, float)) or amount < 0:
                raise ConfigError(f"--worker-resource {name}: the amount must be a number >= 0")
        if self.strategy not in ("data", "pipeline", "tensor", "auto"):
            raise ConfigError(f"--strategy must be auto, data, pipeline or tensor, got {self.strategy!r}")
        if self.stages is not None and self.stages < 1:
            raise ConfigError(f"--stages must be >= 1, got {self.stages}")
        if (self.stages is not None or self.cuts) and self.strategy not in ("pipeline", "auto"):
            raise ConfigError("--stages and --cuts cut a pipeline; add --strategy pipeline")
        if self.tensor_parallel is not None:
            if self.strategy not in ("tensor", "auto"):
                raise ConfigError("--tensor-parallel shards a model over ranks; add --strategy tensor")
            if self.tensor_parallel < 2:
                raise ConfigError(f"--tensor-parallel must be >= 2, got {self.tensor_parallel}")
        if self.tensor_comm not in ("auto", "shm", "gloo", "nccl"):
            raise ConfigError(f"--tensor-comm must be auto, shm, gloo or nccl, got {self.tensor_comm!r}")
        if self.tensor_comm != "auto" and self.strategy not in ("tensor", "auto"):
            raise ConfigError("--tensor-comm is how tensor-parallel ranks talk; add --strategy tensor")
        if (self.tensor_comm in ("shm", "gloo") and self.device == "cuda") or (
            self.tensor_comm == "nccl" and self.device != "cuda"
        ):
            raise ConfigError("--tensor-comm shm and gloo work on the CPU, nccl with --device cuda")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        self.bad_row_limit(0)
        if not isinstance(self.speculation, bool):
            raise ConfigError(f"speculation must be true or false (--speculation on|off), "
                              f"got {self.speculation!r}")
        self._check_generation()
        self.image_options()

    @property
    def images_given(self) -> bool:
        """Whether an image option was given (so a column of paths holds images)."""
        return any(v is not None for v in (self.image_size, self.resize, self.crop, self.mean, self.std,
                                           self.layout))

    def image_options(self) -> ImageOptions:
        """The image options given, checked (unset fields None)."""
        size = _pair(self.image_size, "--image-size")
        if self.resize is not None and (isinstance(self.resize, bool) or not isinstance(self.resize, int)
                                        or self.resize < 1):
            raise ConfigError(f"--resize must be a whole number of pixels >= 1, got {self.resize!r}")
        if self.crop not in (None, "center", "none"):
            raise ConfigError(f"--crop must be center or none, got {self.crop!r}")
        if self.crop == "none" and self.resize is not None:
            raise ConfigError("--resize sets the shorter side before a centre crop; --crop none scales "
                              "the whole image to --image-size instead, so leave one of them out")
        if self.layout not in (None, "NCHW", "NHWC"):
            raise ConfigError(f"--layout must be NCHW or NHWC, got {self.layout!r}")
        std = _triple(self.std, "--std")
        if std is not None and min(std) <= 0:
            raise ConfigError(f"--std must be > 0 for every channel, got {self.std!r}")
        return ImageOptions(size, self.resize, self.crop, _triple(self.mean, "--mean"), std,  # type: ignore[arg-type]
                            self.layout, bool(self.jpeg_draft))  # type: ignore[arg-type]

    def bad_row_limit(self, rows: int) -> int:
        """--max-bad-rows for an input of `rows` rows: N, or P% of `rows` rounded down."""
        text = str(self.max_bad_rows).strip()
        problem = ConfigError(f"--max-bad-rows must be a whole number of rows or a percentage such as "
                              f"0.5%, got {self.max_bad_rows!r}")
        if isinstance(self.max_bad_rows, bool):
            raise problem
        try:
            if text.endswith("%"):
                share = float(text[:-1])
                if not 0 <= share <= 100:
                    raise problem
                return int(rows * share / 100)
            count = int(text)
        except ValueError:
            raise problem from None
        if count < 0:
            raise problem
        return count

    def _check_generation(self) -> None:
        if self.task not in (None, "generate"):
            raise ConfigError(f"--task must be generate (or left out), got {self.task!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        problem = sampling_problem(self.temperature, self.top_k, self.top_p, self.min_p)
        if problem:
            raise ConfigError(f"--{problem}")

    @property
    def group_size(self) -> int:
        """Processes per replica: 1, a pipeline's stages (2 when not yet planned) or the ranks."""
        if self.strategy == "pipeline":
            return len(self.cuts) + 1 if self.cuts else self.stages or 2
        if self.strategy == "tensor":
            return self.tensor_parallel or 2
        return 1

    @property
    def threads(self) -> int:
        """Threads per process (a worker, a stage or a rank): the cores shared among them all."""
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        return max(1, (os.cpu_count() or 1) // (self.workers * self.group_size))

    @property
    def first_block_size(self) -> int:
        return min(self.min_block_size or self.batch_size, self.block_size or 1024)

    @classmethod
    def build(cls, options: Mapping[str, Any]) -> RunConfig:
        """Make a config from a mapping of option names (unknown names are an error)."""
        known = {f.name for f in fields(cls)}
        clean: dict[str, Any] = {}
        for key, value in options.items():
            name = key.replace("-", "_")
            name = "workers" if name == "replicas" else name  # --replicas is --workers
            if name not in known:
                raise ConfigError(
                    f"unknown option '{key}'; known options: {', '.join(sorted(known))}"
                )
            clean[name] = value
        missing = [n for n in ("model", "input", "output") if clean.get(n) in (None, "")]
        if missing:
            raise ConfigError(
                f"missing --{missing[0]}; give it as a flag or in the job file "
                "(see 'distinfer run --help')"
            )
        try:
            return cls(**clean)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    def with_options(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)


def _pair(value: Any, flag: str) -> tuple[int, int] | None:
    """224 or "224" → (224, 224); "224x320" or [224, 320] → (224, 320) (height, width)."""
    if value is None:
        return None
    parts = value if isinstance(value, (list, tuple)) else str(value).lower().split("x")
    try:
        pair = [int(p) for p in parts]
    except (TypeError, ValueError):
        pair = []
    if len(pair) == 1:
        pair *= 2
    if len(pair) != 2 or min(pair) < 1 or isinstance(value, bool):
        raise ConfigError(f"{flag} must be N or HxW in pixels (e.g. 224 or 224x320), got {value!r}")
    return pair[0], pair[1]


def _triple(value: Any, flag: str) -> tuple[float, float, float] | None:
    """0.5 → (0.5, 0.5, 0.5); "0.485,0.456,0.406" or a list of 3 → per RGB channel."""
    if value is None:
        return None
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        numbers = [float(p) for p in parts]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) == 1:
        numbers *= 3
    if len(numbers) != 3 or isinstance(value, bool):
        raise ConfigError(f"{flag} takes one number or three (R,G,B), e.g. 0.485,0.456,0.406; got {value!r}")
    return numbers[0], numbers[1], numbers[2]


def load_job_file(path: str) -> dict[str, Any]:
    """Read a TOML or YAML job file; options may sit at the top level or under [run]."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"job file '{path}' does not exist; check --config")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"job file '{path}' must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"job file '{path}' is not valid: {exc}") from None
    except Exception as exc:  # yaml.YAMLError without importing yaml at module load
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"job file '{path}' is not valid YAML: {exc}".splitlines()[0]) from None
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"job file '{path}' must hold a table of options")
    section = data.get("run", data)
    if not isinstance(section, dict):
        raise ConfigError(f"job file '{path}': [run] must be a table of options")
    base = file.parent
    resolved = dict(section)
    for key in ("input", "output"):  # relative paths in a job file are relative to the file
        value = resolved.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value) and "://" not in value:
            resolved[key] = str(base / value)
    model = resolved.get("model")
    model_file = isinstance(model, str) and model.endswith((".onnx", ".pt", ".pth", ".pt2", ".ts"))
    if model_file and isinstance(model, str) and not os.path.isabs(model):
        resolved["model"] = str(base / model)
    return resolved
