"""`serve(config)`: plan the replicas as the batch engine does, start them, listen, and on
SIGTERM or Ctrl-C drain (readiness false first, queued and running requests finish within
`drain_timeout_s`) and exit 0."""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

from ..backends import make_backend
from ..driver.job import with_task
from ..driver.layout import plan_layout
from ..errors import ConfigError, DistinferError
from ..logs import log
from ..messages import WorkerSpec
from ..models.families import parse_model
from .config import ServeConfig, served_name

if TYPE_CHECKING:
    from aiohttp import web

    from .generation import GenerationServer
    from .metrics import ServerMetrics

__all__ = ["serve"]


def serve(config: ServeConfig) -> int:
    """Run the server until SIGTERM or Ctrl-C; the exit code (0 after a clean drain)."""
    return asyncio.run(_serve(laid_out(config)))


def laid_out(config: ServeConfig) -> ServeConfig:
    """`config` with `strategy="auto"` made concrete, as the default `auto` does (no measuring)."""
    if config.strategy != "auto":
        return config
    from ..driver.advisor import announce, auto_serve_layout

    config, line = auto_serve_layout(config, set())
    announce(line)
    return config


def worker_spec(config: ServeConfig) -> WorkerSpec:
    """The replicas' spec: the batch engine's, with no input source and a warm-up."""
    config = laid_out(config)
    run = config.run_config()
    model = with_task(parse_model(config.model), run)
    strategy = config.strategy
    if strategy == "auto":  # laid_out made it concrete
        raise ConfigError("serve: the layout was not planned")
    problem = model.family.serving_problem(model, strategy)
    if problem is not None:
        raise ConfigError(problem)
    layout = plan_layout(run, model)
    # A pipeline replica cuts each batch into micro-batches that stream through its stages.
    stages = layout.stages
    rows_per_call = max(1, config.max_batch_size // (2 * len(stages))) if stages else config.max_batch_size
    return WorkerSpec(model, None, None, "", rows_per_call, run.threads, config.device, layout.strategy,
                      stages, layout.ranks, tensor_comm=config.tensor_comm,
                      stage_slot_bytes=layout.slot_bytes, serving=True)


async def _serve(config: ServeConfig) -> int:
    from aiohttp import web

    from .app import make_app
    from .generation import GenerationServer
    from .metrics import ServerMetrics
    from .server import InferenceServer

    spec = worker_spec(config)
    name = config.model_name or served_name(spec.model)
    metrics = ServerMetrics()
    backend = make_backend(config.run_config(), spec)
    if spec.model.generation is not None:
        server: InferenceServer = GenerationServer(config, backend, metrics, name, spec.model.kind)
    else:
        server = InferenceServer(config, backend, metrics, name, spec.model.kind)
    app = make_app(server, metrics, config.max_body_bytes)
    if isinstance(server, GenerationServer):
        _add_generation_routes(app, server, metrics, spec)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise DistinferError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}; "
                                 "pick another --port or stop what uses it") from None
        host, port = runner.addresses[0][:2]
        routes = "/v1/completions, /v1/chat/completions" if isinstance(server, GenerationServer) else "/v2"
        log.info("serving '%s' on http://%s:%s (%s; %d replicas warming up; ready at /v2/health/ready)",
                 name, host, port, routes, config.replicas)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server.start()
        stopping = asyncio.ensure_future(stop.wait())
        failing = asyncio.ensure_future(server.stopped.wait())
        await asyncio.wait([stopping, failing], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        failing.cancel()
        if server.failed is not None:
            log.error("error: %s", server.failed)
            return 1
        log.info("draining: not ready any more; finishing queued and running requests")
        await server.drain(config.drain_timeout_s)
        log.info("drained; bye")
        return 0
    finally:
        await runner.cleanup()
        server.close()


def _add_generation_routes(app: web.Application, server: GenerationServer, metrics: ServerMetrics,
                           spec: WorkerSpec) -> None:
    """The OpenAI routes, with the model's tokenizer here (prompts and chats are encoded by the
    server; the replicas decode)."""
    from ..models.families.llm import model_path
    from ..models.llm.config import read_config
    from ..models.llm.tokenizer import load_tokenizer
    from .openai_routes import add_openai_routes

    path = model_path(spec.model)
    config = read_config(path)
    add_openai_routes(app, server, metrics, load_tokenizer(path), config.context, config.vocab)
