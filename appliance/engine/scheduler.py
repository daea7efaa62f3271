"""Continuous batching over one llama.cpp context: many requests share each decode step.

One engine thread owns the runtime. Each step puts one token of every generating sequence and
a chunk of any prompt being read into a single `llama_decode` batch, then samples each sequence
with its own sampler chain. New requests join at the next step; a finished or cancelled one
frees its slot at once. A slot keeps its KV cells after a request, so the next request that
shares a prefix with them (same system prompt, next turn of a chat) only reads the rest.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from appliance.engine.runtime import LlamaRuntime
from appliance.engine.sampling import SamplerChain, SamplingParams
from appliance.engine.text import Detokenizer, StopMatcher
from appliance.errors import (
    ApplianceError,
    ContextOverflow,
    EngineError,
    QueueFull,
    ServiceUnavailable,
)

log = logging.getLogger(__name__)

# While other sequences are generating, read at most this many prompt tokens per step, so their
# inter-token latency stays bounded while a long prompt arrives.
PREFILL_CHUNK_BUSY = 128
# Reusing a few cached tokens saves almost nothing and leaves an odd-sized prompt batch, which
# llama.cpp's repacked CPU matmuls handle more slowly than a whole one: reuse from this many on.
MIN_PREFIX_REUSE = 32


@dataclass
class TextEvent:
    text: str


@dataclass
class DoneEvent:
    finish_reason: str  # stop, length; "cancelled" only for a request whose client has left
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class ErrorEvent:
    error: Exception


Event = TextEvent | DoneEvent | ErrorEvent


@dataclass
class GenerationRequest:
    prompt_tokens: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: list[str]
    emit: Callable[[Event], None]  # called on the engine thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)


class SchedulerObserver(Protocol):
    """Receives engine figures (the metrics module implements it)."""

    def on_step(self, batch_tokens: int, sequences: int, decode_s: float,
                step_s: float) -> None: ...
    def on_admit(self, queue_wait_s: float, prompt_tokens: int, cached_tokens: int) -> None: ...


class _NoObserver:
    def on_step(self, batch_tokens: int, sequences: int, decode_s: float,
                step_s: float) -> None:
        pass

    def on_admit(self, queue_wait_s: float, prompt_tokens: int, cached_tokens: int) -> None:
        pass


@dataclass
class Slot:
    index: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV cells the slot holds
    last_used: float = 0.0
    busy: bool = False


@dataclass
class _Sequence:
    request: GenerationRequest
    slot: Slot
    chain: SamplerChain
    prefilled: int
    cached_tokens: int
    detok: Detokenizer = field(default_factory=Detokenizer)
    stopper: StopMatcher | None = None
    generated: int = 0
    last_token: int = -1
    batch_index: int = -1

    @property
    def generating(self) -> bool:
        return self.prefilled >= len(self.request.prompt_tokens)


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value (Linux: per thread). llama.cpp's worker threads are
    started from the engine thread and inherit it, so HTTP handling and the user's desktop win
    the CPU when they need it, and the engine takes the rest."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except OSError as e:  # not Linux, or a sandbox that forbids it: run at normal priority
        log.warning("could not lower the engine's priority: %s", e)


def id_runs(ids: set[int]) -> int:
    """How many runs of consecutive numbers `ids` makes ({0, 1, 3} makes 2)."""
    return sum(i - 1 not in ids for i in ids)


def choose_slot(slots: list[Slot], prompt: list[int]) -> tuple[Slot, int]:
    """The free slot for `prompt`, and how many of its cached tokens the prompt can reuse.

    The longest reusable prefix wins. Otherwise keep the busy slots in as few runs of
    consecutive ids as we can: with a split KV cache llama.cpp decodes each run as a separate
    graph (4 scattered sequences cost 1.6x 4 consecutive ones, bench/batch_ceiling.py). Last,
    the least recently used slot, which keeps the caches most likely to be wanted again.
    """
    def usable_prefix(slot: Slot) -> int:
        # Keep at least one prompt token to read, so the step yields logits to sample from.
        n = min(common_prefix(slot.cached, prompt), len(prompt) - 1)
        return n if n >= MIN_PREFIX_REUSE else 0

    busy = {s.index for s in slots if s.busy}
    free = [s for s in slots if not s.busy]
    slot = max(free, key=lambda s: (usable_prefix(s), -id_runs(busy | {s.index}), -s.last_used))
    return slot, usable_prefix(slot)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    """Admits requests into slots and runs the decode loop on its own thread."""

    def __init__(self, runtime: LlamaRuntime, n_slots: int, max_queue: int,
                 observer: SchedulerObserver | None = None, nice: int = 0,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.runtime = runtime
        self.on_fatal = on_fatal or (lambda _: None)
        self.fatal: BaseException | None = None  # why the engine thread ended, if it did
        self._step_started: float | None = None
        self.nice = nice
        self.max_queue = max_queue
        self.observer = observer or _NoObserver()
        self.slots = [Slot(i) for i in range(n_slots)]
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._active: list[_Sequence] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._stop_reason = "the model was unloaded"
        self._abort: Exception | None = None
        self._token_times: collections.deque[float] = collections.deque(maxlen=4096)
        self.prefix_hit_tokens = 0
        self.prompt_tokens_evaluated = 0
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # -- called from any thread -----------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        limit = self.runtime.context_per_slot
        if len(request.prompt_tokens) >= limit:
            raise ContextOverflow(
                f"the prompt has {len(request.prompt_tokens)} tokens but the model's context "
                f"is {limit} tokens per request", param="messages")
        with self._cond:
            if self.fatal is not None:
                raise EngineError(f"the engine has stopped: {self.fatal!r}")
            if self._stopping:
                raise ServiceUnavailable("the model is being unloaded", retry_after=2)
            if len(self._waiting) >= self.max_queue + self.free_slots():
                raise QueueFull(f"all {len(self.slots)} slots are busy and "
                                f"{len(self._waiting)} requests are waiting", retry_after=2)
            self._waiting.append(request)
            self._cond.notify()

    def cancel(self, request: GenerationRequest) -> None:
        """Withdraw a request: a waiting one leaves the queue now, a running one at the next step."""
        request.cancelled.set()
        with self._cond:
            try:
                self._waiting.remove(request)
            except ValueError:
                return
            self._cond.notify_all()

    def stalled_for(self) -> float:
        """Seconds the current decode step has run (0 between steps): the watchdog's measure."""
        started = self._step_started
        return 0.0 if started is None else time.perf_counter() - started

    def alive(self) -> bool:
        return self._thread.is_alive() and self.fatal is None

    def free_slots(self) -> int:
        return sum(not s.busy for s in self.slots)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return sum(s.busy for s in self.slots)

    def tokens_per_second(self, window_s: float = 5.0) -> float:
        now = time.perf_counter()
        recent = [t for t in list(self._token_times) if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(now - recent[0], 1e-6)

    def idle(self) -> bool:
        with self._cond:
            return not self._waiting and not self._active

    def abort_all(self, error: Exception) -> None:
        """End every running and waiting request with `error` (at the next step)."""
        with self._cond:
            self._abort = error
            self._cond.notify_all()

    def stop(self, reason: str = "the model was unloaded") -> None:
        """End the thread; requests still waiting or running end with an error saying `reason`."""
        with self._cond:
            self._stop_reason = reason
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    # -- engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug past every per-request guard: say so, never hang
            log.critical("the engine thread stopped", exc_info=True)
            self.fatal = e
            self._fail_all(EngineError(f"the engine stopped: {e!r}"))
            self.on_fatal(e)

    def _loop(self) -> None:
        lower_thread_priority(self.nice)
        while True:
            with self._cond:
                while (not self._stopping and not self._waiting and not self._active
                       and self._abort is None):
                    self._cond.wait()
                if self._stopping:
                    break
                abort, self._abort = self._abort, None
                admitted = self._take_admissible() if abort is None else []
            if abort is not None:
                self._fail_all(abort)
                continue
            for request in admitted:
                try:
                    self._admit(request)
                except Exception as e:  # a bug in one request must not stop the engine
                    log.exception("admitting a request failed")
                    for slot in self.slots:
                        if slot.busy and not any(s.slot is slot for s in self._active):
                            slot.busy = False
                    request.emit(ErrorEvent(EngineError(f"engine error: {e}")))
            if self._active:
                self._step_started = time.perf_counter()
                try:
                    self._step()
                except Exception as e:  # fail the running requests, keep serving the rest
                    log.exception("a decode step failed")
                    self._fail_active(EngineError(f"engine error: {e}"))
                finally:
                    self._step_started = None
        # A stream cut short must say so: an error, never a normal finish.
        self._fail_all(ServiceUnavailable(self._stop_reason, retry_after=2))

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            request.emit(ErrorEvent(error))
        for seq in list(self._active):
            self._release(seq)
            seq.request.emit(ErrorEvent(error))

    def _take_admissible(self) -> list[GenerationRequest]:
        free = self.free_slots()
        taken = []
        while self._waiting and free > 0:
            taken.append(self._waiting.popleft())
            free -= 1
        return taken

    def _admit(self, request: GenerationRequest) -> None:
        if request.cancelled.is_set():
            request.emit(DoneEvent("cancelled", len(request.prompt_tokens), 0, 0))
            return
        prompt = request.prompt_tokens
        slot, reuse = choose_slot(self.slots, prompt)
        self.runtime.forget(slot.index, reuse)
        slot.cached = slot.cached[:reuse]
        slot.busy = True
        try:
            chain = self.runtime.sampler(request.sampling)
        except Exception as e:
            slot.busy = False
            request.emit(ErrorEvent(e if isinstance(e, ApplianceError)
                                    else EngineError(f"engine error: {e}")))
            if not isinstance(e, ApplianceError):
                log.exception("building a sampler chain failed")
            return
        seq = _Sequence(request, slot, chain, prefilled=reuse, cached_tokens=reuse,
                        stopper=StopMatcher(request.stop))
        self._active.append(seq)
        self.prefix_hit_tokens += reuse
        self.observer.on_admit(time.perf_counter() - request.submitted_at, len(prompt), reuse)

    def _step(self) -> None:
        started = time.perf_counter()
        rt = self.runtime
        for seq in list(self._active):
            if seq.request.cancelled.is_set():
                self._finish(seq, "cancelled")
        # Every generating sequence gets one token; prompts are read first come, first served
        # within the batch budget, less while others generate so their tokens keep flowing.
        generating = [s for s in self._active if s.generating]
        budget = rt.options.n_batch - len(generating)
        if generating:
            budget = min(budget, PREFILL_CHUNK_BUSY)
        reads: dict[int, int] = {}  # slot index -> prompt tokens to read in this step
        for seq in self._active:
            if seq.generating or budget <= 0:
                continue
            reads[seq.slot.index] = min(budget, len(seq.request.prompt_tokens) - seq.prefilled)
            budget -= reads[seq.slot.index]
        # The batch goes in slot order: with a split KV cache llama.cpp can put sequences with
        # consecutive ids into one graph only when they come in that order.
        rt.clear_batch()
        sampled: list[_Sequence] = []
        for seq in sorted(self._active, key=lambda s: s.slot.index):
            if seq.generating:
                seq.batch_index = rt.add_to_batch(seq.last_token, len(seq.slot.cached),
                                                  seq.slot.index, True)
                seq.slot.cached.append(seq.last_token)
                sampled.append(seq)
                continue
            prompt = seq.request.prompt_tokens
            for token in prompt[seq.prefilled:seq.prefilled + reads.get(seq.slot.index, 0)]:
                last = seq.prefilled == len(prompt) - 1
                index = rt.add_to_batch(token, len(seq.slot.cached), seq.slot.index, last)
                seq.slot.cached.append(token)
                seq.prefilled += 1
                self.prompt_tokens_evaluated += 1
                if last:
                    seq.batch_index = index
                    sampled.append(seq)
        n_tokens = rt.batch.n_tokens
        if n_tokens == 0:
            return
        decode_started = time.perf_counter()
        status = rt.decode()
        decoded = time.perf_counter()
        sequences = len(self._active)
        if status != 0:
            self._decode_failed(status)
            return
        for seq in sampled:
            self._token_times.append(decoded)
            self._accept(seq, seq.chain.sample(rt, seq.batch_index))
        self.observer.on_step(n_tokens, sequences, decoded - decode_started,
                              time.perf_counter() - started)

    def _decode_failed(self, status: int) -> None:
        message = ("the KV cache is full" if status == 1
                   else f"llama_decode failed with status {status}")
        log.error("%s; failing %d requests", message, len(self._active))
        self._fail_active(ServiceUnavailable(message, retry_after=1))

    def _fail_active(self, error: Exception) -> None:
        """End every running request with `error`; their slots' cells may be half-written."""
        for seq in list(self._active):
            seq.slot.cached = []
            self.runtime.forget(seq.slot.index)
            self._release(seq)
            seq.request.emit(ErrorEvent(error))

    def _accept(self, seq: _Sequence, token: int) -> None:
        rt = self.runtime
        seq.generated += 1
        if rt.is_end(token):
            self._finish(seq, "stop")
            return
        assert seq.stopper is not None
        text = seq.stopper.feed(seq.detok.feed(rt.piece(token)))
        if text:
            seq.request.emit(TextEvent(text))
        if seq.stopper.stopped:
            self._finish(seq, "stop")
        elif seq.generated >= seq.request.max_tokens or len(seq.slot.cached) + 1 >= rt.context_per_slot:
            self._finish(seq, "length")
        else:
            seq.last_token = token

    def _release(self, seq: _Sequence) -> None:
        seq.chain.close()
        seq.slot.busy = False
        seq.slot.last_used = time.perf_counter()
        if seq in self._active:
            self._active.remove(seq)

    def _finish(self, seq: _Sequence, reason: str) -> None:
        assert seq.stopper is not None
        if reason != "cancelled":
            tail = seq.stopper.feed(seq.detok.flush()) + seq.stopper.flush()
            if tail:
                seq.request.emit(TextEvent(tail))
        self._release(seq)
        seq.request.emit(DoneEvent(reason, len(seq.request.prompt_tokens), seq.generated,
                                   seq.cached_tokens))
