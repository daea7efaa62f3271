"""Speculative decoding: a small draft model proposes tokens, the target checks them in one step.

The draft has its own llama.cpp context with a sequence per slot. Before proposing, each slot's
draft cells are brought in line with the target's tokens (the common prefix is kept, the rest is
read: the prompt, tokens the target accepted, tokens the engine forced); then the draft proposes
greedily, a round per token, all slots in one batch per round, and stops early where its own top
probability is low. The scheduler verifies the proposals with the target's sampler, so the output
is exactly the target's (see scheduler.py); this module only guesses, and how much to guess is
decided from measured step times (DraftBudget).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from appliance.engine.runtime import LlamaRuntime
from appliance.engine.slots import common_prefix

log = logging.getLogger(__name__)

# The draft stops proposing where its top token is less likely than this: a guess the target
# will probably reject costs a draft round and a verified position for nothing (llama.cpp's
# server uses 0.75 by default; bench/speculative.py measures ours).
P_MIN = 0.5
FIRST_LENGTH = 4  # a stream's first draft length; it grows and shrinks with acceptance


@dataclass
class DraftWant:
    slot: int
    tokens: list[int]  # what the target's cache will hold once this step's input is read
    limit: int  # most tokens to propose; 0: only catch up (a prompt being read)


# A first draft decode that reads more than this many tokens (a prompt being mirrored, a
# stream catching up after a long gap) runs at prompt speed, not guessing speed: its time is
# left out of the round-time figure DraftBudget decides with.
TIMED_CATCH_UP_TOKENS = 64


@dataclass
class Proposal:
    drafts: dict[int, list[int]]  # slot -> proposed tokens
    rounds: int  # draft decodes that guessed (the first one only if it read few tokens)
    seconds: float  # the time of those decodes


def top_choice(logits: np.ndarray) -> tuple[int, float]:
    """The likeliest token and its probability."""
    best = int(np.argmax(logits))
    peak = logits[best]
    return best, float(1.0 / np.exp(logits - peak, dtype=np.float32).sum(dtype=np.float64))


class DraftModel:
    """The draft's runtime and what each of its sequences holds. Engine thread only."""

    def __init__(self, runtime: LlamaRuntime, model_id: str, p_min: float = P_MIN) -> None:
        self.runtime = runtime
        self.model_id = model_id
        self.p_min = p_min
        self.cached: dict[int, list[int]] = {}  # slot -> tokens in the draft's cells

    def propose(self, wants: list[DraftWant]) -> Proposal:
        started = time.perf_counter()
        rt = self.runtime
        rt.clear_batch()
        budget = rt.options.n_batch
        drafts: dict[int, list[int]] = {}  # slot -> proposed so far
        indices: dict[int, int] = {}  # slot -> batch index of its logits in this round
        limits = {want.slot: want.limit for want in wants}
        for want in sorted(wants, key=lambda w: w.slot):  # consecutive ids share a graph
            have = self.cached.setdefault(want.slot, [])
            if not want.tokens:
                continue
            keep = common_prefix(have, want.tokens)
            if want.limit > 0 and keep == len(want.tokens):
                keep -= 1  # the last token is read again: its logits make the first guess
            if keep < len(have):
                self.runtime.forget(want.slot, keep)
                del have[keep:]
            missing = want.tokens[keep:budget + keep]
            if not missing:
                continue
            for token in missing:
                index = rt.add_to_batch(token, len(have), want.slot, False)
                have.append(token)
            budget -= len(missing)
            if want.limit > 0 and len(have) == len(want.tokens):  # caught up: guess
                rt.batch.logits[index] = True
                indices[want.slot] = index
                drafts[want.slot] = []
        rounds = 0  # draft decodes: depth k costs about k of them
        if rt.batch.n_tokens:
            timed = rt.batch.n_tokens <= TIMED_CATCH_UP_TOKENS
            if not self._decode([w.slot for w in wants]):
                indices = {}
            if timed:
                rounds = 1
            else:  # reading a prompt: not what a guessing round costs
                started = time.perf_counter()
        while indices:
            rt.clear_batch()
            going: dict[int, int] = {}
            for slot, index in indices.items():
                token, p = top_choice(rt.logits(index))
                if p < self.p_min:
                    continue
                drafts[slot].append(token)
                if len(drafts[slot]) < limits[slot]:
                    have = self.cached[slot]
                    going[slot] = rt.add_to_batch(token, len(have), slot, True)
                    have.append(token)
            if not going:
                break
            rounds += 1
            if not self._decode(list(going)):
                break  # the proposals so far stand; their cells are forgotten
            indices = going
        return Proposal({s: d for s, d in drafts.items() if d}, rounds,
                        time.perf_counter() - started)

    def _decode(self, slots: list[int]) -> bool:
        """Run the draft batch; on failure forget those slots' cells (they may be half-written)
        and carry on without drafts: a draft never fails a request."""
        status = self.runtime.decode()
        if status == 0:
            return True
        log.warning("the draft model's llama_decode failed with status %d", status)
        for slot in slots:
            self.runtime.forget(slot)
            self.cached[slot] = []
        return False

    def close(self) -> None:
        self.runtime.close()


@dataclass
class LinearFit:
    """Least squares y = a + b x over recent observations (older ones fade)."""

    fade: float = 0.97
    w: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def add(self, x: float, y: float) -> None:
        f = self.fade
        self.w = self.w * f + 1
        self.x = self.x * f + x
        self.y = self.y * f + y
        self.xx = self.xx * f + x * x
        self.xy = self.xy * f + x * y

    def predict(self, x: float) -> float | None:
        """None until observations at two or more sizes make the slope known."""
        det = self.w * self.xx - self.x * self.x
        if self.w < 2 or det <= 1e-9 * max(self.w * self.xx, 1.0):
            return None
        b = (self.w * self.xy - self.x * self.y) / det
        a = (self.y - b * self.x) / self.w
        return a + max(b, 0.0) * x


@dataclass
class DraftBudget:
    """How many tokens each stream may draft this step: the depth that maximizes expected tokens
    per second, from the target's measured step time by batch size, the draft's round time and
    the acceptance rate. Where verifying costs nearly what one token costs (a GPU, a target
    partly in RAM) drafting pays; where each verified token costs as much as a decoded one (a
    CPU with few cores, or many busy slots) it does not, and the depth falls to 0."""

    draft_max: int
    verify: LinearFit = field(default_factory=LinearFit)  # target decode s by batch tokens
    round_s: float | None = None  # one draft round
    acceptance: float = 0.7  # per proposed token; a prior until measured
    idle_steps: int = 0  # steps since the last drafted one (explore now and then)

    EXPLORE_EVERY = 64  # a step with drafts now and then keeps the figures current
    MAX_FIT_TOKENS = 64  # prompt chunks run at another efficiency: fit decode-sized steps only

    def observe_step(self, batch_tokens: int, decode_s: float) -> None:
        if batch_tokens <= self.MAX_FIT_TOKENS:
            self.verify.add(batch_tokens, decode_s)

    def observe_draft(self, rounds: int, seconds: float, proposed: int, accepted: int) -> None:
        if rounds:
            per = seconds / rounds
            self.round_s = per if self.round_s is None else 0.9 * self.round_s + 0.1 * per
        if proposed:
            # The share of proposals accepted estimates the per-token chance only roughly (a
            # rejection also ends the run), but it moves the right way and cheaply.
            rate = accepted / proposed
            self.acceptance = 0.9 * self.acceptance + 0.1 * rate

    def depth(self, streams: int, other_tokens: int) -> int:
        """Tokens each of `streams` generating sequences may draft, with `other_tokens` of prompt
        in the same batch."""
        if streams == 0 or self.draft_max == 0:
            return 0
        base = self.verify.predict(streams + other_tokens)
        if base is None or self.round_s is None:
            return self.draft_max  # not measured yet: try, and measure
        best_k, best_rate = 0, streams / max(base, 1e-6)
        a = min(self.acceptance, 0.99)
        expected = 1.0
        for k in range(1, self.draft_max + 1):
            expected += a ** k
            cost = self.verify.predict(streams * (1 + k) + other_tokens) or base
            rate = streams * expected / max(cost + k * self.round_s, 1e-6)
            if rate > best_rate:
                best_k, best_rate = k, rate
        if best_k == 0:
            self.idle_steps += 1
            if self.idle_steps >= self.EXPLORE_EVERY:
                self.idle_steps = 0
                return 2
        else:
            self.idle_steps = 0
        return best_k


@dataclass
class DraftLength:
    """One stream's draft length: grows after a run fully accepted, shrinks to what was
    accepted after a rejection."""

    limit: int
    length: int = FIRST_LENGTH

    def __post_init__(self) -> None:
        self.length = max(1, min(self.length, self.limit))

    def update(self, proposed: int, accepted: int) -> None:
        if not proposed:
            return
        if accepted == proposed:
            self.length = min(self.limit, self.length + 2)
        else:
            self.length = max(1, accepted + 1)
