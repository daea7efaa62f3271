"""The scheduler's admit, cancel, failure and stop paths, on a fake runtime (milliseconds each)."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest

from appliance.engine.runtime import RuntimeOptions
from appliance.engine.sampling import SamplingParams
from appliance.engine.scheduler import (
    DoneEvent,
    ErrorEvent,
    Event,
    GenerationRequest,
    Scheduler,
    TextEvent,
)
from appliance.errors import EngineError, QueueFull, ServiceUnavailable
from tests.appliance.fakes import FakeRuntime

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
