"""The batcher's queue rules with an injected clock: admission, batch formation, dropping."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from distinfer.serving.batcher import (
    ROW_WORK,
    Pending,
    RateEstimate,
    RequestQueue,
    Shed,
    merge_inputs,
    row_size,
    signature,
)


@pytest.fixture()
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def request(loop: asyncio.AbstractEventLoop, rows: int = 1, arrived: float = 0.0, deadline: float = 10.0,
            inputs: dict[str, object] | None = None) -> Pending:
    data = inputs or {"text": ["x"] * rows}
    return Pending(data, rows, arrived, deadline, loop.create_future(), signature(data),  # type: ignore[arg-type]
                   row_size(data))  # type: ignore[arg-type]


def test_a_full_queue_refuses_with_retry_after(loop: asyncio.AbstractEventLoop) -> None:
    q = RequestQueue(max_batch=4, max_queue=3)
    q.admit(request(loop, 2), 0.0)
    q.admit(request(loop, 1), 0.0)
    assert q.work == 3 * (1 + ROW_WORK)  # one character per row ("x") plus the per-row share
    with pytest.raises(Shed) as shed:
        q.admit(request(loop, 1), 0.0, free_at=[0.0], work_per_s=q.work / 1.5)
    assert shed.value.status == 429 and shed.value.reason == "queue_full" and shed.value.retry_after == 2
    assert q.rows == 3


def test_a_request_predicted_to_miss_its_deadline_is_refused(loop: asyncio.AbstractEventLoop) -> None:
    q = RequestQueue(max_batch=4, max_queue=100)
    per_row = 1 + ROW_WORK
    for _ in range(10):
        q.admit(request(loop, deadline=100.0), 0.0, free_at=[0.0, 0.0], work_per_s=10 * per_row)
    # 10 rows ahead on two replicas at 10 rows/s: batches of 4 and 4 now, then 2 + ours at
    # 0.4 s, done at 0.7 s; with the 25 % margin a deadline of 0.9 s is too tight
    with pytest.raises(Shed) as shed:
        q.admit(request(loop, deadline=0.9), 0.0, free_at=[0.0, 0.0], work_per_s=10 * per_row)
    assert shed.value.reason == "deadline" and "700 ms" in shed.value.message
    q.admit(request(loop, deadline=0.95), 0.0, free_at=[0.0, 0.0], work_per_s=10 * per_row)
    assert q.rows == 11


def test_take_merges_compatible_requests_up_to_the_batch_size(loop: asyncio.AbstractEventLoop) -> None:
    q = RequestQueue(max_batch=4, max_queue=100)
    a, b, c = request(loop, 2), request(loop, 3), request(loop, 1)
    wide = request(loop, 1, inputs={"x": np.zeros((1, 8), np.float32)})
    narrow = request(loop, 1, inputs={"x": np.zeros((1, 4), np.float32)})
    for p in (a, wide, b, narrow, c):
        q.push(p)
    assert q.ready_rows() == 6
    assert q.take(1.0) == [a, c]  # b does not fit beside a; other inputs never join a text batch
    assert a.state == "running" and a.dispatched == 1.0 and q.rows == 5
    assert q.take(1.0) == [wide]  # different row shapes cannot share a call
    assert q.take(1.0) == [b]
    assert q.take(1.0) == [narrow]
    assert q.take(1.0) == [] and q.rows == 0


def test_dropped_requests_leave_the_queue_and_retries_go_first(loop: asyncio.AbstractEventLoop) -> None:
    q = RequestQueue(max_batch=8, max_queue=100)
    a, b, c = request(loop), request(loop), request(loop)
    for p in (a, b, c):
        q.push(p)
    assert q.drop(b) and not q.drop(b)
    assert q.rows == 2 and len(q) == 2
    first = q.take(0.0)
    assert first == [a, c]
    retry = request(loop)
    q.push(retry)
    q.push_front(first)
    assert q.oldest() is a and q.take(0.0) == [a, c, retry]


def test_a_solo_request_runs_alone(loop: asyncio.AbstractEventLoop) -> None:
    q = RequestQueue(max_batch=8, max_queue=100)
    a, b = request(loop), request(loop)
    a.solo = True
    q.push_front([a])
    q.push(b)
    assert q.ready_rows() == 1
    assert q.take(0.0) == [a] and q.take(0.0) == [b]


def test_merge_inputs_keeps_request_order(loop: asyncio.AbstractEventLoop) -> None:
    texts = merge_inputs([request(loop, inputs={"text": ["a", "b"]}), request(loop, inputs={"text": ["c"]})])
    assert texts == {"text": ["a", "b", "c"]}
    arrays = merge_inputs([request(loop, inputs={"x": np.ones((1, 2))}), request(loop, inputs={"x": np.zeros((2, 2))})])
    assert np.asarray(arrays["x"]).tolist() == [[1, 1], [0, 0], [0, 0]]


def test_rate_estimate_follows_recent_batches() -> None:
    rate = RateEstimate(weight=0.5)
    rate.add(10, 1.0)
    assert rate.per_s == 10
    rate.add(20, 1.0)
    assert rate.per_s == 15
    rate.add(5, 0.0)  # nothing measured
    assert rate.per_s == 15


def test_predict_finish_hands_full_batches_to_replicas_as_they_free() -> None:
    from distinfer.serving.batcher import predict_finish

    # two idle replicas doing 10 units/s, batches of 4 rows, a unit per row: alone, 1 row takes 0.1 s
    assert predict_finish(0.0, [0.0, 0.0], 0, 0.0, 1, 1.0, 4, 10.0) == pytest.approx(0.1)
    # 8 rows ahead: two full batches start now on both replicas; ours starts at 0.4
    assert predict_finish(0.0, [0.0, 0.0], 8, 8.0, 1, 1.0, 4, 10.0) == pytest.approx(0.5)
    # rows ahead twice as costly: ours starts at 0.8
    assert predict_finish(0.0, [0.0, 0.0], 8, 16.0, 1, 1.0, 4, 10.0) == pytest.approx(0.9)
    # one replica busy until 1.0: the first batch goes to the other, ours follows it there
    assert predict_finish(0.0, [1.0, 0.0], 4, 4.0, 2, 2.0, 4, 10.0) == pytest.approx(0.6)
    # a request larger than a batch goes alone
    assert predict_finish(0.0, [0.0], 0, 0.0, 9, 9.0, 4, 10.0) == pytest.approx(0.9)
    # free times in the past mean now
    assert predict_finish(5.0, [1.0], 0, 0.0, 1, 1.0, 4, 10.0) == pytest.approx(5.1)


def test_a_crowded_queue_batches_rows_of_similar_length(loop: asyncio.AbstractEventLoop) -> None:
    q = RequestQueue(max_batch=3, max_queue=100)
    texts = ["a" * 50, "b" * 5, "c" * 48, "d" * 6, "e" * 52, "f" * 4, "g" * 500]
    pendings = [request(loop, inputs={"text": [t]}) for t in texts]
    for p in pendings:
        p.size = len(p.inputs["text"][0])
        q.push(p)
    # the oldest (50 chars) goes with the two nearest it among the next 6 rows: 48 and 52
    assert [p.inputs["text"][0][0] for p in q.take(0.0)] == ["a", "c", "e"]
    assert [p.inputs["text"][0][0] for p in q.take(0.0)] == ["b", "d", "f"]
    assert [p.inputs["text"][0][0] for p in q.take(0.0)] == ["g"]


def test_a_model_that_does_not_pad_gets_batches_in_arrival_order(loop: asyncio.AbstractEventLoop) -> None:
    q = RequestQueue(max_batch=3, max_queue=100)
    q.group_lengths = False  # e.g. minilm, which runs its batches packed
    texts = ["a" * 50, "b" * 5, "c" * 48, "d" * 6, "e" * 52, "f" * 4, "g" * 500]
    for t in texts:
        q.push(request(loop, inputs={"text": [t]}))
    assert [p.inputs["text"][0][0] for p in q.take(0.0)] == ["a", "b", "c"]
    assert [p.inputs["text"][0][0] for p in q.take(0.0)] == ["d", "e", "f"]


def test_row_size_is_characters_per_text_row() -> None:
    from distinfer.serving.batcher import row_size

    assert row_size({"text": ["ab", "abcd"]}) == 3.0
    assert row_size({"x": np.zeros((2, 3))}) == 0.0


def test_a_request_near_its_deadline_goes_before_nearer_lengths(loop: asyncio.AbstractEventLoop) -> None:
    q = RequestQueue(max_batch=2, max_queue=100)
    oldest, similar, urgent = (request(loop, inputs={"text": [t]}, deadline=d)
                               for t, d in (("aaaa", 9.0), ("bbbb", 9.0), ("cccccccccccccccc", 1.0)))
    for p in (oldest, similar, urgent):
        q.push(p)
    assert q.take(0.0, urgent_before=2.0) == [oldest, urgent]
    assert q.take(0.0) == [similar]
