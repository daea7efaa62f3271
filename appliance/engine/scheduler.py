"""Continuous batching over one llama.cpp context: many requests share each decode step.

One engine thread owns the runtime. Each step puts one token of every generating sequence and
a chunk of any prompt being read into a single `llama_decode` batch, then samples each sequence
with its own sampler chain. New requests join at the next step; a finished or cancelled one
frees its slot at once. A slot keeps its KV cells after a request, so the next request that
shares a prefix with them (same system prompt, next turn of a chat) only reads the rest.

A request for `n` choices takes `n` slots at once: the first reads the prompt, the others get a
copy of its KV cells and sample from the same logits, each with its own sampler. A request may
also carry a thinking budget: once its thinking reaches it, the engine appends `</think>` itself.

With a draft model (draft.py), a generating sequence also puts the draft's guesses into the step:
the target computes logits at each of them in the same batch, and the sequence's own sampler
picks a token at each position in order while the picks equal the guesses. The sampler sees
exactly the positions it would see without a draft, in the same order (its random state, the
penalties and the grammar advance the same way), so the output is the target's own; the cells
of guesses it did not take are removed.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from appliance.engine.compute_turns import NO_TURNS, Turns
from appliance.engine.draft import DraftBudget, DraftLength, DraftModel, DraftWant
from appliance.engine.logprobs import Alternative, TokenLogprob, log_softmax_at
from appliance.engine.runtime import LlamaRuntime
from appliance.engine.sampling import GrammarRefused, SamplerChain, SamplingParams
from appliance.engine.slots import Slot, choose_slot
from appliance.engine.text import Detokenizer, StopMatcher
from appliance.errors import (
    ApplianceError,
    ContextOverflow,
    EngineError,
    InvalidValue,
    QueueFull,
    ServiceUnavailable,
)

log = logging.getLogger(__name__)

# While other sequences are generating, read at most this many prompt tokens per step, so their
# inter-token latency stays bounded while a long prompt arrives.
PREFILL_CHUNK_BUSY = 128


@dataclass
class TextEvent:
    text: str
    index: int = 0  # which choice
    # The tokens behind this text (when the request asked for logprobs); a token whose text is
    # held back (a partial character, a possible stop string) comes with the text it releases.
    logprobs: list[TokenLogprob] | None = None


@dataclass
class DoneEvent:
    finish_reason: str  # stop, length; "cancelled" only for a request whose client has left
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    index: int = 0  # which choice: a request for n choices gets n of these
    thinking_tokens: int = 0  # of completion_tokens, those inside <think> (Responses' usage)


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
    # Thinking tokens (inside <think>, opened by the prompt or the model) before the engine
    # closes the block itself with "\n</think>\n\n"; None: no limit.
    thinking_budget: int | None = None
    n: int = 1  # choices, each in its own slot, sharing the prompt's KV cells
    logprobs: int | None = None  # None: none; k: each token's logprob and the k likeliest
    open_thinking: bool = False  # append "<think>\n" to the prompt (the model must think)


class SchedulerObserver(Protocol):
    """Receives engine figures (the metrics module implements it)."""

    def on_step(self, batch_tokens: int, sequences: int, decode_s: float,
                step_s: float) -> None: ...
    def on_admit(self, queue_wait_s: float, prompt_tokens: int, cached_tokens: int) -> None: ...
    def on_draft(self, proposed: int, accepted: int) -> None: ...


class _NoObserver:
    def on_step(self, batch_tokens: int, sequences: int, decode_s: float,
                step_s: float) -> None:
        pass

    def on_admit(self, queue_wait_s: float, prompt_tokens: int, cached_tokens: int) -> None:
        pass

    def on_draft(self, proposed: int, accepted: int) -> None:
        pass


@dataclass
class _Sequence:
    request: GenerationRequest
    slot: Slot
    chain: SamplerChain
    prefilled: int
    cached_tokens: int
    index: int = 0
    detok: Detokenizer = field(default_factory=Detokenizer)
    stopper: StopMatcher | None = None
    generated: int = 0
    feed: list[int] = field(default_factory=list)  # tokens for the next step (usually one)
    batch_index: int = -1
    followers: list[_Sequence] = field(default_factory=list)  # siblings waiting for the prompt
    following: bool = False  # a sibling: gets the first choice's KV cells, reads nothing
    thinking: bool = False
    thought: int = 0
    answering: bool = False  # the answer has begun: a <think> from now on is text, not thinking
    held: list[TokenLogprob] = field(default_factory=list)  # logprobs whose text is held back
    draft_length: DraftLength | None = None  # None: no draft model
    drafts: list[int] = field(default_factory=list)  # guesses in this step's batch
    batch_indices: list[int] = field(default_factory=list)  # logits: the input's last, guesses

    @property
    def generating(self) -> bool:
        return not self.following and self.prefilled >= len(self.request.prompt_tokens)


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


class Scheduler:
    """Admits requests into slots and runs the decode loop on its own thread."""

    def __init__(self, runtime: LlamaRuntime, n_slots: int, max_queue: int,
                 observer: SchedulerObserver | None = None, nice: int = 0,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 draft: DraftModel | None = None, draft_budget: DraftBudget | None = None,
                 turns: Turns = NO_TURNS) -> None:
        self.runtime = runtime
        # Each step is one CPU turn (compute_turns.py), shared with the other resident models.
        self.turns = turns
        self.draft = draft
        self.draft_budget = draft_budget or DraftBudget(draft_max=8)
        self.draft_proposed = 0  # guesses verified, and how many the target took
        self.draft_accepted = 0
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
        self._draft_round = (0, 0.0)
        self._step_drafts = [0, 0]
        self.prefix_hit_tokens = 0
        self.prompt_tokens_evaluated = 0
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # -- called from any thread -----------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        if request.n > len(self.slots):
            raise InvalidValue(f"n={request.n} needs {request.n} slots at once and this daemon "
                               f"runs {len(self.slots)} (the parallel setting)", param="n")
        think = self.runtime.think
        if request.open_thinking and think is not None:
            request.prompt_tokens = [*request.prompt_tokens, *think.open_run]
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
        self.turns.leave()

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
                with self.turns.turn():
                    # From the turn on: a wait for another model's decode is no stall.
                    self._step_started = time.perf_counter()
                    try:
                        self._step()
                    except Exception as e:  # fail the running requests, serve the rest
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
        # First come, first served: a request for n choices waits for n free slots, and those
        # behind it wait too, so it is never starved by smaller ones.
        free = self.free_slots()
        taken = []
        while self._waiting and free >= self._waiting[0].n:
            free -= self._waiting[0].n
            taken.append(self._waiting.popleft())
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
        slots = [slot]
        for _ in range(request.n - 1):
            sibling, _ = choose_slot(self.slots, [])
            sibling.busy = True
            sibling.cached = []  # the first choice's cells replace these
            slots.append(sibling)
        chains: list[SamplerChain] = []
        try:
            for i in range(request.n):
                chains.append(self.runtime.sampler(_choice_sampling(request.sampling, i)))
        except Exception as e:
            for chain in chains:
                chain.close()
            for taken in slots:
                taken.busy = False
            request.emit(ErrorEvent(e if isinstance(e, ApplianceError)
                                    else EngineError(f"engine error: {e}")))
            if not isinstance(e, ApplianceError):
                log.exception("building a sampler chain failed")
            return
        thinking = self._prompt_opens_thinking(prompt)
        seqs = [_Sequence(request, taken, chain, prefilled=reuse, cached_tokens=reuse, index=i,
                          stopper=StopMatcher(request.stop), following=i > 0, thinking=thinking,
                          draft_length=DraftLength(self.draft_budget.draft_max)
                          if self.draft else None)
                for i, (taken, chain) in enumerate(zip(slots, chains, strict=True))]
        seqs[0].followers = seqs[1:]
        self._active.extend(seqs)
        self.prefix_hit_tokens += reuse
        self.observer.on_admit(time.perf_counter() - request.submitted_at, len(prompt), reuse)

    def _prompt_opens_thinking(self, prompt: list[int]) -> bool:
        """Whether the prompt leaves a <think> block open (its last thinking tag opens one)."""
        think = self.runtime.think
        if think is None:
            return False
        for token in reversed(prompt):
            if token == think.open:
                return True
            if token == think.close:
                return False
        return False

    def _step(self) -> None:
        started = time.perf_counter()
        rt = self.runtime
        self._draft_round = (0, 0.0)  # draft rounds and seconds in this step
        self._step_drafts = [0, 0]  # guesses verified and taken in this step
        for seq in list(self._active):
            if seq in self._active and seq.request.cancelled.is_set():
                self._finish(seq, "cancelled")
        # Every generating sequence gets one token; prompts are read first come, first served
        # within the batch budget, less while others generate so their tokens keep flowing.
        generating = [s for s in self._active if s.generating]
        guesses = self._propose(generating) if self.draft else {}
        budget = rt.options.n_batch - sum(len(s.feed) + len(guesses.get(s.slot.index, ()))
                                          for s in generating)
        if generating:
            budget = min(budget, PREFILL_CHUNK_BUSY)
        reads: dict[int, int] = {}  # slot index -> prompt tokens to read in this step
        for seq in self._active:
            if seq.generating or seq.following or budget <= 0:
                continue
            reads[seq.slot.index] = min(budget, len(seq.request.prompt_tokens) - seq.prefilled)
            budget -= reads[seq.slot.index]
        # The batch goes in slot order: with a split KV cache llama.cpp can put sequences with
        # consecutive ids into one graph only when they come in that order.
        rt.clear_batch()
        sampled: list[_Sequence] = []
        for seq in sorted(self._active, key=lambda s: s.slot.index):
            if seq.following:
                continue
            if seq.generating:
                # Forced tokens are read like a prompt; logits at the last input and each guess.
                seq.drafts = guesses.get(seq.slot.index, [])
                seq.batch_indices = []
                last = len(seq.feed) - 1
                for i, token in enumerate(seq.feed + seq.drafts):
                    index = rt.add_to_batch(token, len(seq.slot.cached), seq.slot.index,
                                            i >= last)
                    seq.slot.cached.append(token)
                    if i >= last:
                        seq.batch_indices.append(index)
                seq.batch_index = seq.batch_indices[0]
                seq.feed = []
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
        self.draft_budget.observe_step(n_tokens, decoded - decode_started)
        for seq in sampled:
            followers, seq.followers = seq.followers, []
            for sibling in followers:  # before the first choice can finish and free its slot
                rt.copy_sequence(seq.slot.index, sibling.slot.index)
                sibling.slot.cached = list(seq.slot.cached)
                sibling.prefilled = seq.prefilled
                sibling.following = False
                sibling.batch_index = seq.batch_index
            for each in (seq, *followers):
                if each.drafts:
                    self._verify(each, decoded)
                    continue
                self._token_times.append(decoded)
                self._accept(each, each.chain.sample(rt, each.batch_index))
        if self._step_drafts[0] or self._draft_round[0]:
            self.draft_budget.observe_draft(*self._draft_round, *self._step_drafts)
            self.observer.on_draft(*self._step_drafts)
        self.observer.on_step(n_tokens, sequences, decoded - decode_started,
                              time.perf_counter() - started)

    def _propose(self, generating: list[_Sequence]) -> dict[int, list[int]]:
        """The draft's guesses for this step by slot (none when drafting does not pay now)."""
        assert self.draft is not None
        rt = self.runtime
        prompts = [s for s in self._active if not s.generating and not s.following]
        depth = self.draft_budget.depth(
            len(generating), sum(min(PREFILL_CHUNK_BUSY, len(s.request.prompt_tokens)
                                     - s.prefilled) for s in prompts))
        if depth == 0:
            return {}
        wants = []
        for seq in generating:
            assert seq.draft_length is not None
            tokens = seq.slot.cached + seq.feed
            limit = min(depth, seq.draft_length.length,
                        seq.request.max_tokens - seq.generated - 1,
                        rt.context_per_slot - len(tokens) - 1)
            wants.append(DraftWant(seq.slot.index, tokens, max(0, limit)))
        # Prompts being read are mirrored as they go, so a stream's first guess waits for little.
        wants += [DraftWant(s.slot.index, list(s.slot.cached), 0) for s in prompts]
        try:
            proposal = self.draft.propose(wants)
        except Exception:  # a guess is never worth a request: decode without one
            log.exception("the draft model failed; this step goes without drafts")
            return {}
        self._draft_round = (proposal.rounds, proposal.seconds)
        return proposal.drafts

    def _verify(self, seq: _Sequence, decoded: float) -> None:
        """Sample at each guessed position in order while the picks equal the guesses; the
        first pick that differs (or the one after the last guess) is the step's new token."""
        rt = self.runtime
        drafts, seq.drafts = seq.drafts, []
        cached = seq.slot.cached
        del cached[len(cached) - len(drafts):]  # in the cells, not yet in the sequence
        accepted = 0
        for i, index in enumerate(seq.batch_indices):
            seq.batch_index = index
            token = seq.chain.sample(rt, index)
            self._token_times.append(decoded)
            self._accept(seq, token)
            if (i == len(drafts) or token != drafts[i] or seq not in self._active
                    or seq.feed != [token]):
                break
            cached.append(token)  # its cell was written by this step: nothing to read
            seq.feed = []
            accepted += 1
        rt.forget(seq.slot.index, len(cached))
        if seq.draft_length is not None:
            seq.draft_length.update(len(drafts), accepted)
        self.draft_proposed += len(drafts)
        self.draft_accepted += accepted
        self._step_drafts[0] += len(drafts)
        self._step_drafts[1] += accepted

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
        if seq.request.logprobs is not None:
            seq.held.append(self._logprob(seq, token))
        self._emit_tokens(seq, [token])
        seq.feed = [token]
        think = rt.think
        if think is not None and not seq.stopper.stopped:  # type: ignore[union-attr]
            if token == think.close:
                seq.thinking = False
                seq.answering = True
            elif seq.thinking:
                seq.thought += 1
                budget = seq.request.thinking_budget
                if budget is not None and seq.thought >= max(budget, 1) \
                        and not self._close_thinking(seq):
                    self._finish(seq, "length")
                    return
            elif token == think.open and not seq.answering:
                seq.thinking = True
            elif not seq.answering and rt.piece(token).strip():
                # Text first: a <think> later on (inside a JSON string, say) is part of the
                # answer, and a grammar that shapes the answer would refuse a forced close.
                seq.answering = True
        assert seq.stopper is not None
        if seq.stopper.stopped:
            self._finish(seq, "stop")
        elif (seq.generated >= seq.request.max_tokens
              or len(seq.slot.cached) + len(seq.feed) >= rt.context_per_slot):
            self._finish(seq, "length")

    def _close_thinking(self, seq: _Sequence) -> bool:
        """The budget is spent: "\n</think>\n\n" goes into the sequence as if generated (the
        client sees it, the sampler chain accepts it: a lazy grammar starts at the tag) and is
        read in the next step like prompt tokens, so the model goes on with its answer.
        False when a grammar refused part of it (the part it took is in): the answer ends."""
        think = self.runtime.think
        assert think is not None
        run: list[int] = []
        for token in think.close_run:
            try:
                seq.chain.accept(token)
            except GrammarRefused:
                break
            run.append(token)
        seq.generated += len(run)
        seq.thinking = False
        seq.answering = True
        seq.feed += run
        self._emit_tokens(seq, run)
        return len(run) == len(think.close_run)

    def _emit_tokens(self, seq: _Sequence, tokens: list[int]) -> None:
        assert seq.stopper is not None
        text = seq.stopper.feed("".join(seq.detok.feed(self.runtime.piece(t)) for t in tokens))
        if text:
            held, seq.held = seq.held, []
            seq.request.emit(TextEvent(text, seq.index,
                                       held if seq.request.logprobs is not None else None))

    def _logprob(self, seq: _Sequence, token: int) -> TokenLogprob:
        rt = self.runtime
        top = seq.request.logprobs or 0
        logprob, best = log_softmax_at(rt.logits(seq.batch_index), token, top)
        return TokenLogprob(token, rt.piece(token), logprob,
                            tuple(Alternative(t, rt.piece(t), lp) for t, lp in best))

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
            # Tokens cut with a stop string are not reported; any others come with the tail.
            held = [] if seq.stopper.stopped else seq.held
            if tail or held:
                seq.request.emit(TextEvent(tail, seq.index, held
                                           if seq.request.logprobs is not None else None))
        seq.held = []
        self._release(seq)
        for follower in seq.followers:  # finished before the prompt was read (cancelled)
            if follower not in self._active:
                continue
            self._release(follower)
            follower.request.emit(DoneEvent(reason, len(seq.request.prompt_tokens), 0,
                                            seq.cached_tokens, follower.index))
        seq.followers = []
        seq.request.emit(DoneEvent(reason, len(seq.request.prompt_tokens), seq.generated,
                                   seq.cached_tokens, seq.index, seq.thought))


def _choice_sampling(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` samples with seed+index: n choices differ, and each is reproducible."""
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=params.seed + index)
