"""Embedding throughput, chat + embeddings at once, and resident memory, in one run.

    python bench/embed_throughput.py EMBED.gguf CHAT.gguf [--threads 2] [--inputs 256]

1. raw llama.cpp in process, one llama_decode per input (the naive loop), and our
   EmbeddingRuntime called directly (many inputs per decode, no HTTP): the baselines;
2. our daemon: one /v1/embeddings request with all inputs (~64 tokens each), and one request
   per input (sequential), in inputs per second;
3. the daemon with the chat model too: 4 chat streams alone, then 4 chat streams while one
   all-inputs embedding request runs; the load counters of both models; RSS of the two resident
   models (daemon RSS minus its RSS before any load) against the planner's figures.
llama-server is not run here (bench/build_llama_server.sh takes ~15 minutes on two cores).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serve_throughput import NO_END, Daemon  # noqa: E402

HTTP = httpx.Client(timeout=1200)
WORDS = ("alpha beta gamma delta river mountain window garden copper silver music table "
         "orange paper stone cloud").split()


def inputs(n: int, words: int = 60) -> list[str]:
    """n distinct texts of ~64 tokens each."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) + f" #{i}"
            for i in range(n)]


def raw_per_input(path: Path, texts: list[str], threads: int) -> float:
    """Inputs per second: one llama_decode per input, as a plain loop would do it."""
    from appliance.engine.embedding import EmbeddingOptions, EmbeddingRuntime

    rt = EmbeddingRuntime(path, EmbeddingOptions(0, 4096, 512, 1, threads))
    try:
        ids = [rt.tokenize(t) for t in texts]
        started = time.perf_counter()
        for one in ids:
            rt.embed([one])
        return len(ids) / (time.perf_counter() - started)
    finally:
        rt.close()


def raw_batched(path: Path, texts: list[str], threads: int) -> tuple[float, int]:
    """Inputs per second through EmbeddingRuntime.embed directly (the ceiling), and tokens."""
    from appliance.engine.embedding import EmbeddingOptions, EmbeddingRuntime

    rt = EmbeddingRuntime(path, EmbeddingOptions(0, 4096, 512, 64, threads))
    try:
        ids = [rt.tokenize(t) for t in texts]
        started = time.perf_counter()
        rt.embed(ids)
        return len(ids) / (time.perf_counter() - started), sum(len(i) for i in ids)
    finally:
        rt.close()


def embed_request(url: str, model: str, texts: list[str]) -> float:
    started = time.perf_counter()
    r = HTTP.post(url + "/v1/embeddings", json={"model": model, "input": texts,
                                                "encoding_format": "base64"})
    r.raise_for_status()
    return time.perf_counter() - started


def chat_streams(url: str, model: str, n: int, tokens: int) -> float:
    """Aggregate generated tokens per second over n concurrent streams."""
    done: list[int] = []

    def one() -> None:
        with httpx.Client(timeout=1200) as c:
            r = c.post(url + "/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "Tell a story."}],
                "max_tokens": tokens, "logit_bias": NO_END,
                "chat_template_kwargs": {"enable_thinking": False}})
            r.raise_for_status()
            done.append(r.json()["usage"]["completion_tokens"])

    workers = [threading.Thread(target=one) for _ in range(n)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embed", type=Path)
    parser.add_argument("chat", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--per-request-inputs", type=int, default=64)
    parser.add_argument("--chat-tokens", type=int, default=48)
    args = parser.parse_args()
    texts = inputs(args.inputs)
    out: dict = {"embed_model": args.embed.name, "chat_model": args.chat.name,
                 "threads": args.threads, "inputs": args.inputs, "cpu_count": os.cpu_count(),
                 "load_average_start": os.getloadavg()}
    out["raw_per_input_inputs_per_s"] = raw_per_input(args.embed, texts[:args.per_request_inputs],
                                                      args.threads)
    rate, tokens = raw_batched(args.embed, texts, args.threads)
    out["raw_batched_inputs_per_s"], out["tokens_in_request"] = rate, tokens

    folder = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    try:
        for f in (args.embed, args.chat):
            (folder / f.name).symlink_to(f.resolve())
        embed_id, chat_id = args.embed.stem.lower(), args.chat.stem.lower()
        daemon = Daemon(folder, args.threads, parallel=4, context=2048)
        try:
            proc = psutil.Process(daemon.process.pid)
            rss_before = proc.memory_info().rss
            embed_request(daemon.url, embed_id, texts[:4])  # load and warm
            seconds = embed_request(daemon.url, embed_id, texts)
            out["daemon_one_request_inputs_per_s"] = args.inputs / seconds
            started = time.perf_counter()
            for text in texts[:args.per_request_inputs]:
                embed_request(daemon.url, embed_id, [text])
            out["daemon_per_request_inputs_per_s"] = args.per_request_inputs / (
                time.perf_counter() - started)

            chat_streams(daemon.url, chat_id, 1, 4)  # load and warm
            out["chat_4_streams_solo_tok_s"] = chat_streams(daemon.url, chat_id, 4,
                                                            args.chat_tokens)
            result: dict = {}

            def embedding_batch() -> None:
                result["seconds"] = embed_request(daemon.url, embed_id, texts)

            batch = threading.Thread(target=embedding_batch)
            batch.start()
            out["chat_4_streams_during_embedding_tok_s"] = chat_streams(
                daemon.url, chat_id, 4, args.chat_tokens)
            batch.join()
            out["embedding_batch_during_chat_s"] = result.get("seconds")
            status = HTTP.get(daemon.url + "/api/status").json()
            out["loads"] = {m["id"]: m["loads"] for m in status["models"]}
            planned = sum(m["memory"]["planned_ram"] for m in status["models"])
            rss = proc.memory_info().rss - rss_before
            out["resident_rss_mib"] = rss / 2**20
            out["planned_ram_mib"] = planned / 2**20
            out["rss_over_planned"] = rss / planned
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out["load_average_end"] = os.getloadavg()
    out["one_request_vs_raw_batched"] = out["daemon_one_request_inputs_per_s"] / out[
        "raw_batched_inputs_per_s"]
    out["one_request_vs_raw_per_input"] = out["daemon_one_request_inputs_per_s"] / out[
        "raw_per_input_inputs_per_s"]
    out["one_request_vs_per_request"] = out["daemon_one_request_inputs_per_s"] / out[
        "daemon_per_request_inputs_per_s"]
    out["chat_during_embedding_vs_solo"] = out["chat_4_streams_during_embedding_tok_s"] / out[
        "chat_4_streams_solo_tok_s"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
