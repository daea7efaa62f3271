"""Quantized KV caches on real llama.cpp: the runtime's context parameters, and a daemon that
sizes its context itself and says what it chose."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import openai
import pytest

from appliance.context_sizing import CPU_MAX_CONTEXT
from appliance.engine.runtime import LlamaRuntime, RuntimeOptions
from appliance.errors import LoadFailed
from appliance.gguf_info import read_gguf_info
from appliance.offload import kv_bytes_per_layer
from tests.appliance.conftest import run_daemon
from tests.conftest import MODEL_A, run_cli


def runtime(path: Path, kv_type: str, flash_attn: bool = True) -> LlamaRuntime:
    return LlamaRuntime(path, RuntimeOptions(n_gpu_layers=0, context_per_slot=512, n_seq=2,
                                             n_threads=2, flash_attn=flash_attn,
                                             kv_cache_type=kv_type))


def greedy(rt: LlamaRuntime, prompt: list[int], n: int) -> tuple[list[int], int]:
    """n greedy tokens after `prompt`, and the bytes llama.cpp's saved state of the sequence
    grew by while they went into the cache."""
    rt.clear_batch()
    for i, token in enumerate(prompt):
        rt.add_to_batch(token, i, 0, i == len(prompt) - 1)
    assert rt.decode() == 0
    before = llama_cpp.llama_state_seq_get_size(rt.ctx, 0)
    out, index = [], rt.batch.n_tokens - 1
    for i in range(n):
        out.append(int(rt.logits(index).argmax()))
        rt.clear_batch()
        index = rt.add_to_batch(out[-1], len(prompt) + i, 0, True)
        assert rt.decode() == 0
    return out, llama_cpp.llama_state_seq_get_size(rt.ctx, 0) - before


def test_quantized_caches_decode_in_their_real_size(tiny_gguf: Path) -> None:
    info = read_gguf_info(tiny_gguf)
    grew, outputs = {}, {}
    for kv_type in ("f16", "q8_0", "q4_0"):
        rt = runtime(tiny_gguf, kv_type)
        try:
            prompt = rt.tokenize("The KV cache holds keys and values", add_special=False)
            outputs[kv_type], grew[kv_type] = greedy(rt, prompt, 8)
        finally:
            rt.close()
    assert all(len(o) == 8 for o in outputs.values())
    # Per cell the state holds the K and V rows plus the same position and sequence ids for
    # every type: the differences between types are the rows alone, as the planner counts them.
    rows = {t: kv_bytes_per_layer(info, 8, t) * info.n_layers for t in grew}
    assert grew["f16"] - grew["q8_0"] == rows["f16"] - rows["q8_0"]
    assert grew["q8_0"] - grew["q4_0"] == rows["q8_0"] - rows["q4_0"]
    assert rows["q8_0"] <= 0.55 * rows["f16"]


def test_a_quantized_cache_without_flash_attention_is_refused(tiny_gguf: Path) -> None:
    with pytest.raises(LoadFailed, match="kv_cache_type q8_0 needs flash attention"):
        runtime(tiny_gguf, "q8_0", flash_attn=False)


def test_daemon_sizes_context_and_shows_it(models_dir: Path, tmp_path: Path) -> None:
    trained = read_gguf_info(models_dir / f"{MODEL_A}.gguf").context_length
    with run_daemon(models_dir, tmp_path, default_model=MODEL_A, context_length="auto",
                    kv_cache_type="q8_0", parallel="2") as d:
        with openai.OpenAI(base_url=d.base_url, api_key="unused", max_retries=0) as client:
            reply = client.completions.create(model=MODEL_A, prompt="Hello", max_tokens=4)
        assert reply.usage.completion_tokens == 4
        with d.http() as http:
            model = http.get("/api/status").json()["model"]
        # CPU only: auto is capped, and the tiny model's cache is far under a quarter of RAM
        assert model["context_per_slot"] == min(trained, CPU_MAX_CONTEXT)
        assert model["kv_cache_type"] == "q8_0" and "auto" in model["context_reason"]
        assert model["offload"]["kv_cache_type"] == "q8_0"
        status = run_cli("status", env={"APPLIANCE_PORT": d.url.rsplit(":", 1)[1],
                                        "APPLIANCE_CONFIG": str(tmp_path / "absent.toml")})
        assert f"2 slots × {model['context_per_slot']} tokens of context, q8_0 KV" in status.stdout
