"""The worker supervisor shared by `distinfer run` and `distinfer serve`, driven by scripted
events and explicit times: no processes, no sleeps."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distinfer.errors import ErrorInfo
from distinfer.messages import StartWorker, StopWorker, Tick, WorkerFailed, WorkerLost, WorkerReady
from distinfer.scheduling import NotReady, Retired, Supervision, Supervisor, SupervisorConfig
from distinfer.scheduling.supervisor import SupervisorEvent

FATAL = ErrorInfo("ModelError", "no model named 'bert-tiny'", fatal=True)
TRANSIENT = ErrorInfo("RuntimeError", "CUDA error: an illegal memory access", fatal=False)


def make(workers: Sequence[int] = (0, 1), now: float = 0.0, **config: object) -> Supervisor:
    return Supervisor(workers, SupervisorConfig(**config), now)  # type: ignore[arg-type]


# --- config and construction -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [{"max_restarts": -1}, {"start_timeout_s": 0.0}, {"start_timeout_s": float("nan")}]
)
def test_config_out_of_range_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SupervisorConfig(**kwargs)  # type: ignore[arg-type]


def test_worker_ids_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        make([0, 0])


def test_unknown_event_type_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        make().handle(StartWorker(0), 0.0)  # type: ignore[arg-type]


# --- the rules, one by one ---------------------------------------------------------------


def test_worked_example_from_the_design_note() -> None:
    sup = make(max_restarts=3, start_timeout_s=60.0)
    reason = "RuntimeError: CUDA error: an illegal memory access"
    script: list[tuple[SupervisorEvent, float, list[Supervision]]] = [
        (WorkerReady(0), 5.0, []),
        (Tick(), 60.0, [StopWorker(1), Retired(1, "worker 1 was not ready 60 s after its start", False,
                                               timed_out=True, replacement=2), StartWorker(2)]),
        (WorkerFailed(2, TRANSIENT), 70.0, [StopWorker(2), Retired(2, reason, False, TRANSIENT, replacement=3),
                                            StartWorker(3)]),
        (WorkerLost(0, "killed"), 100.0, [Retired(0, "killed", True, replacement=4), StartWorker(4)]),
        (Tick(), 130.0, [StopWorker(3), Retired(3, "worker 3 was not ready 60 s after its start", False,
                                                timed_out=True)]),
        (Tick(), 160.0, [NotReady(60.0, 100.0)]),
    ]
    sup.start(0.0)
    for event, now, expected in script:
        assert sup.handle(event, now) == expected, (event, now)
    assert sup.restarts_used == 3 and sup.live_workers == (4,) and sup.since == 100.0


def test_a_started_worker_becomes_ready_and_its_start_clock_stops() -> None:
    sup = make(start_timeout_s=60.0)
    assert sup.handle(WorkerReady(1), 10.0) == []
    assert sup.ready_workers == (1,) and sup.loading_workers == (0,) and sup.is_ready(1)
    assert sup.next_deadline() == 60.0  # worker 0's start; the face's clock stops while 1 is ready
    assert sup.handle(WorkerReady(0), 20.0) == []
    assert sup.next_deadline() is None
    assert sup.handle(Tick(), 10_000.0) == []


def test_events_from_unknown_or_retired_workers_are_ignored() -> None:
    sup = make()
    assert sup.handle(WorkerLost(0, "gone"), 1.0)[-1] == StartWorker(2)
    for event in (WorkerReady(0), WorkerLost(0, "again"), WorkerFailed(0, TRANSIENT), WorkerReady(9),
                  WorkerFailed(9, FATAL)):
        assert sup.handle(event, 2.0) == []
    assert sup.live_workers == (1, 2) and not sup.is_live(0) and sup.ready_workers == ()


def test_an_unusable_worker_is_stopped_at_once_and_replaced_under_a_fresh_id() -> None:
    sup = make([5, 2])
    sup.handle(WorkerReady(5), 1.0)
    actions = sup.handle(WorkerFailed(2, TRANSIENT), 2.0)
    assert actions == [StopWorker(2), Retired(2, f"{TRANSIENT.kind}: {TRANSIENT.message}", False, TRANSIENT,
                                              replacement=6), StartWorker(6)]
    assert sup.live_workers == (5, 6) and sup.restarts_used == 1


def test_a_fatal_failure_is_stopped_and_never_replaced() -> None:
    sup = make(max_restarts=3)
    actions = sup.handle(WorkerFailed(1, FATAL), 2.0)
    assert actions == [StopWorker(1), Retired(1, f"ModelError: {FATAL.message}", False, FATAL)]
    assert sup.restarts_used == 0 and sup.live_workers == (0,)


def test_a_lost_worker_is_replaced_without_a_stop_and_ids_continue_after_the_largest() -> None:
    sup = make([5, 2], max_restarts=3)
    sup.handle(WorkerReady(5), 0.0)
    sup.handle(WorkerReady(2), 0.0)
    assert sup.handle(WorkerLost(2, "a"), 1.0) == [Retired(2, "a", True, replacement=6), StartWorker(6)]
    assert sup.handle(WorkerLost(6, "b"), 2.0)[-1] == StartWorker(7)
    assert sup.handle(WorkerLost(5, "c"), 3.0)[-1] == StartWorker(8)
    assert sup.restarts_used == 3 and sup.live_workers == (7, 8)
    # The budget is spent: the next loss is not replaced.
    assert sup.handle(WorkerLost(7, "d"), 4.0) == [Retired(7, "d", False)]
    assert sup.handle(WorkerLost(8, "e"), 5.0) == [Retired(8, "e", False)]
    assert not sup.live_workers and sup.restarts_used == 3


def test_replace_false_retires_without_touching_the_budget() -> None:
    sup = make(max_restarts=1)
    assert sup.handle(WorkerFailed(0, TRANSIENT), 1.0, replace=False) == [
        StopWorker(0), Retired(0, "RuntimeError: CUDA error: an illegal memory access", False, TRANSIENT)]
    assert sup.handle(WorkerLost(1, "x"), 1.0, replace=False) == [Retired(1, "x", False)]
    assert sup.restarts_used == 0 and sup.live_workers == ()


# --- start timeouts ----------------------------------------------------------------------


def test_a_replacement_still_loading_is_stopped_and_replaced_while_another_is_ready() -> None:
    sup = make([0, 1], start_timeout_s=60.0, max_restarts=2)
    sup.handle(WorkerReady(0), 1.0)
    sup.handle(WorkerReady(1), 1.0)
    assert sup.handle(WorkerLost(1, "x"), 100.0)[-1] == StartWorker(2)
    assert sup.next_deadline() == 160.0
    assert sup.handle(Tick(), 159.9) == []
    assert sup.handle(Tick(), 160.0) == [
        StopWorker(2), Retired(2, "worker 2 was not ready 60 s after its start", False, timed_out=True,
                               replacement=3), StartWorker(3)]
    assert sup.handle(WorkerReady(2), 161.0) == []  # late: it was stopped
    assert sup.ready_workers == (0,) and sup.live_workers == (0, 3) and sup.next_deadline() == 220.0


def test_every_first_start_is_timed_by_default() -> None:
    sup = make([0, 1], now=10.0, start_timeout_s=60.0)
    sup.handle(WorkerReady(0), 20.0)
    assert sup.handle(Tick(), 69.0) == []
    actions = sup.handle(Tick(), 70.0)
    assert actions[0] == StopWorker(1) and actions[-1] == StartWorker(2)


def test_untimed_first_starts_are_left_to_the_face_clock() -> None:
    sup = make([0, 1], start_timeout_s=60.0, time_first_starts=False)
    sup.handle(WorkerReady(0), 10.0)
    assert sup.next_deadline() is None
    assert sup.handle(Tick(), 1000.0) == []  # worker 1 still loading: a ready job keeps it
    assert sup.handle(WorkerLost(0, "x"), 1000.0)[-1] == StartWorker(2)
    assert sup.next_deadline() == 1060.0  # the replacement's start and the face's clock
    assert sup.handle(Tick(), 1060.0) == [NotReady(60.0, 1000.0)]


def test_the_face_clock_wins_over_start_clocks_due_at_the_same_tick() -> None:
    sup = make([0, 1], now=100.0, start_timeout_s=60.0)
    assert sup.handle(Tick(), 159.9) == []
    assert sup.handle(Tick(), 160.0) == [NotReady(60.0, 100.0)]
    assert sup.live_workers == (0, 1) and sup.restarts_used == 0  # nothing stopped or replaced
    assert sup.handle(Tick(), 161.0) == [NotReady(60.0, 100.0)]  # until the face gives up


def test_a_reported_loss_restarts_the_face_clock_a_start_timeout_does_not() -> None:
    sup = make([0, 1], start_timeout_s=60.0)
    assert sup.handle(WorkerLost(0, "crash"), 30.0)[-1] == StartWorker(2)  # none ready: clock from 30
    assert sup.since == 30.0
    actions = sup.handle(Tick(), 60.0)  # worker 1's own start ran out, the face's has not
    assert actions[0] == StopWorker(1) and actions[-1] == StartWorker(3)
    assert sup.since == 30.0
    assert sup.handle(Tick(), 89.9) == []
    assert sup.handle(Tick(), 90.0) == [NotReady(60.0, 30.0)]


def test_a_timed_out_worker_without_budget_is_stopped_and_not_replaced() -> None:
    sup = make([0, 1], start_timeout_s=60.0, max_restarts=0)
    sup.handle(WorkerReady(0), 1.0)
    assert sup.handle(Tick(), 60.0) == [
        StopWorker(1), Retired(1, "worker 1 was not ready 60 s after its start", False, timed_out=True)]
    assert sup.live_workers == (0,)


def test_start_resets_the_clocks() -> None:
    sup = make([0], now=0.0, start_timeout_s=60.0)
    sup.start(500.0)  # the face started its workers late
    assert sup.next_deadline() == 560.0
    assert sup.handle(Tick(), 559.0) == []


# --- property: random event streams keep the books straight -------------------------------


_events = st.lists(
    st.tuples(
        st.one_of(
            st.builds(WorkerReady, st.integers(0, 8)),
            st.builds(WorkerLost, st.integers(0, 8), st.just("lost")),
            st.builds(WorkerFailed, st.integers(0, 8), st.sampled_from([TRANSIENT, FATAL])),
            st.builds(Tick),
        ),
        st.floats(0.0, 50.0),
        st.booleans(),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(_events, st.integers(0, 4), st.booleans())
def test_random_event_streams_keep_the_books(
    events: list[tuple[SupervisorEvent, float, bool]], max_restarts: int, time_first: bool
) -> None:
    sup = make([0, 1, 2], start_timeout_s=30.0, max_restarts=max_restarts, time_first_starts=time_first)
    now = 0.0
    ever = {0, 1, 2}
    for event, step, replace in events:
        now += step
        live_before = set(sup.live_workers)
        actions = sup.handle(event, now, replace=replace)
        stopped: set[int] = set()
        for action in actions:
            if isinstance(action, StartWorker):
                assert action.worker == max(ever) + 1  # fresh: never reused
                ever.add(action.worker)
            elif isinstance(action, StopWorker):
                assert action.worker in live_before
                stopped.add(action.worker)
            elif isinstance(action, Retired):
                assert action.worker in live_before and not sup.is_live(action.worker)
                assert (action.worker in stopped) == (not isinstance(event, WorkerLost))
                if (action.error is not None and action.error.fatal) or not replace:
                    assert action.replacement is None
            else:
                assert actions == [action] and not sup.ready_workers
        assert set(sup.ready_workers) <= set(sup.live_workers)
        assert sup.restarts_used <= max_restarts
        assert len(ever) == 3 + sup.restarts_used
        if isinstance(event, Tick) and not any(isinstance(a, NotReady) for a in actions):
            deadline = sup.next_deadline()  # nothing left due: a timer at it never spins
            assert deadline is None or deadline > now
