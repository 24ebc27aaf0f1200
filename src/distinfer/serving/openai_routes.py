"""The OpenAI-compatible routes of a text-generation server (aiohttp):

    GET  /v1/models
    POST /v1/completions          prompt: a string, strings, token ids, or lists of them
    POST /v1/chat/completions     messages through the model's chat template

Bodies are parsed by `openai_api` (400 naming the field); the choices go to the
`GenerationServer`. With `stream: true` the answer is `text/event-stream`: one
`data: {json}` event per new piece of text (whole UTF-8 characters: a character split
across tokens waits for its last byte, in the replica's decoder), the `finish_reason` in a
last chunk, a usage chunk when `stream_options.include_usage`, then `data: [DONE]`. A
stream that fails after it began ends with a `data: {"error": ...}` event, which the
`openai` client raises. A client that goes away ends its sequences at the next step.

Errors are the OpenAI shape `{"error": {"message", "type", "param", "code"}}`: 400 a bad
request, 429 shed (with Retry-After), 503 not ready or draining, 500 a failed generation.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import orjson
from aiohttp import web

from .. import messages as msg
from .batcher import Shed
from .generation import GenerationServer, TextStream
from .metrics import ServerMetrics
from .openai_api import (
    ApiError,
    ChoiceResult,
    TextAsk,
    Tokenizer,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_id,
    now_s,
    parse_chat,
    parse_completion,
    usage_chunk,
)

__all__ = ["add_openai_routes"]


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(value), status=status, content_type="application/json", headers=headers
    )


def _error(
    status: int, message: str, kind: str, param: str | None = None, retry_after: int | None = None
) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return _json(body, status, headers)


def _event(value: Any) -> bytes:
    return b"data: " + orjson.dumps(value) + b"\n\n"


class _OpenAIRoutes:
    def __init__(
        self, server: GenerationServer, metrics: ServerMetrics, tokenizer: Tokenizer, context: int, vocab: int
    ) -> None:
        self.server = server
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.context = context
        self.vocab = vocab
        self.name = server.name
        self.created = now_s()

    async def models(self, _: web.Request) -> web.Response:
        return _json(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "distinfer",
                        "max_model_len": self.context,
                    }
                ],
            }
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    async def _handle(self, request: web.Request, kind: str) -> web.StreamResponse:
        route = "completions" if kind == "completion" else "chat"
        try:
            ask = self._parse(await request.read(), kind)
            streams = self.server.submit_text(self._orders(ask), ask.stream)
        except ApiError as exc:
            return self._count(route, _error(exc.status, exc.message, exc.kind, exc.param))
        except Shed as exc:
            self.metrics.shed.inc(model=self.name, reason=exc.reason)
            kind_ = "rate_limit_error" if exc.status == 429 else "service_unavailable"
            return self._count(route, _error(exc.status, exc.message, kind_, retry_after=exc.retry_after))
        except web.HTTPRequestEntityTooLarge as exc:
            return self._count(
                route, _error(413, f"request body too large ({exc.text})", "invalid_request_error")
            )
        try:
            if ask.stream:
                response = await self._stream(request, ask, streams)
            else:
                response = await self._whole(ask, streams)
        except (asyncio.CancelledError, ConnectionResetError):  # the client went away
            for s in streams:
                self.server.cancel(s)
            raise
        return self._count(route, response)

    def _count(self, route: str, response: web.StreamResponse) -> web.StreamResponse:
        self.metrics.requests.inc(model=self.name, route=route, status=str(response.status))
        return response

    def _parse(self, body: bytes, kind: str) -> TextAsk:
        if kind == "completion":
            ask = parse_completion(body, self.name, self.tokenizer, self.context, self.vocab)
        else:
            ask = parse_chat(body, self.name, self.tokenizer, self.context)
        pages = self.server.kv_pages()
        longest = max(len(p) for p in ask.prompts)
        if pages and -(-(longest + 1) // msg.KV_PAGE_TOKENS) > pages:
            raise ApiError(
                400,
                f"prompt: its {longest} tokens do not fit a replica's KV cache "
                f"({pages * msg.KV_PAGE_TOKENS} tokens); shorten it or raise --kv-cache-memory",
                "messages" if kind == "chat" else "prompt",
            )
        return ask

    def _orders(self, ask: TextAsk) -> list[msg.Generate]:
        seed = ask.seed if ask.seed is not None else secrets.randbits(31)
        return [
            msg.Generate(
                self.server.new_id(),
                prompt,
                ask.max_tokens,
                ask.temperature,
                ask.top_k,
                ask.top_p,
                ask.min_p,
                seed + i,
                ask.stop,
                ask.ignore_eos,
            )
            for i, prompt in enumerate(ask.prompts)
        ]

    async def _whole(self, ask: TextAsk, streams: list[TextStream]) -> web.Response:
        rid, created = new_id(ask.kind), now_s()
        left = set(range(len(streams)))
        queue = streams[0].pieces
        index = {s.id: i for i, s in enumerate(streams)}
        while left:
            piece = await queue.get()
            if piece.finish is not None:
                left.discard(index[piece.request])
        failed = next((s for s in streams if s.finish == "error"), None)
        if failed is not None:
            return self._failure(failed)
        choices = [ChoiceResult(s.text, s.finish or "length", s.prompt_tokens, s.tokens) for s in streams]
        if ask.kind == "chat":
            return _json(chat_response(rid, created, ask.model, choices[0]))
        return _json(completion_response(rid, created, ask.model, choices))

    def _failure(self, stream: TextStream) -> web.Response:
        status = stream.error_status
        return _error(
            status,
            stream.error or "generation failed",
            "server_error" if status == 500 else "service_unavailable",
        )

    async def _stream(
        self, request: web.Request, ask: TextAsk, streams: list[TextStream]
    ) -> web.StreamResponse:
        rid, created, model = new_id(ask.kind), now_s(), ask.model
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        chat = ask.kind == "chat"
        if chat:
            await response.write(
                _event(chat_chunk(rid, created, model, {"role": "assistant", "content": ""}, None))
            )
        index = {s.id: i for i, s in enumerate(streams)}
        left = set(index.values())
        queue = streams[0].pieces
        while left:
            piece = await queue.get()
            i = index[piece.request]
            if piece.finish == "error":
                s = streams[i]
                err = {
                    "message": s.error or "generation failed",
                    "type": "server_error",
                    "param": None,
                    "code": s.error_status,
                }
                await response.write(_event({"error": err}))
                for other in streams:
                    self.server.cancel(other)
                await response.write(b"data: [DONE]\n\n")
                return response
            if piece.text or piece.finish is not None:
                if chat:
                    delta = {"content": piece.text} if piece.text else {}
                    chunk = chat_chunk(rid, created, model, delta, piece.finish)
                else:
                    chunk = completion_chunk(rid, created, model, i, piece.text, piece.finish)
                await response.write(_event(chunk))
            if piece.finish is not None:
                left.discard(i)
        if ask.include_usage:
            prompt = sum(s.prompt_tokens for s in streams)
            completion = sum(s.tokens for s in streams)
            await response.write(_event(usage_chunk(rid, created, model, ask.kind, prompt, completion)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def add_openai_routes(
    app: web.Application,
    server: GenerationServer,
    metrics: ServerMetrics,
    tokenizer: Tokenizer,
    context: int,
    vocab: int,
) -> None:
    r = _OpenAIRoutes(server, metrics, tokenizer, context, vocab)
    app.add_routes(
        [
            web.get("/v1/models", r.models),
            web.post("/v1/completions", r.completions),
            web.post("/v1/chat/completions", r.chat),
        ]
    )
