"""Turns on the CPU for the resident models that compute there.

Every resident model has a thread of its own (a chat model's scheduler, an embedding model's
worker), and each llama_decode spreads over all cores with a thread pool of its own. Two pools
at once on the same cores do not share them well: each pool's threads meet at a barrier after
every graph node, and a thread preempted by the other pool holds its whole pool up. Measured on
2 cores (bench/embed_throughput.py): 4 chat streams kept 0.35x of their solo rate while one
embedding batch ran beside them. So a model computing on the CPU takes a turn for each piece of
work: one model computes at a time, and when several want the CPU the one that has had the least
of it, in CPU seconds divided by its weight, goes next (weighted fair queueing). A chat model
weighs more than an embedding batch: a person is reading its tokens as they come. Off by default
(`cpu_turns`): on a calm 2-core machine (bench/cpu_turns.py, 24 inputs beside 4 chat streams)
chat kept 0.51x solo with turns and 0.52x without, and the batch took 2.95x its time alone with
turns against 1.93x without.

A batch party (the embedding worker) also sizes its work to the others' turns while they are
active (`BatchPace`): a chat step waits for at most about one of its own steps, and the batch
goes back to full-size decodes as soon as the others have been quiet for a moment.

The rule is narrow on purpose: a model entirely on a GPU uses the CPU only to launch kernels, so
it gets `NO_TURNS` (the same face, doing nothing) and never waits for a CPU model, nor makes one
wait. A model with some layers on the CPU takes turns like any CPU model.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

INTERACTIVE_WEIGHT = 2.0  # chat: about 2/3 of the CPU while a batch runs beside it
BATCH_WEIGHT = 1.0  # embeddings: the rest, and all of it when chat is quiet
# A party is "active" this long after its last turn: a chat model samples and streams between
# its steps, and a batch must not take a full-size decode in that gap.
RECENT_S = 1.0
SMOOTHING = 0.3  # weight of the newest turn in the running averages
# A party that just ended a turn while owed more of the CPU gets this long to ask again before
# a party owed less takes it: a chat model samples and streams between its steps, and without
# the pause a waiting batch took a long turn after every chat step (chat kept 0.37x solo).
GRACE_S = 0.05


class TurnParty:
    """One model's place in the queue for the CPU; `turn()` holds the CPU for one piece of work."""

    def __init__(self, turns: ComputeTurns, name: str, weight: float) -> None:
        self._turns = turns
        self.name = name
        self.weight = weight
        self.vtime = 0.0  # CPU seconds held, divided by the weight
        self.turn_s: float | None = None  # running average of this party's turn length
        self.last_turn_end = -float("inf")
        self.released_at = -float("inf")  # time.monotonic(), for GRACE_S
        self.turns_taken = 0

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        started = self._turns._acquire(self)
        try:
            yield
        finally:
            self._turns._release(self, started)

    def contended(self) -> bool:
        """Whether another party wants the CPU now or had it within RECENT_S."""
        return self._turns._others_active(self)

    def others_turn_s(self) -> float | None:
        """How long the other active parties' turns last (the longest of their averages)."""
        return self._turns._others_turn_s(self)

    def leave(self) -> None:
        """The model unloads: it no longer counts for anyone's share."""
        self._turns._leave(self)


class ComputeTurns:
    """The CPU's queue, shared by every runtime of the process that computes on the CPU."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._parties: list[TurnParty] = []
        self._waiting: list[TurnParty] = []
        self._holder: TurnParty | None = None
        self._last_served_vtime = 0.0  # where a party arriving with nobody active starts

    def party(self, name: str, weight: float) -> TurnParty:
        party = TurnParty(self, name, weight)
        with self._cond:
            self._parties.append(party)
        return party

    @property
    def holder(self) -> str | None:
        return self._holder.name if self._holder else None

    @property
    def waiting(self) -> list[str]:
        with self._cond:
            return [p.name for p in self._waiting]

    def _acquire(self, party: TurnParty) -> float:
        with self._cond:
            if self._holder is party:
                raise RuntimeError(f"{party.name} already holds the CPU turn (not reentrant)")
            # Back from idle (or new): start level with the parties active now, or with the
            # last one served when none is, so time spent idle is no credit that locks the
            # others out afterwards. Leveling with nobody instead left a newcomer far behind
            # a model that had worked alone: an embedding batch then waited for chat streams
            # started since to compute twice what it had done alone (minutes).
            if self._clock() - party.last_turn_end > RECENT_S:
                competing = [p.vtime for p in self._others(party)]
                party.vtime = max(party.vtime, min(competing, default=self._last_served_vtime))
            self._waiting.append(party)
            while not self._may_go(party):
                self._cond.wait(GRACE_S)
            self._waiting.remove(party)
            self._holder = party
            return self._clock()

    def _may_go(self, party: TurnParty) -> bool:
        if self._holder is not None or self._next() is not party:
            return False
        now = time.monotonic()  # real time, whatever clock measures the turns
        return not any(p.vtime < party.vtime and now - p.released_at < GRACE_S
                       for p in self._parties if p is not party and p not in self._waiting)

    def _next(self) -> TurnParty:
        # The least served goes first; on a tie, the one that has waited longest.
        return min(self._waiting, key=lambda p: p.vtime)

    def _release(self, party: TurnParty, started: float) -> None:
        with self._cond:
            now = self._clock()
            held = max(0.0, now - started)
            party.vtime += held / party.weight
            party.turn_s = held if party.turn_s is None else (
                SMOOTHING * held + (1 - SMOOTHING) * party.turn_s)
            party.last_turn_end = now
            party.released_at = time.monotonic()
            party.turns_taken += 1
            self._last_served_vtime = party.vtime
            self._holder = None
            self._cond.notify_all()

    def _others(self, party: TurnParty) -> list[TurnParty]:
        now = self._clock()
        return [p for p in self._parties if p is not party and (
            p is self._holder or p in self._waiting or now - p.last_turn_end <= RECENT_S)]

    def _others_active(self, party: TurnParty) -> bool:
        with self._cond:
            return bool(self._others(party))

    def _others_turn_s(self, party: TurnParty) -> float | None:
        with self._cond:
            lengths = [p.turn_s for p in self._others(party) if p.turn_s is not None]
            return max(lengths, default=None)

    def _leave(self, party: TurnParty) -> None:
        with self._cond:
            if party in self._parties:
                self._parties.remove(party)


class _NoTurns:
    """The face of a party for a model that does not compute on the CPU: never waits."""

    name = "gpu"

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        yield

    def contended(self) -> bool:
        return False

    def others_turn_s(self) -> float | None:
        return None

    def leave(self) -> None:
        pass


NO_TURNS = _NoTurns()
Turns = TurnParty | _NoTurns

MIN_DECODE_TOKENS = 16  # below this a decode costs more in overhead than it saves in waiting


class BatchPace:
    """How much a batch party (the embedding worker) decodes at a time, and its turns.

    Alone: everything it may (`n_batch` tokens). While others are active: about as many tokens
    as take as long as one of their turns, from its own measured seconds per token, so the
    others wait for at most about one of their own turns.
    """

    def __init__(self, party: Turns, history: int = 256) -> None:
        self.party = party
        self.seconds_per_token: float | None = None
        self.decoded: collections.deque[int] = collections.deque(maxlen=history)

    def tokens_per_decode(self, n_batch: int) -> int:
        if not self.party.contended():
            return n_batch
        others = self.party.others_turn_s()
        if others is None or self.seconds_per_token is None:
            return max(MIN_DECODE_TOKENS, min(n_batch, 256))  # no measure yet: a modest start
        return max(MIN_DECODE_TOKENS, min(n_batch, round(others / self.seconds_per_token)))

    @contextlib.contextmanager
    def decode(self, tokens: int) -> Iterator[None]:
        """One decode of `tokens` tokens, in a turn; its time updates seconds per token."""
        with self.party.turn():
            started = time.perf_counter()
            yield
            per_token = (time.perf_counter() - started) / max(tokens, 1)
        self.decoded.append(tokens)
        self.seconds_per_token = per_token if self.seconds_per_token is None else (
            SMOOTHING * per_token + (1 - SMOOTHING) * self.seconds_per_token)
