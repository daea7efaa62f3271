"""The scheduler's admit, cancel, failure and stop paths, on a fake runtime (milliseconds each)."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest

from appliance.engine.runtime import RuntimeOptions
from appliance.engine.sampling import GrammarRefused, SamplingParams
from appliance.engine.scheduler import (
    DoneEvent,
    ErrorEvent,
    Event,
    GenerationRequest,
    Scheduler,
    TextEvent,
)
from appliance.errors import EngineError, QueueFull, ServiceUnavailable
from tests.appliance.fakes import THINK_CLOSE, THINK_OPEN, FakeRuntime, FakeSampler

# A context no fake stream fills: they run until finished or cut.
OPTIONS = RuntimeOptions(n_gpu_layers=0, context_per_slot=2**24, n_seq=2, n_threads=1)


class Events:
    def __init__(self) -> None:
        self.queue: queue.Queue[Event] = queue.Queue()

    def __call__(self, event: Event) -> None:
        self.queue.put(event)

    def final(self, timeout: float = 10) -> Event:
        deadline = time.monotonic() + timeout
        while True:
            event = self.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            if not isinstance(event, TextEvent):
                return event

    def first(self, timeout: float = 10) -> Event:
        return self.queue.get(timeout=timeout)


def request(events: Events, max_tokens: int = 5, prompt: str = "hello") -> GenerationRequest:
    return GenerationRequest(list(prompt.encode()), SamplingParams(), max_tokens, [], events)


@pytest.fixture()
def runtime() -> FakeRuntime:
    return FakeRuntime(Path("fake.gguf"), OPTIONS)


def wait_until(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_request_runs_to_its_length(runtime: FakeRuntime) -> None:
    sched = Scheduler(runtime, 2, 4)
    events = Events()
    sched.submit(request(events, max_tokens=3))
    done = events.final()
    assert isinstance(done, DoneEvent) and done.finish_reason == "length"
    assert done.completion_tokens == 3
    sched.stop()


def test_a_cancelled_waiting_request_leaves_the_queue_at_once(runtime: FakeRuntime) -> None:
    runtime.gate.clear()  # hold the engine inside a step
    sched = Scheduler(runtime, 1, 1)
    running, waiting = Events(), Events()
    sched.submit(request(running, max_tokens=1000))
    wait_until(lambda: runtime.steps == 0 and sched.busy_slots == 1)
    queued = request(waiting)
    sched.submit(queued)
    with pytest.raises(QueueFull):  # one slot busy, one waiting: the bound
        sched.submit(request(Events()))
    sched.cancel(queued)
    assert sched.queue_depth == 0
    sched.submit(request(Events()))  # the cancelled request no longer counts
    runtime.gate.set()
    sched.stop()


def test_a_cancelled_running_request_frees_its_slot_within_a_step(runtime: FakeRuntime) -> None:
    sched = Scheduler(runtime, 1, 0)
    events = Events()
    req = request(events, max_tokens=100_000)
    sched.submit(req)
    assert isinstance(events.first(), TextEvent)
    sched.cancel(req)
    wait_until(lambda: sched.busy_slots == 0)
    steps = runtime.steps
    time.sleep(0.05)
    assert runtime.steps == steps  # nothing left to decode: the engine sleeps
    sched.stop()


def test_a_failed_decode_fails_running_requests_and_the_engine_serves_on(
        runtime: FakeRuntime) -> None:
    runtime.on_decode = lambda rt: -1 if rt.steps == 2 else 0
    sched = Scheduler(runtime, 2, 4)
    first = Events()
    sched.submit(request(first, max_tokens=50))
    failed = first.final()
    assert isinstance(failed, ErrorEvent) and "status -1" in str(failed.error)
    second = Events()
    sched.submit(request(second, max_tokens=3))
    assert isinstance(second.final(), DoneEvent)
    sched.stop()


def test_stop_ends_running_streams_with_an_error_not_a_finish(runtime: FakeRuntime) -> None:
    sched = Scheduler(runtime, 2, 4)
    events = Events()
    sched.submit(request(events, max_tokens=100_000))
    assert isinstance(events.first(), TextEvent)
    sched.stop("the server switched to model b")
    end = events.final()
    assert isinstance(end, ErrorEvent) and isinstance(end.error, ServiceUnavailable)
    assert "switched to model b" in str(end.error)


def test_an_engine_thread_that_dies_says_so(runtime: FakeRuntime) -> None:
    def explode(rt: FakeRuntime) -> int:
        raise SystemExit("a bug past every guard")  # not an Exception: escapes the step guard

    runtime.on_decode = explode
    died: list[BaseException] = []
    sched = Scheduler(runtime, 2, 4, on_fatal=died.append)
    events = Events()
    sched.submit(request(events))
    end = events.final()
    assert isinstance(end, ErrorEvent) and isinstance(end.error, EngineError)
    wait_until(lambda: bool(died))
    assert not sched.alive() and isinstance(sched.fatal, SystemExit)
    with pytest.raises(EngineError):
        sched.submit(request(Events()))


def test_stalled_for_measures_a_step_in_progress(runtime: FakeRuntime) -> None:
    runtime.gate.clear()
    sched = Scheduler(runtime, 1, 0)
    sched.submit(request(Events(), max_tokens=2))
    wait_until(lambda: sched.stalled_for() > 0.05)
    runtime.gate.set()
    wait_until(lambda: sched.stalled_for() == 0.0)
    sched.stop()


# -- n choices, thinking budget, logprobs ----------------------------------------------------


def collect(events: Events, n: int = 1, timeout: float = 10) -> tuple[dict[int, str],
                                                                      dict[int, DoneEvent],
                                                                      list[TextEvent]]:
    """Every choice's text and final event, and the text events in order."""
    texts: dict[int, str] = {}
    done: dict[int, DoneEvent] = {}
    pieces: list[TextEvent] = []
    deadline = time.monotonic() + timeout
    while len(done) < n:
        event = events.queue.get(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(event, TextEvent):
            texts[event.index] = texts.get(event.index, "") + event.text
            pieces.append(event)
        elif isinstance(event, DoneEvent):
            done[event.index] = event
        else:
            raise AssertionError(event)
    return texts, done, pieces


def think_request(events: Events, prompt: list[int], budget: int | None,
                  max_tokens: int = 20) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingParams(), max_tokens, [], events,
                             thinking_budget=budget)


def test_a_spent_thinking_budget_closes_thinking_and_generation_goes_on(
        runtime: FakeRuntime) -> None:
    sched = Scheduler(runtime, 2, 4)
    events = Events()
    prompt = runtime.tokenize("user: hi\nassistant: <think>\n", add_special=False)
    sched.submit(think_request(events, prompt, budget=5))
    texts, done, _ = collect(events)
    # 5 thinking tokens, the close the engine appended, then the answer continues.
    thought, _, answer = texts[0].partition("\n</think>\n\n")
    assert len(thought) == 5 and "<think>" not in thought and len(answer) > 0
    assert done[0].finish_reason == "length" and done[0].completion_tokens == 20
    sched.stop()


def test_the_forced_close_is_read_by_the_model_and_seen_by_the_sampler(
        runtime: FakeRuntime) -> None:
    fed: list[int] = []
    runtime.on_decode = lambda rt: fed.extend(t for t, *_ in rt.batch.tokens) or 0
    samplers = []
    real_sampler = runtime.sampler
    runtime.sampler = lambda params: samplers.append(real_sampler(params)) or samplers[-1]
    sched = Scheduler(runtime, 1, 0)
    events = Events()
    prompt = runtime.tokenize("<think>\n", add_special=False)
    sched.submit(think_request(events, prompt, budget=2, max_tokens=8))
    collect(events)
    close = runtime.think.close_run
    assert samplers[0].accepted == close
    start = next(i for i in range(len(fed)) if fed[i:i + len(close)] == close)
    assert fed[start + len(close):start + len(close) + 1] == [ord("a") + (ord("\n") + 1) % 26]
    sched.stop()


def test_no_budget_or_no_open_thinking_changes_nothing(runtime: FakeRuntime) -> None:
    sched = Scheduler(runtime, 2, 4)
    free, closed = Events(), Events()
    sched.submit(think_request(free, runtime.tokenize("<think>\n", add_special=False), None))
    sched.submit(think_request(closed, runtime.tokenize("<think>\n\n</think>\n\n",
                                                        add_special=False), budget=1))
    assert "</think>" not in collect(free)[0][0]
    assert "</think>" not in collect(closed)[0][0]
    sched.stop()


class ScriptedSampler(FakeSampler):
    """Samples `script` first, then as the fake does; refuses to accept `refused` (a grammar)."""

    def __init__(self, runtime: FakeRuntime, script: list[int], refused: set[int]) -> None:
        super().__init__(runtime)
        self.script, self.refused = list(script), refused

    def sample(self, runtime: FakeRuntime, batch_index: int) -> int:
        return self.script.pop(0) if self.script else super().sample(runtime, batch_index)

    def accept(self, token: int) -> None:
        if token in self.refused:
            raise GrammarRefused(f"token {token}")
        super().accept(token)


def test_a_think_tag_inside_the_answer_is_text(runtime: FakeRuntime) -> None:
    """A JSON answer may hold "<think>" in a string (a grammar allows it there): it opens no
    thinking, so no budget forces a close the grammar would refuse."""
    runtime.sampler = lambda params: ScriptedSampler(runtime, [ord("{"), THINK_OPEN], set())
    sched = Scheduler(runtime, 1, 0)
    events = Events()
    sched.submit(think_request(events, list(b"q"), budget=1, max_tokens=6))
    texts, done, _ = collect(events)
    assert texts[0].startswith("{<think>") and "</think>" not in texts[0]
    assert done[0].finish_reason == "length" and done[0].completion_tokens == 6
    sched.stop()


def test_a_close_the_grammar_refuses_ends_the_answer(runtime: FakeRuntime) -> None:
    """A spent budget whose forced close a grammar refuses: what it took is kept, the answer
    ends there ("length": the budget ran out), and the engine serves on."""
    samplers: list[ScriptedSampler] = []
    runtime.sampler = lambda params: samplers.append(
        ScriptedSampler(runtime, [], {THINK_CLOSE})) or samplers[-1]
    sched = Scheduler(runtime, 1, 0)
    events = Events()
    sched.submit(think_request(events, runtime.tokenize("<think>\n", add_special=False),
                               budget=2, max_tokens=20))
    texts, done, _ = collect(events)
    assert samplers[0].accepted == [ord("\n")]  # the close run up to the refused tag
    assert texts[0].endswith("\n") and done[0].finish_reason == "length"
    assert done[0].completion_tokens == 3
    after = Events()
    sched.submit(request(after))
    assert isinstance(after.final(), DoneEvent)
    sched.stop()


def test_open_thinking_appends_the_tag_to_the_prompt(runtime: FakeRuntime) -> None:
    sched = Scheduler(runtime, 1, 0)
    events = Events()
    req = GenerationRequest(list(b"q"), SamplingParams(), 6, [], events, thinking_budget=3,
                            open_thinking=True)
    sched.submit(req)
    texts, done, _ = collect(events)
    assert req.prompt_tokens == [ord("q"), *runtime.think.open_run]
    assert done[0].prompt_tokens == 3 and "\n</think>\n\n" in texts[0]
    sched.stop()


def test_n_choices_read_the_prompt_once_and_copy_it(runtime: FakeRuntime) -> None:
    fed: list[tuple[int, int, int, bool]] = []
    runtime.on_decode = lambda rt: fed.extend(rt.batch.tokens) or 0
    sched = Scheduler(runtime, 4, 4)
    events = Events()
    prompt = list(b"hello world")
    sched.submit(GenerationRequest(prompt, SamplingParams(seed=3), 4, [], events, n=3))
    texts, done, _ = collect(events, n=3)
    assert set(texts) == {0, 1, 2} and set(done) == {0, 1, 2}
    prompt_reads = [t for t in fed if t[1] < len(prompt)]
    assert len(prompt_reads) == len(prompt)  # read once, into the first choice's slot
    first_slot = prompt_reads[0][2]
    assert sorted(src for src, _ in runtime.copies) == [first_slot, first_slot]
    assert len({dst for _, dst in runtime.copies} | {first_slot}) == 3
    assert all(d.completion_tokens == 4 and d.prompt_tokens == len(prompt) for d in done.values())
    assert sched.busy_slots == 0
    sched.stop()


def test_n_waits_for_enough_free_slots_first_come_first_served(runtime: FakeRuntime) -> None:
    runtime.gate.clear()
    sched = Scheduler(runtime, 2, 4)
    running, pair, single = Events(), Events(), Events()
    sched.submit(request(running, max_tokens=3))
    wait_until(lambda: sched.busy_slots == 1)
    sched.submit(GenerationRequest(list(b"x"), SamplingParams(), 2, [], pair, n=2))
    sched.submit(request(single, max_tokens=2))
    assert sched.queue_depth == 2  # one slot is free, but the pair came first and needs two
    runtime.gate.set()
    collect(pair, n=2)
    collect(single)
    sched.stop()


def test_n_above_the_slot_count_is_refused(runtime: FakeRuntime) -> None:
    from appliance.errors import InvalidValue

    sched = Scheduler(runtime, 2, 4)
    with pytest.raises(InvalidValue) as info:
        sched.submit(GenerationRequest(list(b"x"), SamplingParams(), 2, [], Events(), n=3))
    assert info.value.param == "n"
    sched.stop()


def test_cancelling_n_choices_frees_every_slot(runtime: FakeRuntime) -> None:
    sched = Scheduler(runtime, 3, 0)
    events = Events()
    req = GenerationRequest(list(b"x" * 50), SamplingParams(), 100_000, [], events, n=3)
    sched.submit(req)
    assert isinstance(events.first(), TextEvent)
    sched.cancel(req)
    _, done, _ = collect(events, n=3)
    assert {d.finish_reason for d in done.values()} == {"cancelled"}
    wait_until(lambda: sched.busy_slots == 0)
    sched.stop()


def test_logprobs_come_with_their_text_and_stop_strings_drop_theirs(
        runtime: FakeRuntime) -> None:
    sched = Scheduler(runtime, 1, 0)
    events = Events()
    # The fake continues "a" with "uoicwq..."; "i", "ic" are held back as a possible "icw" and
    # cut with it.
    sched.submit(GenerationRequest(list(b"a"), SamplingParams(), 10, ["icw"], events,
                                   logprobs=2))
    texts, done, pieces = collect(events)
    assert texts[0] == "uo" and done[0].finish_reason == "stop"
    entries = [e for p in pieces for e in (p.logprobs or [])]
    assert [e.piece for e in entries] == [b"u", b"o"]
    assert entries[0].top[0].token == ord("u") and len(entries[0].top) == 2
    assert -1e-3 < entries[0].logprob <= 0 and entries[0].top[1].logprob < -19
    sched.stop()
