"""The one vocabulary of a job and a server: what crosses the process boundary between the
driver and a worker, and what the pure scheduler and supervisor are told and asked.

Everything here is a small frozen dataclass; errors travel as `ErrorInfo`, never as lost
tracebacks. The same records serve both sides of the wire and the scheduler, so a backend
passes what a worker says straight on (no translation layer):

    events (worker or backend -> driver -> scheduler):
        WorkerReady  WorkerFailed  WorkerLost  BlockStarted  BlockDone  BlockFailed  Tick
        BatchDone  BatchFailed                                    (serving answers)
    actions (scheduler -> driver -> backend):
        Assign  Cancel  StartWorker  StopWorker  Finish
    orders (driver -> worker, over the wire):
        RunBlock (an Assign with the block's descriptor)  Cancel  StopWorker  InferBatch

`WorkerLost` is made by a backend (a process exited, an actor died), never sent by the worker
itself; `Tick` is made by the driver's loop. Only ids travel in scheduler events and actions;
the payloads (rows, timings, a model's inputs) ride along with defaults, so that the
scheduler's unit tests write `BlockDone(0, 3)`.

This module imports nothing heavy at run time (the annotations are for type checkers), so
the pure scheduler can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from .errors import ErrorInfo

if TYPE_CHECKING:
    import numpy as np

    from .data.blocks import Block
    from .data.sources import SourceSpec
    from .models.family import ModelSpec

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KV_PAGE_TOKENS",
    "SAMPLING_CANDIDATES",
    "Action",
    "Assign",
    "BackendName",
    "BadRow",
    "BatchDone",
    "BatchFailed",
    "BlockDone",
    "BlockFailed",
    "BlockStarted",
    "Cancel",
    "Device",
    "Event",
    "Finish",
    "Generate",
    "GenerationOptions",
    "GenerationStats",
    "GroupStats",
    "ImageOptions",
    "InferBatch",
    "Layout",
    "Order",
    "Piece",
    "RunBlock",
    "StartWorker",
    "StopSequence",
    "StopWorker",
    "Strategy",
    "TensorComm",
    "TensorInfo",
    "Tick",
    "TokenPieces",
    "WorkerFailed",
    "WorkerLost",
    "WorkerMessage",
    "WorkerReady",
    "WorkerSpec",
    "sampling_problem",
]

Strategy: TypeAlias = Literal["data", "pipeline", "tensor"]  # how one replica holds the model
BackendName: TypeAlias = Literal["local", "ray"]  # where replicas run
Device: TypeAlias = Literal["cpu", "cuda"]
TensorComm: TypeAlias = Literal["auto", "shm", "gloo", "nccl"]  # how tensor-parallel ranks talk
StageTransport: TypeAlias = Literal["local", "ray"]  # how pipeline stages are linked


# --- records carried by messages ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """A text-generation job's settings (`--task generate`); per-row columns may override
    the sampling ones. Part of the model spec, so a resumed job must use the same."""

    max_tokens: int = 128  # new tokens per row, at most
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit (within the sampler's candidates)
    min_p: float = 0.0
    seed: int = 0  # a row's seed is this plus its row number, unless a 'seed' column gives it
    stop: tuple[str, ...] = ()  # strings that end a completion (cut from its text)
    ignore_eos: bool = False  # go on to max_tokens (benchmarks)
    max_running: int = 32  # sequences one replica advances together
    kv_cache_bytes: int = 1 << 30  # the KV cache of one replica, all its stages or ranks together
    step_tokens: int = 256  # tokens fed per step at most (prompts are prefilled in chunks of it)
    dtype: str = "float32"  # weights and activations: float32 or bfloat16

    def problem(self) -> str | None:
        """Why the sampling settings are out of range, naming the option; None when fine."""
        return sampling_problem(self.temperature, self.top_k, self.top_p, self.min_p)


#: tokens per page of a generation replica's KV cache (models/llm/paged.py)
KV_PAGE_TOKENS = 16

#: tokens per sequence that sampling considers (models/llm/sampling.py)
SAMPLING_CANDIDATES = 64


def sampling_problem(temperature: float, top_k: int, top_p: float, min_p: float) -> str | None:
    """Why sampling parameters are out of range ("temperature must be >= 0, got -1"); None if fine."""
    if not (temperature >= 0 and temperature != float("inf")):
        return f"temperature must be >= 0, got {temperature}"
    if not 0 <= top_k <= SAMPLING_CANDIDATES:
        return f"top_k must be between 0 (no limit) and {SAMPLING_CANDIDATES}, got {top_k}"
    if not 0 < top_p <= 1:
        return f"top_p must be in (0, 1], got {top_p}"
    if not 0 <= min_p <= 1:
        return f"min_p must be in [0, 1], got {min_p}"
    return None


@dataclass(frozen=True, slots=True)
class GenerationStats:
    """What a replica's generation engine did over one block."""

    prompt_tokens: int = 0  # prefilled (recomputed ones after a preemption included)
    generated_tokens: int = 0
    steps: int = 0
    running_sum: int = 0  # sequences per step, summed: / steps = the mean running batch
    preemptions: int = 0
    peak_kv_pages: int = 0
    kv_pages: int = 0  # pages the replica's cache holds
    kv_cache_bytes: int = 0  # what they take, all stages or ranks together
    first_token_s: float | None = None  # from the block's first request to its first token
    model_s: float = 0.0  # the block's generation, end to end


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A model input or output: `dtype` a numpy dtype string ("<f4") or "text"; `shape` with
    -1 for a dimension of any size, the first (rows) always -1."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class GroupStats:
    """What the processes of one replica group (pipeline stages or tensor-parallel ranks)
    did while it ran one block's batches; lists hold one entry per member, in order."""

    kind: Literal["stage", "rank"]
    wall_s: float  # the block's forward_many, start to end
    micro_batches: int
    busy_s: tuple[float, ...]  # computing layers
    comm_s: tuple[float, ...]  # moving activations: queue put/get, broadcasts, all-reduces
    peak_rss: tuple[int, ...]  # bytes, the member process's peak resident memory so far
    bubble_s: float = 0.0  # pipeline: stage-seconds idle while the block's pipeline filled and drained


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker needs to load its model and do blocks (or serve batches); sent once at start."""

    model: ModelSpec
    source: SourceSpec | None  # None when serving: rows arrive in InferBatch messages
    column: str | None
    output_dir: str
    batch_size: int
    threads: int
    device: Device = "cpu"
    strategy: Strategy = "data"
    stages: tuple[tuple[int, int], ...] = ()  # pipeline: layer range of each stage
    tensor_parallel: int = 1  # tensor: ranks per replica
    tensor_comm: TensorComm = "auto"  # tensor: how ranks exchange tensors (worker/collectives.py)
    stage_transport: StageTransport = "local"  # pipeline: "local" child processes or "ray" actors
    stage_slot_bytes: int = 0  # pipeline, local: each shared activation buffer (0: the default)
    stage_options: dict[str, Any] = field(default_factory=dict)  # ray: what each stage actor asks for
    serving: bool = False  # warm the model up and describe its inputs and outputs before ready
    max_bad_rows: int = 0  # rows a block may set aside (quarantine); 0: a bad row fails the block
    images: ImageOptions | None = None  # the rows are images, decoded so (models/images.py)
    keep: tuple[str, ...] = ()  # input columns written next to the outputs (an image's path)


# --- events: worker or backend -> driver -> scheduler --------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """The worker has loaded its model and can take blocks (or batches)."""

    worker: int
    pid: int = 0
    host: str = ""
    load_s: float = 0.0  # from the worker's entry to a loaded model (imports included)
    members: tuple[str, ...] = ()  # a group's stages or ranks: where each runs
    inputs: tuple[TensorInfo, ...] = ()  # serving: what the model takes (from the warm-up)
    outputs: tuple[TensorInfo, ...] = ()  # serving: what it returned for the warm-up rows
    pads_batches: bool = True  # serving: the model pays for padding (`Runner.pads_batches`)
    kv_pages: int = 0  # serving text generation: the KV cache's pages (0: not a generation replica)
    max_running: int = 0  # serving text generation: sequences the replica advances together


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    """The worker could not start (model failed to load, bad column binding); it may still be
    alive, so it is stopped."""

    worker: int
    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class WorkerLost:
    """The worker's process died or its actor was lost (made by the backend)."""

    worker: int
    reason: str


@dataclass(frozen=True, slots=True)
class BlockStarted:
    """The worker began computing the block; from now on the block cannot be stolen."""

    worker: int
    block: int


@dataclass(frozen=True, slots=True)
class BadRow:
    """One quarantined row (`--max-bad-rows`): where it failed and why."""

    row: int  # the input's absolute row
    stage: str  # read, preprocess or model
    kind: str  # the error's type
    message: str  # names the row ("data.txt row 7 (line 8): ...")
    value: str = ""  # the row's input, cut to about 1 kB


@dataclass(frozen=True, slots=True)
class BlockDone:
    """The worker finished the block and its output part is written (without its bad rows,
    which are in `bad` and in the block's part of DIR/_errors/)."""

    worker: int
    block: int
    rows: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # per stage of the worker's loop
    elapsed_s: float = 0.0  # since the worker became ready
    group: GroupStats | None = None  # pipeline stages / tensor ranks, this block
    generation: GenerationStats | None = None  # a generation job's engine, this block
    bad: tuple[BadRow, ...] = ()


@dataclass(frozen=True, slots=True)
class BlockFailed:
    """The block raised on the worker; a fatal error fails the job, another is retried. The
    worker (and its whole group) is still up and takes the next block."""

    worker: int
    block: int
    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class BatchDone:
    """Serving: the outputs of an `InferBatch`, one row per input row, in order."""

    worker: int
    batch_id: int
    outputs: dict[str, np.ndarray]
    busy_s: float


@dataclass(frozen=True, slots=True)
class BatchFailed:
    """Serving: an `InferBatch` raised; the replica is still up."""

    worker: int
    batch_id: int
    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class Piece:
    """New text of one sequence: whole characters only (may be ""), the tokens it came from,
    and on its last piece why it ended ("stop", "length", or "error" with `error`)."""

    request: int
    text: str
    tokens: int
    finish: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class TokenPieces:
    """Serving text generation: what a replica's engine made since its last report, and its
    state now, which the server routes and admits by."""

    worker: int
    pieces: tuple[Piece, ...]
    running: int  # sequences in the engine's running batch
    waiting: int  # sequences given to it and not yet started
    free_pages: int  # KV pages free
    preemptions: int  # since the replica started
    token_s: float  # measured seconds between two tokens of one sequence (decode)
    prefill_token_s: float  # measured seconds of prefill per prompt token
    busy_s: float = 0.0  # seconds spent in engine steps since the last report


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed; lets the scheduler notice timeouts when nothing else happens."""


Event: TypeAlias = WorkerReady | BlockStarted | BlockDone | BlockFailed | WorkerLost | WorkerFailed | Tick
WorkerMessage: TypeAlias = (
    WorkerReady | WorkerFailed | WorkerLost | BlockStarted | BlockDone | BlockFailed | BatchDone | BatchFailed
    | TokenPieces
)
"""What `Backend.receive` returns: what workers said, and the losses the backend saw."""


# --- actions: scheduler -> driver -> backend -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Assign:
    """Append the block to the worker's queue (the driver sends it as a `RunBlock`)."""

    worker: int
    block: int


@dataclass(frozen=True, slots=True)
class Cancel:
    """Take a queued block back from the worker; a worker that already started it may finish
    it. Sent to the worker as it is."""

    worker: int
    block: int


@dataclass(frozen=True, slots=True)
class StartWorker:
    """Start a (replacement) worker under this new id."""

    worker: int


@dataclass(frozen=True, slots=True)
class StopWorker:
    """Shut the worker down. Sent to a local worker as it is; a Ray actor is killed."""

    worker: int


@dataclass(frozen=True, slots=True)
class Finish:
    """The job is over: `error` is None on success. Always the last action the scheduler emits."""

    error: ErrorInfo | None


Action: TypeAlias = Assign | Cancel | StartWorker | StopWorker | Finish


# --- orders: driver -> worker ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunBlock:
    """Queue this block on the worker: its rows are read, run and written by the worker."""

    block: Block


@dataclass(frozen=True, slots=True)
class InferBatch:
    """Serving: run these rows (keyed by model input) now; answered by BatchDone or BatchFailed."""

    batch_id: int
    inputs: dict[str, Any]  # model input -> a column (list of str or numpy array)


@dataclass(frozen=True, slots=True)
class Generate:
    """Serving text generation: start this sequence; its text comes back in `TokenPieces`."""

    request: int  # the server's id of the sequence (one per choice)
    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class StopSequence:
    """Serving text generation: end this sequence at the next step (its client went away)."""

    request: int


Order: TypeAlias = RunBlock | Cancel | InferBatch | Generate | StopSequence
"""What `Backend.send` delivers to a worker."""


# --- images: how a job's image rows are decoded (models/images.py) --------------------------

Layout = Literal["NCHW", "NHWC"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the usual ratio of the crop to the shorter side it is cut from (224 out of 256)
CROP_RATIO = 0.875


@dataclass(frozen=True, slots=True)
class ImageOptions:
    """How image rows become model tensors. None: not given (a family's default, the model's
    input shape, or the defaults in `resolved`).

    `size` is the tensor's (height, width). With `crop` "center" the image's shorter side is
    first scaled to `resize` (default: size / 0.875, so 256 for 224) and the centre cut out;
    with "none" the whole image is scaled to `size` (its aspect ratio not kept). Pixels are
    scaled to [0, 1], then `(x - mean) / std` per RGB channel. `base` is the folder relative
    paths in a column are taken from (the input file's)."""

    size: tuple[int, int] | None = None
    resize: int | None = None
    crop: Literal["center", "none"] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    layout: Layout | None = None
    draft: bool = True
    base: str = ""

    def over(self, defaults: ImageOptions | None) -> ImageOptions:
        """These options, with what they leave unset taken from `defaults`."""
        if defaults is None:
            return self
        given = {f: getattr(self, f) for f in ("size", "resize", "crop", "mean", "std", "layout")
                 if getattr(self, f) is not None}
        return replace(defaults, **given, draft=self.draft, base=self.base or defaults.base)

    def resolved(self, shape: Sequence[int] | None) -> ImageOptions:
        """Every field set: the size and layout read from the model input's `shape` (rows
        first, -1 where any size goes) when not given, else 224 x 224, NCHW."""
        layout, size = self.layout, self.size
        if shape is not None and len(shape) == 4:
            if layout is None:
                layout = "NHWC" if shape[3] == 3 and shape[1] != 3 else "NCHW"
            hw = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
            if size is None and hw[0] > 0 and hw[1] > 0:
                size = (int(hw[0]), int(hw[1]))
        size = size or (224, 224)
        crop = self.crop or "center"
        resize = self.resize or round(min(size) / CROP_RATIO)
        return replace(self, size=size, resize=resize, crop=crop, layout=layout or "NCHW",
                       mean=self.mean or IMAGENET_MEAN, std=self.std or IMAGENET_STD)
