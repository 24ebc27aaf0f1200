"""The HTTP app and the dynamic batcher over in-process fake replicas (tests/helpers/
fake_serving.py): what clients see for good and bad requests, batching, shedding, deadlines,
lost replicas, draining, and generated requests that must never break the server."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from fake_serving import FakeBackend, Running, fake_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distinfer.errors import ErrorInfo

INFER = "/v2/models/fake/infer"


def body(texts: list[str], **extra: object) -> dict[str, object]:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}], **extra}


def test_infer_json_and_binary_and_text_route() -> None:
    with fake_server() as s:
        r = requests.post(s.url + INFER, json=body(["ab", "cde"], id="r1"), timeout=10)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert r.json()["id"] == "r1" and out["length"]["data"] == [2, 3] and out["length"]["datatype"] == "INT64"
        assert out["pair"]["shape"] == [2, 2] and out["pair"]["datatype"] == "FP32"

        # binary in (BYTES: uint32 length + bytes per element), binary out
        raw = b"".join(struct.pack("<I", len(t)) + t for t in (b"hello", b"\xc3\xa9t\xc3\xa9"))
        header = json.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                         "parameters": {"binary_data_size": len(raw)}}],
                             "outputs": [{"name": "length", "parameters": {"binary_data": True}}]}).encode()
        r = requests.post(s.url + INFER, data=header + raw, timeout=10,
                          headers={"Inference-Header-Content-Length": str(len(header))})
        assert r.status_code == 200, r.text
        n = int(r.headers["Inference-Header-Content-Length"])
        meta = json.loads(r.content[:n])
        assert [o["name"] for o in meta["outputs"]] == ["length"]
        assert np.frombuffer(r.content[n:], dtype="<i8").tolist() == [5, 3]

        r = requests.post(s.url + "/text", json={"text": "four"}, timeout=10)
        assert r.status_code == 200 and r.json()["outputs"]["length"] == 4
        r = requests.post(s.url + "/text", json=["a", "bb"], timeout=10)
        assert r.json()["outputs"]["length"] == [1, 2]


def test_metadata_health_and_unknown_model() -> None:
    with fake_server() as s:
        assert requests.get(s.url + "/v2/health/live", timeout=10).status_code == 200
        ready = requests.get(s.url + "/v2/health/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["replicas_ready"] == 2
        meta = requests.get(s.url + "/v2/models/fake", timeout=10).json()
        assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        assert {o["name"] for o in meta["outputs"]} == {"length", "pair"}
        assert requests.get(s.url + "/v2", timeout=10).json()["extensions"] == ["binary_tensor_data"]
        missing = requests.post(s.url + "/v2/models/other/infer", json=body(["a"]), timeout=10)
        assert missing.status_code == 404 and "this server serves 'fake'" in missing.json()["error"]


@pytest.mark.parametrize(
    ("payload", "status", "names"),
    [
        (b"{not json", 400, "JSON"),
        (json.dumps({"inputs": [{"name": "txt", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}).encode(), 400,
         "txt"),
        (json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).encode(), 400,
         "datatype"),
        (json.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}).encode(), 400,
         "shape"),
        (json.dumps({"inputs": []}).encode(), 400, "inputs"),
        (json.dumps({"inputs": [{"name": "text", "shape": [0], "datatype": "BYTES", "data": []}]}).encode(), 400,
         "no rows"),
    ],
)
def test_bad_requests_get_400_naming_the_field(payload: bytes, status: int, names: str) -> None:
    with fake_server() as s:
        r = requests.post(s.url + INFER, data=payload, timeout=10)
        assert r.status_code == status and names in r.json()["error"], r.text
        assert s.backend.batches == []  # nothing reached a replica


def test_a_body_over_the_limit_gets_413() -> None:
    with fake_server(max_body_bytes=1000) as s:
        r = requests.post(s.url + INFER, json=body(["x" * 2000]), timeout=10)
        assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]


def test_concurrent_requests_are_batched_and_answered_each_with_its_own_rows() -> None:
    backend = FakeBackend(batch_s=0.05)
    # Deadlines far beyond the work (40 rows, 0.05 s a batch): admission never sheds, however
    # slow this machine is at the moment; shedding has tests of its own.
    with fake_server(backend, max_batch_size=8, timeout_ms=60_000) as s:
        texts = ["x" * i for i in range(1, 41)]
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda t: requests.post(s.url + INFER, json=body([t]), timeout=60), texts))
        assert all(a.status_code == 200 for a in answers), [(a.status_code, a.text) for a in answers]
        got = [next(o for o in a.json()["outputs"] if o["name"] == "length")["data"][0] for a in answers]
        assert got == [len(t) for t in texts]
        sizes = [len(b) for _, b in backend.batches]
        assert max(sizes) > 1 and max(sizes) <= 8 and sum(sizes) == 40
        assert {w for w, _ in backend.batches} == {0, 1}  # both replicas worked
        assert s.metric("distinfer_batch_size_sum") / s.metric("distinfer_batch_size_count") > 1


def test_a_full_queue_sheds_with_429_and_retry_after() -> None:
    backend = FakeBackend(batch_s=0.5)
    with fake_server(backend, replicas=1, max_batch_size=1, max_queue=2, timeout_ms=5000) as s:
        with ThreadPoolExecutor(6) as pool:
            started = time.monotonic()
            futures = [pool.submit(requests.post, s.url + INFER, json=body([f"r{i}"]), timeout=10) for i in range(6)]
            shed = [f.result() for f in futures if f.result().status_code == 429]
        assert shed and all(int(r.headers["Retry-After"]) >= 1 for r in shed)
        assert "queue is full" in shed[0].json()["error"]
        assert time.monotonic() - started < 5
        assert s.metric('distinfer_shed_requests_total{model="fake",reason="queue_full"}') == len(shed)


def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once() -> None:
    backend = FakeBackend(batch_s=0.3)
    with fake_server(backend, replicas=1, max_batch_size=1, timeout_ms=5000) as s:
        for i in range(2):  # teach the server how long a batch takes
            assert requests.post(s.url + INFER, json=body([f"w{i}"]), timeout=10).status_code == 200
        with ThreadPoolExecutor(4) as pool:
            slow = [pool.submit(requests.post, s.url + INFER, json=body([f"q{i}"]), timeout=10) for i in range(3)]
            time.sleep(0.05)
            t = time.monotonic()
            tight = requests.post(s.url + INFER, json=body(["late"], parameters={"timeout": 200_000}), timeout=10)
            answered_in = time.monotonic() - t
            assert all(f.result().status_code == 200 for f in slow)
        assert tight.status_code == 429 and "deadline" in tight.json()["error"] and answered_in < 0.15
        assert "late" not in backend.texts_seen()


def test_a_deadline_passing_in_the_queue_gets_504_and_the_rows_are_never_computed() -> None:
    with fake_server(replicas=1, max_queue_delay_ms=2000, timeout_ms=300) as s:
        t = time.monotonic()
        r = requests.post(s.url + INFER, json=body(["lonely"]), timeout=10)
        assert r.status_code == 504 and "not computed" in r.json()["error"]
        assert 0.25 < time.monotonic() - t < 1.5
        time.sleep(2.2)  # past the queue delay: still never sent
        assert "lonely" not in s.backend.texts_seen()


def test_a_client_that_goes_away_is_dropped_from_the_queue() -> None:
    with fake_server(replicas=1, max_queue_delay_ms=1500, timeout_ms=5000) as s:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(s.url + INFER, json=body(["impatient"]), timeout=0.3)
        time.sleep(1.6)
        assert "impatient" not in s.backend.texts_seen()
        assert s.metric('distinfer_shed_requests_total{model="fake",reason="disconnected"}') == 1


def test_a_lost_replica_is_replaced_and_its_requests_retried_once_elsewhere() -> None:
    backend = FakeBackend(batch_s=0.3)
    with fake_server(backend, max_batch_size=4) as s:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(requests.post, s.url + INFER, json=body([f"k{i}"]), timeout=10) for i in range(8)]
            time.sleep(0.1)
            backend.kill(0)
            answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200] * 8
        assert backend.started == [0, 1, 2]  # the replacement
        ready = requests.get(s.url + "/v2/health/ready", timeout=10).json()
        assert ready["replicas_ready"] == 2


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll until `check()` holds (the replicas' thread and the loop run on their own)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def later(s: Running, seconds: float) -> None:
    """Feed the server's supervisor a Tick `seconds` ahead of its loop's clock (no waiting)."""
    s.call(lambda: s.server.tick(s.loop.time() + seconds))


def test_an_unusable_replica_is_stopped_at_once_and_replaced() -> None:
    backend = FakeBackend(fail={1: ErrorInfo("RuntimeError", "CUDA init failed", fatal=False)})
    with fake_server(backend) as s:
        wait_until(lambda: s.call(s.server.ready_count) == 2, "the replacement")
        assert backend.stopped == [1] and backend.started == [0, 1, 2]  # stopped before the next start
        assert s.call(lambda: s.server.restarts) == 1
        assert requests.post(s.url + INFER, json=body(["ok"]), timeout=10).status_code == 200


def test_a_replica_with_a_fatal_error_is_stopped_and_not_replaced() -> None:
    backend = FakeBackend(fail={1: ErrorInfo("ModelError", "cannot load the model", fatal=True)})
    with fake_server(backend) as s:
        wait_until(lambda: backend.stopped == [1], "the stop")
        assert s.call(s.server.is_ready) and s.call(s.server.ready_count) == 1
        assert backend.started == [0, 1] and s.call(lambda: s.server.restarts) == 0
        assert requests.post(s.url + INFER, json=body(["ok"]), timeout=10).status_code == 200


def test_the_server_fails_when_no_replica_can_start() -> None:
    fatal = ErrorInfo("ModelError", "cannot load the model", fatal=True)
    backend = FakeBackend(fail={0: fatal, 1: fatal})
    with fake_server(backend, ready_timeout=0) as s:
        wait_until(lambda: s.call(lambda: s.server.failed) is not None, "the failure")
        assert s.call(lambda: s.server.failed) == "no replica could start: cannot load the model"
        wait_until(lambda: sorted(backend.stopped) == [0, 1], "the stops")
        assert backend.started == [0, 1]


def test_a_replacement_that_never_warms_up_is_stopped_after_the_start_timeout_and_replaced() -> None:
    backend = FakeBackend(hang={2})
    with fake_server(backend) as s:
        backend.kill(0)
        wait_until(lambda: backend.started == [0, 1, 2], "the replacement's start")
        later(s, 500)  # not yet
        assert backend.stopped == [] and s.call(lambda: s.server.restarts) == 1
        later(s, 601)
        wait_until(lambda: s.call(s.server.ready_count) == 2, "the second replacement")
        assert backend.stopped == [2] and backend.started == [0, 1, 2, 3]
        assert s.call(lambda: s.server.restarts) == 2
        assert requests.post(s.url + INFER, json=body(["ok"]), timeout=10).status_code == 200


def test_a_first_replica_that_never_warms_up_is_replaced_and_the_server_starts() -> None:
    backend = FakeBackend(hang={1})
    with fake_server(backend, ready_timeout=0) as s:
        wait_until(lambda: s.call(s.server.ready_count) == 1, "replica 0")
        assert not s.call(s.server.is_ready)  # replica 1 has not settled
        later(s, 601)
        wait_until(lambda: s.call(s.server.ready_count) == 2, "the replacement")
        assert s.call(s.server.is_ready) and backend.stopped == [1] and backend.started == [0, 1, 2]


def test_the_server_fails_when_no_replica_is_ever_warm() -> None:
    backend = FakeBackend(hang={0, 1})
    with fake_server(backend, ready_timeout=0) as s:
        wait_until(lambda: backend.started == [0, 1], "the starts")
        later(s, 500)
        assert s.call(lambda: s.server.failed) is None
        later(s, 600)
        assert s.call(lambda: s.server.failed) == "no replica was warm after 600 s (--start-timeout)"
        assert s.server.stopped.is_set() and backend.stopped == [] and s.call(lambda: s.server.restarts) == 0


def test_the_server_fails_when_its_last_replica_is_lost_and_no_replacement_is_allowed() -> None:
    backend = FakeBackend()
    with fake_server(backend, replicas=1, max_restarts=0) as s:
        backend.kill(0)
        wait_until(lambda: s.call(lambda: s.server.failed) is not None, "the failure")
        assert s.call(lambda: s.server.failed) == (
            "every replica was lost and no replacement is allowed (--max-restarts 0): "
            "worker 0 was killed by SIGKILL")
        assert backend.started == [0]


def test_a_bad_row_fails_only_its_own_request() -> None:
    backend = FakeBackend(batch_s=0.1)
    with fake_server(backend, replicas=1, max_queue_delay_ms=50) as s:
        with ThreadPoolExecutor(3) as pool:
            good = pool.submit(requests.post, s.url + INFER, json=body(["fine"]), timeout=10)
            bad = pool.submit(requests.post, s.url + INFER, json=body(["boom"]), timeout=10)
            other = pool.submit(requests.post, s.url + INFER, json=body(["also fine"]), timeout=10)
        assert good.result().status_code == 200 and other.result().status_code == 200
        assert bad.result().status_code == 400 and "boom" in bad.result().json()["error"]


def test_draining_turns_readiness_off_and_refuses_new_requests() -> None:
    backend = FakeBackend(batch_s=0.4)
    with fake_server(backend, replicas=1) as s, ThreadPoolExecutor(2) as pool:
        running = pool.submit(requests.post, s.url + INFER, json=body(["in flight"]), timeout=10)
        time.sleep(0.1)
        drained = pool.submit(s.call, lambda: s.server.drain(5.0))
        time.sleep(0.05)
        assert requests.get(s.url + "/v2/health/ready", timeout=10).status_code == 503
        late = requests.post(s.url + INFER, json=body(["too late"]), timeout=10)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]
        drained.result()
        assert running.result().status_code == 200


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_requests = st.one_of(
    st.binary(max_size=200),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"inputs": st.lists(st.fixed_dictionaries({
        "name": st.sampled_from(["text", "x"]), "shape": st.lists(st.integers(-2, 3), max_size=3),
        "datatype": st.sampled_from(["BYTES", "FP32", "INT64", "nope"]), "data": _json_values,
    }), max_size=2)}).map(lambda v: json.dumps(v).encode()),
)


@pytest.fixture(scope="module")
def shared() -> Iterator[Running]:
    with fake_server() as s:
        yield s


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=_requests, header=st.one_of(st.none(), st.integers(-5, 300).map(str), st.text("0123456789ab -+.", max_size=5)),
       route=st.sampled_from([INFER, "/text"]))
def test_generated_requests_never_break_the_server(
    shared: Running, payload: bytes, header: str | None, route: str
) -> None:
    server = shared
    headers = {"Inference-Header-Content-Length": header} if header is not None else {}
    try:
        r = requests.post(server.url + route, data=payload, headers=headers, timeout=10)
    except requests.exceptions.InvalidHeader:
        return  # a header value the client library itself refuses to send
    assert r.status_code in (200, 400), (r.status_code, r.text)
    assert "error" in r.json() if r.status_code == 400 else True
    ok = requests.post(server.url + INFER, json=body(["still up"]), timeout=10)
    assert ok.status_code == 200
