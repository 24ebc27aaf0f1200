"""The generation engine's scheduling, with a fake model: continuous batching, chunked
prefill, preemption, stopping, cancelling. No torch: the engine is pure Python."""

from __future__ import annotations

from collections import deque

import pytest

from distinfer.models.llm.engine import Engine, Request
from distinfer.models.llm.paged import PAGE, SeqChunk
from distinfer.models.llm.sampling import SamplingParams

EOS = 1


def next_token(position: int, prompt_len: int) -> int:
    """The fake model: the token after `position` tokens depends only on the position (and
    ends with EOS at prompt_len + 9), so any batching or recomputation gives the same text."""
    return EOS if position == prompt_len + 9 else 10 + position % 26


class FakeExecutor:
    def __init__(self, depth: int = 1) -> None:
        self.depth = depth
        self.steps: list[list[SeqChunk]] = []
        self.done: deque[list[int]] = deque()
        self.prompt_len: dict[tuple[int, ...], int] = {}

    def submit(self, chunks: list[SeqChunk], sampling: list[tuple[SamplingParams, int]]) -> None:
        self.steps.append(chunks)
        # the position of the token to make is what `sampling` carries
        self.done.append([next_token(pos, self.prompt_of(pos, p)) for p, pos in sampling])

    def prompt_of(self, pos: int, params: SamplingParams) -> int:
        return params.seed  # the tests put the prompt length in the seed

    def collect(self) -> list[int]:
        return self.done.popleft()


class Chars:
    def push(self, token: int) -> str:
        return chr(ord("a") + token - 10)

    def flush(self) -> str:
        return ""


def requests(n: int, prompt_len: int = 5, max_tokens: int = 20, stop: tuple[str, ...] = ()) -> list[Request]:
    return [Request(i, tuple(range(100, 100 + prompt_len + i)), max_tokens, SamplingParams(seed=prompt_len + i),
                    stop) for i in range(n)]


def engine(executor: FakeExecutor, pages: int = 64, **kw: int) -> Engine:
    return Engine(executor, pages, 0, 0, 4096, (EOS,), decoder=Chars, **kw)


def expected(r: Request) -> list[int]:
    out: list[int] = []
    while len(out) < r.max_tokens:
        t = next_token(len(r.prompt) + len(out), r.params.seed)
        if t == EOS:
            break
        out.append(t)
    return out


def test_every_request_gets_its_own_tokens_whatever_the_batching() -> None:
    reqs = requests(12)
    for running in (1, 4, 32):
        done = engine(FakeExecutor(), max_running=running).run_all(reqs)
        assert [done[r.id].out for r in reqs] == [expected(r) for r in reqs]
        assert all(done[r.id].finish == "stop" for r in reqs)


def test_a_finished_sequence_is_replaced_at_the_next_step() -> None:
    ex = FakeExecutor()
    e = engine(ex, max_running=2)
    e.run_all(requests(3, max_tokens=3))
    running = [len(step) for step in ex.steps]
    assert max(running) == 2
    # the third request starts in the step right after the first two finished, not later
    assert running.count(2) >= 3 and sum(running) == 3 * (1 + 3) - 3


def test_long_prompts_are_prefilled_in_chunks_alongside_decodes() -> None:
    ex = FakeExecutor()
    e = engine(ex, max_running=4, step_tokens=16)
    reqs = [*requests(1), Request(9, tuple(range(200, 260)), 3, SamplingParams(seed=60))]
    e.run_all(reqs)
    assert all(sum(len(c.tokens) for c in step) <= 16 for step in ex.steps)
    chunks = [c for step in ex.steps for c in step if len(c.tokens) > 1 and c.tokens[0] >= 200]
    assert len(chunks) >= 4  # 60 prompt tokens in pieces
    mixed = [step for step in ex.steps if any(len(c.tokens) == 1 for c in step) and any(len(c.tokens) > 1 for c in step)]
    assert mixed, "prefill chunks should share steps with running decodes"


def test_a_full_cache_preempts_and_recomputes_to_the_same_tokens() -> None:
    reqs = [Request(i, tuple(range(100, 120 + i)), 40, SamplingParams(seed=1000)) for i in range(6)]
    e = engine(FakeExecutor(), pages=8, max_running=6)  # 8 pages of 16 tokens: not all at once
    done = e.run_all(reqs)
    assert e.stats.preemptions > 0
    assert [done[r.id].out for r in reqs] == [expected(r) for r in reqs]
    assert len(e.pool.free) == 8  # every page came back


def test_pipeline_depth_keeps_several_groups_in_flight() -> None:
    ex = FakeExecutor(depth=2)
    e = engine(ex, max_running=8)
    reqs = requests(8)
    done = e.run_all(reqs)
    assert [done[r.id].out for r in reqs] == [expected(r) for r in reqs]
    assert max(len(step) for step in ex.steps) == 4  # two groups of four
    held = [{c.pages[0] for c in step} for step in ex.steps[:2]]  # a sequence's first page names it
    assert not held[0] & held[1]


def test_stop_strings_cut_the_text_and_max_tokens_ends_with_length() -> None:
    [r] = requests(1, prompt_len=5, max_tokens=20, stop=("jk",))
    done = engine(FakeExecutor()).run_all([r])
    full = "".join(Chars().push(t) for t in expected(r))
    assert done[0].finish == "stop" and done[0].text == full[: full.index("jk")]
    [r] = requests(1, max_tokens=3)
    done = engine(FakeExecutor()).run_all([r])
    assert done[0].finish == "length" and len(done[0].out) == 3


def test_cancel_frees_the_pages_at_the_next_step() -> None:
    e = engine(FakeExecutor(), pages=16)
    for r in requests(2, max_tokens=30):
        e.add(r)
    e.step()
    e.cancel(0)
    while e.busy:
        e.step()
    assert len(e.pool.free) == 16


def test_requests_that_cannot_fit_are_refused_up_front() -> None:
    e = engine(FakeExecutor(), pages=2)
    with pytest.raises(ValueError, match="needs 3 KV pages; the cache holds 2"):
        e.add(Request(0, tuple(range(2 * PAGE + 1)), 4))
    with pytest.raises(ValueError, match="at least one prompt token"):
        e.add(Request(1, (), 4))


def test_a_sequence_too_long_for_the_whole_cache_ends_with_length() -> None:
    e = engine(FakeExecutor(), pages=2)
    r = Request(0, tuple(range(100, 120)), 100, SamplingParams(seed=1000))  # no EOS: grows past 2 pages
    done = e.run_all([r])
    assert done[0].finish == "length" and done[0].computed == 2 * PAGE  # the cache held all it could


def test_preemption_never_takes_a_sequence_already_in_the_step() -> None:
    # many growing sequences in a small cache: each step checks that every chunk has its pages
    class Checking(FakeExecutor):
        def submit(self, chunks: list[SeqChunk], sampling: list[tuple[SamplingParams, int]]) -> None:
            for c in chunks:
                assert len(c.pages) * PAGE >= c.start + len(c.tokens), "a chunk without its pages"
            super().submit(chunks, sampling)

    reqs = [Request(i, tuple(range(100, 110 + 3 * i)), 60, SamplingParams(seed=1000)) for i in range(10)]
    e = engine(Checking(), pages=12, max_running=10)
    done = e.run_all(reqs)
    assert e.stats.preemptions > 0
    assert [done[r.id].out for r in reqs] == [expected(r) for r in reqs]
