"""The OpenAI request parser: what a client sends becomes prompts and parameters, and every
bad request is a 400 naming its field, in OpenAI's error shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from distinfer.serving.openai_api import (
    ApiError,
    ChoiceResult,
    chat_chunk,
    chat_response,
    completion_response,
    parse_chat,
    parse_completion,
)

CONTEXT, VOCAB = 64, 1000


class FakeTokenizer:
    """One id per character (+1 BOS); a chat is its contents joined."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) % VOCAB for c in text]

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if messages[-1]["role"] == "assistant" and len(messages) == 1:
            raise ValueError("a conversation cannot start with the assistant")
        return self.encode("|".join(f"{m['role']}:{m['content']}" for m in messages))


def completion(**fields: Any) -> Any:
    return parse_completion(json.dumps({"model": "m", **fields}).encode(), "m", FakeTokenizer(), CONTEXT, VOCAB)


def chat(**fields: Any) -> Any:
    return parse_chat(json.dumps({"model": "m", **fields}).encode(), "m", FakeTokenizer(), CONTEXT)


def test_a_string_prompt_with_openai_defaults() -> None:
    ask = completion(prompt="hi")
    assert ask.prompts == ((1, ord("h"), ord("i")),)
    assert (ask.max_tokens, ask.temperature, ask.top_p, ask.stream, ask.include_usage) == (16, 1.0, 1.0, False, False)


def test_prompts_as_lists_and_token_ids() -> None:
    assert completion(prompt=["a", "b"]).prompts == ((1, 97), (1, 98))
    assert completion(prompt=[5, 6, 7]).prompts == ((5, 6, 7),)
    assert completion(prompt=[[5], [6, 7]]).prompts == ((5,), (6, 7))


def test_chat_applies_the_template_and_defaults_to_the_rest_of_the_context() -> None:
    ask = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
               stream=True, stream_options={"include_usage": True}, max_completion_tokens=5, stop="\n")
    assert ask.prompts == (tuple(FakeTokenizer().encode("user:hi")),)
    assert (ask.max_tokens, ask.stream, ask.include_usage, ask.stop) == (5, True, True, ("\n",))
    assert chat(messages=[{"role": "user", "content": "hi"}]).max_tokens == CONTEXT - 8


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"model": "other"}, "model", "unknown model 'other'; this server serves 'm'"),
    ({"prompt": None}, "prompt", "'prompt' is required"),
    ({"prompt": [VOCAB]}, "prompt", f"token id {VOCAB} is outside the vocabulary"),
    ({"prompt": "x" * CONTEXT}, "prompt", f"it has {CONTEXT + 1} tokens; the model's context holds {CONTEXT}"),
    ({"max_tokens": 62}, "max_tokens", "62 new tokens after the prompt's 3 exceed the model's context of 64"),
    ({"max_tokens": 0}, "max_tokens", "'max_tokens' must be >= 1, got 0"),
    ({"max_tokens": 2.5}, "max_tokens", "'max_tokens' must be a whole number, got 2.5"),
    ({"temperature": -1}, "temperature", "'temperature' must be >= 0, got -1"),
    ({"top_p": 0}, "top_p", "'top_p' must be in (0, 1]"),
    ({"top_k": 100}, "top_k", "'top_k' must be between 0 (no limit) and 64"),
    ({"n": 2}, "n", "only 1 choice per prompt is built"),
    ({"logprobs": 2}, "logprobs", "log-probabilities are not built"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 strings"),
    ({"stream": "yes"}, "stream", "'stream' must be true or false"),
    ({"presence_penalty": 0.5}, "presence_penalty", "penalties are not built"),
])
def test_a_bad_completion_request_is_a_400_naming_its_field(fields: dict[str, Any], param: str,
                                                           message: str) -> None:
    with pytest.raises(ApiError) as caught:
        completion(**{"prompt": "hi", **fields})
    assert (caught.value.status, caught.value.param) == (400, param)
    assert message in caught.value.message
    assert caught.value.body()["error"]["param"] == param


@pytest.mark.parametrize(("messages", "message"), [
    ([], "'messages' must be a non-empty list"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role must be system, developer, user or assistant"),
    ([{"role": "user", "content": 3}], "messages[0].content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts are supported"),
    ([{"role": "assistant", "content": "x"}], "messages: a conversation cannot start with the assistant"),
])
def test_a_bad_chat_is_a_400_on_messages(messages: Any, message: str) -> None:
    with pytest.raises(ApiError) as caught:
        chat(messages=messages)
    assert (caught.value.status, caught.value.param) == (400, "messages")
    assert message in caught.value.message


def test_a_body_that_is_not_a_json_object() -> None:
    for body in (b"{", b"[1]", b"\xff"):
        with pytest.raises(ApiError, match="the body"):
            parse_completion(body, "m", FakeTokenizer(), CONTEXT, VOCAB)


def test_responses_parse_with_the_openai_client_types() -> None:
    openai = pytest.importorskip("openai")
    done = ChoiceResult("hello", "stop", 3, 2)
    c = openai.types.Completion.model_validate(completion_response("cmpl-1", 1, "m", [done]))
    assert (c.choices[0].text, c.choices[0].finish_reason, c.usage.total_tokens) == ("hello", "stop", 5)
    ch = openai.types.chat.ChatCompletion.model_validate(chat_response("chatcmpl-1", 1, "m", done))
    assert ch.choices[0].message.content == "hello"
    chunk = openai.types.chat.ChatCompletionChunk.model_validate(chat_chunk("c", 1, "m", {"content": "h"}, None))
    assert chunk.choices[0].delta.content == "h"
