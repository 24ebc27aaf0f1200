"""Admission for generation: a request is refused at once when its first token would come
past its deadline, and the prediction learns from the first tokens measured (the slow ones)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from fake_serving import FakeBackend

from distinfer import messages as msg
from distinfer.serving.batcher import Shed
from distinfer.serving.config import ServeConfig
from distinfer.serving.generation import (
    TTFT_HORIZON_S,
    TTFT_WINDOW,
    GenerationServer,
    TextStream,
    _pick,
    _TextReplica,
    calibration_scale,
)
from distinfer.serving.metrics import ServerMetrics


def test_the_scale_is_the_slow_tail_of_the_ratios_not_their_mean() -> None:
    assert calibration_scale([]) == 1.0
    assert calibration_scale([1.0] * 19 + [8.0]) == 1.0  # one slow first token in 20: noise
    assert calibration_scale([1.0] * 17 + [3.0, 3.0, 3.0]) == 3.0  # three in 20: the tail to keep
    assert calibration_scale([2.0]) == 2.0


def on_server(check: Callable[[GenerationServer], Any]) -> Any:
    """Run `check` on a generation server with one ready replica (16 places, 50 ms a token,
    2 ms a prompt token, nothing running) and a 2 s deadline; no process is started."""

    async def main() -> Any:
        config = ServeConfig(model="gemma3-270m", replicas=1, timeout_ms=2000.0, max_queue=64)
        server = GenerationServer(config, FakeBackend(), ServerMetrics(), "gemma3-270m", "generate")
        replica = server.replicas[0]
        assert isinstance(replica, _TextReplica)
        replica.ready, replica.max_running, replica.kv_pages, replica.free_pages = True, 16, 64, 64
        replica.token_s, replica.prefill_token_s = 0.05, 0.002
        server.started = True
        server._dispatch = lambda: None  # type: ignore[method-assign]  # keep requests queued
        return check(server)

    return asyncio.run(main())


def order(server: GenerationServer, prompt: int = 100, max_tokens: int = 64) -> msg.Generate:
    return msg.Generate(server.new_id(), tuple(range(prompt)), max_tokens)


def test_an_idle_replica_admits_and_its_prediction_is_the_prompt_at_the_prefill_rate() -> None:
    def check(server: GenerationServer) -> float | None:
        (stream,) = server.submit_text([order(server)], streaming=True)
        return stream.predicted_s

    assert on_server(check) == pytest.approx(100 * 0.002 + 0.05)


def test_a_quick_first_token_that_came_late_neither_inflates_nor_deflates_the_scale() -> None:
    def check(server: GenerationServer) -> float:
        # predicted 0.25 s, came in 0.5 s: compared with half the allowed wait (0.75 s)
        (stream,) = server.submit_text([order(server)], streaming=True)
        replica = server.replicas[0]
        assert isinstance(replica, _TextReplica)
        server.waiting.remove(stream)
        stream.state, stream.worker, stream.attempts = "running", 0, 1
        replica.assigned[stream.id] = stream
        stream.arrived = server.loop.time() - 0.5
        server._piece(replica, stream, msg.Piece(stream.id, "a", 1, None), server.loop.time())
        return server._ttft_scale

    assert on_server(check) == 1.0  # 0.5 / 0.75, and the scale never goes below 1


def test_first_tokens_slower_than_predicted_make_admission_shed_what_it_admitted_before() -> None:
    def check(server: GenerationServer) -> tuple[int, int]:
        # 16 places busy for 20 more tokens each (1 s), then 16 requests queued
        replica = server.replicas[0]
        assert isinstance(replica, _TextReplica)
        for _ in range(16):
            s = server.submit_text([order(server, max_tokens=21)], streaming=True)[0]
            server.waiting.remove(s)
            s.state, s.tokens = "running", 1
            replica.assigned[s.id] = s
        admitted_before = 0
        try:
            while True:
                server.submit_text([order(server)], streaming=True)
                admitted_before += 1
        except Shed as shed:
            assert shed.status == 429 and "deadline" in shed.message
        server.waiting.clear()
        for _ in range(TTFT_WINDOW):  # measured first tokens came 3x later than predicted
            server._calibrate(3.0)
        admitted_after = 0
        try:
            while True:
                server.submit_text([order(server)], streaming=True)
                admitted_after += 1
        except Shed as shed:
            assert shed.status == 429 and (shed.retry_after or 0) >= 1
        return admitted_before, admitted_after

    before, after = on_server(check)
    assert before > 0 and after < before


def test_an_idle_server_admits_whatever_it_learnt_under_load_and_the_lesson_expires() -> None:
    def check(server: GenerationServer) -> tuple[float, float]:
        for _ in range(TTFT_WINDOW):  # first tokens came 10x later than predicted, under load
            server._calibrate(10.0)
        (stream,) = server.submit_text([order(server, prompt=500)], streaming=True)  # idle: admitted
        assert stream.predicted_s is not None
        with pytest.raises(Shed):  # not idle any more: 0.05 + 1 s, x10
            server.submit_text([order(server, prompt=500)], streaming=True)
        server.waiting.clear()
        scaled = server._ttft_scale
        server._ttft_ratios = type(server._ttft_ratios)(
            ((t - TTFT_HORIZON_S - 1, r) for t, r in server._ttft_ratios), maxlen=TTFT_WINDOW
        )  # as if measured more than the horizon ago
        server.predict_first_token_s(10)
        return scaled, server._ttft_scale

    assert on_server(check) == (10.0, 1.0)


def test_with_room_on_a_replica_the_prediction_is_that_replicas_not_the_soonest_place() -> None:
    async def main() -> tuple[float | None, int]:
        config = ServeConfig(model="gemma3-270m", replicas=2, timeout_ms=2000.0, max_queue=64)
        server = GenerationServer(config, FakeBackend(), ServerMetrics(), "gemma3-270m", "generate")
        a, b = server.replicas[0], server.replicas[1]
        assert isinstance(a, _TextReplica) and isinstance(b, _TextReplica)
        for r in (a, b):
            r.ready, r.max_running, r.kv_pages, r.free_pages = True, 4, 64, 64
            r.token_s, r.prefill_token_s = 0.05, 0.0
        server.started = True
        server._dispatch = lambda: None  # type: ignore[method-assign]
        # both full; b's sequences end far sooner, and b has one more handed to it
        for r, remaining, extra in ((a, 40, 0), (b, 2, 1)):
            for _ in range(4 + extra):
                s = TextStream(order(server, prompt=1, max_tokens=remaining + 1), True, 0.0, asyncio.Queue())
                s.state, s.tokens = "running", 1
                r.assigned[s.id] = s
        with pytest.raises(Shed):  # b frees a place in 0.1 s, but the request would wait on a
            server.submit_text([order(server, prompt=1)], streaming=True)
        return server.predict_first_token_s(1), _pick([a, b]).worker

    predicted, picked = asyncio.run(main())
    # handed to a (more free places counting its spare), it waits for a's first place: 40 tokens
    assert picked == 0 and predicted == pytest.approx(40 * 0.05 + 0.05)
