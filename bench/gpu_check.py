"""The measuring steps of bench/gpu_check.sh, one subcommand each, each writing one JSON file
(the shell script gives every step its own timeout and merges the files at the end).

    python bench/gpu_check.py daemon MODEL.gguf OUT.json [--gpu auto] [--parallel 8] [--tokens 128]
    python bench/gpu_check.py raw MODEL.gguf OUT.json --plan DAEMON.json [--tokens 128]
    python bench/gpu_check.py llama-bench BINARY MODEL.gguf OUT.json
    python bench/gpu_check.py merge DIR OUT.json

daemon: our daemon on the file (context auto); its offload plan (weights, KV, compute buffer,
context per slot, KV type) against NVML's measured VRAM of the daemon process after the load;
decode tok/s through the OpenAI API with 1, 4 and 8 streams.
raw: the same file in process with the daemon's layers, context and KV type: llama.cpp's own
buffer sizes (weights, KV, compute, per device) to hold against the plan, then a raw
llama-cpp-python decode loop (one token per llama_decode, greedy) as the speed reference.
llama-bench: llama.cpp's own prompt and decode speed on the same file, f16 and q8_0 KV.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from bench.serve_throughput import NO_END, PROMPT, concurrent, free_port, stream_once  # noqa: E402

MIB = 2**20


def start_daemon(model: Path, work: Path, gpu: str, parallel: int, threads: int,
                 context: str) -> tuple[subprocess.Popen, str]:
    models = work / "daemon-models"
    models.mkdir(parents=True, exist_ok=True)
    link = models / model.name
    if not link.exists():
        link.symlink_to(model.resolve())
    port = free_port()
    env = {**os.environ, "APPLIANCE_PORT": str(port), "APPLIANCE_MODELS_DIR": str(models),
           "APPLIANCE_CONFIG": str(work / "absent.toml"), "APPLIANCE_GPU": gpu,
           "APPLIANCE_PARALLEL": str(parallel), "APPLIANCE_THREADS": str(threads),
           "APPLIANCE_DEFAULT_MODEL": model.stem, "APPLIANCE_MAX_QUEUE": "64",
           "APPLIANCE_LOG_LEVEL": "warning", "APPLIANCE_CONTEXT_LENGTH": context}
    log = (work / "serve.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=env,
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("daemon exited:\n" + (work / "serve.log").read_text()[-3000:])
        try:
            status = httpx.get(url + "/api/status", timeout=2).json()
            if status.get("state") == "ready" and status.get("model"):
                return process, url
            if status.get("state") == "failed":
                raise SystemExit(f"load failed: {status.get('failure')}")
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("daemon did not load the model in 300 s")


def cmd_daemon(args: argparse.Namespace) -> dict:
    process, url = start_daemon(args.model, args.out.parent, args.gpu, args.parallel,
                                args.threads, args.context)
    try:
        status = httpx.get(url + "/api/status", timeout=10).json()
        model = status["model"]
        gpus = status["memory"]["gpus"]
        body = {"model": args.model.stem, "max_tokens": args.tokens, "temperature": 0,
                "logit_bias": NO_END, "prompt": PROMPT}
        singles = [stream_once(url, {**body, "prompt": f"single {i}: {PROMPT}"})
                   for i in range(args.rounds)]
        streams = {n: concurrent(url, body, n) for n in (4, 8) if n <= args.parallel}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    plan = model["offload"]
    return {
        "plan": {k: plan[k] for k in ("n_gpu_layers", "n_layers", "device", "reason",
                                      "kv_cache_type", "context_per_slot", "context_reason",
                                      "weights_on_gpu", "kv_on_gpu", "kv_in_ram", "compute_buffer",
                                      "planned_vram", "planned_ram", "free_vram", "margin")},
        "slots": model["slots"],
        "nvml_process_vram": sum(g["process_used"] for g in gpus),
        "nvml_used_vram": sum(g["used"] for g in gpus),
        "nvml_over_plan": round(sum(g["process_used"] for g in gpus) / plan["planned_vram"], 3)
        if plan["planned_vram"] and gpus else None,
        "api_single_decode_tps": round(statistics.median(r["decode_tps"] for r in singles), 2),
        "api_single_ttft_s": round(statistics.median(r["ttft_s"] for r in singles), 3),
        "api_streams": {str(n): {k: round(v, 2) for k, v in r.items()}
                        for n, r in streams.items()},
    }


def cmd_raw(args: argparse.Namespace) -> dict:
    import llama_cpp
    from kv_llama import capture_kv_log, logged_buffers, open_runtime

    plan = json.loads(args.plan.read_text())["plan"] if args.plan else {}
    layers = plan.get("n_gpu_layers", 0)
    kv_type = plan.get("kv_cache_type", "f16")
    context = plan.get("context_per_slot", 4096)
    capture_kv_log()
    # The daemon's shape: its layers, KV type and every slot's context, for the buffer sizes.
    started = time.perf_counter()
    rt, kv_bytes, cells = open_runtime(args.model, kv_type, context, n_seq=args.parallel,
                                       threads=args.threads, n_gpu_layers=layers)
    load_s = time.perf_counter() - started
    buffers = logged_buffers()
    prompt = rt.tokenize(PROMPT, add_special=False)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    biases = (llama_cpp.llama_logit_bias * len(NO_END))()
    for i, token in enumerate(NO_END):
        biases[i].token, biases[i].bias = int(token), -100.0
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(
        rt.n_vocab, len(NO_END), biases))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    rates = []
    for _ in range(args.rounds):
        rt.forget(0)
        rt.clear_batch()
        for i, token in enumerate(prompt):
            rt.add_to_batch(token, i, 0, i == len(prompt) - 1)
        assert rt.decode() == 0
        token = llama_cpp.llama_sampler_sample(chain, rt.ctx, len(prompt) - 1)
        started = time.perf_counter()
        for pos in range(len(prompt), len(prompt) + args.tokens - 1):
            rt.clear_batch()
            rt.add_to_batch(token, pos, 0, True)
            assert rt.decode() == 0
            token = llama_cpp.llama_sampler_sample(chain, rt.ctx, 0)
        rates.append((args.tokens - 1) / (time.perf_counter() - started))
    llama_cpp.llama_sampler_free(chain)
    rt.close()
    return {"n_gpu_layers": layers, "kv_cache_type": kv_type, "context_per_slot": context,
            "cells": cells, "load_s": round(load_s, 2), "llama_buffers": buffers,
            "llama_kv_bytes": kv_bytes,
            "planned_kv_bytes": plan.get("kv_on_gpu", 0) + plan.get("kv_in_ram", 0),
            "raw_decode_tps": round(statistics.median(rates), 2)}


def cmd_llama_bench(args: argparse.Namespace) -> dict:
    results = {}
    for kv_type in ("f16", "q8_0"):
        command = [str(args.binary), "-m", str(args.model), "-p", str(args.prompt),
                   "-n", str(args.tokens), "-r", str(args.rounds),
                   "-ngl", str(args.gpu_layers), "-fa", "1", "-ctk", kv_type, "-ctv", kv_type,
                   "-t", str(args.threads), "-o", "json"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results[kv_type] = {"error": f"timed out after {args.timeout} s"}
            continue
        if done.returncode != 0:
            results[kv_type] = {"error": done.stderr[-1000:]}
            continue
        rows = json.loads(done.stdout)
        results[kv_type] = {("prompt_tps" if r["n_prompt"] else "decode_tps"):
                            round(r["avg_ts"], 2) for r in rows}
    return results


def cmd_merge(args: argparse.Namespace) -> dict:
    merged: dict = {}
    for path in sorted(args.dir.glob("step-*.json")):
        try:
            merged[path.stem.removeprefix("step-")] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            merged[path.stem.removeprefix("step-")] = {"error": f"unreadable: {e}"}
    steps = args.dir / "steps.tsv"
    if steps.exists():
        merged["steps"] = [dict(zip(("step", "rc", "seconds", "note"), line.split("\t"),
                                    strict=False))
                           for line in steps.read_text().splitlines() if line]
    daemon, raw = merged.get("daemon", {}), merged.get("raw", {})
    if "api_single_decode_tps" in daemon and "raw_decode_tps" in raw:
        merged["api_over_raw"] = round(daemon["api_single_decode_tps"]
                                       / raw["raw_decode_tps"], 3)
    bench = merged.get("llama_bench", {}).get("f16", {})
    if "decode_tps" in bench and "raw_decode_tps" in raw:
        merged["raw_over_llama_bench"] = round(raw["raw_decode_tps"] / bench["decode_tps"], 3)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    common.add_argument("--tokens", type=int, default=128)
    common.add_argument("--rounds", type=int, default=3)
    common.add_argument("--parallel", type=int, default=8)
    p = sub.add_parser("daemon", parents=[common])
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--gpu", default="auto")
    p.add_argument("--context", default="auto", help="context_length per slot (auto: sized)")
    p = sub.add_parser("raw", parents=[common])
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--plan", type=Path)
    p = sub.add_parser("llama-bench", parents=[common])
    p.add_argument("binary", type=Path)
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--gpu-layers", type=int, default=99)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per llama-bench test")
    p = sub.add_parser("merge")
    p.add_argument("dir", type=Path)
    p.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "llama-bench" and not shutil.which(str(args.binary)):
        raise SystemExit(f"no llama-bench at {args.binary}")
    run = {"daemon": cmd_daemon, "raw": cmd_raw, "llama-bench": cmd_llama_bench,
           "merge": cmd_merge}[args.command]
    result = run(args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
