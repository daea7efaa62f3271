"""What batching can buy on this machine: llama.cpp's own cost of one decode step with 1, 2, 4
and 8 sequences (one token each, logits for each), in process, no server.

    python bench/batch_ceiling.py MODEL.gguf [--threads 2]

The best aggregate tokens/s any continuous-batching server can reach with N streams is about
N / step_seconds(N); the ratio to N = 1 bounds the speed-up from batching.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    rt = LlamaRuntime(args.model, RuntimeOptions(0, 1024, 8, args.threads))
    results = {}
    for n in (1, 2, 4, 8):
        for seq in range(8):
            rt.forget(seq)
        rt.clear_batch()
        for seq in range(n):
            for pos in range(16):
                rt.add_to_batch(100 + pos, pos, seq, pos == 15)
        assert rt.decode() == 0
        times = []
        for step in range(args.steps):
            rt.clear_batch()
            for seq in range(n):
                rt.add_to_batch(200 + step, 16 + step, seq, True)
            started = time.perf_counter()
            assert rt.decode() == 0
            times.append(time.perf_counter() - started)
        step_s = statistics.median(times)
        results[n] = {"step_ms": round(step_s * 1000, 1), "tokens_per_s": round(n / step_s, 1)}
    for n in (2, 4, 8):
        results[n]["ceiling_over_single"] = round(results[n]["tokens_per_s"]
                                                  / results[1]["tokens_per_s"], 2)
    rt.close()
    print(json.dumps({"model": args.model.name, "threads": args.threads, "sequences": results},
                     indent=2))


if __name__ == "__main__":
    main()
