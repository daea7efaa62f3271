"""What logprobs cost: single-stream decode rate with and without top_logprobs=5, same daemon.

    python bench/logprobs_cost.py MODEL.gguf [--threads 2] [--tokens 64] [--rounds 7]

One daemon (`appliance serve`, one slot) serves alternating rounds: each round streams one
completion without logprobs and one with the five likeliest tokens at each position
(`logprobs: 5`, the completions name for chat's `top_logprobs: 5`: the same engine work), in
alternating order, each from a fresh prompt. Completions, not chat: a random-weight model's chat
answer can be all whitespace, which the chat parser holds back, so its stream would show no
decode rate. On a shared machine the figure is the median over rounds of each round's ratio.
End-of-generation tokens are suppressed so every stream does the same work. Also times the
engine's log-softmax over the model's vocabulary in process. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serve_throughput import NO_END, free_port, stream_once, wait_healthy  # noqa: E402


def daemon(models: Path, threads: int, context: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "APPLIANCE_PORT": str(port), "APPLIANCE_MODELS_DIR": str(models),
           "APPLIANCE_THREADS": str(threads), "APPLIANCE_PARALLEL": "1",
           "APPLIANCE_CONTEXT_LENGTH": str(context), "APPLIANCE_CONFIG": "/nonexistent.toml",
           "APPLIANCE_GPU": "none", "APPLIANCE_LOG_LEVEL": "warning"}
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=env,
                               cwd=REPO, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url + "/health")
    return process, url


def softmax_cost(model: Path, top: int, calls: int = 200) -> dict:
    """Milliseconds per log_softmax_at on real logits of this model."""
    from appliance.engine.logprobs import log_softmax_at
    from appliance.engine.runtime import LlamaRuntime, RuntimeOptions

    rt = LlamaRuntime(model, RuntimeOptions(0, 256, 1, 1))
    try:
        prompt = rt.tokenize("The sea is", add_special=False)
        rt.clear_batch()
        for i, token in enumerate(prompt):
            rt.add_to_batch(token, i, 0, i == len(prompt) - 1)
        rt.decode()
        logits = rt.logits(rt.batch.n_tokens - 1)
        started = time.perf_counter()
        for _ in range(calls):
            log_softmax_at(logits, 0, top)
        return {"vocab": rt.n_vocab, "top": top,
                "ms_per_token": (time.perf_counter() - started) / calls * 1000}
    finally:
        rt.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_id = args.model.stem
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        (models / f"{model_id}.gguf").symlink_to(args.model.resolve())
        process, url = daemon(models, args.threads, 1024)
        try:
            base = {"model": model_id, "max_tokens": args.tokens, "temperature": 0.0,
                    "logit_bias": NO_END}
            with_lp = {**base, "logprobs": 5}

            def run(body: dict, i: int, kind: str) -> dict:
                prompt = f"Round {i} ({kind}). Write a long story about a lighthouse keeper."
                return stream_once(url, {**body, "prompt": prompt})

            run(base, -1, "warm")
            rounds = []
            for i in range(args.rounds):
                order = [("plain", base), ("logprobs", with_lp)]
                if i % 2:
                    order.reverse()
                rates = {kind: run(body, i, kind)["decode_tps"] for kind, body in order}
                rates["ratio"] = rates["logprobs"] / rates["plain"]
                rounds.append(rates)
                print(f"round {i}: {rates}", file=sys.stderr)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    ratio = statistics.median(r["ratio"] for r in rounds)
    result = {
        "model": args.model.name, "threads": args.threads, "tokens": args.tokens,
        "rounds": rounds,
        "median_plain_tps": statistics.median(r["plain"] for r in rounds),
        "median_logprobs_tps": statistics.median(r["logprobs"] for r in rounds),
        "median_ratio": ratio,
        "cost_percent": (1 - ratio) * 100,
        "log_softmax_in_process": softmax_cost(args.model, 5),
        "machine": {"cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
                    "python": platform.python_version()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
