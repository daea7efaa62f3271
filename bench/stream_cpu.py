"""The HTTP side of a streamed token, per dialect: the daemon's event-loop CPU time per token.

    python bench/stream_cpu.py MODEL.gguf [--rounds 5] [--streams 4] [--tokens 128]

Decode speed is set by llama.cpp, so a dialect's own cost per token (shaping each chunk,
serializing it, the awaits between the engine and the socket) hides inside noisy decode rates.
This measures it directly, and under load too: the CPU time of the daemon's main thread (the
event loop: every route and every chunk runs there; llama.cpp, templates and tokenizing run on
other threads), read from /proc around a batch of streams of one dialect. Rounds alternate
OpenAI chat (SSE), Ollama /api/chat (NDJSON), Anthropic /v1/messages (SSE) and /v1/responses
(SSE), one stream at a time; each stream has the same prompt and sampling in every dialect (and
the same seed, so the same tokens, but for Anthropic's, which has no seed). Prints one JSON
object and writes it to bench/results/stream_cpu-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
HTTP = httpx.Client(timeout=600)
TICK = os.sysconf("SC_CLK_TCK")
SEED = 11


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_thread_cpu(pid: int) -> float:
    """CPU time of the process's main thread (its tid is its pid), in seconds: from schedstat
    (nanoseconds) where the kernel keeps it, else utime + stime in clock ticks."""
    task = Path(f"/proc/{pid}/task/{pid}")
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"[{i}] Write a long story about the sea."}]


def openai(url: str, model: str, tokens: int, i: int) -> int:
    body = {"model": model, "messages": messages(i), "max_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.7, "seed": SEED,
            "chat_template_kwargs": {"enable_thinking": False}}
    count = 0
    with HTTP.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"usage": {' in line:
                count = json.loads(line[6:])["usage"]["completion_tokens"]
    return count


def ollama(url: str, model: str, tokens: int, i: int) -> int:
    body = {"model": model, "messages": messages(i), "think": False,
            "options": {"num_predict": tokens, "temperature": 0.7, "seed": SEED}}
    count = 0
    with HTTP.stream("POST", url + "/api/chat", json=body) as r:
        for line in r.iter_lines():
            if '"done": true' in line:
                count = json.loads(line)["eval_count"]
    return count


def anthropic(url: str, model: str, tokens: int, i: int) -> int:
    body = {"model": model, "messages": messages(i), "max_tokens": tokens, "stream": True,
            "temperature": 0.7}  # Anthropic's API has no seed
    count = 0
    with HTTP.stream("POST", url + "/v1/messages", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"message_delta"' in line:
                count = json.loads(line[6:])["usage"]["output_tokens"]
    return count


def responses(url: str, model: str, tokens: int, i: int) -> int:
    body = {"model": model, "input": messages(i), "max_output_tokens": tokens, "stream": True,
            "temperature": 0.7, "seed": SEED, "reasoning": {"effort": "none"}}
    count = 0
    with HTTP.stream("POST", url + "/v1/responses", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"usage": {' in line:
                count = json.loads(line[6:])["response"]["usage"]["output_tokens"]
    return count


DIALECTS: dict[str, Callable[[str, str, int, int], int]] = {
    "openai": openai, "ollama": ollama, "anthropic": anthropic, "responses": responses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=4, help="streams per dialect per round")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    models = Path(tempfile.mkdtemp(prefix="stream-cpu-"))
    (models / args.model.name).symlink_to(args.model.resolve())
    model = args.model.stem.lower()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "APPLIANCE_PORT": str(port), "APPLIANCE_MODELS_DIR": str(models),
           "APPLIANCE_CONFIG": str(models / "absent.toml"), "APPLIANCE_GPU": "none",
           "APPLIANCE_THREADS": str(args.threads), "APPLIANCE_PARALLEL": "4",
           "APPLIANCE_CONTEXT_LENGTH": "1024", "APPLIANCE_DEFAULT_MODEL": model}
    log = (models / "daemon.log").open("wb")
    daemon = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=env,
                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    cpu_us: dict[str, list[float]] = {name: [] for name in DIALECTS}
    counted: dict[str, int] = {name: 0 for name in DIALECTS}
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if HTTP.get(url + "/api/status").json()["state"] == "ready":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("daemon did not start:\n" + (models / "daemon.log").read_text())
            time.sleep(0.2)
        for run in DIALECTS.values():  # warm-up: imports, first-use caches
            run(url, model, 8, 0)
        for r in range(args.rounds):
            for name, run in DIALECTS.items():
                before = main_thread_cpu(daemon.pid)
                tokens = sum(run(url, model, args.tokens, r * args.streams + s)
                             for s in range(args.streams))
                cpu_us[name].append((main_thread_cpu(daemon.pid) - before) / tokens * 1e6)
                counted[name] += tokens
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)

    def ratio(name: str) -> dict[str, float]:
        paired = [x / y for x, y in zip(cpu_us[name], cpu_us["openai"], strict=True)]
        return {"median": round(statistics.median(paired), 3), "max": round(max(paired), 3)}

    result = {
        "model": model, "tokens": args.tokens, "streams": args.streams, "rounds": args.rounds,
        "cpu_clock": "schedstat" if Path(f"/proc/{os.getpid()}/schedstat").exists()
        else f"ticks of {1 / TICK} s",
        "tokens_streamed": counted,
        "event_loop_cpu_us_per_token": {k: [round(v, 1) for v in vs] for k, vs in cpu_us.items()},
        "median_us_per_token": {k: round(statistics.median(vs), 1) for k, vs in cpu_us.items()},
        **{f"{name}_vs_openai": ratio(name) for name in DIALECTS if name != "openai"},
    }
    text = json.dumps(result, indent=2)
    print(text)
    (REPO / "bench" / "results" / f"stream_cpu-{model}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
