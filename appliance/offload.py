"""How many layers to put on the GPU, from measured free VRAM and the model's real tensor sizes.

llama.cpp offloads the last `n_gpu_layers` repeating layers; n_layers + 1 also moves the output
head. The token embedding stays on the CPU. Each GPU layer also holds its share of the KV cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from appliance.gguf_info import GGUFInfo

MIB = 2**20
KV_BYTES_PER_VALUE = 2  # f16 K and V cache
N_UBATCH = 512


@dataclass(frozen=True)
class OffloadPlan:
    n_gpu_layers: int
    n_layers: int
    device: str  # "cpu" or the GPU's name
    reason: str
    free_vram: int = 0
    weights_on_gpu: int = 0
    kv_on_gpu: int = 0
    compute_buffer: int = 0
    margin: int = 0

    @property
    def planned_vram(self) -> int:
        return self.weights_on_gpu + self.kv_on_gpu + self.compute_buffer

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "planned_vram": self.planned_vram}


def kv_bytes_per_layer(info: GGUFInfo, n_ctx_total: int) -> int:
    n_kv = int(info.arch_value("attention.head_count_kv", info.arch_value("attention.head_count", 1)))
    head = int(info.arch_value("embedding_length", 0)) // max(
        int(info.arch_value("attention.head_count", 1)), 1)
    k = int(info.arch_value("attention.key_length", head))
    v = int(info.arch_value("attention.value_length", head))
    return n_ctx_total * n_kv * (k + v) * KV_BYTES_PER_VALUE


def output_head_bytes(info: GGUFInfo) -> int:
    """The output matrix (or the tied embedding, which llama.cpp then copies) and its norm."""
    head = info.tensor_bytes("output.weight") or info.tensor_bytes("token_embd.weight")
    return head + info.tensor_bytes("output_norm.weight")


def compute_buffer_bytes(info: GGUFInfo) -> int:
    """llama.cpp's GPU scratch for one micro-batch: dominated by the logits of its tokens."""
    vocab = int(info.arch_value("vocab_size", 0)) or info.array_lengths.get("tokenizer.ggml.tokens", 0)
    hidden = int(info.arch_value("embedding_length", 0))
    ff = int(info.arch_value("feed_forward_length", 0))
    return N_UBATCH * (vocab + 4 * hidden + 2 * ff) * 4


def plan_offload(info: GGUFInfo, *, n_ctx_total: int, free_vram: int, device: str,
                 margin: int, gpu_build: bool, forced_layers: int | None = None) -> OffloadPlan:
    n_layers = info.n_layers
    if forced_layers is not None:
        return OffloadPlan(min(forced_layers, n_layers + 1), n_layers,
                           device if forced_layers > 0 else "cpu", "set in configuration")
    if not gpu_build:
        return OffloadPlan(0, n_layers, "cpu", "CPU only: llama.cpp was built without GPU support")
    if free_vram <= 0:
        return OffloadPlan(0, n_layers, "cpu", "CPU only: no NVIDIA GPU found")
    kv = kv_bytes_per_layer(info, n_ctx_total)
    compute = compute_buffer_bytes(info)
    budget = free_vram - margin - compute
    layers = info.layer_bytes()
    weights = kv_total = 0
    count = 0
    for size in reversed(layers):  # llama.cpp offloads the last layers first
        if weights + kv_total + size + kv > budget:
            break
        weights += size
        kv_total += kv
        count += 1
    if count == n_layers and weights + kv_total + output_head_bytes(info) <= budget:
        weights += output_head_bytes(info)
        count = n_layers + 1
    if count == 0:
        reason = "CPU only: not enough free VRAM for one layer"
    elif count > n_layers:
        reason = "all layers on the GPU"
    else:
        reason = f"{count} of {n_layers} layers fit in free VRAM"
    return OffloadPlan(count, n_layers, device if count else "cpu", reason, free_vram,
                       weights, kv_total, compute if count else 0, margin)


def fewer_layers(n_gpu_layers: int) -> int:
    """The next try after a failed load: a quarter fewer layers (0 ends the retries)."""
    return max(0, n_gpu_layers - max(1, n_gpu_layers // 4))
