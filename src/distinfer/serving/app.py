"""The HTTP face of the server (aiohttp): the KServe v2 REST routes, a text route, metrics.

    GET  /v2/health/live | /v2/health/ready | /v2 | /v2/models/{name}[/versions/{v}][/ready]
    POST /v2/models/{name}[/versions/{v}]/infer     JSON or binary tensors (v2 protocol)
    POST /text                                      {"text": "..."} or a list of texts
    GET  /metrics                                   Prometheus text format

Errors are JSON `{"error": "..."}` with the v2 status codes: 400 bad request, 404 unknown
model, 413 body too large, 429 shed (with Retry-After), 503 not ready or draining, 504
deadline passed, 500 a model failure that is not the request's fault.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from ..models.base import TensorInfo
from .batcher import Shed
from .metrics import ServerMetrics
from .protocol import (
    ProtocolError,
    TensorMeta,
    encode_infer_response,
    encode_text_response,
    numpy_to_datatype,
    parse_infer_request,
    parse_text_request,
)
from .server import BatchError, InferenceServer

__all__ = ["make_app"]

VERSION = "1"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json",
                        headers=headers)


def _error(status: int, message: str, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return _json({"error": message}, status, headers)


def _meta(info: TensorInfo) -> TensorMeta:
    datatype = "BYTES" if info.dtype == "text" else numpy_to_datatype(np.dtype(info.dtype))
    return TensorMeta(info.name, datatype, tuple(info.shape))


class _Routes:
    def __init__(self, server: InferenceServer, metrics: ServerMetrics, max_body_bytes: int) -> None:
        self.server = server
        self.metrics = metrics
        self.name = server.name
        self.max_body_bytes = max_body_bytes

    # -- health and metadata ---------------------------------------------------------------

    async def live(self, _: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, _: web.Request) -> web.Response:
        s = self.server
        body = {"ready": s.is_ready(), "replicas_ready": s.ready_count(), "replicas": s.config.replicas}
        if s.draining:
            body["draining"] = True
        return _json(body, 200 if s.is_ready() else 503)

    async def server_meta(self, _: web.Request) -> web.Response:
        return _json({"name": "distinfer", "version": "0.1.0", "extensions": ["binary_tensor_data"]})

    async def model_meta(self, request: web.Request) -> web.Response:
        if (missing := self._unknown(request)) is not None:
            return missing
        s = self.server

        def describe(infos: tuple[TensorInfo, ...]) -> list[dict[str, Any]]:
            metas = map(_meta, infos)
            return [{"name": m.name, "datatype": m.datatype, "shape": list(m.shape)} for m in metas]

        return _json({"name": self.name, "versions": [VERSION], "platform": f"distinfer_{s.kind}",
                      "inputs": describe(s.inputs), "outputs": describe(s.outputs)})

    async def model_ready(self, request: web.Request) -> web.Response:
        if (missing := self._unknown(request)) is not None:
            return missing
        ready = self.server.is_ready()
        return _json({"name": self.name, "ready": ready}, 200 if ready else 503)

    async def prometheus(self, _: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    def _unknown(self, request: web.Request) -> web.Response | None:
        name = request.match_info["name"]
        if name != self.name:
            return _error(404, f"unknown model '{name}'; this server serves '{self.name}'")
        version = request.match_info.get("version")
        if version is not None and version != VERSION:
            return _error(404, f"model '{name}' has no version '{version}'; it has version {VERSION}")
        return None

    # -- inference -------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.StreamResponse:
        return await self._counted("infer", request, self._infer)

    async def text(self, request: web.Request) -> web.StreamResponse:
        return await self._counted("text", request, self._text)

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        if (missing := self._unknown(request)) is not None:
            return missing
        if not self.server.is_ready():
            raise self.server.not_ready()
        raw_length = request.headers.get("Inference-Header-Content-Length")
        try:
            header_length = int(raw_length) if raw_length is not None else None
        except ValueError:
            raise ProtocolError(400, f"header Inference-Header-Content-Length must be a whole number, "
                                     f"got {str(raw_length)[:40]!r}") from None
        body = await request.read()
        s = self.server
        parsed = parse_infer_request(body, header_length, [_meta(i) for i in s.inputs],
                                     [o.name for o in s.outputs])
        if parsed.rows == 0:
            raise ProtocolError(400, "the request has no rows (its inputs' first dimension is 0)")
        outputs = await self._run(dict(parsed.inputs), parsed.rows, parsed.timeout_s)
        if parsed.outputs is not None:
            outputs = {name: outputs[name] for name in parsed.outputs if name in outputs}
            binary: set[str] = set(parsed.binary_outputs)
        else:  # every output; binary as asked, when the names were not known at parse time too
            binary = set(parsed.binary_outputs) or (set(outputs) if parsed.binary_default else set())
        payload, headers = encode_infer_response(self.name, VERSION, parsed.id, outputs, binary)
        return web.Response(body=payload, headers=headers)

    async def _text(self, request: web.Request) -> web.StreamResponse:
        s = self.server
        if [(i.name, i.dtype) for i in s.inputs] != [("text", "text")]:
            return _error(400, f"model '{self.name}' does not take text; "
                               f"use POST /v2/models/{self.name}/infer")
        if not s.is_ready():
            raise self.server.not_ready()
        texts, single = parse_text_request(await request.read())
        outputs = await self._run({"text": texts}, len(texts), None)
        payload = encode_text_response(self.name, outputs, single)
        return web.Response(body=payload, content_type="application/json")

    async def _run(self, inputs: dict[str, Any], rows: int, timeout_s: float | None) -> dict[str, np.ndarray]:
        pending = self.server.submit(inputs, rows, timeout_s)
        return await self.server.result(pending)

    async def _counted(self, route: str, request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        try:
            response = await handler(request)
        except ProtocolError as exc:
            response = _error(exc.status, exc.message)
        except Shed as exc:
            self.metrics.shed.inc(model=self.name, reason=exc.reason)
            response = _error(exc.status, exc.message, exc.retry_after if exc.status in (429, 503) else None)
        except BatchError as exc:
            fault = exc.error.kind == "ModelInputError"
            response = _error(400 if fault else 500, exc.error.message)
        except web.HTTPRequestEntityTooLarge as exc:
            response = _error(413, f"request body too large ({exc.text}); the limit is --max-body-bytes "
                                   f"{self.max_body_bytes}")
        self.metrics.requests.inc(model=self.name, route=route, status=str(response.status))
        if response.status == 200:
            self.metrics.latency.observe(time.perf_counter() - start, model=self.name)
        return response


def make_app(server: InferenceServer, metrics: ServerMetrics, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)
    r = _Routes(server, metrics, max_body_bytes)
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    app.add_routes([
        web.get("/v2/health/live", r.live),
        web.get("/v2/health/ready", r.ready),
        web.get("/v2", r.server_meta),
        web.get(model, r.model_meta),
        web.get(versioned, r.model_meta),
        web.get(model + "/ready", r.model_ready),
        web.get(versioned + "/ready", r.model_ready),
        web.post(model + "/infer", r.infer),
        web.post(versioned + "/infer", r.infer),
        web.post("/text", r.text),
        web.get("/metrics", r.prometheus),
    ])
    return app
