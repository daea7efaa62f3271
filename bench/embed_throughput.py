"""Embedding throughput, chat and embeddings at once, and resident memory, in one run.

    python bench/embed_throughput.py EMBED.gguf CHAT.gguf [--threads 2] [--inputs 256]
        [--rounds 3] [--cpp-server $(bench/build_llama_server.sh)]

(a) throughput: `--inputs` texts of ~64 tokens embedded in one /v1/embeddings request of our
    daemon, against (1) one request per input through our API and (2) llama.cpp's llama-server
    `--embeddings` on the same file, set up as our embedding model is (the model's pooling, the
    same threads, 64 sequences in one unified 4096-token cache, 512-token micro-batches), one
    request with every input; the two servers alternate for `--rounds` rounds (medians), and
    the cosine of their vectors for the same inputs is reported. Also in process, without HTTP:
    one llama_decode per input (the naive loop) and our EmbeddingRuntime with many inputs per
    decode (the ceiling).
(b) chat and embeddings at once: 4 streams of chat turns (TURN_TOKENS each, one after another)
    on CHAT.gguf, their aggregate decode rate alone, then while one all-inputs embedding request
    runs (tokens counted inside the request's time window only), then alone again (the solo
    rate must not drift: the ratio is against the mean of both); both must finish, and each
    model must have loaded once.
(c) memory: the daemon's RSS growth with both models resident, after each has reached the peak
    the planner plans for (see resident_memory), against the planner's RAM figures.
Targets (the issue's): (a) >= 5x per-request and >= 1.0x llama-server; (b) >= 0.5x solo;
(c) within 10 %. Prints one JSON object and writes bench/results/embed_throughput-<embed>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.config import Settings  # noqa: E402
from bench.serve_throughput import NO_END, Daemon, free_port, wait_healthy  # noqa: E402

HTTP = httpx.Client(timeout=1200)
WORDS = ("alpha beta gamma delta river mountain window garden copper silver music table "
         "orange paper stone cloud").split()
BATCH_TOKENS, UBATCH, SEQUENCES = 4096, 512, 64  # as appliance.residency.loader sets them
LONG_INPUT_TOKEN = 1000  # any ordinary token: the memory peak's input repeats it
CHAT_STREAMS = 4
TURN_TOKENS = 128  # tokens per chat turn; each stream runs turn after turn
ENGINE_NICE = Settings.model_fields["engine_nice"].default
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


def embed_request(url: str, model: str, texts: list[str]) -> tuple[float, np.ndarray]:
    """Seconds for one /v1/embeddings request with every text, and its vectors in input order."""
    started = time.perf_counter()
    r = HTTP.post(url + "/v1/embeddings", json={"model": model, "input": texts})
    r.raise_for_status()
    seconds = time.perf_counter() - started
    data = sorted(r.json()["data"], key=lambda d: d["index"])
    assert len(data) == len(texts)
    return seconds, np.array([d["embedding"] for d in data], dtype=np.float64)


def llama_server_command(binary: Path, model: Path, threads: int, port: int) -> list[str]:
    """llama-server --embeddings set up as our embedding model is (loader.py): the model's own
    pooling (no --pooling), the same threads, one 4096-token decode of up to 64 sequences that
    share one unified KV cache (any input may take any cell), 512-token micro-batches."""
    return [str(binary), "-m", str(model), "--embeddings", "--host", "127.0.0.1",
            "--port", str(port), "-t", str(threads), "-tb", str(threads),
            "-c", str(BATCH_TOKENS), "-b", str(BATCH_TOKENS), "-ub", str(UBATCH),
            "-np", str(SEQUENCES), "--kv-unified", "-ngl", str(GPU_LAYERS), "--no-webui"]


def _engine_priority() -> None:
    """In the child before exec: the nice value the daemon's engine threads take
    (scheduler.lower_thread_priority: at least engine_nice)."""
    os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), ENGINE_NICE))


class LlamaServer:
    """llama.cpp's llama-server as a child process; its log is kept to say why it exited."""

    def __init__(self, binary: Path, model: Path, threads: int) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.command = llama_server_command(binary, model, threads, port)
        self.log = tempfile.TemporaryFile()
        # At the nice value the daemon's engine threads take (engine_nice): on a busy machine
        # both then lose the same share to everything else.
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                        preexec_fn=_engine_priority)
        try:
            wait_healthy(self.url + "/health", 600, self.process, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        self.log.close()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, dim) arrays."""
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def alternate(ours: tuple[str, str], theirs: tuple[str, str] | None, texts: list[str],
              rounds: int) -> dict[str, Any]:
    """One all-inputs request to our daemon and one to llama-server per round, the order
    swapped every round (a drift in machine load then hits both alike); medians, the ratio,
    and how far apart the two servers' vectors are for the same inputs."""
    ours_s: list[float] = []
    theirs_s: list[float] = []
    vectors: dict[str, np.ndarray] = {}
    for r in range(rounds):
        order = [("ours", ours), ("theirs", theirs)] if theirs else [("ours", ours)]
        for name, (url, model) in order if r % 2 == 0 else reversed(order):
            seconds, vectors[name] = embed_request(url, model, texts)
            (ours_s if name == "ours" else theirs_s).append(seconds)
    out: dict[str, Any] = {"rounds": rounds, "daemon_one_request_s": ours_s,
                           "daemon_one_request_inputs_per_s":
                               len(texts) / statistics.median(ours_s)}
    if theirs_s:
        rate = len(texts) / statistics.median(theirs_s)
        agree = cosines(vectors["ours"], vectors["theirs"])
        out.update({"llama_server_one_request_s": theirs_s,
                    "llama_server_inputs_per_s": rate,
                    "one_request_vs_llama_server":
                        out["daemon_one_request_inputs_per_s"] / rate,
                    "per_round_vs_llama_server": [t / o for o, t in zip(ours_s, theirs_s, strict=True)],
                    "cosine_vs_llama_server_min": float(agree.min()),
                    "cosine_vs_llama_server_mean": float(agree.mean())})
    return out


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
        # Chat turns in Qwen's format through /v1/completions (the chat endpoint holds back
        # whitespace, and a random-weight model can emit nothing else for minutes), each of
        # TURN_TOKENS tokens, one after another: the streams' contexts stay as long on average
        # while the batch runs as before it. One endless turn instead grew every context by
        # thousands of tokens over the run, and decode slows as its context grows (4 streams
        # alone fell to 0.47x their first rate within 2 minutes): "during" was slower than
        # "solo" without any batch. logprobs only to count tokens per chunk.
        body = {"model": self.model, "stream": True, "max_tokens": TURN_TOKENS,
                "logit_bias": NO_END, "logprobs": 1,
                "prompt": f"<|im_start|>user\nTell story number {i}.<|im_end|>\n"
                          "<|im_start|>assistant\n<think>\n\n</think>\n\n"}
        try:
            with httpx.Client(timeout=1200) as c:
                while not self._stop.is_set():
                    with c.stream("POST", self.url + "/v1/completions", json=body) as r:
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
        embed_seconds, _ = embed_request(url, embed_id, texts)
        end = time.perf_counter()
        during = streams.rate(begin, end)
        time.sleep(solo_s)  # alone again: did the solo rate drift meanwhile?
        solo_after = streams.rate(end, time.perf_counter())
    finally:
        streams.stop()
    return {"chat_4_streams_solo_tok_s": solo, "chat_4_streams_solo_after_tok_s": solo_after,
            "chat_4_streams_during_embedding_tok_s": during,
            "embedding_batch_during_chat_s": embed_seconds,
            "chat_streams_finished": all(streams.finished), "chat_errors": streams.errors,
            "chat_during_embedding_vs_solo": during / ((solo + solo_after) / 2),
            "chat_during_embedding_vs_solo_before": during / solo}


def smaps_rollup_mib(pid: int) -> dict[str, float]:
    """The process's resident set split as the kernel counts it: anonymous (llama.cpp's
    buffers, Python's heap) and file-backed (the mapped GGUF weights)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Anonymous"):
                fields[name] = int(rest.split()[0]) / 1024
    return {"rss": fields["Rss"], "anonymous": fields["Anonymous"],
            "file": fields["Rss"] - fields["Anonymous"]}


def resident_memory(url: str, proc: psutil.Process, rss_before: int, chat_id: str,
                    embed_id: str) -> dict[str, Any]:
    """The daemon's RSS growth against the planner's RAM, measured at the models' peak: the
    planner counts what a model needs at its largest decode, and llama.cpp touches its pages
    only as a decode uses them (a malloc'd buffer costs no RAM until written). So first one
    embedding input of a full batch (its decode writes every token's output and the whole
    cache; short inputs decode a few hundred tokens at a time on the CPU and never get there)
    and one chat prompt longer than a micro-batch (the whole compute buffer); a shorter run
    would read low and pass a planner that undercounts."""
    longest = [LONG_INPUT_TOKEN] * (BATCH_TOKENS - 16)  # room for what the model adds
    HTTP.post(url + "/v1/embeddings", json={"model": embed_id, "input": [longest]}
              ).raise_for_status()
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(UBATCH + 100))
    HTTP.post(url + "/v1/completions", json={"model": chat_id, "prompt": prompt,
                                             "max_tokens": 1}).raise_for_status()
    status = HTTP.get(url + "/api/status").json()
    planned = sum(m["memory"]["planned_ram"] for m in status["models"])
    rss = proc.memory_info().rss - rss_before
    return {"loads": {m["id"]: m["loads"] for m in status["models"]},
            "memory_per_model": {m["id"]: m["memory"] for m in status["models"]},
            "rss_at_start_mib": rss_before / 2**20,
            "rss_breakdown_mib": smaps_rollup_mib(proc.pid),
            "resident_rss_mib": rss / 2**20, "planned_ram_mib": planned / 2**20,
            "rss_over_planned": rss / planned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embed", type=Path)
    parser.add_argument("chat", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--per-request-inputs", type=int, default=64,
                        help="how many of the inputs to send one request each")
    parser.add_argument("--solo-s", type=float, default=30.0,
                        help="seconds the 4 chat streams run alone before the embedding batch")
    parser.add_argument("--cpp-server", type=Path, help="llama-server (build_llama_server.sh)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="all-inputs requests to each server, alternating (medians)")
    parser.add_argument("--gpu", action="store_true", help="offload both models to the GPU")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/...)")
    parser.add_argument("--memory-only", action="store_true",
                        help="only (c): load both models, drive them to their peak, compare")
    args = parser.parse_args()
    if args.memory_only:
        memory_only(args)
        return
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

    with resident_daemon(args) as (daemon, proc, rss_before):
        embed_id, chat_id = args.embed.stem.lower(), args.chat.stem.lower()
        embed_request(daemon.url, embed_id, texts[:4])  # load and warm
        theirs = LlamaServer(args.cpp_server, args.embed, args.threads) \
            if args.cpp_server else None
        try:
            if theirs is not None:
                out["llama_server_args"] = theirs.command[3:]
                embed_request(theirs.url, embed_id, texts[:4])  # warm
            out.update(alternate((daemon.url, embed_id),
                                 (theirs.url, embed_id) if theirs else None, texts,
                                 args.rounds))
        finally:
            if theirs is not None:
                theirs.stop()
        started = time.perf_counter()
        for text in texts[:args.per_request_inputs]:
            embed_request(daemon.url, embed_id, [text])
        out["daemon_per_request_inputs_per_s"] = args.per_request_inputs / (
            time.perf_counter() - started)
        out.update(chat_and_embeddings(daemon.url, chat_id, embed_id, texts, args.solo_s))
        out.update(resident_memory(daemon.url, proc, rss_before, chat_id, embed_id))
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
    if "one_request_vs_llama_server" in out:
        targets["one_request_vs_llama_server >= 1.0"] = out["one_request_vs_llama_server"] >= 1.0
        targets["same vectors as llama-server (cosine >= 0.999)"] = \
            out["cosine_vs_llama_server_min"] >= 0.999
    out["targets"] = targets
    write_results(out, args)


def write_results(out: dict[str, Any], args: argparse.Namespace, suffix: str = "") -> None:
    """Printed, and written to --out or bench/results/embed_throughput-<embed><suffix>.json."""
    text = json.dumps(out, indent=2)
    print(text)
    results = args.out or (REPO / "bench" / "results"
                           / f"embed_throughput-{args.embed.stem.lower()}{suffix}.json")
    results.write_text(text + "\n")


@contextlib.contextmanager
def resident_daemon(args: argparse.Namespace) -> Iterator[tuple[Daemon, psutil.Process, int]]:
    """Our daemon serving both models from a folder of links (neither loaded yet): the daemon,
    its process and its RSS before any load."""
    folder = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    try:
        for f in (args.embed, args.chat):
            (folder / f.name).symlink_to(f.resolve())
        daemon = Daemon(folder, args.threads, parallel=CHAT_STREAMS, context=4096,
                        gpu="auto" if args.gpu else "none")
        try:
            proc = psutil.Process(daemon.process.pid)
            yield daemon, proc, proc.memory_info().rss
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def memory_only(args: argparse.Namespace) -> None:
    """(c) alone, written to embed_throughput-<embed>-memory.json (RSS does not depend on load,
    so this may run beside other work)."""
    with resident_daemon(args) as (daemon, proc, rss_before):
        out = resident_memory(daemon.url, proc, rss_before, args.chat.stem.lower(),
                              args.embed.stem.lower())
    out["targets"] = {"each model loaded once": set(out["loads"].values()) == {1},
                      "rss within 10 % of planned": abs(out["rss_over_planned"] - 1) <= 0.10}
    write_results(out, args, "-memory")


if __name__ == "__main__":
    main()
