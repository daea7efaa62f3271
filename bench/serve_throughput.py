"""Daemon figures against baselines measured in the same run, on the same GGUF.

    python bench/serve_throughput.py MODEL.gguf [--threads 2] [--tokens 64] [--baseline-server]

1. raw loop: llama_decode one token at a time with llama.cpp's greedy sampler, in process;
2. our daemon (`appliance serve`, a child process): single-stream decode rate and time to first
   token through the streaming API, aggregate rates with 4 and 8 concurrent streams, median time
   to first token with 8, the second turn of a 1,000-token chat, a model switch against the raw
   load time, idle CPU with a model loaded;
3. with --baseline-server: llama-cpp-python's own server (`python -m llama_cpp.server`), and with
   --cpp-server PATH: llama.cpp's C++ llama-server; each with 1, 4 and 8 concurrent streams.
End-of-generation tokens are suppressed (logit_bias) so every stream does the same work.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# One pooled client for every timed request: a fresh httpx client costs ~50 ms to build.
HTTP = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=32))
NO_END = {str(t): -100 for t in range(151643, 151669)}  # every added token, the EOG ones too
PROMPT = "Write a long story about a lighthouse keeper and the sea."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PARALLEL, CONTEXT = 8, 1536  # the daemon's slots and context per slot in this bench


def raw_load(model: Path, threads: int) -> float:
    """Seconds to load the model in process with the daemon's own context size."""
    from appliance.engine.runtime import LlamaRuntime, RuntimeOptions

    started = time.perf_counter()
    LlamaRuntime(model, RuntimeOptions(0, CONTEXT, PARALLEL, threads)).close()
    return time.perf_counter() - started


def raw_loop(model: Path, threads: int, n_tokens: int) -> dict:
    """The reference: one token per llama_decode, llama.cpp's greedy sampler, nothing else."""
    import llama_cpp

    from appliance.engine.runtime import LlamaRuntime, RuntimeOptions

    rt = LlamaRuntime(model, RuntimeOptions(0, CONTEXT, PARALLEL, threads))
    prompt = rt.tokenize("[0] " + PROMPT, add_special=False)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    biases = (llama_cpp.llama_logit_bias * len(NO_END))()
    for i, token in enumerate(NO_END):
        biases[i].token, biases[i].bias = int(token), -100.0
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(
        rt.n_vocab, len(NO_END), biases))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    rt.clear_batch()
    for i, token in enumerate(prompt):
        rt.add_to_batch(token, i, 0, i == len(prompt) - 1)
    assert rt.decode() == 0
    token = llama_cpp.llama_sampler_sample(chain, rt.ctx, len(prompt) - 1)
    t1 = time.perf_counter()
    pos = len(prompt)
    for _ in range(n_tokens - 1):
        rt.clear_batch()
        rt.add_to_batch(token, pos, 0, True)
        assert rt.decode() == 0
        token = llama_cpp.llama_sampler_sample(chain, rt.ctx, 0)
        pos += 1
    decode_s = time.perf_counter() - t1
    llama_cpp.llama_sampler_free(chain)
    rt.close()
    return {"prompt_tokens": len(prompt), "tokens_per_s": (n_tokens - 1) / decode_s}


def raw_first_token(rt: object, chain: object, prompt_text: str) -> float:
    """Prefill a prompt from scratch and sample its first token, in process."""
    import llama_cpp

    prompt = rt.tokenize(prompt_text, add_special=False)
    rt.forget(0)
    rt.clear_batch()
    for j, token in enumerate(prompt):
        rt.add_to_batch(token, j, 0, j == len(prompt) - 1)
    started = time.perf_counter()
    assert rt.decode() == 0
    llama_cpp.llama_sampler_sample(chain, rt.ctx, len(prompt) - 1)
    return time.perf_counter() - started


def chain_for(rt: object) -> object:
    """A greedy sampler chain (one per call; the timing loop only needs the sample call)."""
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    return chain


class Daemon:
    def __init__(self, models_dir: Path, threads: int, parallel: int, context: int,
                 gpu: str = "none") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "APPLIANCE_PORT": str(self.port),
               "APPLIANCE_MODELS_DIR": str(models_dir), "APPLIANCE_THREADS": str(threads),
               "APPLIANCE_PARALLEL": str(parallel), "APPLIANCE_CONTEXT_LENGTH": str(context),
               "APPLIANCE_CONFIG": "/nonexistent.toml", "APPLIANCE_GPU": gpu,
               "APPLIANCE_LOG_LEVEL": "warning", "APPLIANCE_MAX_QUEUE": "64"}
        self.process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"],
                                        env=env, cwd=REPO, stderr=subprocess.DEVNULL)
        wait_healthy(self.url + "/health")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


def wait_healthy(url: str, timeout: float = 120, process: subprocess.Popen | None = None,
                 log: IO[bytes] | None = None) -> None:
    """Until `url` answers 200. With `process` (and its `log`): its own last words if it exits
    first (a flag this build does not know, a model it cannot load)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = ""
            if log is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-1500:]
            raise SystemExit(f"{process.args[0]} exited ({process.returncode}):\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server at {url} did not come up in {timeout:.0f} s")


def stream_once(url: str, body: dict, path: str = "/v1/completions") -> dict:
    """One streaming request: time to first text, decode rate after it, tokens."""
    try:
        return _stream_once(url, body, path)
    except httpx.RemoteProtocolError:  # a pooled connection the server had already closed
        return _stream_once(url, body, path)


def _stream_once(url: str, body: dict, path: str) -> dict:
    started = time.perf_counter()
    first = last = None
    usage = None
    chunks = 0
    with HTTP.stream("POST", url + path, json={**body, "stream": True,
                                              "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            choices = data.get("choices") or []
            if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    # llama-cpp-python's server sends no usage when streaming, but one token per chunk.
    n = usage["completion_tokens"] if usage else chunks
    return {"ttft_s": (first or started) - started,
            "decode_tps": (n - 1) / (last - first) if first and last and last > first else 0.0,
            "tokens": n, "elapsed_s": time.perf_counter() - started}


_rounds = iter(range(1_000_000))


def concurrent(url: str, body: dict, n: int, path: str = "/v1/completions") -> dict:
    """n streams at once. Every prompt is new to the server (a fresh number leads it), so no
    server answers from a cached prompt."""
    results: list[dict] = [{}] * n
    barrier = threading.Barrier(n)
    round_no = next(_rounds)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = stream_once(url, {**body, "prompt": f"{round_no}-{i}: {PROMPT}"}, path)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"aggregate_tps": sum(r["tokens"] for r in results) / wall,
            "median_ttft_s": statistics.median(r["ttft_s"] for r in results)}


def conversation_turns(url: str, model: str, n_tokens: int) -> dict:
    """A ~1,000-token first turn, then the next turn of the same chat."""
    history = [{"role": "system", "content": "You are a helpful assistant. " * 10},
               {"role": "user", "content": "Summarise this text: " + "the sea is wide and the "
                                           "light turns slowly over the rocks. " * 60}]
    body = {"model": model, "max_tokens": n_tokens, "temperature": 0, "logit_bias": NO_END,
            "chat_template_kwargs": {"enable_thinking": False}}
    r = httpx.post(url + "/v1/chat/completions", json={**body, "messages": history},
                   timeout=600).json()
    prompt_tokens = r["usage"]["prompt_tokens"]
    # The first turn again, timed, now that the answer exists (and a fresh prefix: new system).
    fresh = [{"role": "system", "content": "You are a very helpful assistant. " * 10},
             *history[1:]]
    first = stream_once(url, {**body, "messages": fresh}, "/v1/chat/completions")
    answer = httpx.post(url + "/v1/chat/completions", json={**body, "messages": fresh},
                        timeout=600).json()["choices"][0]["message"]["content"]
    second = stream_once(url, {**body, "messages": [*fresh, {"role": "assistant",
                                                             "content": answer},
                                                    {"role": "user", "content": "Shorter?"}]},
                         "/v1/chat/completions")
    return {"prompt_tokens": prompt_tokens, "first_turn_ttft_s": first["ttft_s"],
            "second_turn_ttft_s": second["ttft_s"],
            "ratio": second["ttft_s"] / first["ttft_s"]}


def idle_cpu(pid: int, seconds: float = 10.0) -> float:
    import psutil

    process = psutil.Process(pid)
    before = sum(process.cpu_times()[:2])
    time.sleep(seconds)
    return (sum(process.cpu_times()[:2]) - before) / seconds * 100


def singles(url: str, body: dict, tries: int) -> list[dict]:
    """A warm-up, then `tries` single streams, each prompt with a different first token (no
    prefix reuse, as in the raw loop)."""
    stream_once(url, {**body, "max_tokens": 4})
    return [stream_once(url, {**body, "prompt": f"[{i}] {PROMPT}"}) for i in range(1, tries + 1)]


def server_figures(url: str, model: str, n_tokens: int) -> dict:
    """Single-stream rate and 4- and 8-stream aggregates of any OpenAI-compatible server."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": n_tokens, "temperature": 0,
            "logit_bias": NO_END}
    single = max(singles(url, body, 2), key=lambda r: r["decode_tps"])
    four = concurrent(url, body, 4)
    eight = concurrent(url, body, 8)
    return {"single_decode_tps": single["decode_tps"], "aggregate_tps_4": four["aggregate_tps"],
            "aggregate_tps_8": eight["aggregate_tps"], "median_ttft_4_s": four["median_ttft_s"],
            "median_ttft_8_s": eight["median_ttft_s"]}


class Server:
    """Another OpenAI-compatible server as a child process, serving the model as "m"."""

    def __init__(self, command: list[str], port: int, ready_path: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_healthy(self.url + ready_path)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def llama_cpp_python_server(model: Path, threads: int) -> Server:
    """llama-cpp-python's own server: one request at a time."""
    port = free_port()
    return Server([sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                   "--port", str(port), "--n_threads", str(threads), "--n_ctx", "2048",
                   "--interrupt_requests", "False", "--model_alias", "m"], port, "/v1/models")


def cpp_server(binary: Path, model: Path, threads: int) -> Server:
    """llama.cpp's C++ llama-server with the daemon's slots and context per slot."""
    port = free_port()
    return Server([str(binary), "-m", str(model), "--port", str(port), "--host", "127.0.0.1",
                   "-t", str(threads), "-tb", str(threads), "-np", str(PARALLEL),
                   "-c", str(PARALLEL * CONTEXT), "-a", "m", "--no-webui"], port, "/health")


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--baseline-server", action="store_true",
                        help="also measure llama-cpp-python's server")
    parser.add_argument("--cpp-server", type=Path, metavar="LLAMA_SERVER",
                        help="also measure llama.cpp's llama-server binary "
                             "(bench/build_llama_server.sh builds it)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of 4 and 8 concurrent streams (medians are reported)")
    args = parser.parse_args()

    raw = raw_loop(args.model, args.threads, args.tokens)
    raw["load_s"] = raw_load(args.model, args.threads)
    results: dict = {"model": args.model.name, "threads": args.threads, "tokens": args.tokens,
                     "raw_loop": raw}

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        a, b = "bench-a", "bench-b"
        os.link(args.model, models / f"{a}.gguf") if same_fs(args.model, models) else \
            shutil.copy(args.model, models / f"{a}.gguf")
        shutil.copy(args.model, models / f"{b}.gguf")
        daemon = Daemon(models, args.threads, parallel=PARALLEL, context=CONTEXT)
        try:
            url = daemon.url
            httpx.post(f"{url}/api/models/{a}/load", timeout=600)
            body = {"model": a, "prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0,
                    "logit_bias": NO_END}
            single = singles(url, body, 3)
            best = max(single, key=lambda r: r["decode_tps"])
            ttft = statistics.median(r["ttft_s"] for r in single)
            # First token through the API without streaming or text decoding in the way: a
            # whole max_tokens=1 request, paired with an in-process prefill + first sample of
            # the same prompt, alternating so the machine's noise hits both alike.
            from appliance.engine.runtime import LlamaRuntime, RuntimeOptions

            rt = LlamaRuntime(args.model, RuntimeOptions(0, CONTEXT, PARALLEL, args.threads))
            chain = chain_for(rt)
            one, raw_firsts = [], []
            for i in range(4, 15):
                text = f"[{i}] {PROMPT}"
                raw_firsts.append(raw_first_token(rt, chain, text))
                started = time.perf_counter()
                HTTP.post(url + "/v1/completions", json={**body, "max_tokens": 1,
                                                         "prompt": text}).raise_for_status()
                one.append(time.perf_counter() - started)
            rt.close()
            first_token_api = statistics.median(one)
            raw["first_token_s"] = statistics.median(raw_firsts)
            added = statistics.median(a - b for a, b in zip(one, raw_firsts, strict=True))
            # 4 and 8 streams, alternating with llama-server (running beside us, idle while
            # we are measured) round by round, so the machine's drift hits both alike.
            other = cpp_server(args.cpp_server, args.model, args.threads) \
                if args.cpp_server else None
            other_single = None
            if other:
                other_body = {**body, "model": "m"}
                other_single = max(singles(other.url, other_body, 2),
                                   key=lambda r: r["decode_tps"])
            runs: dict[str, dict[int, list[dict]]] = {"daemon": {4: [], 8: []},
                                                      "llama_server": {4: [], 8: []}}
            # The control API must stay responsive while every slot decodes.
            latencies: list[float] = []
            stop_polling = threading.Event()

            def poll() -> None:
                with httpx.Client(timeout=10) as control:
                    while not stop_polling.is_set():
                        for path in ("/health", "/api/status"):
                            started = time.perf_counter()
                            control.get(url + path)
                            latencies.append(time.perf_counter() - started)
                        time.sleep(0.1)

            try:
                for _ in range(args.rounds):
                    for n in (4, 8):
                        runs["daemon"][n].append(concurrent(url, body, n))
                        if other:
                            runs["llama_server"][n].append(concurrent(other.url, other_body, n))
            finally:
                if other:
                    other.stop()
            # One more round of 8, polled, apart from the compared ones (polling costs CPU).
            poller = threading.Thread(target=poll)
            poller.start()
            concurrent(url, body, 8)
            stop_polling.set()
            poller.join()
            turns = conversation_turns(url, a, 16)
            cpu = idle_cpu(daemon.process.pid)
            started = time.perf_counter()
            switched = HTTP.post(f"{url}/api/models/{b}/load")
            switch_s = time.perf_counter() - started
            assert switched.status_code == 200, switched.text
            switch_load_s = switched.json()["model"]["load_seconds"]
        finally:
            daemon.stop()

    results["daemon"] = {
        "single_decode_tps": best["decode_tps"],
        "single_over_raw": best["decode_tps"] / raw["tokens_per_s"],
        "single_ttft_s": ttft,
        "first_token_request_s": first_token_api,
        "first_token_added_ms": added * 1000,
        "aggregate_tps_4": median_of(runs["daemon"][4], "aggregate_tps"),
        "aggregate_tps_8": median_of(runs["daemon"][8], "aggregate_tps"),
        "median_ttft_4_s": median_of(runs["daemon"][4], "median_ttft_s"),
        "median_ttft_8_s": median_of(runs["daemon"][8], "median_ttft_s"),
        "rounds_aggregate_tps_8": [round(r["aggregate_tps"], 1) for r in runs["daemon"][8]],
        "control_api_under_load_ms": {
            "median": statistics.median(latencies) * 1000,
            "p95": sorted(latencies)[int(len(latencies) * 0.95)] * 1000,
            "max": max(latencies) * 1000},
        "conversation": turns,
        "switch_s": switch_s,
        "switch_over_raw_load": switch_s / raw["load_s"],
        "switch_load_part_s": switch_load_s,
        "idle_cpu_percent": cpu,
    }
    ours = results["daemon"]
    ours["ratio_4_over_single"] = ours["aggregate_tps_4"] / ours["single_decode_tps"]
    ours["ratio_8_over_single"] = ours["aggregate_tps_8"] / ours["single_decode_tps"]
    if other_single:
        theirs = {"single_decode_tps": other_single["decode_tps"],
                  "aggregate_tps_4": median_of(runs["llama_server"][4], "aggregate_tps"),
                  "aggregate_tps_8": median_of(runs["llama_server"][8], "aggregate_tps"),
                  "median_ttft_4_s": median_of(runs["llama_server"][4], "median_ttft_s"),
                  "median_ttft_8_s": median_of(runs["llama_server"][8], "median_ttft_s"),
                  "rounds_aggregate_tps_8": [round(r["aggregate_tps"], 1)
                                             for r in runs["llama_server"][8]]}
        theirs["ratio_4_over_single"] = theirs["aggregate_tps_4"] / theirs["single_decode_tps"]
        theirs["ratio_8_over_single"] = theirs["aggregate_tps_8"] / theirs["single_decode_tps"]
        results["llama_server"] = theirs
        for n in (4, 8):  # paired: round k of ours against round k of theirs
            ratios = [a["aggregate_tps"] / b["aggregate_tps"]
                      for a, b in zip(runs["daemon"][n], runs["llama_server"][n], strict=True)]
            ours[f"aggregate_{n}_over_llama_server"] = statistics.median(ratios)
    if args.baseline_server:
        server = llama_cpp_python_server(args.model, args.threads)
        try:
            base = server_figures(server.url, "m", args.tokens)
        finally:
            server.stop()
        results["llama_cpp_python_server"] = base
        ours["aggregate_4_over_llama_cpp_python"] = ours["aggregate_tps_4"] / base["aggregate_tps_4"]
        ours["aggregate_8_over_llama_cpp_python"] = ours["aggregate_tps_8"] / base["aggregate_tps_8"]
    print(json.dumps(results, indent=2))


def same_fs(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


if __name__ == "__main__":
    main()
