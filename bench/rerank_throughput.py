"""Reranker throughput: one /v1/rerank request with many documents against one request per
document, and against llama.cpp's llama-server `--reranking` on the same file, in one run.

    python bench/rerank_throughput.py RERANK.gguf CHAT.gguf [--threads 2] [--documents 64]
        [--cpp-server $(bench/build_llama_server.sh)]

CHAT.gguf only makes the daemon healthy (the benchmark never chats). Documents are ~64 tokens;
every pair's prompt is the reranker's template (~110 tokens a pair). Also reports whether our
ordering equals llama-server's and the largest score difference (same file, same prompt).
Targets: one request >= 3x one request per document; >= 1.0x llama-server (same threads).
Prints one JSON object and writes bench/results/rerank_throughput-<model>.json.
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
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.embed_throughput import inputs  # noqa: E402
from bench.serve_throughput import Daemon, free_port, wait_healthy  # noqa: E402

HTTP = httpx.Client(timeout=1200)
QUERY = "Which text talks about a copper window in the mountain garden?"


def rerank(url: str, model: str, documents: list[str]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    r = HTTP.post(url + "/v1/rerank", json={"model": model, "query": QUERY,
                                            "documents": documents})
    r.raise_for_status()
    body = r.json()
    assert len(body["results"]) == len(documents)
    return time.perf_counter() - started, body


def scores(body: dict[str, Any]) -> list[float]:
    return [x["relevance_score"] for x in sorted(body["results"], key=lambda x: x["index"])]


def cpp_server(binary: Path, model: Path, documents: list[str], threads: int) -> dict[str, Any]:
    """llama-server --reranking on the same file and threads: one request with every document
    (it spreads them over its slots)."""
    port = free_port()
    slots = 16
    args = [str(binary), "-m", str(model), "--reranking", "--host", "127.0.0.1",
            "--port", str(port), "-t", str(threads), "-tb", str(threads),
            "-c", str(slots * 512), "-np", str(slots), "-b", "4096", "-ub", "512", "-ngl", "0",
            "--no-webui"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health")
        url = f"http://127.0.0.1:{port}"
        rerank(url, model.stem, documents[:2])  # warm
        seconds, body = rerank(url, model.stem, documents)
        return {"documents_per_s": len(documents) / seconds, "scores": scores(body),
                "args": args[3:]}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rerank", type=Path)
    parser.add_argument("chat", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--cpp-server", type=Path, help="llama-server (build_llama_server.sh)")
    args = parser.parse_args()
    documents = inputs(args.documents)
    out: dict[str, Any] = {"rerank_model": args.rerank.name, "threads": args.threads,
                           "documents": args.documents, "cpu_count": os.cpu_count(),
                           "load_average_start": os.getloadavg()}
    folder = Path(tempfile.mkdtemp(prefix="rerank-bench-"))
    try:
        for f in (args.rerank, args.chat):
            (folder / f.name).symlink_to(f.resolve())
        model = args.rerank.stem.lower()
        daemon = Daemon(folder, args.threads, parallel=1, context=4096)
        try:
            rerank(daemon.url, model, documents[:2])  # load and warm
            seconds, body = rerank(daemon.url, model, documents)
            ours = scores(body)
            out["daemon_one_request_documents_per_s"] = args.documents / seconds
            out["prompt_tokens"] = body["usage"]["prompt_tokens"]
            started = time.perf_counter()
            for document in documents:
                rerank(daemon.url, model, [document])
            out["daemon_per_request_documents_per_s"] = args.documents / (
                time.perf_counter() - started)
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    one = out["daemon_one_request_documents_per_s"]
    out["one_request_vs_per_request"] = one / out["daemon_per_request_documents_per_s"]
    targets = {"one_request_vs_per_request >= 3": out["one_request_vs_per_request"] >= 3}
    if args.cpp_server:
        cpp = cpp_server(args.cpp_server, args.rerank, documents, args.threads)
        theirs = cpp.pop("scores")
        out["cpp_server"] = cpp
        out["one_request_vs_cpp_server"] = one / cpp["documents_per_s"]
        out["max_score_difference_vs_cpp_server"] = max(abs(a - b) for a, b in
                                                        zip(ours, theirs, strict=True))
        rank = sorted(range(len(ours)), key=lambda i: -ours[i])
        out["same_top_10_as_cpp_server"] = rank[:10] == sorted(
            range(len(theirs)), key=lambda i: -theirs[i])[:10]
        targets["one_request_vs_cpp_server >= 1.0"] = out["one_request_vs_cpp_server"] >= 1.0
    out["load_average_end"] = os.getloadavg()
    out["targets"] = targets
    text = json.dumps(out, indent=2)
    print(text)
    results = REPO / "bench" / "results" / f"rerank_throughput-{args.rerank.stem.lower()}.json"
    results.write_text(text + "\n")


if __name__ == "__main__":
    main()
