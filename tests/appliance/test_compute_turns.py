"""The CPU's queue (appliance/engine/compute_turns.py) on its own: one holder at a time, shares by
weight whatever the turns' lengths, no deadlock under many threads, "contended" that follows
the others' activity, and a batch pace that sizes decodes to the others' turns. Real threads;
the clock is a counter the holders advance, so CPU seconds are exact and nothing sleeps."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import pytest

from appliance.engine.compute_turns import (
    BATCH_WEIGHT,
    INTERACTIVE_WEIGHT,
    MIN_DECODE_TOKENS,
    NO_TURNS,
    RECENT_S,
    BatchPace,
    ComputeTurns,
    TurnParty,
)

DEADLINE_S = 60


class Clock:
    """Seconds that pass only when a test says so (a holder "computing")."""

    def __init__(self) -> None:
        self.now = 100.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def hammer(parties: list[tuple[TurnParty, float]], clock: Clock, turns_each: int,
           on_turn: Callable[[TurnParty], None] = lambda _: None) -> list[str]:
    """Each party's thread takes `turns_each` turns back to back, each `cost` clock seconds;
    the order the turns were granted in. Fails (never hangs) past the deadline."""
    order: list[str] = []
    start = threading.Barrier(len(parties))
    unfinished = {party.name for party, _ in parties}
    turns = parties[0][0]._turns

    def all_others_queued(me: str) -> bool:
        return unfinished - {me} <= set(turns.waiting)

    def run(party: TurnParty, cost: float) -> None:
        start.wait(DEADLINE_S)
        for i in range(turns_each):
            with party.turn():
                order.append(party.name)
                on_turn(party)
                # Every party wants the CPU all the time: the holder "computes" until the
                # others are queued (in Python, a thread could otherwise run all its turns
                # before the others are even scheduled).
                deadline = time.monotonic() + DEADLINE_S
                while not all_others_queued(party.name):
                    assert time.monotonic() < deadline, "the other parties never queued"
                    time.sleep(0.0002)
                clock.advance(cost)
                if i == turns_each - 1:
                    unfinished.discard(party.name)

    threads = [threading.Thread(target=run, args=p, daemon=True) for p in parties]
    for t in threads:
        t.start()
    deadline = time.monotonic() + DEADLINE_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        assert not t.is_alive(), "a party never got its turns: deadlock or starvation"
    return order


def held_seconds(order: list[str], costs: dict[str, float]) -> dict[str, float]:
    return {name: order.count(name) * cost for name, cost in costs.items()}


def while_both_wanted(order: list[str]) -> list[str]:
    """The turns up to the last one of the party that finished first."""
    ends = [len(order) - order[::-1].index(name) for name in set(order)]
    return order[:min(ends)]


def test_one_holder_at_a_time_and_every_thread_finishes() -> None:
    clock = Clock()
    turns = ComputeTurns(clock)
    holding = []
    overlap = []
    lock = threading.Lock()

    def on_turn(party: TurnParty) -> None:
        with lock:
            holding.append(party.name)
            if len(holding) > 1:
                overlap.append(list(holding))
        time.sleep(0)  # let another thread try to get in
        with lock:
            holding.remove(party.name)

    parties = [(turns.party(f"p{i}", 1.0 + i % 2), 0.01) for i in range(6)]
    order = hammer(parties, clock, 200, on_turn)
    assert not overlap
    assert len(order) == 6 * 200 and turns.holder is None


def test_both_wanting_the_cpu_share_it_by_weight() -> None:
    clock = Clock()
    turns = ComputeTurns(clock)
    chat, batch = turns.party("chat", 2.0), turns.party("batch", 1.0)
    order = hammer([(chat, 0.05), (batch, 0.05)], clock, 300)
    both = while_both_wanted(order)
    share = held_seconds(both, {"chat": 0.05, "batch": 0.05})
    assert share["chat"] / (share["chat"] + share["batch"]) == pytest.approx(2 / 3, abs=0.05)
    # No long runs: the batch waits for at most a few chat turns at a time.
    runs = "".join("c" if name == "chat" else "b" for name in both)
    assert "ccccc" not in runs and "bbb" not in runs, runs


def test_long_turns_do_not_buy_a_larger_share() -> None:
    clock = Clock()
    turns = ComputeTurns(clock)
    a, b = turns.party("a", 1.0), turns.party("b", 1.0)
    order = hammer([(a, 0.01), (b, 0.08)], clock, 400)
    share = held_seconds(while_both_wanted(order), {"a": 0.01, "b": 0.08})
    assert share["a"] / (share["a"] + share["b"]) == pytest.approx(0.5, abs=0.05)


def test_a_party_back_from_idle_has_no_credit_to_lock_the_others_out() -> None:
    clock = Clock()
    turns = ComputeTurns(clock)
    busy, idle = turns.party("busy", 1.0), turns.party("idle", 1.0)
    hammer([(busy, 1.0)], clock, 100)  # 100 s of CPU while the other was idle
    order = hammer([(busy, 1.0), (idle, 1.0)], clock, 20)
    first = order[:20]
    assert 7 <= first.count("busy") <= 13, first  # alternating, not 20 turns of "idle" first


def test_contended_follows_the_others_activity() -> None:
    clock = Clock()
    turns = ComputeTurns(clock)
    chat, batch = turns.party("chat", 2.0), turns.party("batch", 1.0)
    assert not batch.contended() and batch.others_turn_s() is None
    with chat.turn():
        assert batch.contended()  # holding
        clock.advance(0.2)
    assert batch.contended() and batch.others_turn_s() == pytest.approx(0.2)
    assert not chat.contended()  # the batch has not computed
    clock.advance(RECENT_S + 0.01)
    assert not batch.contended()  # quiet for a while: the batch may take it all

    held = []  # the chat's turn, entered on another thread and never left
    waiting = threading.Thread(target=lambda: held.append(chat.turn()) or held[0].__enter__(),
                               daemon=True)
    with batch.turn():
        waiting.start()
        deadline = time.monotonic() + DEADLINE_S
        while not batch.contended():  # the chat thread is queued behind the batch's turn
            assert time.monotonic() < deadline
            time.sleep(0.001)
    waiting.join(DEADLINE_S)
    assert turns.holder == "chat"

    chat.leave()
    turns2 = ComputeTurns(clock)
    gone = turns2.party("gone", 1.0)
    with gone.turn():
        pass
    gone.leave()
    assert not turns2.party("other", 1.0).contended()


def test_a_turn_is_not_reentrant() -> None:
    party = ComputeTurns().party("p", 1.0)
    with party.turn(), pytest.raises(RuntimeError, match="not reentrant"), party.turn():
        pass


def test_a_model_off_the_cpu_never_waits() -> None:
    turns = ComputeTurns()
    cpu = turns.party("cpu", 1.0)
    with cpu.turn():
        entered = threading.Event()

        def gpu_model() -> None:
            with NO_TURNS.turn():
                entered.set()

        threading.Thread(target=gpu_model, daemon=True).start()
        assert entered.wait(DEADLINE_S)  # while the CPU model holds its turn
    assert not NO_TURNS.contended()


def test_batch_pace_sizes_decodes_to_the_others_turns() -> None:
    clock = Clock()
    turns = ComputeTurns(clock)
    chat, batch = turns.party("chat", 2.0), turns.party("batch", 1.0)
    pace = BatchPace(batch)
    assert pace.tokens_per_decode(4096) == 4096  # alone: full size
    with chat.turn():
        clock.advance(0.1)
    assert pace.tokens_per_decode(4096) == 256  # no measure of its own yet: a modest start
    pace.seconds_per_token = 0.001
    assert pace.tokens_per_decode(4096) == 100  # about one chat turn's worth
    assert pace.tokens_per_decode(64) == 64
    pace.seconds_per_token = 1.0
    assert pace.tokens_per_decode(4096) == MIN_DECODE_TOKENS
    with pace.decode(100):
        pass
    assert list(pace.decoded) == [100] and pace.seconds_per_token < 1.0
    clock.advance(RECENT_S + 0.01)
    assert pace.tokens_per_decode(4096) == 4096  # chat went quiet


def test_a_batch_back_from_idle_is_not_held_back_by_turns_it_took_alone() -> None:
    """As in the bench: an embedding model works alone (its CPU seconds pile up with nobody to
    share with), goes quiet, chat streams start while it is quiet, then a batch comes. It gets
    a turn after a chat turn or two, not after chat has caught up with all it did alone."""
    clock = Clock()
    turns = ComputeTurns(clock)
    chat = turns.party("chat", INTERACTIVE_WEIGHT)
    batch = turns.party("batch", BATCH_WEIGHT)
    for _ in range(20):  # 20 s of embedding alone
        with batch.turn():
            clock.advance(1.0)
    clock.advance(RECENT_S + 1)  # quiet; the chat model starts while nobody else is active

    chat_turns = 0
    batch_queued_at: int | None = None  # chat turns taken when the batch was first seen queued
    batch_done = threading.Event()
    solo_turns = 20
    limit = 5000  # the chat streams stop here at the latest: the batch then runs (no hang)

    def chat_streams() -> None:
        nonlocal chat_turns, batch_queued_at
        while not batch_done.is_set() and chat_turns < limit:
            with chat.turn():
                if chat_turns == solo_turns:  # the batch comes while this turn computes
                    deadline = time.monotonic() + DEADLINE_S
                    while "batch" not in turns.waiting:
                        assert time.monotonic() < deadline, "the batch never queued"
                        time.sleep(0.0002)
                    batch_queued_at = chat_turns
                chat_turns += 1
                clock.advance(0.05)  # a short decode step of 4 streams

    streams = threading.Thread(target=chat_streams, daemon=True)
    streams.start()
    deadline = time.monotonic() + DEADLINE_S
    while chat_turns < solo_turns:  # chat alone for a while
        assert time.monotonic() < deadline, "the chat party never took its turns"
        time.sleep(0.001)
    with batch.turn():
        granted_at = chat_turns
        clock.advance(0.2)
    batch_done.set()
    streams.join(DEADLINE_S)
    assert not streams.is_alive()
    assert batch_queued_at is not None
    # Weighted 2:1, the batch may let a chat turn or two through first, not hundreds.
    assert granted_at - batch_queued_at <= 3, (batch_queued_at, granted_at)


def test_a_batch_that_pauses_between_long_turns_still_gets_only_its_share() -> None:
    """A batch whose turns are long and who pauses just past RECENT_S between them (one input
    per request, say) keeps what it owes: chat still computes twice as long between its turns."""
    clock = Clock()
    turns = ComputeTurns(clock)
    chat = turns.party("chat", INTERACTIVE_WEIGHT)
    batch = turns.party("batch", BATCH_WEIGHT)
    chat_turns = 0
    batch_back_at: float | None = None  # clock time the batch wants the CPU again
    stop = threading.Event()

    def chat_streams() -> None:
        nonlocal chat_turns
        while not stop.is_set():
            with chat.turn():
                back_at = batch_back_at
                if back_at is not None and clock() >= back_at:  # the batch asks now
                    deadline = time.monotonic() + DEADLINE_S
                    while "batch" not in turns.waiting and not stop.is_set():
                        assert time.monotonic() < deadline, "the batch never queued"
                        time.sleep(0.0002)
                chat_turns += 1
                clock.advance(0.05)

    streams = threading.Thread(target=chat_streams, daemon=True)
    streams.start()
    chat_turns_at_batch_turn = []
    for _ in range(5):
        with batch.turn():
            chat_turns_at_batch_turn.append(chat_turns)
            clock.advance(1.0)
            batch_back_at = clock() + RECENT_S + 0.05  # quiet for a little more than RECENT_S
        deadline = time.monotonic() + DEADLINE_S
        while clock() < batch_back_at:
            assert time.monotonic() < deadline, "the chat party stopped taking turns"
            time.sleep(0.0005)
    stop.set()
    streams.join(DEADLINE_S)
    assert not streams.is_alive()
    between = [b - a for a, b in itertools.pairwise(chat_turns_at_batch_turn)]
    # 1 s of batch is 2 s of chat, 40 of its turns, quiet time included; forgiving the batch
    # what it owed after each pause would give chat about 22.
    assert all(36 <= n <= 44 for n in between), between


def test_a_chat_that_pauses_briefly_between_steps_keeps_its_share() -> None:
    """Chat samples and streams between its decode steps, holding no turn for a moment. A
    batch waiting right then must not take the CPU while chat is still owed it (it did: after
    every chat step the batch took a long turn, and chat kept 0.37x solo beside it)."""
    clock = Clock()
    turns = ComputeTurns(clock)
    chat = turns.party("chat", INTERACTIVE_WEIGHT)
    batch = turns.party("batch", BATCH_WEIGHT)
    order: list[str] = []
    stop = threading.Event()

    def batch_worker() -> None:
        while not stop.is_set():
            with batch.turn():
                order.append("batch")
                clock.advance(1.0)  # one whole input: a long decode

    def chat_steps() -> None:
        for _ in range(60):
            with chat.turn():
                order.append("chat")
                clock.advance(0.1)
            # Sampling between steps, while the batch wants the CPU.
            deadline = time.monotonic() + DEADLINE_S
            while "batch" not in turns.waiting and turns.holder != "batch":
                assert time.monotonic() < deadline, "the batch never asked for the CPU"
                time.sleep(0.0002)
            time.sleep(0.002)

    worker = threading.Thread(target=batch_worker, daemon=True)
    streams = threading.Thread(target=chat_steps, daemon=True)
    streams.start()
    worker.start()
    streams.join(DEADLINE_S)
    stop.set()
    worker.join(DEADLINE_S)
    assert not streams.is_alive() and not worker.is_alive()
    chat_time = order.count("chat") * 0.1
    last_chat = len(order) - 1 - order[::-1].index("chat")
    batch_time = order[:last_chat].count("batch") * 1.0  # while chat still wanted the CPU
    # Weighted 2:1: chat computes about twice the batch's time while both want the CPU. One
    # batch turn after each chat step would give the batch ten times chat's time.
    assert chat_time >= 1.5 * batch_time - 1.0, order
