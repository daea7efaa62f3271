"""What batching can buy on this machine: llama.cpp's own cost of one decode step with 1, 2, 4
and 8 sequences (one token each, logits for each), in process, no server, for both KV layouts.

    python bench/batch_ceiling.py MODEL.gguf [--threads 2]

The best aggregate tokens/s any continuous-batching server can reach with N streams is about
N / step_seconds(N); the ratio to N = 1 bounds the speed-up from batching. Two more steps show
what the scheduler meets in practice: 7 sequences decoding while an eighth reads a 128-token
prompt chunk, 4 sequences in slots whose ids are not consecutive (0, 2, 5, 7), and 2 sequences
decoding while 4 idle slots keep 768-token conversations cached. The two layouts' steps
alternate, so the machine's drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.engine.runtime import LlamaRuntime, RuntimeOptions

HISTORY = 16  # tokens each sequence holds before the timed steps
PREFILL_CHUNK = 128
IDLE_HISTORY = 768
LAYOUTS = ("split", "unified")


def prepare(rt: LlamaRuntime, decoding: list[int], idle: int = 0) -> None:
    """Empty the cache, give each decoding sequence HISTORY tokens, and each of `idle` other
    slots IDLE_HISTORY tokens (a cached conversation nobody is using right now)."""
    for seq in range(8):
        rt.forget(seq)
    for seq in decoding:
        rt.clear_batch()
        for pos in range(HISTORY):
            rt.add_to_batch(100 + pos, pos, seq, pos == HISTORY - 1)
        assert rt.decode() == 0
    for seq in range(8 - idle, 8):
        for start in range(0, IDLE_HISTORY, 256):
            rt.clear_batch()
            for pos in range(start, start + 256):
                rt.add_to_batch(100 + pos % 50, pos, seq, False)
            assert rt.decode() == 0


def one_step(rt: LlamaRuntime, decoding: list[int], prefill_seq: int | None, step: int) -> float:
    """Seconds of one step: one token for each of `decoding`, plus a prompt chunk."""
    rt.clear_batch()
    for seq in decoding:
        rt.add_to_batch(200 + step, HISTORY + step, seq, True)
    if prefill_seq is not None:
        rt.forget(prefill_seq)
        for pos in range(PREFILL_CHUNK):
            rt.add_to_batch(300 + pos, pos, prefill_seq, pos == PREFILL_CHUNK - 1)
    started = time.perf_counter()
    assert rt.decode() == 0
    return time.perf_counter() - started


def paired(runtimes: dict[str, LlamaRuntime], decoding: list[int], prefill_seq: int | None,
           steps: int, idle: int = 0) -> dict[str, float]:
    """Median step seconds per layout, the layouts' steps alternating so drift hits both."""
    for rt in runtimes.values():
        prepare(rt, decoding, idle)
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for step in range(steps):
        for name, rt in runtimes.items():
            times[name].append(one_step(rt, decoding, prefill_seq, step))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    runtimes = {name: LlamaRuntime(args.model, RuntimeOptions(0, 1024, 8, args.threads,
                                                              unified_kv=name == "unified"))
                for name in LAYOUTS}
    try:
        results: dict = {name: {} for name in LAYOUTS}
        for n in (1, 2, 4, 8):
            for name, step_s in paired(runtimes, list(range(n)), None, args.steps).items():
                results[name][n] = {"step_ms": round(step_s * 1000, 1),
                                    "tokens_per_s": round(n / step_s, 1)}
        for name in LAYOUTS:
            for n in (2, 4, 8):
                results[name][n]["ceiling_over_single"] = round(
                    results[name][n]["tokens_per_s"] / results[name][1]["tokens_per_s"], 2)
        for name, step_s in paired(runtimes, [0, 2, 5, 7], None, args.steps).items():
            results[name]["scattered_4_step_ms"] = round(step_s * 1000, 1)
        for name, step_s in paired(runtimes, list(range(7)), 7, max(4, args.steps // 3)).items():
            results[name]["7_decode_plus_prefill_step_ms"] = round(step_s * 1000, 1)
        for name, step_s in paired(runtimes, [0, 1], None, args.steps, idle=4).items():
            results[name]["2_decode_4_idle_caches_step_ms"] = round(step_s * 1000, 1)
    finally:
        for rt in runtimes.values():
            rt.close()
    print(json.dumps({"model": args.model.name, "threads": args.threads, "kv": results},
                     indent=2))


if __name__ == "__main__":
    main()
