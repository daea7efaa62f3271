"""What batching can buy on this machine: llama.cpp's own cost of one decode step with 1, 2, 4
and 8 sequences (one token each, logits for each), in process, no server, for both KV layouts.

    python bench/batch_ceiling.py MODEL.gguf [--threads 2]

The best aggregate tokens/s any continuous-batching server can reach with N streams is about
N / step_seconds(N); the ratio to N = 1 bounds the speed-up from batching. Two more steps show
what the scheduler meets in practice: 7 sequences decoding while an eighth reads a 128-token
prompt chunk, and 4 sequences in slots whose ids are not consecutive (0, 2, 5, 7).
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


def time_steps(rt: LlamaRuntime, decoding: list[int], prefill_seq: int | None, steps: int) -> float:
    """Median seconds of a step: one token for each of `decoding`, plus a prompt chunk."""
    for seq in range(8):
        rt.forget(seq)
    rt.clear_batch()
    for seq in decoding:
        for pos in range(HISTORY):
            rt.add_to_batch(100 + pos, pos, seq, pos == HISTORY - 1)
    assert rt.decode() == 0
    times = []
    for step in range(steps):
        rt.clear_batch()
        for seq in decoding:
            rt.add_to_batch(200 + step, HISTORY + step, seq, True)
        if prefill_seq is not None:
            rt.forget(prefill_seq)
            for pos in range(PREFILL_CHUNK):
                rt.add_to_batch(300 + pos, pos, prefill_seq, pos == PREFILL_CHUNK - 1)
        started = time.perf_counter()
        assert rt.decode() == 0
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(model: Path, threads: int, steps: int, unified: bool) -> dict:
    rt = LlamaRuntime(model, RuntimeOptions(0, 1024, 8, threads, unified_kv=unified))
    try:
        results: dict = {}
        for n in (1, 2, 4, 8):
            step_s = time_steps(rt, list(range(n)), None, steps)
            results[n] = {"step_ms": round(step_s * 1000, 1), "tokens_per_s": round(n / step_s, 1)}
        for n in (2, 4, 8):
            results[n]["ceiling_over_single"] = round(results[n]["tokens_per_s"]
                                                      / results[1]["tokens_per_s"], 2)
        results["scattered_4_step_ms"] = round(time_steps(rt, [0, 2, 5, 7], None, steps) * 1000, 1)
        results["7_decode_plus_prefill_step_ms"] = round(
            time_steps(rt, list(range(7)), 7, max(4, steps // 3)) * 1000, 1)
        return results
    finally:
        rt.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    layouts = {"unified": measure(args.model, args.threads, args.steps, True),
               "split": measure(args.model, args.threads, args.steps, False)}
    print(json.dumps({"model": args.model.name, "threads": args.threads, "kv": layouts},
                     indent=2))


if __name__ == "__main__":
    main()
