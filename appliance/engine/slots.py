"""Which slot a request takes: the longest reusable prefix first, then keeping busy slots
together, then the least recently used."""

from __future__ import annotations

from dataclasses import dataclass, field

# Reusing a few cached tokens saves almost nothing and leaves an odd-sized prompt batch, which
# llama.cpp's repacked CPU matmuls handle more slowly than a whole one: reuse from this many on.
MIN_PREFIX_REUSE = 32


@dataclass
class Slot:
    index: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV cells the slot holds
    last_used: float = 0.0
    busy: bool = False


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
    """How many leading tokens `a` and `b` share. Slice comparisons run in C: a binary search
    over them beats a Python loop over a long context (the draft checks one every step)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    same, differ = 0, n  # a[:same] == b[:same], a[:differ] != b[:differ]
    while differ - same > 1:
        mid = (same + differ) // 2
        if a[:mid] == b[:mid]:
            same = mid
        else:
            differ = mid
    return same
