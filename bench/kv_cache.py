"""KV cache types: the bytes llama.cpp allocates for each, and single-stream decode speed against
f16 in the same run (rounds alternate between the types, so the machine's drift hits all alike).

    python bench/kv_cache.py MODEL.gguf [--context 4096] [--fill 1024] [--steps 64] [--rounds 5]

Each type gets its own runtime (our LlamaRuntime, so our context parameters are what is
measured) with the same context. A round: drop what the last round decoded, then decode
`--steps` tokens one at a time after `--fill` tokens of history, timing the steps only.
Writes bench/results/kv_cache-MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_llama import capture_kv_log, feed, open_runtime

from appliance.offload import kv_bytes_per_layer

TYPES = ("f16", "q8_0", "q4_0")


def decode_steps(runtime, fill: int, steps: int, tokens: list[int]) -> float:
    """Seconds for `steps` single-token decodes after `fill` tokens of history."""
    runtime.forget(0, fill)
    start = time.perf_counter()
    for i in range(steps):
        runtime.clear_batch()
        runtime.add_to_batch(tokens[i % len(tokens)], fill + i, 0, True)
        if runtime.decode() != 0:
            raise RuntimeError("llama_decode failed")
        runtime.logits(0).argmax()  # read the logits as a server would
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--fill", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 16))
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from appliance.gguf_info import read_gguf_info

    info = read_gguf_info(args.model)
    capture_kv_log()
    runtimes, measured = {}, {}
    for kv_type in TYPES:
        runtime, nbytes, cells = open_runtime(args.model, kv_type, args.context,
                                              threads=args.threads, n_gpu_layers=args.gpu_layers)
        runtimes[kv_type] = runtime
        measured[kv_type] = {"llama_kv_bytes": nbytes, "cells": cells,
                             "planner_kv_bytes": kv_bytes_per_layer(info, cells, kv_type)
                             * info.n_layers}
    history = runtimes["f16"].tokenize("The quick brown fox jumps over the lazy dog. " * 400,
                                       add_special=False)[:args.fill]
    for kv_type, runtime in runtimes.items():
        feed(runtime, history, 0)
        measured[kv_type]["state_seq_bytes"] = _state_seq_size(runtime)
    seconds: dict[str, list[float]] = {t: [] for t in TYPES}
    for _ in range(args.rounds):
        for kv_type, runtime in runtimes.items():
            seconds[kv_type].append(decode_steps(runtime, args.fill, args.steps, history))
    for runtime in runtimes.values():
        runtime.close()

    f16 = measured["f16"]
    result = {"model": args.model.name, "context": args.context, "fill": args.fill,
              "steps": args.steps, "rounds": args.rounds, "threads": args.threads,
              "gpu_layers": args.gpu_layers, "load_average": os.getloadavg()[0], "types": {}}
    for kv_type in TYPES:
        m = measured[kv_type]
        ratios = [f / s for f, s in zip(seconds["f16"], seconds[kv_type], strict=True)]
        result["types"][kv_type] = {
            **m, "bytes_vs_f16": round(m["llama_kv_bytes"] / f16["llama_kv_bytes"], 4),
            "planner_matches_llama": m["planner_kv_bytes"] == m["llama_kv_bytes"],
            "state_seq_vs_f16": round(m["state_seq_bytes"] / f16["state_seq_bytes"], 4),
            "decode_tok_s": round(args.steps / statistics.median(seconds[kv_type]), 2),
            "decode_vs_f16": round(statistics.median(ratios), 3),
            "decode_vs_f16_rounds": [round(r, 3) for r in ratios]}
    q8 = result["types"]["q8_0"]
    result["q8_0_bytes_ok"] = q8["bytes_vs_f16"] <= 0.55
    result["q8_0_speed_ok"] = q8["decode_vs_f16"] >= 0.9
    out = args.out or (Path(__file__).parent / "results"
                       / f"kv_cache-{args.model.stem}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _state_seq_size(runtime) -> int:
    import llama_cpp

    return int(llama_cpp.llama_state_seq_get_size(runtime.ctx, 0))


if __name__ == "__main__":
    main()
