"""The real `distinfer serve --model gemma3-270m` as a subprocess on 127.0.0.1, used through the
official `openai` client unchanged: greedy completions equal transformers' generation, streamed
text joined equals the whole text (Chinese and emoji included), concurrent clients share a
running batch, a client that goes away frees its KV pages, bad requests get 400 naming the
field, and SIGTERM drains the streams in flight and exits 0."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from procs import wait_for

openai = pytest.importorskip("openai")

MODEL = "gemma3-270m"


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        text = requests.get(self.url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
                   or line.startswith(name + " "))


def start_server(tmp: Path, *args: str) -> Server:
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "distinfer.cli", "serve", "--model", MODEL, "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    url = ""

    def listening() -> bool:
        nonlocal url
        assert proc.poll() is None, log.read_text()
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text())
        url = found.group(1) if found else ""
        return bool(url)

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        return requests.get(url + "/v2/health/ready", timeout=5).status_code == 200

    try:
        wait_for(listening, 120, "the server to listen")
        wait_for(ready, 300, "the server to be ready")
    except BaseException:
        proc.kill()
        raise
    return Server(proc, url, log)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("openai"), "--replicas", "1", "--max-running", "8",
                     "--kv-cache-memory", "256MiB")
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait(timeout=30)


def test_models_lists_the_served_model(server: Server) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_greedy_completions_equal_transformers(server: Server, gemma_reference, gemma_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Prompts as token ids, greedy: the text equals transformers' tokens decoded (prompts
    whose reference has no near-tie in the first 16 tokens, so float rounding cannot flip one)."""
    ref = gemma_reference
    chosen = [i for i in range(len(ref.prompts)) if len(ref.tokens[i]) >= 16 and min(ref.margins[i][:16]) > 1e-2]
    assert len(chosen) >= 4
    client = server.client()
    for i in chosen[:6]:
        got = client.completions.create(model=MODEL, prompt=ref.prompts[i], max_tokens=16, temperature=0)
        assert got.choices[0].text == gemma_tokenizer.decode(ref.tokens[i][:16]), f"prompt {i}"
        assert got.choices[0].finish_reason == "length"
        assert got.usage is not None and got.usage.completion_tokens == 16
        assert got.usage.prompt_tokens == len(ref.prompts[i])


@pytest.mark.parametrize("prompt", ["中国的首都是北京。北京是", "Emoji: 🎉🚀🌍 means", "日本の首都は"])
def test_streamed_text_joined_equals_the_whole_text(server: Server, prompt: str) -> None:
    client = server.client()
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
    pieces, finishes, usage = [], [], None
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finishes.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].text
    assert all("\ufffd" not in p for p in pieces)  # whole characters only, never half of one
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_chat_streamed_and_whole_agree(server: Server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True) if c.choices)  # type: ignore[arg-type]
    assert whole.choices[0].message.role == "assistant"
    assert text == whole.choices[0].message.content and text


def test_concurrent_clients_share_a_running_batch(server: Server) -> None:
    client = server.client()
    seen: list[float] = []

    def one(k: int) -> str:
        return client.completions.create(model=MODEL, prompt=f"Story number {k}:", max_tokens=48, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, k) for k in range(4)]
        while not all(f.done() for f in futures):
            seen.append(server.metric("distinfer_running_sequences"))
            time.sleep(0.02)
        texts = [f.result() for f in futures]
    assert max(seen) > 1, seen
    assert all(texts)


def test_a_client_that_disconnects_frees_its_pages(server: Server) -> None:
    body = {"model": MODEL, "prompt": "Count to a thousand: 1, 2, 3,", "max_tokens": 2000, "stream": True,
            "ignore_eos": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        wait_for(lambda: server.metric("distinfer_kv_cache_usage_ratio") > 0, 30, "pages in use")
    wait_for(lambda: server.metric("distinfer_kv_cache_usage_ratio") == 0, 30, "the pages to be freed")
    assert server.metric("distinfer_running_sequences") == 0


@pytest.mark.parametrize(("body", "field"), [
    ({"model": "other", "prompt": "x"}, "model"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "n": 2}, "n"),
    ({"model": MODEL, "prompt": [10**9]}, "prompt"),
])
def test_bad_completions_get_400_naming_the_field(server: Server, body: dict, field: str) -> None:  # type: ignore[type-arg]
    r = requests.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_a_malformed_chat_is_a_client_error(server: Server) -> None:
    with pytest.raises(openai.BadRequestError, match="messages"):
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])  # type: ignore[list-item]
    assert requests.get(server.url + "/v2/health/ready", timeout=10).status_code == 200


def test_sigterm_drains_streams_in_flight_and_exits_0(tmp_path: Path, gemma_path: Path) -> None:
    s = start_server(tmp_path, "--replicas", "1", "--max-running", "4", "--kv-cache-memory", "128MiB")
    try:
        client = s.client()
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(lambda: "".join(
                c.choices[0].text for c in client.completions.create(
                    model=MODEL, prompt="Once upon a time", max_tokens=64, temperature=0, stream=True,
                    extra_body={"ignore_eos": True}) if c.choices))
            wait_for(lambda: s.metric("distinfer_running_sequences") > 0, 60, "the stream to run")
            s.proc.send_signal(signal.SIGTERM)
            text = future.result(timeout=120)
        assert s.proc.wait(timeout=120) == 0, s.log.read_text()
        assert text
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20), st.lists(st.integers(-5, 300_000), max_size=4),
                    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=5), st.integers()))
_BODIES = st.fixed_dictionaries(
    {"model": st.sampled_from([MODEL, "other", 3]), "max_tokens": st.one_of(st.integers(-2, 4), st.text(max_size=3))},
    optional={k: _VALUES for k in ("prompt", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n",
                                   "stream", "stream_options", "logprobs", "ignore_eos", "echo")},
)


@hypothesis.settings(max_examples=40, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(body=_BODIES)
@hypothesis.example(body={"model": MODEL, "max_tokens": 0, "prompt": float("inf")})
@hypothesis.example(body={"model": MODEL, "max_tokens": 2, "prompt": "hi", "temperature": float("nan")})
def test_generated_bodies_never_give_500_nor_lose_a_replica(server: Server, body: dict) -> None:  # type: ignore[type-arg]
    # json.dumps, not requests' json=: NaN and Infinity (which Python's json reads) must reach the server
    r = requests.post(server.url + "/v1/completions", data=json.dumps(body),
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["message"]
    assert server.metric("distinfer_replicas_ready") == 1


def _greedy(s: Server, prompt: str) -> str:
    return s.client().completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text


@pytest.mark.parametrize("layout", [("--strategy", "pipeline", "--stages", "2"), ("--backend", "ray")],
                         ids=["pipeline", "ray"])
def test_other_layouts_serve_the_same_greedy_text(server: Server, tmp_path: Path, layout: tuple[str, ...]) -> None:
    prompt = "The capital of France is"
    expected = _greedy(server, prompt)
    other = start_server(tmp_path, "--replicas", "1", "--max-running", "4", "--kv-cache-memory", "128MiB",
                         "--threads-per-replica", "1", *layout)
    try:
        assert _greedy(other, prompt) == expected
        joined = "".join(c.choices[0].text for c in other.client().completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
        assert joined == expected
    finally:
        other.proc.send_signal(signal.SIGTERM)
        assert other.proc.wait(timeout=120) == 0, other.log.read_text()


def test_a_killed_replica_ends_its_stream_with_an_error_and_is_replaced(tmp_path: Path, gemma_path: Path) -> None:
    s = start_server(tmp_path, "--replicas", "1", "--max-running", "4", "--kv-cache-memory", "128MiB")
    try:
        pid = int(re.findall(r"replica 0 ready \(pid (\d+)", s.log.read_text())[0])
        stream = s.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=1000,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
        got = []
        with pytest.raises(openai.APIError, match="lost after"):
            for chunk in stream:
                got.append(chunk.choices[0].text if chunk.choices else "")
                if len(got) == 3:
                    import os
                    os.kill(pid, signal.SIGKILL)
        assert len(got) >= 3  # tokens came, then the error event, never a silent cut
        wait_for(lambda: requests.get(s.url + "/v2/health/ready", timeout=5).status_code == 200, 300,
                 "the replacement replica")
        assert _greedy(s, "Hello")
        assert "replica lost" in s.log.read_text()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
