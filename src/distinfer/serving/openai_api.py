"""The OpenAI API's completions and chat completions, as pure functions (no I/O).

`parse_completion` and `parse_chat` turn a request body into a `TextAsk` (prompts as token
ids, the sampling parameters, streaming options), or raise `ApiError` with the HTTP status,
a one-line message and the field at fault (`param`), which the client library shows as is.
The encoders build the response bodies and the streamed chunks, in the shapes the `openai`
package parses (`Completion`, `ChatCompletion`, `ChatCompletionChunk`).

Defaults follow OpenAI (and vLLM, which follows it): `temperature` 1, `top_p` 1,
`max_tokens` 16 for completions and the rest of the context for chat. `top_k`, `min_p`
and `ignore_eos` are accepted as vLLM and llama-server accept them. What is not built is
refused by name rather than ignored: `n` > 1, `logprobs`, `top_logprobs`, `echo`, `suffix`,
`best_of` > 1, `logit_bias`, non-zero `presence_penalty` / `frequency_penalty`, tools.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ..messages import sampling_problem

__all__ = ["ApiError", "ChoiceResult", "TextAsk", "chat_chunk", "chat_response", "completion_chunk",
           "completion_response", "new_id", "now_s", "parse_chat", "parse_completion", "usage", "usage_chunk"]

Kind = Literal["completion", "chat"]


class ApiError(Exception):
    """A request the API refuses: HTTP `status`, a one-line `message`, the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]],
                    add_generation_prompt: bool = True) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class TextAsk:
    """One request: a prompt per choice, and how to generate."""

    kind: Kind
    model: str
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool


@dataclass(frozen=True, slots=True)
class ChoiceResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


_REFUSED = {
    "logprobs": "log-probabilities are not built; leave 'logprobs' out",
    "top_logprobs": "log-probabilities are not built; leave 'top_logprobs' out",
    "echo": "echoing the prompt is not built; leave 'echo' out",
    "suffix": "suffixes (insertion) are not built; leave 'suffix' out",
    "logit_bias": "logit biases are not built; leave 'logit_bias' out",
    "tools": "tool calls are not built; leave 'tools' out",
    "functions": "function calls are not built; leave 'functions' out",
    "response_format": "structured output is not built; leave 'response_format' out",
}


def parse_completion(body: bytes, served: str, tokenizer: Tokenizer, context: int, vocab: int) -> TextAsk:
    """`POST /v1/completions`: `prompt` is a string, a list of strings, a list of token ids,
    or a list of such lists (one choice each)."""
    r = _object(body)
    _check_model(r, served)
    prompt = r.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required: a string, a list of strings or token ids", "prompt")
    prompts = [_prompt_ids(p, tokenizer, vocab) for p in _prompt_list(prompt)]
    return _ask(r, "completion", served, prompts, context, default_max=16)


def parse_chat(body: bytes, served: str, tokenizer: Tokenizer, context: int) -> TextAsk:
    """`POST /v1/chat/completions`: `messages` through the model's chat template."""
    r = _object(body)
    _check_model(r, served)
    messages = r.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    chat = [_message(i, m) for i, m in enumerate(messages)]
    try:
        ids = tokenizer.encode_chat(chat)
    except Exception as exc:  # the template's own refusal (roles out of order, ...)
        raise ApiError(400, f"messages: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                       "messages") from None
    if "max_completion_tokens" in r and r["max_completion_tokens"] is not None:
        r = {**r, "max_tokens": r["max_completion_tokens"]}
        field = "max_completion_tokens"
    else:
        field = "max_tokens"
    return _ask(r, "chat", served, [ids], context, default_max=None, max_field=field)


# --- responses ----------------------------------------------------------------------------------


def new_id(kind: Kind) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_response(rid: str, created: int, model: str,
                        choices: Sequence[ChoiceResult]) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                    for i, c in enumerate(choices)],
        "usage": usage(sum(c.prompt_tokens for c in choices), sum(c.completion_tokens for c in choices)),
    }


def chat_response(rid: str, created: int, model: str, choice: ChoiceResult) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": choice.text},
                     "logprobs": None, "finish_reason": choice.finish_reason}],
        "usage": usage(choice.prompt_tokens, choice.completion_tokens),
    }


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_chunk(rid: str, created: int, model: str, delta: Mapping[str, str],
               finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, created: int, model: str, kind: Kind, prompt: int,
                completion: int) -> dict[str, Any]:
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt, completion)}


def now_s() -> int:
    return int(time.time())


# --- parsing ------------------------------------------------------------------------------------


def _object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not JSON ({exc.__class__.__name__}: {str(exc)[:80]})") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(value).__name__}")
    return value


def _check_model(r: Mapping[str, Any], served: str) -> None:
    model = r.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"'model' is required; this server serves '{served}'", "model")
    if model != served:
        raise ApiError(400, f"unknown model '{model[:100]}'; this server serves '{served}'", "model")


def _prompt_list(prompt: Any) -> list[Any]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        return list(prompt)
    raise ApiError(400, "'prompt' must be a string, a non-empty list of strings, a list of token ids "
                        "or a list of such lists", "prompt")


def _prompt_ids(p: Any, tokenizer: Tokenizer, vocab: int) -> list[int]:
    if isinstance(p, str):
        ids = tokenizer.encode(p)
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                           "prompt")
        ids = [int(t) for t in p]
    else:
        raise ApiError(400, "prompt: each prompt must be a string or a non-empty list of token ids", "prompt")
    if not ids:
        raise ApiError(400, "prompt: the prompt is empty", "prompt")
    return ids


def _message(i: int, m: Any) -> dict[str, str]:
    if not isinstance(m, dict):
        raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", "messages")
    role, content = m.get("role"), m.get("content")
    if role not in ("system", "developer", "user", "assistant"):
        raise ApiError(400, f"messages[{i}].role must be system, developer, user or assistant, got "
                            f"{str(role)[:40]!r}", "messages")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            texts.append(text)
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
    return {"role": "system" if role == "developer" else role, "content": content}


def _ask(r: Mapping[str, Any], kind: Kind, served: str, prompts: list[list[int]], context: int,
         default_max: int | None, max_field: str = "max_tokens") -> TextAsk:
    for name, why in _REFUSED.items():
        if r.get(name) not in (None, False, 0, [], {}):
            raise ApiError(400, f"'{name}': {why}", name)
    n = r.get("n", 1)
    if n not in (None, 1):
        raise ApiError(400, f"'n': only 1 choice per prompt is built, got {n!r}", "n")
    if r.get("best_of") not in (None, 1):
        raise ApiError(400, "'best_of': only 1 is built", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if r.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"'{name}': penalties are not built; leave it out or 0", name)
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ApiError(400, f"prompt: it has {longest} tokens; the model's context holds {context}",
                       "messages" if kind == "chat" else "prompt")
    max_tokens = _number(r, "max_tokens", int, None, max_field)
    if max_tokens is None:
        max_tokens = default_max if default_max is not None else context - longest
    if max_tokens < 1:
        raise ApiError(400, f"'{max_field}' must be >= 1, got {max_tokens}", max_field)
    if longest + max_tokens > context:
        raise ApiError(400, f"'{max_field}': {max_tokens} new tokens after the prompt's {longest} exceed the "
                            f"model's context of {context}; ask for at most {context - longest}", max_field)
    temperature = _number(r, "temperature", float, 1.0)
    top_p = _number(r, "top_p", float, 1.0)
    top_k = _number(r, "top_k", int, 0)
    min_p = _number(r, "min_p", float, 0.0)
    if top_k < 0:  # vLLM's "no limit"
        top_k = 0
    problem = sampling_problem(temperature, top_k, top_p, min_p)
    if problem:
        field = problem.split()[0]
        raise ApiError(400, f"'{field}' {problem[len(field) + 1:]}", field)
    seed = _number(r, "seed", int, None)
    stop = _stop(r.get("stop"))
    stream = _bool(r, "stream")
    options = r.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return TextAsk(kind, served, tuple(tuple(p) for p in prompts), max_tokens, temperature, top_p, top_k,
                   min_p, seed, stop, stream, include_usage, _bool(r, "ignore_eos"))


def _number(r: Mapping[str, Any], name: str, kind: type, default: Any, field: str | None = None) -> Any:
    v = r.get(name)
    field = field or name
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not float(v).is_integer()):
        what = "a whole number" if kind is int else "a number"
        raise ApiError(400, f"'{field}' must be {what}, got {json.dumps(v)[:40]}", field)
    if kind is float and v != v:
        raise ApiError(400, f"'{field}' must be a number, got NaN", field)
    return kind(v)


def _bool(r: Mapping[str, Any], name: str) -> bool:
    v = r.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(v)[:40]}", name)
    return v


def _stop(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > 4:
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    return tuple(s for s in v if s)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

