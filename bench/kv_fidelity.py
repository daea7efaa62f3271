"""How much a quantized KV cache changes the model's answers: q8_0 and q4_0 against f16.

    python bench/kv_fidelity.py MODEL.gguf [--tokens 512] [--threads 2]

f16 writes a greedy continuation of a fixed prompt; then each type reads prompt + that same
continuation (teacher-forced), and at every continuation position we compare its next-token
distribution with f16's: top-1 agreement and KL(f16 || type), mean and max. Teacher forcing
keeps the positions aligned even after a first disagreement. The same again over a fixed varied
passage (`text_types`), since a random-weight model's greedy continuation repeats itself. All
three runtimes are open at once and read each chunk in turn, so no distribution is kept.
Writes bench/results/kv_fidelity-MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_llama import capture_kv_log, feed, open_runtime

TYPES = ("f16", "q8_0", "q4_0")
CHUNK = 64  # continuation positions read per decode (their logits are compared at once)
PROMPT = ("<|im_start|>user\nExplain, step by step, how a hash table handles collisions and "
          "why its load factor matters.<|im_end|>\n<|im_start|>assistant\n")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def greedy(runtime, prompt: list[int], n: int) -> list[int]:
    feed(runtime, prompt, 0)
    out: list[int] = []
    index = runtime.batch.n_tokens - 1
    for i in range(n):
        token = int(runtime.logits(index).argmax())
        out.append(token)
        runtime.clear_batch()
        index = runtime.add_to_batch(token, len(prompt) + i, 0, True)
        if runtime.decode() != 0:
            raise RuntimeError("llama_decode failed")
    return out


def chunk_logprobs(runtime, tokens: list[int], start: int) -> np.ndarray:
    """Decode `tokens` at positions start.., returning the log-probs after each token."""
    runtime.clear_batch()
    for i, token in enumerate(tokens):
        runtime.add_to_batch(token, start + i, 0, True)
    if runtime.decode() != 0:
        raise RuntimeError("llama_decode failed")
    return log_softmax(np.stack([runtime.logits(i).astype(np.float64)
                                 for i in range(len(tokens))]))


TEXT = ("A hash table maps keys to slots with a hash function. Two keys may land in the same "
        "slot; chaining keeps a short list per slot, while open addressing probes the next free "
        "slot (linear, quadratic, or by a second hash). The load factor, entries over slots, "
        "sets the expected probe length: past about 0.7, open addressing slows sharply, so the "
        "table doubles and rehashes. Deletion under open addressing needs tombstones. ")


def compare(runtimes: dict, prefix: list[int], targets: list[int]) -> dict[str, dict]:
    """Every type reads `prefix` then `targets` (teacher-forced); at each target position, its
    next-token distribution against f16's."""
    for runtime in runtimes.values():
        runtime.forget(0)
        feed(runtime, prefix[:-1], 0)
    # The distribution after prefix[-1] predicts targets[0], so reading starts at prefix[-1].
    forced = [prefix[-1], *targets[:-1]]
    agree = {t: 0 for t in TYPES[1:]}
    kls: dict[str, list[float]] = {t: [] for t in TYPES[1:]}
    for offset in range(0, len(forced), CHUNK):
        chunk = forced[offset:offset + CHUNK]
        start = len(prefix) - 1 + offset
        reference = chunk_logprobs(runtimes["f16"], chunk, start)
        top = reference.argmax(axis=-1)
        p = np.exp(reference)
        for kv_type in TYPES[1:]:
            other = chunk_logprobs(runtimes[kv_type], chunk, start)
            agree[kv_type] += int((other.argmax(axis=-1) == top).sum())
            kls[kv_type].extend((p * (reference - other)).sum(axis=-1).tolist())
    n = len(forced)
    return {t: {"top1_agreement": round(agree[t] / n, 4),
                "mean_kl": float(f"{np.mean(kls[t]):.3g}"),
                "max_kl": float(f"{np.max(kls[t]):.3g}"),
                "p99_kl": float(f"{np.percentile(kls[t], 99):.3g}")} for t in TYPES[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 16))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    capture_kv_log()
    context = 1024 * (1 + (args.tokens + 256) // 1024)
    runtimes = {t: open_runtime(args.model, t, context, threads=args.threads)[0] for t in TYPES}
    prompt = runtimes["f16"].tokenize(PROMPT, add_special=False)
    continuation = greedy(runtimes["f16"], prompt, args.tokens)
    text = runtimes["f16"].tokenize(TEXT * 40, add_special=False)[:args.tokens]
    result = {"model": args.model.name, "positions": len(continuation),
              "prompt_tokens": len(prompt),
              "distinct_continuation_tokens": len(set(continuation)),
              "types": compare(runtimes, prompt, continuation),
              # the same over a varied passage: a random-weight model's greedy text repeats
              "text_types": compare(runtimes, prompt, text)}
    for runtime in runtimes.values():
        runtime.close()
    out = args.out or (Path(__file__).parent / "results"
                       / f"kv_fidelity-{args.model.stem}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
