"""The three API dialects on one engine: decode speed through each, same run, same model.

    python bench/dialects.py MODEL.gguf [--rounds 5] [--tokens 128] [--threads 2]

Single streams alternate between OpenAI chat (SSE), Ollama's /api/chat (NDJSON) and Anthropic's
/v1/messages (SSE), round by round; then 4 concurrent OpenAI streams alternate with 4 concurrent
streams mixing the dialects (OpenAI, Ollama, Anthropic, OpenAI). Every request has a fresh prompt
(no prefix-cache hits) and thinking off. A stream's rate is the tokens the server counted
(OpenAI usage, Ollama eval_count, Anthropic output_tokens) over the client's wall time from
sending the request to the end of the stream. Prints one JSON object and writes it to
bench/results/dialects-<model>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
HTTP = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=16))
COUNTER = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt() -> list[dict[str, str]]:
    return [{"role": "user", "content": f"[{next(COUNTER)}] Write a long story about the sea."}]


def openai_stream(url: str, model: str, tokens: int) -> tuple[int, float]:
    body = {"model": model, "messages": prompt(), "max_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.7,
            "chat_template_kwargs": {"enable_thinking": False}}
    started, count = time.perf_counter(), 0
    with HTTP.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    count = usage["completion_tokens"]
    return count, time.perf_counter() - started


def ollama_stream(url: str, model: str, tokens: int) -> tuple[int, float]:
    body = {"model": model, "messages": prompt(), "think": False,
            "options": {"num_predict": tokens, "temperature": 0.7}}
    started, count = time.perf_counter(), 0
    with HTTP.stream("POST", url + "/api/chat", json=body) as r:
        for line in r.iter_lines():
            data = json.loads(line)
            if data.get("done"):
                count = data["eval_count"]
    return count, time.perf_counter() - started


def anthropic_stream(url: str, model: str, tokens: int) -> tuple[int, float]:
    body = {"model": model, "messages": prompt(), "max_tokens": tokens, "stream": True,
            "temperature": 0.7}
    started, count = time.perf_counter(), 0
    with HTTP.stream("POST", url + "/v1/messages", json=body,
                     headers={"anthropic-version": "2023-06-01"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"message_delta"' in line:
                count = json.loads(line[6:])["usage"]["output_tokens"]
    return count, time.perf_counter() - started


DIALECTS = {"openai": openai_stream, "ollama": ollama_stream, "anthropic": anthropic_stream}


def concurrent_rate(url: str, model: str, tokens: int, kinds: list[str]) -> float:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(kinds)) as pool:
        results = list(pool.map(lambda k: DIALECTS[k](url, model, tokens), kinds))
    return sum(count for count, _ in results) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    models = Path(tempfile.mkdtemp(prefix="dialects-"))
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
        for name in DIALECTS:  # warm-up, one each
            DIALECTS[name](url, model, 8)
        single: dict[str, list[float]] = {name: [] for name in DIALECTS}
        four_openai, four_mixed = [], []
        for _ in range(args.rounds):
            for name, run in DIALECTS.items():
                count, seconds = run(url, model, args.tokens)
                single[name].append(count / seconds)
            four_openai.append(concurrent_rate(url, model, args.tokens, ["openai"] * 4))
            four_mixed.append(concurrent_rate(url, model, args.tokens,
                                              ["openai", "ollama", "anthropic", "openai"]))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)

    def ratios(a: list[float], b: list[float]) -> dict[str, float]:
        paired = [x / y for x, y in zip(a, b, strict=True)]
        return {"median": round(statistics.median(paired), 3), "min": round(min(paired), 3)}

    result = {
        "model": model, "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
        "single_stream_tok_s": {k: [round(v, 2) for v in vs] for k, vs in single.items()},
        "ollama_vs_openai": ratios(single["ollama"], single["openai"]),
        "anthropic_vs_openai": ratios(single["anthropic"], single["openai"]),
        "four_openai_tok_s": [round(v, 2) for v in four_openai],
        "four_mixed_tok_s": [round(v, 2) for v in four_mixed],
        "mixed_vs_openai_4": ratios(four_mixed, four_openai),
    }
    text = json.dumps(result, indent=2)
    print(text)
    (REPO / "bench" / "results" / f"dialects-{model}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
