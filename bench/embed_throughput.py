"""Embedding throughput, chat and embeddings at once, and resident memory, in one run.

    python bench/embed_throughput.py EMBED.gguf CHAT.gguf [--threads 2] [--inputs 256]
        [--cpp-server $(bench/build_llama_server.sh)]

(a) throughput: `--inputs` texts of ~64 tokens embedded in one /v1/embeddings request of our
    daemon, against (1) one request per input through our API and (2) llama.cpp's llama-server
    `--embeddings` on the same file with the same threads and the same batch sizes (one request
    with every input). Also in process, without HTTP: one llama_decode per input (the naive
    loop) and our EmbeddingRuntime with many inputs per decode (the ceiling).
(b) chat and embeddings at once: 4 streams of a chat turn on CHAT.gguf, their aggregate decode
    rate alone, then while one all-inputs embedding request runs (tokens counted inside the
    request's time window only); both must finish, and each model must have loaded once.
(c) memory: the daemon's RSS growth with both models resident (after the work, so every page
    they touch is in) against the planner's RAM figures, and each model's RSS at load.
Targets (the issue's): (a) >= 5x per-request and >= 1.0x llama-server; (b) >= 0.5x solo;
(c) within 10 %. Prints one JSON object and writes bench/results/embed_throughput-<embed>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serve_throughput import NO_END, Daemon, free_port, wait_healthy  # noqa: E402

HTTP = httpx.Client(timeout=1200)
WORDS = ("alpha beta gamma delta river mountain window garden copper silver music table "
         "orange paper stone cloud").split()
BATCH_TOKENS, UBATCH, SEQUENCES = 4096, 512, 64  # as appliance.residency.loader sets them
CHAT_STREAMS = 4
GPU_LAYERS = 0  # --gpu: every layer on the GPU (bench/gpu_check.sh measures the 5x there)


def inputs(n: int, words: int = 60) -> list[str]:
    """n distinct texts of ~64 tokens each."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) + f" #{i}"
            for i in range(n)]


# -- in process: the floor and the ceiling ----------------------------------------------------


def raw_per_input(path: Path, texts: list[str], threads: int) -> float:
    """Inputs per second: one llama_decode per input, as a plain loop would do it."""
    from appliance.engine.embedding import EmbeddingOptions, EmbeddingRuntime

    rt = EmbeddingRuntime(path, EmbeddingOptions(GPU_LAYERS, BATCH_TOKENS, UBATCH, 1, threads))
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

    rt = EmbeddingRuntime(path, EmbeddingOptions(GPU_LAYERS, BATCH_TOKENS, UBATCH, SEQUENCES, threads))
    try:
        ids = [rt.tokenize(t) for t in texts]
        rt.embed(ids[:4])  # warm
        started = time.perf_counter()
        rt.embed(ids)
        return len(ids) / (time.perf_counter() - started), sum(len(i) for i in ids)
    finally:
        rt.close()


# -- over HTTP ---------------------------------------------------------------------------------


def embed_request(url: str, model: str, texts: list[str]) -> float:
    started = time.perf_counter()
    r = HTTP.post(url + "/v1/embeddings", json={"model": model, "input": texts})
    r.raise_for_status()
    assert len(r.json()["data"]) == len(texts)
    return time.perf_counter() - started


def cpp_server_rate(binary: Path, model: Path, texts: list[str], threads: int) -> dict[str, Any]:
    """llama-server --embeddings on the same file, same threads and batch sizes: inputs per
    second for one request with every input (it spreads them over its slots)."""
    port = free_port()
    slots = 16
    args = [str(binary), "-m", str(model), "--embeddings", "--pooling", "last",
            "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb", str(threads),
            "-c", str(slots * 256), "-np", str(slots), "-b", str(BATCH_TOKENS),
            "-ub", str(UBATCH), "-ngl", str(GPU_LAYERS), "--no-webui"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health")
        url = f"http://127.0.0.1:{port}"
        embed_request(url, model.stem, texts[:4])  # warm
        seconds = embed_request(url, model.stem, texts)
        return {"inputs_per_s": len(texts) / seconds, "args": args[3:]}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def _tokens_in(data: str) -> int:
    """Tokens in one streamed chunk, from its logprobs entries."""
    choices = json.loads(data).get("choices") or [{}]
    return len((choices[0].get("logprobs") or {}).get("tokens") or [])


class ChatStreams:
    """n streaming chats that run until stopped; (time, tokens) of every chunk is kept."""

    def __init__(self, url: str, model: str, n: int) -> None:
        self.url, self.model = url, model
        self.times: list[list[tuple[float, int]]] = [[] for _ in range(n)]
        self.finished = [False] * n
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        # A chat turn in Qwen's format through /v1/completions: the chat endpoint holds back
        # whitespace, and a random-weight model can emit nothing else for minutes. logprobs
        # only to count tokens per chunk (a few % of decode, alone and during alike).
        body = {"model": self.model, "stream": True, "max_tokens": 100000, "logit_bias": NO_END,
                "logprobs": 1, "prompt": f"<|im_start|>user\nTell story number {i}.<|im_end|>\n"
                                          "<|im_start|>assistant\n<think>\n\n</think>\n\n"}
        try:
            with httpx.Client(timeout=1200) as c, \
                    c.stream("POST", self.url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: {") and (tokens := _tokens_in(line[6:])):
                        self.times[i].append((time.perf_counter(), tokens))
                    if self._stop.is_set():
                        break
            self.finished[i] = True
        except Exception as e:  # any failure ends this stream: say it, do not hang the run
            self.errors.append(repr(e))

    def wait_flowing(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not all(len(t) >= 2 for t in self.times):
            if time.monotonic() > deadline or self.errors:
                raise SystemExit(f"chat streams did not start: {self.errors}")
            time.sleep(0.05)

    def rate(self, start: float, end: float) -> float:
        """Aggregate tokens per second inside [start, end]."""
        count = sum(n for times in self.times for t, n in times if start <= t <= end)
        return count / (end - start)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def chat_and_embeddings(url: str, chat_id: str, embed_id: str, texts: list[str],
                        solo_s: float) -> dict[str, Any]:
    streams = ChatStreams(url, chat_id, CHAT_STREAMS)
    try:
        streams.wait_flowing()
        started = time.perf_counter()
        time.sleep(solo_s)  # the solo window: the streams alone
        solo = streams.rate(started, time.perf_counter())
        begin = time.perf_counter()
        embed_seconds = embed_request(url, embed_id, texts)
        end = time.perf_counter()
        during = streams.rate(begin, end)
    finally:
        streams.stop()
    return {"chat_4_streams_solo_tok_s": solo, "chat_4_streams_during_embedding_tok_s": during,
            "embedding_batch_during_chat_s": embed_seconds,
            "chat_streams_finished": all(streams.finished), "chat_errors": streams.errors,
            "chat_during_embedding_vs_solo": during / solo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embed", type=Path)
    parser.add_argument("chat", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--per-request-inputs", type=int, default=64,
                        help="how many of the inputs to send one request each")
    parser.add_argument("--solo-s", type=float, default=15.0,
                        help="seconds the 4 chat streams run alone before the embedding batch")
    parser.add_argument("--cpp-server", type=Path, help="llama-server (build_llama_server.sh)")
    parser.add_argument("--gpu", action="store_true", help="offload both models to the GPU")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/...)")
    args = parser.parse_args()
    global GPU_LAYERS
    GPU_LAYERS = 99 if args.gpu else 0
    texts = inputs(args.inputs)
    out: dict[str, Any] = {"embed_model": args.embed.name, "chat_model": args.chat.name,
                           "threads": args.threads, "inputs": args.inputs,
                           "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg()}
    out["raw_per_input_inputs_per_s"] = raw_per_input(args.embed, texts[:args.per_request_inputs],
                                                      args.threads)
    rate, tokens = raw_batched(args.embed, texts, args.threads)
    out["raw_batched_inputs_per_s"], out["tokens_in_request"] = rate, tokens
    if args.cpp_server:
        out["cpp_server"] = cpp_server_rate(args.cpp_server, args.embed, texts, args.threads)

    folder = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    try:
        for f in (args.embed, args.chat):
            (folder / f.name).symlink_to(f.resolve())
        embed_id, chat_id = args.embed.stem.lower(), args.chat.stem.lower()
        daemon = Daemon(folder, args.threads, parallel=CHAT_STREAMS, context=4096,
                        gpu="auto" if args.gpu else "none")
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
            out.update(chat_and_embeddings(daemon.url, chat_id, embed_id, texts, args.solo_s))
            status = HTTP.get(daemon.url + "/api/status").json()
            out["loads"] = {m["id"]: m["loads"] for m in status["models"]}
            out["memory_per_model"] = {m["id"]: m["memory"] for m in status["models"]}
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
    one = out["daemon_one_request_inputs_per_s"]
    out["one_request_vs_raw_batched"] = one / out["raw_batched_inputs_per_s"]
    out["one_request_vs_raw_per_input"] = one / out["raw_per_input_inputs_per_s"]
    out["one_request_vs_per_request"] = one / out["daemon_per_request_inputs_per_s"]
    targets = {"one_request_vs_per_request >= 5": out["one_request_vs_per_request"] >= 5,
               "chat_during_embedding_vs_solo >= 0.5":
                   out["chat_during_embedding_vs_solo"] >= 0.5,
               "each model loaded once": set(out["loads"].values()) == {1}
                   and len(out["loads"]) == 2,
               "chat streams finished": out["chat_streams_finished"],
               "rss within 10 % of planned": abs(out["rss_over_planned"] - 1) <= 0.10}
    if "cpp_server" in out:
        out["one_request_vs_cpp_server"] = one / out["cpp_server"]["inputs_per_s"]
        targets["one_request_vs_cpp_server >= 1.0"] = out["one_request_vs_cpp_server"] >= 1.0
    out["targets"] = targets
    text = json.dumps(out, indent=2)
    print(text)
    results = args.out or (REPO / "bench" / "results"
                           / f"embed_throughput-{args.embed.stem.lower()}.json")
    results.write_text(text + "\n")


if __name__ == "__main__":
    main()
