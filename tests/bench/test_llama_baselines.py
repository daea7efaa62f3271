"""The llama.cpp baselines our benches run beside us: llama-bench at a KV depth, and
llama-server with and without a draft model. Real binaries on the tiny models; skipped where
bench/build_llama_server.sh has not built them (it takes a quarter of an hour)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bench.llama_bench import KvConfig, decode_rate
from bench.speculative import cpp_server


def built(name: str) -> Path:
    """A binary that bench/build_llama_server.sh builds, or skip."""
    found = sorted(Path.home().glob(f".cache/qwen-appliance/llama-server-*/src/vendor/llama.cpp/"
                                    f"build/bin/{name}"))
    if not found or not os.access(found[-1], os.X_OK):
        pytest.skip(f"{name} is not built here (bench/build_llama_server.sh builds it)")
    return found[-1]


@pytest.mark.parametrize("config", [KvConfig("f16", "f16", True), KvConfig("f16", "f16", False),
                                    KvConfig("q8_0", "q8_0", True),
                                    KvConfig("q8_0", "f16", True)],
                         ids=["f16", "f16-no-fa", "q8_0", "q8_0-k"])
def test_llama_bench_decodes_at_depth(tiny_gguf: Path, config: KvConfig) -> None:
    rate = decode_rate(built("llama-bench"), tiny_gguf, config, depth=64, steps=4, threads=1,
                       timeout=300)
    assert rate > 0


def test_llama_bench_failure_is_an_error_not_a_rate(tiny_gguf: Path) -> None:
    # A quantized V cache needs flash attention: llama.cpp refuses it, and so must we.
    with pytest.raises(RuntimeError, match="llama-bench failed"):
        decode_rate(built("llama-bench"), tiny_gguf, KvConfig("q8_0", "q8_0", False), depth=64,
                    steps=4, threads=1, timeout=300)


def test_llama_server_drafts_with_this_llama_cpp_flags(draft_pair: tuple[Path, Path]) -> None:
    target, draft = draft_pair
    server = built("llama-server")
    plain = cpp_server(server, target, None, threads=1, tokens=24, draft_max=4, p_min=0.0)
    drafted = cpp_server(server, target, draft, threads=1, tokens=24, draft_max=4, p_min=0.0)
    assert plain["proposed"] == 0 and plain["tokens_per_s"] > 0
    # The draft really ran (a flag it ignored would leave these at zero) and the same-weights
    # draft agrees with its target on some greedy tokens.
    assert drafted["proposed"] > 0
    assert 0 < drafted["accepted"] <= drafted["proposed"]


def test_llama_server_embeds_what_our_runtime_embeds(tiny_embedding_gguf: Path) -> None:
    """The embedding bench's baseline: llama-server started with the bench's flags (this build
    must accept them all) returns, for the same texts, the vectors our EmbeddingRuntime does:
    the model's pooling, the same tokens, L2-normalized, one request with every input."""
    from appliance.engine.embedding import EmbeddingOptions, EmbeddingRuntime
    from bench.embed_throughput import (
        BATCH_TOKENS,
        SEQUENCES,
        UBATCH,
        LlamaServer,
        cosines,
        embed_request,
        inputs,
    )

    texts = inputs(12)
    server = LlamaServer(built("llama-server"), tiny_embedding_gguf, threads=1)
    try:
        _, theirs = embed_request(server.url, "m", texts)
    finally:
        server.stop()
    runtime = EmbeddingRuntime(tiny_embedding_gguf,
                               EmbeddingOptions(0, BATCH_TOKENS, UBATCH, SEQUENCES, 1))
    try:
        ours = runtime.embed([runtime.tokenize(t) for t in texts])
    finally:
        runtime.close()
    assert theirs.shape == ours.shape
    assert cosines(ours, theirs).min() > 0.999
    # Each of our vectors is closest to llama-server's vector of the same text, not another's:
    # agreement above is not a model that maps every text to one direction.
    similarity = ours @ (theirs / np.linalg.norm(theirs, axis=1, keepdims=True)).T
    assert list(similarity.argmax(axis=1)) == list(range(len(texts)))
