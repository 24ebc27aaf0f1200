"""`distinfer` command line: arguments → config → api. Errors print one line, exit non-zero."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError, DistinferError
from .logs import log_to_stderr

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _run_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a model over a data set with several workers",
        description=(
            "Run MODEL over every row of INPUT with several workers and write the predictions "
            "to DIR as a Parquet data set (a 'row' column with the 0-based input row, one column "
            "per model output). Running the same command again resumes an interrupted job."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="FILE", help="job file (.toml/.yaml) with these options; flags override it")
    p.add_argument("--model", "-m", help="built-in model (minilm, decoder-SIZE, gemma3-270m), an .onnx file, a TorchScript/.pt2 file, package.module:factory, or a text-generation model: a .gguf file or a Hugging Face model directory (Gemma 3, Llama, Mistral, Qwen2)")
    p.add_argument("--input", "-i", help="input file: .txt (a row per line), .jsonl, .csv, .parquet, .npy; or images: a directory (its .jpg/.jpeg/.png/.webp/... files, subdirectories included) or a quoted glob such as 'photos/**/*.jpg'")
    p.add_argument("--output", "-o", metavar="DIR", help="output directory (Parquet data set, _manifest.json, _report.json)")
    p.add_argument("--workers", "--replicas", "-w", dest="workers", type=int, help="replicas (default 2): worker processes, or pipelines / tensor-parallel groups with --strategy pipeline/tensor")
    p.add_argument("--threads-per-worker", type=int, help="threads per process (default: the cores divided among all worker, stage or rank processes)")
    p.add_argument("--batch-size", type=int, help="rows per model call (default 64)")
    p.add_argument("--block-size", type=int, help="rows per block, the unit of scheduling and of output files (default 1024)")
    p.add_argument("--min-block-size", type=int, help="rows in the first and last blocks, so results start fast and the tail balances (default: batch size)")
    p.add_argument("--column", "--field", dest="column", help="input column/field to feed the model (default: 'text', the only column, or the columns named like the model inputs)")
    p.add_argument("--input-format", choices=["text", "jsonl", "csv", "parquet", "npy", "images"], help="input format when the file suffix does not tell; images: a text file listing image paths, one per line")
    p.add_argument("--overwrite", action="store_true", help="replace another job's output in DIR")
    p.add_argument("--max-bad-rows", metavar="N|P%", help="rows that may fail (unreadable, rejected by the model's preprocessing, or raising in the forward pass) and be set aside: N rows, or P%% of the input's rows. Each goes to DIR/_errors/ (Parquet: row, stage, error_type, message, input) and every other row is computed; the job fails when more fail. Default 0: the first bad row fails the job, naming it")
    p.add_argument("--speculation", choices=["on", "off"], help="at the job's tail, an idle worker runs a copy of a block whose worker is much slower than the others; the first copy to finish commits (default on)")
    p.add_argument("--retry-bad-rows", action="store_true", help="when resuming, compute the rows set aside by the earlier run again (by default they stay set aside)")
    _layout_args(p)
    _generation_args(p, job=True)
    _image_args(p)
    p.add_argument("--start-timeout", dest="start_timeout_s", type=float, help="fail the job when no worker is ready for this many seconds; a replacement worker still loading after this long is stopped and replaced (default 600)")
    p.add_argument("--max-restarts", type=int, help="replacement workers allowed over the job (default 3)")
    p.add_argument("--prefetch", type=int, help="blocks queued per worker, including the running one (default 2)")
    p.add_argument("--baseline-throughput", type=float, metavar="ROWS_PER_S", help="one worker's throughput (from 'distinfer bench'), for the scaling efficiency in the report")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, help="show a progress bar (default: when stderr is a terminal)")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _layout_args(p: Any) -> None:
    """Where replicas run and how each holds the model: shared by 'run' and 'serve'."""
    p.add_argument("--backend", choices=["local", "ray"], help="where workers run: local processes (default) or actors on a Ray cluster")
    p.add_argument("--address", help="ray: the cluster to join: 'auto' (the one 'ray start' made on this node), 'ray://host:10001', or leave out to start Ray on this machine")
    p.add_argument("--worker-cpus", type=float, help="ray: CPUs each worker asks for (default 1)")
    p.add_argument("--worker-gpus", type=float, help="ray: GPUs each worker asks for (default 0)")
    p.add_argument("--worker-resource", dest="worker_resources", action="append", type=_resource, metavar="NAME=AMOUNT", help="ray: a custom resource each worker asks for, to pin workers to kinds of nodes (repeatable)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="device for the model (default cpu)")
    p.add_argument("--strategy", choices=["auto", "data", "pipeline", "tensor"], help="auto (default): the top plan of 'distinfer plan' among those that agree with the options you give; by default only from a profile already cached on this machine (else data parallel, or the fewest pipeline stages that fit --worker-memory), and asked for by name, 'run' measures the model first (about a minute, once) while 'serve' refuses to start without a profile; data: a whole model copy per replica; pipeline: each replica is a group of stage processes, each holding only its layers (built-in models, ONNX files, traceable PyTorch models); tensor: each replica is a group of ranks sharing every layer, Megatron-style (minilm, decoder-SIZE)")
    p.add_argument("--tensor-parallel", type=int, help="tensor: ranks per replica (default 2)")
    p.add_argument("--tensor-comm", choices=["auto", "shm", "gloo", "nccl"], help="tensor: how ranks exchange activations: shm = shared memory (the CPU default, fastest on one machine), gloo = torch.distributed over loopback TCP, nccl = torch.distributed on GPUs (the --device cuda default)")
    p.add_argument("--stages", type=int, help="pipeline: stages per worker (default 2, or the fewest that fit --worker-memory)")
    p.add_argument("--cuts", type=_cuts, help="pipeline: explicit cut points, the first layer of stages 2.. (e.g. 4,9); see 'distinfer plan'")
    p.add_argument("--worker-memory", help="memory limit per worker process, e.g. 3GiB: pipeline stages are cut to fit it, and a model larger than it is refused for --strategy data")


def _generation_args(p: Any, job: bool) -> None:
    """Text-generation options: the engine's (shared by 'run' and 'serve') and, for a job,
    its sampling defaults (a server takes those from each request)."""
    g = p.add_argument_group("text generation (gemma3-270m, .gguf files, Hugging Face model directories)")
    if job:
        g.add_argument("--task", choices=["generate"], help="generate: prompts in (column 'prompt', or 'messages' for a chat), completions out; the default for generation models")
        g.add_argument("--max-tokens", type=int, help="new tokens per row at most (default 128; a 'max_tokens' column overrides it per row)")
        g.add_argument("--temperature", type=float, help="0 = greedy (default); higher samples more freely (a 'temperature' column overrides it)")
        g.add_argument("--top-p", type=float, help="sample from the smallest set of tokens holding this much probability (default 1)")
        g.add_argument("--top-k", type=int, help="sample from the k most likely tokens, at most 64 (default 0: all 64 candidates)")
        g.add_argument("--min-p", type=float, help="drop tokens less likely than this times the most likely one (default 0)")
        g.add_argument("--seed", type=int, help="sampling seed; row r uses seed + r unless a 'seed' column gives it, so a row's text does not depend on the worker or the strategy (default 0)")
        g.add_argument("--stop", action="append", help="a string that ends a completion, cut from its text (repeatable)")
        g.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-text token up to --max-tokens (for benchmarks)")
    g.add_argument("--max-running", type=int, help="sequences a replica advances together, continuous batching (default 32)")
    g.add_argument("--kv-cache-memory", help="KV cache of one replica, all its stages or ranks together, e.g. 512MiB (default 1GiB); when full, sequences are preempted and recomputed later")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights and activations (default float32; GGUF weights are dequantised to it)")


def _image_args(p: Any) -> None:
    g = p.add_argument_group("images (an image directory or glob as --input, or a column of image bytes or paths)",
                             "Each image is decoded, converted to RGB, its shorter side resized, the centre cropped, "
                             "pixels scaled to [0, 1] and normalised, (x - mean) / std, in the workers. A built-in "
                             "vision model (efficientnet-lite0) brings its own settings; these flags override them.")
    g.add_argument("--image-size", metavar="N|HxW", help="the model's input size (default: from the model's input shape, else 224)")
    g.add_argument("--resize", type=int, metavar="PIXELS", help="the shorter side before the centre crop (default: image size / 0.875, e.g. 256 for 224)")
    g.add_argument("--crop", choices=["center", "none"], help="center (default): cut the image size out of the middle; none: scale the whole image to the image size, aspect ratio not kept")
    g.add_argument("--mean", metavar="M|R,G,B", help="subtracted per channel from pixels in [0, 1] (default ImageNet's 0.485,0.456,0.406)")
    g.add_argument("--std", metavar="S|R,G,B", help="divides per channel after the mean (default ImageNet's 0.229,0.224,0.225)")
    g.add_argument("--layout", choices=["NCHW", "NHWC"], help="tensor layout (default: from the model's input shape, else NCHW)")
    g.add_argument("--jpeg-draft", choices=["on", "off"], help="on (default): let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale before resizing (faster, slightly different pixels); off: decode every pixel")


def _cuts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like 4,9, got {text!r}") from None


def _resource(text: str) -> tuple[str, float]:
    name, sep, amount = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(amount)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT (e.g. accelerator_x=1), got {text!r}") from None


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP (KServe v2; OpenAI-compatible for text generation) over replicas",
        description=(
            "Serve MODEL at http://HOST:PORT with the KServe v2 / Open Inference Protocol "
            "(POST /v2/models/NAME/infer, JSON or binary tensors; POST /text for text models; "
            "GET /metrics). Concurrent requests are merged into batches of up to --max-batch-size "
            "rows, waiting at most --max-queue-delay-ms, and each batch goes to the least-loaded "
            "ready replica. A text-generation model (gemma3-270m, a .gguf file, a Hugging Face "
            "directory) is served by the OpenAI routes instead: POST /v1/completions, "
            "POST /v1/chat/completions (streamed with 'stream': true) and GET /v1/models; each "
            "replica batches up to --max-running sequences continuously, and each new request goes "
            "to the replica that will start it soonest. SIGTERM or Ctrl-C drains: readiness turns "
            "false, queued and running requests finish, then the server exits 0."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--model", "-m", required=True, help="built-in model (minilm, decoder-SIZE, gemma3-270m), an .onnx file, or a text-generation model: a .gguf file or a Hugging Face model directory")
    p.add_argument("--model-name", help="the model's name in URLs (default: minilm, decoder-SIZE, or the file's stem)")
    p.add_argument("--replicas", "--workers", "-w", dest="replicas", type=int, help="replicas (default 2): worker processes, or pipelines / tensor-parallel groups with --strategy pipeline/tensor")
    p.add_argument("--threads-per-replica", "--threads-per-worker", dest="threads_per_replica", type=int, help="threads per process (default: the cores divided among all processes)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000; 0 picks a free one, printed at start)")
    p.add_argument("--max-batch-size", type=int, help="rows merged into one model call (default 32)")
    p.add_argument("--max-queue-delay-ms", type=float, help="how long a request waits for others to join its batch when a replica is free (default 10)")
    p.add_argument("--max-queue", type=int, help="rows (generation: requests) allowed to wait; requests beyond get 429 (default 512)")
    p.add_argument("--timeout-ms", type=float, help="a request's deadline when it sets no 'timeout' parameter (default 1000; generation: 10000, for the first token): 429 at once if it cannot be met, 504 if it passes while queued")
    p.add_argument("--drain-timeout", dest="drain_timeout_s", type=float, help="on SIGTERM, seconds queued and running requests may take before the server exits (default 30)")
    p.add_argument("--max-body-bytes", type=int, help="larger request bodies get 413 (default 16 MiB)")
    p.add_argument("--max-restarts", type=int, help="replacement replicas over the server's life (default 10)")
    p.add_argument("--start-timeout", dest="start_timeout_s", type=float, help="exit with an error when no replica is warm after this many seconds; a replica still loading this long after its own start is stopped and replaced (default 600)")
    p.add_argument("--latency-target", dest="latency_target_s", type=_milliseconds, metavar="MS", help="--strategy auto: one batch's latency at most, e.g. 100ms (a bare number is ms): the top plan that meets it, and its batch size as --max-batch-size unless given")
    p.add_argument("--request-rate", type=float, metavar="ROWS_PER_S", help="--strategy auto: rows/s the replicas must sustain together: the top plan that does")
    _layout_args(p)
    _generation_args(p, job=False)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure one worker's throughput (the baseline for scaling efficiency)",
        description="Measure the throughput of one worker in this process, to pass as --baseline-throughput.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", "-m", required=True, help="as for 'distinfer run'")
    p.add_argument("--input", "-i", required=True, help="as for 'distinfer run'")
    p.add_argument("--rows", type=int, default=512, help="rows to time (after one warm-up batch)")
    p.add_argument("--threads", type=int, default=1, help="threads of the one worker")
    p.add_argument("--batch-size", type=int, default=64, help="rows per model call")
    p.add_argument("--column", "--field", dest="column", default=None, help="input column")
    p.add_argument("--input-format", default=None, help="input format when the suffix does not tell")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _plan_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="choose how to split a model over this machine or a cluster, and predict the run",
        description=(
            "With --input: measure MODEL on this machine (once; the profile is cached), then "
            "rank every layout it can take on the resources (this machine, or --cluster FILE): "
            "data, pipeline and tensor parallel and their hybrids, with replicas, stages or "
            "ranks, threads and batch size. Each plan shows its predicted throughput, the job's "
            "time, one batch's latency, the memory per process and its reasons. "
            "Without --input, or with --stages/--cuts: cut MODEL into pipeline stages only "
            "(measured one layer in memory at a time) and show each stage's time and memory."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", "-m", required=True, help="minilm, decoder-SIZE, an .onnx file, or a PyTorch model (package.module:factory, .pt2)")
    p.add_argument("--input", "-i", default=None, help="the input (a sample of its rows is measured; its row count is the job's size)")
    p.add_argument("--rows", type=int, default=None, help="plan for this many rows like the input's (default: the input's row count)")
    p.add_argument("--cluster", metavar="FILE", default=None, help="a cluster file (TOML or JSON: [[node]] kind, count, cores, memory, gpus, speed, network); default this machine")
    p.add_argument("--latency-target", type=_milliseconds, default=None, metavar="MS", help="one batch's latency at most, e.g. 100ms or 0.5s (a bare number is ms)")
    p.add_argument("--request-rate", type=float, default=None, help="serving: rows/s the plan must sustain")
    p.add_argument("--block-size", type=int, default=1024, help="rows per block (for the pipeline bubble)")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    p.add_argument("--top", type=int, default=5, help="usable plans to show")
    p.add_argument("--refresh-profile", action="store_true", help="measure again instead of using the cached profile")
    p.add_argument("--column", "--field", dest="column", default=None, help="input column")
    p.add_argument("--input-format", default=None, help="input format when the suffix does not tell")
    p.add_argument("--stages", type=int, default=None, help="pipeline stages to cut into (default: 2, or the fewest that fit --worker-memory)")
    p.add_argument("--worker-memory", default=None, help="memory limit per worker process, e.g. 3GiB")
    p.add_argument("--cuts", type=_cuts, default=None, help="explicit cut points instead of the balanced cut: layer indices where stages 2.. start, e.g. 4,9")
    p.add_argument("--batch-size", type=int, default=8, help="the pipeline cut: rows per micro-batch")
    p.add_argument("--seq-len", type=int, default=64, help="the pipeline cut: tokens per row for the measurement")
    p.add_argument("--micro-batches", type=int, default=8, help="the pipeline cut: micro-batches in flight, for the bubble figure")
    p.add_argument("--max-tokens", type=int, default=128, help="text generation: new tokens per row at most, as for 'run'")
    p.add_argument("--ignore-eos", action="store_true", help="text generation: every row generates --max-tokens (a known output length)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="text generation: weights and activations, as for 'run'")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _milliseconds(text: str) -> float:
    """Seconds from '100ms', '0.5s' or a bare number of milliseconds."""
    t = text.strip().lower()
    try:
        if t.endswith("ms"):
            return float(t[:-2]) / 1e3
        if t.endswith("s"):
            return float(t[:-1])
        return float(t) / 1e3
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 100ms or 0.5s, got {text!r}") from None


def _cmd_plan(args: dict[str, Any]) -> int:
    if args["input"] is None or args["stages"] is not None or args["cuts"]:
        return _cmd_cut(args)
    import json

    from .api import plan
    from .planning.describe import describe_plans, plans_json

    advice = plan(
        args["model"], args["input"], rows=args["rows"], cluster=args["cluster"],
        latency_target_s=args["latency_target"], request_rate=args["request_rate"],
        worker_memory=args["worker_memory"], block_size=args["block_size"],
        refresh_profile=args["refresh_profile"], input_format=args["input_format"], column=args["column"],
        max_tokens=args["max_tokens"], ignore_eos=args["ignore_eos"], dtype=args["dtype"],
    )  # fmt: skip
    if args["json"]:
        print(json.dumps(plans_json(advice.plans, advice.profile, advice.cluster, advice.workload), indent=1))
    else:
        print(describe_plans(advice.plans, advice.profile, advice.cluster, advice.workload, args["top"]))
    return 0


def _cmd_cut(args: dict[str, Any]) -> int:
    from .driver.layout import RUNTIME_RESERVE, choose_plan, usable_memory
    from .models.families import parse_model
    from .planning import format_bytes

    limit = usable_memory(args["worker_memory"])
    spec = parse_model(args["model"])
    costs = spec.family.layer_costs(spec, args["batch_size"], args["seq_len"])
    names = [c.name for c in costs]
    plan = choose_plan(costs, args["stages"], args["cuts"], limit)
    total = sum(c.weight_bytes for c in costs)
    print(f"{args['model']}: {len(costs)} layers, {format_bytes(total)} of weights"
          + (f", {format_bytes(limit)} per worker for the model ({args['worker_memory']} less "
             f"{format_bytes(RUNTIME_RESERVE)} for the runtime)" if limit else ""))
    print(plan.describe(names))
    p, m = len(plan.stages), args["micro_batches"]
    print(f"bubble with {m} micro-batches: {plan.bubble(m):.1%} = (p-1)/(m+p-1) for p={p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distinfer",
        description="Distributed inference of PyTorch and ONNX models over many workers.",
    )
    parser.add_argument("--version", action="version", version="distinfer 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _run_parser(sub)
    _serve_parser(sub)
    _bench_parser(sub)
    _plan_parser(sub)
    from .simulation.cli import add_parser as _simulate_parser

    _simulate_parser(sub)
    sub.add_parser("models", help="list the model families (built-in models, ONNX files, PyTorch models)")
    return parser


def _cmd_run(args: dict[str, Any]) -> int:
    from .api import run
    from .config import load_job_file

    options: dict[str, Any] = {}
    if "config" in args:
        options.update(load_job_file(args.pop("config")))
    if "worker_resources" in args:
        args["worker_resources"] = dict(args["worker_resources"])
    options.setdefault("progress", None)  # the CLI draws a bar on a terminal; the API does not
    if "stop" in args:
        args["stop"] = tuple(args["stop"])
    for flag in ("speculation", "jpeg_draft"):
        if flag in args:
            args[flag] = args[flag] == "on"
    options.update(args)
    report = run(**options)  # keywords: an option given by name, --strategy auto among them, is known
    print(report.summary(), file=sys.stderr)
    return 0


def _cmd_serve(args: dict[str, Any]) -> int:
    from .api import serve
    from .serving.config import ServeConfig

    if "worker_resources" in args:
        args["worker_resources"] = dict(args["worker_resources"])
    try:
        ServeConfig(**args)  # checked here, where a wrong keyword is the user's
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    return serve(**args)


def _cmd_bench(args: dict[str, Any]) -> int:
    from .api import bench

    rate = bench(
        args["model"], args["input"], rows=args["rows"], threads=args["threads"],
        batch_size=args["batch_size"], column=args["column"], input_format=args["input_format"],
    )
    print(f"{rate:.1f} rows/s with one worker x {args['threads']} thread(s)")
    print(f"pass --baseline-throughput {rate:.1f} to 'distinfer run' for the scaling efficiency")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    log_to_stderr()  # the pipeline cut, a server's life: "distinfer: ..." lines
    command = args.pop("command")
    debug = bool(args.pop("debug", False))
    try:
        if command == "run":
            return _cmd_run(args)
        if command == "serve":
            return _cmd_serve(args)
        if command == "bench":
            return _cmd_bench(args)
        if command == "plan":
            return _cmd_plan(args)
        if command == "simulate":
            from .simulation.cli import run as _cmd_simulate

            return _cmd_simulate(args)
        from .models.families import FAMILIES

        width = max(len(family.name) for family in FAMILIES)
        for family in FAMILIES:
            print(f"{family.name:{width}s} {family.summary}")
        return 0
    except KeyboardInterrupt:
        print("distinfer: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DistinferError as exc:
        if debug:
            traceback.print_exc()
        print(f"distinfer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
