"""What routing through our daemon to an upstream costs a streamed completion, same run.

    python bench/upstream_proxy.py MODEL.gguf [--rounds 7] [--tokens 128] [--threads 2]
                                              [--pairs 100] [--starts 40]

Two real daemons: the upstream serves MODEL (with an API key, as a team server would), the front
holds no model and routes MODEL to the upstream (`[upstreams.bench]`, its own key). Rounds
alternate a stream sent straight to the upstream with the same stream sent through the front
(which goes first alternates too). Each request is a /v1/completions stream with a fresh prompt
and the end-of-generation tokens banned so every stream runs `--tokens` long. Per stream: time to the
first text chunk (from sending), and decode rate (tokens after the first over the time from
the first chunk to the last). Figures: the median over rounds of the through/direct rate ratio
(goal >= 0.95), and the added first-token time (goal <= 10 ms): the median over `--pairs` pairs
of short streams, one straight and one through the front, alternating (the upstream's prompt
time varies by tens of milliseconds from one request to the next, so a few long rounds cannot
tell 10 ms from nothing; the rounds' own median is kept beside it). Also the front daemon's own
CPU time (user + system, from /proc) per proxied stream, and per proxied request start: `--starts`
one-token streams in a row, which is the front's work on the way to a first token (less noisy on
a busy machine than the latency, which includes waiting for a core). Prints one JSON object and
writes bench/results/upstream_proxy-<model>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
COUNTER = itertools.count()
# Qwen3's added tokens (end of text/turn among them): banned so each stream runs its length.
NO_END = {str(t): -100 for t in range(151643, 151669)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def daemon(folder: Path, name: str, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full = {**os.environ, "APPLIANCE_PORT": str(port), "APPLIANCE_GPU": "none",
            "APPLIANCE_CONFIG": str(folder / "absent.toml"), **env}
    log_path = folder / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=full,
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start:\n" + log_path.read_text())
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def stream(http: httpx.Client, url: str, key: str, model: str, tokens: int
           ) -> tuple[float, float, int]:
    """(seconds to the first text chunk, tokens/s after it, tokens counted by the server)."""
    # /v1/completions: text passes on token by token (a chat answer holds back leading
    # whitespace, which is all a random-weight model may say).
    body = {"model": model, "max_tokens": tokens, "stream": True, "temperature": 0.7,
            "prompt": f"[{next(COUNTER)}] Once upon a time",
            "stream_options": {"include_usage": True}, "logit_bias": NO_END}
    started = time.perf_counter()
    first = last = None
    count = 0
    with http.stream("POST", url + "/v1/completions", json=body,
                     headers={"Authorization": f"Bearer {key}"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                count = data["usage"]["completion_tokens"]
            if any(c.get("text") for c in data.get("choices", [])):
                last = time.perf_counter()
                first = first or last
    assert first is not None and last is not None and last > first, "under two text chunks"
    return first - started, (count - 1) / (last - first), count


def short_stream(http: httpx.Client, url: str, key: str, model: str) -> None:
    """A one-token stream, read to its end: mostly the cost of starting a request."""
    body = {"model": model, "max_tokens": 1, "stream": True, "prompt": f"[{next(COUNTER)}] Once"}
    with http.stream("POST", url + "/v1/completions", json=body,
                     headers={"Authorization": f"Bearer {key}"}) as r:
        r.raise_for_status()
        r.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--starts", type=int, default=40,
                        help="one-token streams through the front for its CPU per request")
    parser.add_argument("--pairs", type=int, default=100,
                        help="short streams straight and through the front, alternating, for "
                             "the added first-token time (the long rounds give too few)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="upstream-proxy-"))
    (work / "models").mkdir()
    (work / "empty").mkdir()
    (work / "models" / args.model.name).symlink_to(args.model.resolve())
    model = args.model.stem.lower()
    up_key, front_key = secrets.token_hex(16), secrets.token_hex(16)
    for name, key in (("up.key", up_key), ("front.key", front_key)):
        (work / name).write_text(key)
        (work / name).chmod(0o600)
    upstream_env = {"APPLIANCE_MODELS_DIR": str(work / "models"),
                    "APPLIANCE_API_KEY_FILE": str(work / "up.key"),
                    "APPLIANCE_THREADS": str(args.threads), "APPLIANCE_PARALLEL": "2",
                    "APPLIANCE_CONTEXT_LENGTH": str(max(1024, args.tokens + 256)),
                    "APPLIANCE_DEFAULT_MODEL": model}
    direct_s: list[float] = []
    via_s: list[float] = []
    direct_rate: list[float] = []
    via_rate: list[float] = []
    front_cpu: list[float] = []
    added_s: list[float] = []
    with daemon(work, "upstream", upstream_env) as (upstream, _):
        (work / "front.toml").write_text(
            f'[upstreams.bench]\nurl = "{upstream}/v1"\n'
            f'api_key_file = "{work / "up.key"}"\nmodels = ["{model}"]\n')
        front_env = {"APPLIANCE_MODELS_DIR": str(work / "empty"),
                     "APPLIANCE_CONFIG": str(work / "front.toml"),
                     "APPLIANCE_API_KEY_FILE": str(work / "front.key"),
                     "APPLIANCE_THREADS": "1"}
        with daemon(work, "front", front_env) as (front, front_pid), \
                httpx.Client(timeout=600) as http:
            paths = {"direct": (upstream, up_key), "via": (front, front_key)}
            for name in paths:  # warm-up: loads, connections, first-request costs
                stream(http, *paths[name], model, 8)
            for i in range(args.rounds):
                order = ["direct", "via"] if i % 2 == 0 else ["via", "direct"]
                for name in order:
                    before = cpu_seconds(front_pid)
                    ttft, rate, _ = stream(http, *paths[name], model, args.tokens)
                    if name == "via":
                        front_cpu.append(cpu_seconds(front_pid) - before)
                    (direct_s if name == "direct" else via_s).append(ttft)
                    (direct_rate if name == "direct" else via_rate).append(rate)
            for i in range(args.pairs):  # the prompt's cost varies more than the proxy's
                order = ["direct", "via"] if i % 2 == 0 else ["via", "direct"]
                first = {name: stream(http, *paths[name], model, 4)[0] for name in order}
                added_s.append(first["via"] - first["direct"])
            before = cpu_seconds(front_pid)
            for _ in range(args.starts):  # back to back: the connection to the upstream is reused
                short_stream(http, *paths["via"], model)
            start_cpu = (cpu_seconds(front_pid) - before) / max(1, args.starts)

    rate_ratio = statistics.median(v / d for v, d in zip(via_rate, direct_rate, strict=True))
    long_added_ms = statistics.median((v - d) * 1000 for v, d in zip(via_s, direct_s,
                                                                     strict=True))
    added_ms = statistics.median(added_s) * 1000
    quartiles = statistics.quantiles([a * 1000 for a in added_s], n=4)
    result = {
        "model": model, "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
        "load_average": os.getloadavg(),
        "direct_tok_s": [round(v, 2) for v in direct_rate],
        "via_front_tok_s": [round(v, 2) for v in via_rate],
        "direct_first_token_ms": [round(v * 1000, 2) for v in direct_s],
        "via_front_first_token_ms": [round(v * 1000, 2) for v in via_s],
        "rate_ratio_median": round(rate_ratio, 3),
        "added_first_token_ms_median": round(added_ms, 2),
        "added_first_token_ms_quartiles": [round(q, 2) for q in quartiles],
        "pairs": args.pairs,
        "added_first_token_ms_median_long_streams": round(long_added_ms, 2),
        "front_cpu_ms_per_stream_median": round(statistics.median(front_cpu) * 1000, 2),
        "front_cpu_ms_per_request_start": round(start_cpu * 1000, 2),
        "starts": args.starts,
        "goals": {"rate_ratio": ">= 0.95", "added_first_token_ms": "<= 10"},
        "met": rate_ratio >= 0.95 and added_ms <= 10,
    }
    text = json.dumps(result, indent=2)
    print(text)
    (REPO / "bench" / "results" / f"upstream_proxy-{model}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
