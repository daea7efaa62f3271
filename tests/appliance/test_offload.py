"""Offload planning against a fake GPU and the real tensor sizes of a converted GGUF."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import gguf
import pytest

from appliance.config import Settings
from appliance.gguf_info import read_gguf_info
from appliance.gpu import GpuMemory
from appliance.offload import fewer_layers, plan_offload
from appliance.registry import Registry
from appliance.residency.loader import ModelLoader

T = TypeVar("T")
GIB = 2**30
MIB = 2**20


class FakeGpu:
    """A probe reporting one card with fixed figures."""

    name = "fake"

    def __init__(self, total: int, free: int) -> None:
        self.total, self.free = total, free

    def devices(self) -> list[GpuMemory]:
        return [GpuMemory(0, "Fake RTX", self.total, self.total - self.free, self.free, 0)]

    def close(self) -> None:
        pass


def hand_sizes(path: Path) -> tuple[list[int], int, int]:
    """Per-layer bytes, output head bytes and the KV bytes per token per layer, by hand from
    gguf's own reader (a different parser from the planner's)."""
    reader = gguf.GGUFReader(path)
    layers = [0, 0]
    head = 0
    for t in reader.tensors:
        if t.name.startswith("blk."):
            layers[int(t.name.split(".")[1])] += int(t.n_bytes)
        elif t.name in ("token_embd.weight", "output_norm.weight"):
            head += int(t.n_bytes)  # tied: the embedding doubles as the output matrix
    kv_per_token_layer = 2 * 32 * 2 * 2  # 2 KV heads × head_dim 32 × (K+V) × f16
    return layers, head, kv_per_token_layer


@pytest.fixture(scope="module")
def tiny_info(tiny_gguf: Path):
    return read_gguf_info(tiny_gguf)


def test_sizes_match_gguf_reader(tiny_gguf: Path, tiny_info) -> None:
    layers, head, _ = hand_sizes(tiny_gguf)
    assert tiny_info.layer_bytes() == layers
    from appliance.offload import output_head_bytes

    assert output_head_bytes(tiny_info) == head


def test_whole_model_fits_a_24_gib_card_with_20_free(tiny_gguf: Path, tiny_info) -> None:
    layers, head, kv_unit = hand_sizes(tiny_gguf)
    plan = plan_offload(tiny_info, n_ctx_total=4 * 8192, free_vram=20 * GIB, device="Fake RTX",
                        margin=512 * MIB, gpu_build=True)
    assert plan.n_gpu_layers == 3  # both layers and the output head
    assert plan.weights_on_gpu == sum(layers) + head
    assert plan.kv_on_gpu == 2 * 4 * 8192 * kv_unit
    vocab, hidden, ff = 151936, 64, 128
    assert plan.compute_buffer == 512 * (vocab + 4 * hidden + 2 * ff) * 4
    assert plan.device == "Fake RTX" and plan.reason == "all layers on the GPU"
    # llama.cpp keeps the input embedding on the CPU; the tied head on the GPU is its copy.
    assert plan.weights_in_ram == tiny_info.tensor_bytes("token_embd.weight") > 0


def test_tight_card_takes_the_last_layers_only(tiny_gguf: Path, tiny_info) -> None:
    layers, head, kv_unit = hand_sizes(tiny_gguf)
    n_ctx = 4096
    kv_layer = n_ctx * kv_unit
    compute = 512 * (151936 + 4 * 64 + 2 * 128) * 4
    margin = 100 * MIB
    # Room for exactly one layer (the last) and its KV, not for two.
    free = margin + compute + layers[1] + kv_layer + 1
    plan = plan_offload(tiny_info, n_ctx_total=n_ctx, free_vram=free, device="gpu",
                        margin=margin, gpu_build=True)
    assert plan.n_gpu_layers == 1
    assert plan.weights_on_gpu == layers[1] and plan.kv_on_gpu == kv_layer
    assert plan.planned_vram <= free - margin
    # All layers but not the head: n_layers exactly.
    free = margin + compute + sum(layers) + 2 * kv_layer + head - 1
    assert plan_offload(tiny_info, n_ctx_total=n_ctx, free_vram=free, device="gpu",
                        margin=margin, gpu_build=True).n_gpu_layers == 2


@pytest.mark.parametrize(("free", "build", "expected"), [
    (0, True, "no NVIDIA GPU"), (20 * GIB, False, "built without GPU support"),
    (200 * MIB, True, "not enough free VRAM"),
])
def test_cpu_fallbacks_say_why(tiny_info, free: int, build: bool, expected: str) -> None:
    plan = plan_offload(tiny_info, n_ctx_total=8192, free_vram=free, device="gpu",
                        margin=0, gpu_build=build)
    assert plan.n_gpu_layers == 0 and plan.device == "cpu" and expected in plan.reason


def test_retry_schedule_reaches_zero() -> None:
    steps = [37]
    while steps[-1]:
        steps.append(fewer_layers(steps[-1]))
    assert steps[:4] == [37, 28, 21, 16] and steps[-1] == 0


def test_loader_plans_from_the_probe(tiny_gguf: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copy(tiny_gguf, tmp_path / "m.gguf")
    settings = Settings(models_dir=tmp_path, context_length=2048, parallel=2)
    registry = Registry(tmp_path)
    registry.scan()
    loader = ModelLoader(settings, FakeGpu(24 * GIB, 20 * GIB))
    loader._gpu_build = True  # as on a CUDA build
    plan, context = loader.plan_for(registry.resolve("m"))
    assert context == 2048 and plan.n_gpu_layers == 3 and plan.free_vram == 20 * GIB


def test_a_draft_is_planned_in_the_vram_the_target_leaves(tiny_gguf: Path,
                                                          tmp_path: Path) -> None:
    import shutil

    from appliance.config import ModelOverrides

    shutil.copy(tiny_gguf, tmp_path / "m.gguf")
    shutil.copy(tiny_gguf, tmp_path / "d.gguf")  # same vocabulary and size: a configured pair
    registry = Registry(tmp_path)
    settings = Settings(models_dir=tmp_path, context_length=2048, parallel=2,
                        models={"m": ModelOverrides(draft="d")})
    loader = ModelLoader(settings, FakeGpu(24 * GIB, 20 * GIB), catalog=registry.scan)
    loader._gpu_build = True
    alone_gpu = ModelLoader(settings.model_copy(update={"models": {}}),
                            FakeGpu(24 * GIB, 20 * GIB))
    alone_gpu._gpu_build = True
    alone, _ = alone_gpu.plan_for(registry.resolve("m"))
    plan, _ = loader.plan_for(registry.resolve("m"))
    assert plan.draft is not None and plan.draft.all_on_gpu and plan.all_on_gpu
    # The draft's weights, KV and scratch are counted: twice one model's, for the same file.
    assert plan.planned_vram == 2 * alone.planned_vram
    assert plan.n_gpu_layers == alone.n_gpu_layers  # the target gave up nothing
    # Where the target needs all the VRAM, the draft is left out rather than run from RAM.
    tight = ModelLoader(settings, FakeGpu(24 * GIB, alone.planned_vram + settings.vram_margin_mib
                                          * 2**20 + 1), catalog=registry.scan)
    tight._gpu_build = True
    plan, _ = tight.plan_for(registry.resolve("m"))
    assert plan.all_on_gpu and plan.draft is None


def test_an_embedding_plan_matches_what_llama_cpp_allocates(tiny_embedding_gguf: Path,
                                                            tmp_path: Path) -> None:
    """The loader's plan for an embedding model against llama.cpp's own logged buffer sizes
    (as bench/kv_llama.py reads them), and its output buffer against the RSS a full-size
    decode really adds: llama.cpp keeps logits for every token even in an embeddings context."""
    import shutil

    import psutil

    from appliance.engine.embedding import EmbeddingOptions, EmbeddingRuntime
    from appliance.gpu import NoGpu
    from appliance.residency.loader import EMBEDDING_SEQUENCES, EMBEDDING_UBATCH

    n_batch = 1024  # a full decode stays quick; the daemon's 4096 scales the same way
    shutil.copy(tiny_embedding_gguf, tmp_path / "e.gguf")
    settings = Settings(models_dir=tmp_path, models={"e": {"context_length": n_batch}})
    registry = Registry(tmp_path)
    registry.scan()
    plan, context = ModelLoader(settings, NoGpu()).plan_for(registry.resolve("e"))
    assert context == n_batch

    options = EmbeddingOptions(0, n_batch, EMBEDDING_UBATCH, EMBEDDING_SEQUENCES, 2)
    runtime, logged = _logged_buffers(lambda: EmbeddingRuntime(tmp_path / "e.gguf", options),
                                      rb"(model|KV|compute) buffer")
    try:
        assert set(logged) == {"model", "KV", "compute"}
        assert plan.weights_in_ram == pytest.approx(logged["model"], rel=0.02)
        assert plan.kv_in_ram == pytest.approx(logged["KV"], rel=0.01)
        assert plan.compute_in_ram == pytest.approx(logged["compute"], rel=0.10)

        process = psutil.Process()
        before = process.memory_info().rss
        # One input of n_batch tokens: the worst case the plan is for. (Short inputs decode a
        # few hundred tokens at a time on the CPU and touch only part of the output buffer.)
        runtime.embed([runtime.tokenize("word " * n_batch)[:n_batch]])
        grown = process.memory_info().rss - before
        # The decode touches the output buffer (every token's logits) and the compute buffer.
        assert plan.output_in_ram == n_batch * (151936 + 64) * 4
        assert grown >= plan.output_in_ram * 0.9, (grown / MIB, plan.output_in_ram / MIB)
        assert grown <= (plan.output_in_ram + plan.compute_in_ram) * 1.2
    finally:
        runtime.close()


def _logged_buffers(load: Callable[[], T], name: bytes = rb"(\w+) model buffer"
                    ) -> tuple[T, dict[str, float]]:
    """What `load` returns, and llama.cpp's buffer sizes it logged (bytes by the `name` pattern's
    group: by default the model buffers, by backend)."""
    import ctypes
    import re

    import llama_cpp
    import llama_cpp._logger

    lines: list[bytes] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if text and b"buffer size" in text:
            lines.append(text)

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        loaded = load()
    finally:  # back to llama-cpp-python's own logger
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
    logged: dict[str, float] = {}
    for line in lines:
        for kind, mib in re.findall(name + rb" size = +([\d.]+) MiB", line):
            logged[kind.decode()] = logged.get(kind.decode(), 0) + float(mib) * MIB
    return loaded, logged


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Qwen3 with tied embeddings, 256 wide: rows whole Q4_K blocks, and a tied head
    large enough (~20 MiB in Q4_0) that llama.cpp's MiB-rounded log shows whether it was
    repacked."""
    from converter.synthetic import Shape, build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("small-qwen3"), Shape(256, 2, 4, 2, 64, 512),
                            shards=1, seed=3)


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_0"])
def test_the_repacked_copy_is_what_llama_cpp_allocates(small_checkpoint: Path, tmp_path: Path,
                                                       quant: str) -> None:
    """llama.cpp's CPU backend keeps a second, repacked copy of some weights (its CPU_REPACK
    buffer, anonymous memory beside the mapped file): the plan counts what this build really
    allocates, on a model all on the CPU and with layers on a GPU (those are not repacked).
    Q4_K_M repacks the layers' Q4_K matrices (not the Q6_K ones); Q4_0 every layer matrix."""
    import llama_cpp

    from appliance.engine.runtime import cpu_repack_types, ensure_backend
    from appliance.offload import weights_repacked, with_ram
    from converter.pipeline import ConvertOptions, convert

    path = tmp_path / f"tiny-{quant.lower()}.gguf"
    convert(ConvertOptions(source=str(small_checkpoint), out=path, quant=quant, quiet=True))
    info = read_gguf_info(path)
    types = cpu_repack_types()
    ensure_backend()

    def load() -> None:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert model
        llama_cpp.llama_model_free(model)

    logged = _logged_buffers(load)[1].get("CPU_REPACK", 0)
    if not types:
        assert logged == 0  # a build without REPACK: nothing planned, nothing allocated
        pytest.skip("this llama.cpp build repacks nothing on this CPU")
    plan = plan_offload(info, n_ctx_total=256, free_vram=0, device="cpu", margin=0,
                        gpu_build=False, repack_types=types)
    assert logged > 0
    assert plan.repack_in_ram == pytest.approx(logged, rel=0.02, abs=0.01 * MIB)
    assert plan.planned_ram >= plan.weights_in_ram + plan.repack_in_ram
    # With every layer and the head on a GPU only the token embedding stays, never repacked.
    on_gpu = with_ram(plan_offload(info, n_ctx_total=256, free_vram=20 * GIB, device="fake",
                                   margin=0, gpu_build=True, repack_types=types),
                      info, 256, repack_types=types)
    assert on_gpu.all_on_gpu and on_gpu.repack_in_ram == 0
    assert weights_repacked(info, 1, False, types) < plan.repack_in_ram


@pytest.mark.parametrize(("system_info", "expected"), [
    ("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | OPENMP = 1 | REPACK = 1 | ",
     {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}),
    ("CPU : AVX2 = 1 | AVX512 = 1 | REPACK = 1 |", {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4", "Q2_K"}),
    ("CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | REPACK = 1 |",
     {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "Q8_0"}),
    ("CPU : AVX2 = 1 | REPACK = 0 |", set()),  # built without repacking
    ("CPU : SSE3 = 1 | REPACK = 1 |", set()),  # no kernel for this instruction set
])
def test_repacked_types_follow_the_build(system_info: str, expected: set[str]) -> None:
    from appliance.engine.runtime import repack_types

    assert repack_types(system_info) == expected
