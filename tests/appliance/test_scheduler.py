"""Slot choice: pure rules, no runtime."""

from __future__ import annotations

from appliance.engine.slots import MIN_PREFIX_REUSE, Slot, choose_slot, id_runs


def slots(busy: set[int], n: int = 8) -> list[Slot]:
    # Slot 0 was used longest ago, slot n-1 most recently.
    return [Slot(i, last_used=float(i), busy=i in busy) for i in range(n)]


def test_id_runs_counts_runs_of_consecutive_ids() -> None:
    assert id_runs(set()) == 0
    assert id_runs({5}) == 1
    assert id_runs({0, 1, 3}) == 2
    assert id_runs({0, 2, 5, 7}) == 4
    assert id_runs({3, 4, 5, 6}) == 1


def test_idle_engine_takes_the_least_recently_used_slot() -> None:
    slot, reuse = choose_slot(slots(set()), [1, 2, 3])
    assert (slot.index, reuse) == (0, 0)


def test_a_new_request_joins_the_run_of_busy_slots() -> None:
    # Slot 5 is busy; 4 and 6 both extend its run, and 4 was used longer ago.
    slot, _ = choose_slot(slots({5}), [1, 2, 3])
    assert slot.index == 4
    # A slot that bridges two runs makes them one.
    slot, _ = choose_slot(slots({1, 3, 6}), [1, 2, 3])
    assert slot.index == 2


def test_a_reusable_prefix_wins_over_contiguity() -> None:
    table = slots({0, 1})
    prompt = list(range(100))
    table[6].cached = [*prompt[:60], 999]
    slot, reuse = choose_slot(table, prompt)
    assert (slot.index, reuse) == (6, 60)


def test_a_short_shared_prefix_is_not_worth_reusing() -> None:
    table = slots({0})
    prompt = list(range(100))
    table[6].cached = prompt[:MIN_PREFIX_REUSE - 1]
    slot, reuse = choose_slot(table, prompt)
    assert (slot.index, reuse) == (1, 0)


def test_reuse_leaves_one_prompt_token_to_read() -> None:
    table = slots(set())
    prompt = list(range(50))
    table[3].cached = list(prompt)
    slot, reuse = choose_slot(table, prompt)
    assert (slot.index, reuse) == (3, 49)


def test_common_prefix_counts_the_shared_leading_tokens() -> None:
    from appliance.engine.slots import common_prefix

    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix([9, 2, 3], [1, 2, 3]) == 0
    long = list(range(5000))
    for cut in (1, 2, 777, 4098, 4999):
        assert common_prefix(long, [*long[:cut], -1, *long[cut + 1:]]) == cut
