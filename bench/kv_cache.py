"""KV cache types: the bytes llama.cpp allocates for each, and single-stream decode speed against
f16 in the same run, ours beside llama.cpp's own llama-bench (rounds alternate between all of
them, so the machine's drift hits all alike).

    python bench/kv_cache.py MODEL.gguf [--context 4096] [--fill 1024] [--steps 64] [--rounds 5]
        [--llama-bench "$(dirname "$(bench/build_llama_server.sh)")/llama-bench"]

Each set-up gets its own runtime (our LlamaRuntime, so our context parameters are what is
measured) with the same context: f16 with flash attention (what the daemon runs), f16 without
it, q8_0 and q4_0 (quantized V needs flash attention). A round: drop what the last round decoded,
then decode `--steps` tokens one at a time after `--fill` tokens of history, timing the steps
only; f16 also at no history, which shows what attending to `--fill` cells costs. With
--llama-bench, each round also runs llama-bench's tg test at -d FILL for the same set-ups plus
q8_0 K with f16 V: if llama.cpp's own q8_0/f16 ratio is ours, the ratio is a property of its
kernels on this CPU, not of our context parameters. Writes bench/results/kv_cache-MODEL.json.
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
from llama_bench import KvConfig, decode_rate

from appliance.offload import kv_bytes_per_layer

# Our set-ups: name -> (K and V type, flash attention).
SETUPS = {"f16": ("f16", True), "f16_no_fa": ("f16", False), "q8_0": ("q8_0", True),
          "q4_0": ("q4_0", True)}
# llama-bench's: the same, plus K-only quantization (V f16, which the plain path can also read).
LLAMA_BENCH = {name: KvConfig(kv, kv, fa) for name, (kv, fa) in SETUPS.items()} | {
    "q8_0_k_f16_v": KvConfig("q8_0", "f16", True)}


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


def rates(steps: int, seconds: dict[str, list[float]]) -> dict[str, dict]:
    """Median tokens/s per set-up and its ratio to f16, round by round (same-round pairs)."""
    out = {}
    for name, times in seconds.items():
        ratios = [f / s for f, s in zip(seconds["f16"], times, strict=True)]
        out[name] = {"decode_tok_s": round(steps / statistics.median(times), 2),
                     "decode_vs_f16": round(statistics.median(ratios), 3),
                     "decode_vs_f16_rounds": [round(r, 3) for r in ratios]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--fill", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 16))
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench binary")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from appliance.gguf_info import read_gguf_info

    info = read_gguf_info(args.model)
    capture_kv_log()
    runtimes, measured = {}, {}
    for name, (kv_type, flash_attn) in SETUPS.items():
        runtime, nbytes, cells = open_runtime(args.model, kv_type, args.context,
                                              threads=args.threads, n_gpu_layers=args.gpu_layers,
                                              flash_attn=flash_attn)
        runtimes[name] = runtime
        measured[name] = {"kv_type": kv_type, "flash_attn": flash_attn,
                          "llama_kv_bytes": nbytes, "cells": cells,
                          "planner_kv_bytes": kv_bytes_per_layer(info, cells, kv_type)
                          * info.n_layers}
    history = runtimes["f16"].tokenize("The quick brown fox jumps over the lazy dog. " * 400,
                                       add_special=False)[:args.fill]
    for name, runtime in runtimes.items():
        feed(runtime, history, 0)
        measured[name]["state_seq_bytes"] = _state_seq_size(runtime)
    seconds: dict[str, list[float]] = {name: [] for name in SETUPS}
    no_history: list[float] = []
    bench_seconds: dict[str, list[float]] = {name: [] for name in LLAMA_BENCH}
    for r in range(args.rounds):
        for name, runtime in runtimes.items():
            seconds[name].append(decode_steps(runtime, args.fill, args.steps, history))
        no_history.append(decode_steps(runtimes["f16"], 0, args.steps, history))
        runtimes["f16"].forget(0)
        feed(runtimes["f16"], history, 0)  # the history back for the next round
        if args.llama_bench:
            for name, config in LLAMA_BENCH.items():
                tok_s = decode_rate(args.llama_bench, args.model, config, depth=args.fill,
                                    steps=args.steps, threads=args.threads,
                                    gpu_layers=args.gpu_layers)
                bench_seconds[name].append(args.steps / tok_s)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for runtime in runtimes.values():
        runtime.close()

    f16 = measured["f16"]
    result = {"model": args.model.name, "context": args.context, "fill": args.fill,
              "steps": args.steps, "rounds": args.rounds, "threads": args.threads,
              "gpu_layers": args.gpu_layers, "load_average": os.getloadavg()[0], "types": {}}
    ours = rates(args.steps, seconds)
    for name in SETUPS:
        m = measured[name]
        result["types"][name] = {
            **m, "bytes_vs_f16": round(m["llama_kv_bytes"] / f16["llama_kv_bytes"], 4),
            "planner_matches_llama": m["planner_kv_bytes"] == m["llama_kv_bytes"],
            "state_seq_vs_f16": round(m["state_seq_bytes"] / f16["state_seq_bytes"], 4),
            **ours[name]}
    # What attending to --fill cells costs f16: its rate with them over its rate without.
    result["f16_no_history_tok_s"] = round(args.steps / statistics.median(no_history), 2)
    result["f16_fill_vs_no_history"] = round(statistics.median(
        n / f for n, f in zip(no_history, seconds["f16"], strict=True)), 3)
    q8 = result["types"]["q8_0"]
    result["q8_0_bytes_ok"] = q8["bytes_vs_f16"] <= 0.55
    result["q8_0_speed_ok"] = q8["decode_vs_f16"] >= 0.9
    if args.llama_bench:
        theirs = rates(args.steps, bench_seconds)
        result["llama_bench"] = {
            name: {"type_k": c.type_k, "type_v": c.type_v, "flash_attn": c.flash_attn,
                   **theirs[name]} for name, c in LLAMA_BENCH.items()}
        # Same set-up, same rounds: ours over llama.cpp's (1.0: our context costs nothing).
        result["ours_vs_llama_bench"] = {
            name: round(statistics.median(b / o for o, b in zip(
                seconds[name], bench_seconds[name], strict=True)), 3) for name in SETUPS}
        result["q8_0_vs_f16_ours_minus_llama_bench"] = round(
            q8["decode_vs_f16"] - theirs["q8_0"]["decode_vs_f16"], 3)
    out = args.out or (Path(__file__).parent / "results"
                       / f"kv_cache-{args.model.stem}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _state_seq_size(runtime) -> int:
    import llama_cpp

    return int(llama_cpp.llama_state_seq_get_size(runtime.ctx, 0))


if __name__ == "__main__":
    main()
