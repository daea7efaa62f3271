"""CPU turns on against off, in the same run: 4 chat streams and one embedding batch on the CPU.

    python bench/cpu_turns.py EMBED.gguf CHAT.gguf [--threads 2] [--inputs 32] [--rounds 1]

Each mode runs in a fresh child process, the models wired as appliance.residency.loader wires
them (one ComputeTurns, chat weight 2, the embedding worker's BatchPace; or no turns at all),
in the order the daemon meets them in bench/embed_throughput.py: the embedding model works
alone first (its baseline), goes quiet, chat streams start and run alone (their baseline), then
the batch runs beside them. Per mode: chat aggregate during the batch / solo (target >= 0.5),
the batch's time beside chat / alone (target about 3: chat weighs 2, so the batch gets a third),
and / alone in decodes of one input each (the grain the turns cut it to beside chat),
the longest gap between two chat tokens during the batch, and the batch's turns. No HTTP: this
measures the sharing itself; embed_throughput.py measures it through the daemon.
Prints one JSON object and writes bench/results/cpu_turns-<embed>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHAT_STREAMS = 4
CHAT_CONTEXT = 4096  # per stream, as the daemon's auto context gives the 0.6B on a workstation
ENGINE_NICE = 5  # Settings.engine_nice's default: both engine threads run at it
NO_END = {t: -100.0 for t in range(151643, 151669)}  # Qwen3's end and control tokens
WORDS = ("alpha beta gamma delta river mountain window garden copper silver music table "
         "orange paper stone cloud").split()
DEADLINE_S = 3600


def texts(n: int, words: int = 60) -> list[str]:
    """n distinct texts of ~64 tokens each (as embed_throughput.py makes them)."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) + f" #{i}"
            for i in range(n)]


def wait_for(predicate: Any, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def one_mode(embed_path: Path, chat_path: Path, turns_on: bool, threads: int, n_inputs: int,
             solo_s: float) -> dict[str, Any]:
    """The figures of one mode, in this process."""
    from appliance.engine.compute_turns import (
        BATCH_WEIGHT,
        INTERACTIVE_WEIGHT,
        NO_TURNS,
        BatchPace,
        ComputeTurns,
    )
    from appliance.engine.embedding import (
        EmbeddingJob,
        EmbeddingOptions,
        EmbeddingRuntime,
        EmbeddingWorker,
    )
    from appliance.engine.runtime import LlamaRuntime, RuntimeOptions
    from appliance.engine.sampling import SamplingParams
    from appliance.engine.scheduler import DoneEvent, ErrorEvent, GenerationRequest, Scheduler
    from appliance.residency.loader import EMBEDDING_SEQUENCES, EMBEDDING_UBATCH

    turns = ComputeTurns()
    embed_runtime = EmbeddingRuntime(embed_path, EmbeddingOptions(
        n_gpu_layers=0, n_batch=4096, n_ubatch=EMBEDDING_UBATCH, n_seq=EMBEDDING_SEQUENCES,
        n_threads=threads))
    pace = BatchPace(turns.party("embedding", BATCH_WEIGHT) if turns_on else NO_TURNS)
    worker = EmbeddingWorker(embed_runtime, 4, nice=ENGINE_NICE, pace=pace)
    ids = [embed_runtime.tokenize(t) for t in texts(n_inputs)]

    def embed(inputs: list[list[int]]) -> float:
        finished = threading.Event()
        errors: list[BaseException] = []

        def done(_rows: object, error: BaseException | None) -> None:
            if error is not None:
                errors.append(error)
            finished.set()

        started = time.perf_counter()
        worker.submit(EmbeddingJob(inputs, done))
        wait_for(finished.is_set, "the embedding batch")
        if errors:
            raise SystemExit(f"the embedding batch failed: {errors[0]!r}")
        return time.perf_counter() - started

    embed(ids[:4])  # warm
    alone_s = embed(ids)  # full-size decodes, as with chat quiet
    # One input per decode, as the turns cut it beside chat: the same work at the same grain,
    # so beside chat / this is 1 / the CPU share the batch got (3 at weights 2:1).
    one_per_decode_s = sum(embed([one]) for one in ids)
    # The chat model loads while the embedding model is quiet, as in the daemon.
    chat_party = turns.party("chat", INTERACTIVE_WEIGHT) if turns_on else NO_TURNS
    chat_runtime = LlamaRuntime(chat_path, RuntimeOptions(
        n_gpu_layers=0, context_per_slot=CHAT_CONTEXT, n_seq=CHAT_STREAMS, n_threads=threads))
    scheduler = Scheduler(chat_runtime, CHAT_STREAMS, 4, nice=ENGINE_NICE, turns=chat_party)
    token_times: list[float] = []
    ended: list[object] = []

    def emit(event: object) -> None:  # the engine thread
        if isinstance(event, DoneEvent | ErrorEvent):
            ended.append(event)
        else:
            token_times.append(time.perf_counter())

    prompt = chat_runtime.tokenize("<|im_start|>user\nTell a long story.<|im_end|>\n"
                                   "<|im_start|>assistant\n", add_special=False)
    requests = [GenerationRequest(prompt, SamplingParams(seed=i, logit_bias=NO_END), 10**6, [],
                                  emit) for i in range(CHAT_STREAMS)]
    for request in requests:
        scheduler.submit(request)
    wait_for(lambda: len(token_times) >= 2 * CHAT_STREAMS, "the chat streams to flow")
    solo_start = time.perf_counter()
    wait_for(lambda: time.perf_counter() - solo_start >= solo_s, "the solo window")
    solo_end = time.perf_counter()
    batch_turns_before = pace.party.turns_taken if turns_on else 0
    beside_s = embed(ids)
    batch_end = time.perf_counter()
    batch_start = batch_end - beside_s
    for request in requests:
        scheduler.cancel(request)
    wait_for(lambda: len(ended) == CHAT_STREAMS, "the chat streams to end")
    scheduler.stop()
    worker.stop("done")

    def rate(start: float, end: float) -> float:
        return sum(start <= t <= end for t in token_times) / (end - start)

    during = [t for t in token_times if batch_start <= t <= batch_end]
    gaps = [b - a for a, b in itertools.pairwise(during)]  # any stream's token to the next
    solo, beside = rate(solo_start, solo_end), rate(batch_start, batch_end)
    return {"cpu_turns": turns_on, "inputs": n_inputs, "tokens": sum(len(i) for i in ids),
            "embed_alone_s": alone_s, "embed_beside_chat_s": beside_s,
            "embed_beside_vs_alone": beside_s / alone_s,
            "embed_alone_one_input_per_decode_s": one_per_decode_s,
            "embed_beside_vs_alone_one_input_per_decode": beside_s / one_per_decode_s,
            "chat_solo_tok_s": solo, "chat_during_embedding_tok_s": beside,
            "chat_during_vs_solo": beside / solo,
            "longest_chat_gap_during_s": max(gaps, default=None),
            "batch_turns": (pace.party.turns_taken - batch_turns_before) if turns_on else None,
            "chat_ended_by_error": sum(isinstance(e, ErrorEvent) for e in ended)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embed", type=Path)
    parser.add_argument("chat", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--solo-s", type=float, default=10.0,
                        help="seconds the chat streams run alone before the batch")
    parser.add_argument("--rounds", type=int, default=1, help="off/on pairs, alternating")
    parser.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="results file (default bench/results/...)")
    args = parser.parse_args()
    if args.one:  # a child: one mode, its figures as the last line
        print(json.dumps(one_mode(args.embed, args.chat, args.one == "on", args.threads,
                                  args.inputs, args.solo_s)))
        return
    out: dict[str, Any] = {"embed_model": args.embed.name, "chat_model": args.chat.name,
                           "threads": args.threads, "inputs": args.inputs,
                           "chat_streams": CHAT_STREAMS, "cpu_count": os.cpu_count(),
                           "load_average_start": os.getloadavg(), "runs": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            child = subprocess.run(
                [sys.executable, __file__, str(args.embed), str(args.chat), "--one", mode,
                 "--threads", str(args.threads), "--inputs", str(args.inputs),
                 "--solo-s", str(args.solo_s)],
                cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S)
            if child.returncode != 0:
                raise SystemExit(f"the {mode} run failed:\n{child.stderr[-3000:]}")
            out["runs"].append(json.loads(child.stdout.strip().splitlines()[-1]))
    out["load_average_end"] = os.getloadavg()
    for mode, on in (("off", False), ("on", True)):
        runs = [r for r in out["runs"] if r["cpu_turns"] is on]
        out[f"chat_during_vs_solo_{mode}"] = statistics.median(
            r["chat_during_vs_solo"] for r in runs)
        out[f"embed_beside_vs_alone_{mode}"] = statistics.median(
            r["embed_beside_vs_alone"] for r in runs)
    out["targets"] = {"turns on: chat_during_vs_solo >= 0.5": out["chat_during_vs_solo_on"] >= 0.5,
                      "turns on: embed_beside_vs_alone <= 3.3":
                          out["embed_beside_vs_alone_on"] <= 3.3}
    text = json.dumps(out, indent=2)
    print(text)
    results = args.out or (REPO / "bench" / "results" / f"cpu_turns-{args.embed.stem.lower()}.json")
    results.write_text(text + "\n")


if __name__ == "__main__":
    main()
