"""A chat model and an embedding model on the CPU in one process, sharing it through one
ComputeTurns as the loader wires them: real llama.cpp on the tiny chat and embedding GGUFs.

While chat streams run, an embedding job of many inputs decodes in smaller pieces, both finish,
and its vectors are the ones it gets alone; with chat idle it goes back to full-size decodes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.engine.compute_turns import (
    BATCH_WEIGHT,
    INTERACTIVE_WEIGHT,
    BatchPace,
    ComputeTurns,
)
from appliance.engine.embedding import (
    CPU_DECODE_TOKENS,
    EmbeddingJob,
    EmbeddingOptions,
    EmbeddingRuntime,
    EmbeddingWorker,
)
from appliance.engine.runtime import LlamaRuntime, RuntimeOptions
from appliance.engine.sampling import SamplingParams
from appliance.engine.scheduler import DoneEvent, ErrorEvent, Event, GenerationRequest, Scheduler

# Smaller than the daemon's 4096 and 64: a full-size decode still packs many inputs, and the
# test stays short on a busy machine.
N_BATCH, N_SEQ = 1024, 16
STREAMS = 2
NO_END = {t: -100.0 for t in range(151643, 151669)}  # Qwen3's end and control tokens
DEADLINE_S = 300


class Models:
    def __init__(self, chat_path: Path, embed_path: Path) -> None:
        self.turns = ComputeTurns()
        self.chat_party = self.turns.party("chat", INTERACTIVE_WEIGHT)
        self.chat_runtime = LlamaRuntime(chat_path, RuntimeOptions(
            n_gpu_layers=0, context_per_slot=8192, n_seq=STREAMS, n_threads=2))
        self.scheduler = Scheduler(self.chat_runtime, STREAMS, 4, turns=self.chat_party)
        self.embed_runtime = EmbeddingRuntime(embed_path, EmbeddingOptions(
            n_gpu_layers=0, n_batch=N_BATCH, n_ubatch=512, n_seq=N_SEQ, n_threads=2))
        self.pace = BatchPace(self.turns.party("embedding", BATCH_WEIGHT))
        self.worker = EmbeddingWorker(self.embed_runtime, 4, pace=self.pace)

    def close(self) -> None:
        self.scheduler.stop()
        self.worker.stop("done")
        self.chat_runtime.close()
        self.embed_runtime.close()


@pytest.fixture(scope="module")
def models(tiny_gguf: Path, tiny_embedding_gguf: Path) -> Iterator[Models]:
    m = Models(tiny_gguf, tiny_embedding_gguf)
    yield m
    m.close()


def texts(n: int) -> list[str]:
    words = "alpha beta gamma delta river mountain window garden copper silver".split()
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(50)) + f" #{i}"
            for i in range(n)]


def embed(models: Models, inputs: list[list[int]]) -> np.ndarray:
    """Through the worker (so through its pace), waiting with a deadline."""
    result: dict[str, object] = {}
    done = threading.Event()

    def finished(rows: np.ndarray | None, error: BaseException | None) -> None:
        result["rows"], result["error"] = rows, error
        done.set()

    models.worker.submit(EmbeddingJob(inputs, finished))
    assert done.wait(DEADLINE_S), "the embedding job never finished"
    assert result["error"] is None, result["error"]
    rows = result["rows"]
    assert isinstance(rows, np.ndarray)
    return rows


def full_size_decodes(inputs: list[list[int]]) -> list[int]:
    """Tokens per decode when nothing else wants the CPU: up to n_seq inputs and, on the CPU,
    CPU_DECODE_TOKENS tokens (not n_batch: embedding.py says why)."""
    sizes, tokens, count = [], 0, 0
    for ids in inputs:
        if count == N_SEQ or tokens + len(ids) > CPU_DECODE_TOKENS:
            sizes.append(tokens)
            tokens, count = 0, 0
        tokens += len(ids)
        count += 1
    return [*sizes, tokens]


class Streams:
    """Chat streams that run until cancelled; counts their tokens and how they ended."""

    def __init__(self, models: Models, n: int) -> None:
        prompt = models.chat_runtime.tokenize(
            "<|im_start|>user\nTell a long story.<|im_end|>\n<|im_start|>assistant\n",
            add_special=False)
        self.tokens = 0
        self.ended: list[Event] = []
        self.requests = [GenerationRequest(prompt, SamplingParams(seed=i, logit_bias=NO_END),
                                           100000, [], self._emit) for i in range(n)]
        for request in self.requests:
            models.scheduler.submit(request)

    def _emit(self, event: Event) -> None:  # engine thread
        if isinstance(event, DoneEvent | ErrorEvent):
            self.ended.append(event)
        else:
            self.tokens += 1

    def stop(self, models: Models) -> None:
        for request in self.requests:
            models.scheduler.cancel(request)
        wait_for(lambda: len(self.ended) == len(self.requests), "the streams to end")


def wait_for(predicate: object, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_embedding_decodes_smaller_while_chat_streams_and_both_finish(models: Models) -> None:
    inputs = [models.embed_runtime.tokenize(t) for t in texts(48)]
    full = full_size_decodes(inputs)
    assert len(full) >= 3 and max(full) > 2 * len(inputs[0])  # several inputs per decode
    assert models.embed_runtime.decode_tokens == CPU_DECODE_TOKENS < N_BATCH
    alone = embed(models, inputs)  # chat idle: the reference vectors
    assert list(models.pace.decoded) == full

    streams = Streams(models, STREAMS)
    wait_for(lambda: streams.tokens >= 10, "the chat streams to flow")
    models.pace.decoded.clear()
    before = streams.tokens
    during = embed(models, inputs)
    assert streams.tokens > before  # chat went on while the job ran
    assert not streams.ended  # and was still streaming when it finished
    streams.stop(models)

    sizes = list(models.pace.decoded)
    assert sum(sizes) == sum(len(i) for i in inputs)  # every input, once
    assert len(sizes) > len(full) and max(sizes) < max(full), sizes  # more, smaller decodes
    # Taking turns changes nothing in a vector: the same groups decoded with chat idle give the
    # same vectors. Grouped differently, llama.cpp's batched kernels round differently: the
    # vectors agree to a cosine of 1 within float error.
    groups, start = [], 0
    for size in sizes:
        end = start
        while sum(len(i) for i in inputs[start:end]) < size:
            end += 1
        groups.append(inputs[start:end])
        start = end
    wait_for(lambda: not models.pace.party.contended(), "the chat to count as quiet")
    same_groups = np.concatenate([embed(models, group) for group in groups])
    assert np.allclose(during, same_groups, atol=1e-6), np.abs(during - same_groups).max()
    cosine = np.sum(during * alone, axis=1)
    assert cosine.min() > 0.9999, cosine.min()
    assert all(isinstance(e, DoneEvent) and e.finish_reason == "cancelled"
               for e in streams.ended)  # ended by us, never by an error


def test_with_chat_idle_again_full_size_decodes_return(models: Models) -> None:
    streams = Streams(models, 1)
    wait_for(lambda: streams.tokens >= 5, "the chat stream to flow")
    streams.stop(models)
    wait_for(lambda: not models.pace.party.contended(), "the chat to count as quiet")
    inputs = [models.embed_runtime.tokenize(t) for t in texts(40)]
    models.pace.decoded.clear()
    embed(models, inputs)
    assert list(models.pace.decoded) == full_size_decodes(inputs)
