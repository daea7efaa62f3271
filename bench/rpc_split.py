"""Decode speed of a model split over two local RPC workers against the same model loaded locally.

    python bench/rpc_split.py MODEL.gguf [--threads 2] [--tokens 64] [--rounds 5]

Two `appliance worker` processes (llama.cpp's rpc-server, CPU backend) on 127.0.0.1; the split
is the daemon's own plan (appliance.offload.plan_split over the workers' reported memory). Each
round decodes the same greedy single stream once locally and once split, in alternating order;
the figure is the median over rounds of each round's ratio (split / local), so a busy machine
moves both sides alike. On loopback this is the cost of the RPC protocol and the extra process
hops, not of a network. Also checks that both produce the same tokens. Writes
bench/results/rpc_split-<model>.json and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.engine.rpc import RpcWorkers, WorkerDevice, probe  # noqa: E402
from appliance.engine.runtime import LlamaRuntime, RuntimeOptions  # noqa: E402
from appliance.errors import WorkerUnavailable  # noqa: E402
from appliance.gguf_info import read_gguf_info  # noqa: E402
from appliance.offload import DeviceShare, plan_split  # noqa: E402
from bench.serve_throughput import free_port  # noqa: E402

PROMPT = "The history of the printing press begins"
CONTEXT = 1024


@contextlib.contextmanager
def worker(threads: int) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "worker", "--port",
                                str(port), "--threads", str(threads)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                probe(endpoint, timeout=2)
                break
            except WorkerUnavailable:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield endpoint
    finally:
        process.kill()
        process.wait()


def decode(runtime: LlamaRuntime, tokens: int) -> tuple[float, list[int]]:
    """Tokens per second of a greedy single stream after the prompt, and the tokens."""
    prompt = runtime.tokenize(PROMPT, add_special=False)
    runtime.forget(0)
    runtime.clear_batch()
    for i, token in enumerate(prompt):
        runtime.add_to_batch(token, i, 0, i == len(prompt) - 1)
    assert runtime.decode() == 0
    out: list[int] = []
    last = runtime.batch.n_tokens - 1
    started = time.perf_counter()
    for step in range(tokens):
        token = int(np.argmax(runtime.logits(last)))
        out.append(token)
        runtime.clear_batch()
        runtime.add_to_batch(token, len(prompt) + step, 0, True)
        assert runtime.decode() == 0
        last = 0
    return tokens / (time.perf_counter() - started), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    info = read_gguf_info(args.model)
    load_before = os.getloadavg()
    with worker(args.threads) as first, worker(args.threads) as second:
        workers = RpcWorkers([first, second])
        plan = plan_split(info, [DeviceShare(w.name, "rpc", w.free, endpoint=w.endpoint,
                                             index=w.index) for w in workers.survey()],
                          n_ctx_total=CONTEXT, margin=512 * 2**20)
        on = [s for s in plan.split if s.kind == "rpc" and s.layers]
        handles = workers.handles([WorkerDevice(s.endpoint or "", s.index, s.free, 0)
                                   for s in on])
        local = LlamaRuntime(args.model, RuntimeOptions(0, CONTEXT, 1, args.threads))
        split = LlamaRuntime(args.model, RuntimeOptions(
            plan.n_gpu_layers, CONTEXT, 1, args.threads, devices=tuple(handles),
            tensor_split=tuple(float(s.layers) for s in on)))
        try:
            decode(local, 4), decode(split, 4)  # warm both
            rounds = []
            for r in range(args.rounds):
                order = [("local", local), ("split", split)]
                if r % 2:
                    order.reverse()
                rates, tokens = {}, {}
                for name, runtime in order:
                    rates[name], tokens[name] = decode(runtime, args.tokens)
                rounds.append({**rates, "ratio": rates["split"] / rates["local"],
                               "same_tokens": tokens["split"] == tokens["local"]})
        finally:
            split.close()
            local.close()
    result = {
        "bench": "rpc_split", "model": args.model.name, "threads": args.threads,
        "tokens": args.tokens, "rounds": rounds,
        "split": [{"name": s.name, "layers": s.layers} for s in plan.split],
        "local_tokens_per_s": statistics.median(r["local"] for r in rounds),
        "split_tokens_per_s": statistics.median(r["split"] for r in rounds),
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "same_tokens": all(r["same_tokens"] for r in rounds),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(),
                    # A shared machine: the load around the run says how far to trust it.
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "llama_lib": str(workers.library.lib_dir)},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out = REPO / "bench" / "results" / f"rpc_split-{args.model.stem}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
