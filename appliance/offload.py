"""How many layers to put on the GPU, from measured free VRAM and the model's real tensor sizes.

llama.cpp offloads the last `n_gpu_layers` repeating layers; n_layers + 1 also moves the output
head. The token embedding stays on the CPU. Each GPU layer also holds its share of the KV cache,
counted in the bytes of its type (f16, or ggml's q8_0/q4_0 blocks).

The plan also says what stays in RAM (weights not offloaded, their KV cache, the CPU compute
buffer): the residency manager admits a model beside the resident ones on both figures.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from appliance.gguf_info import GGML_TYPES, GGUFInfo

MIB = 2**20
N_UBATCH = 512
# KV cache types: (values per block, bytes per block), as ggml stores them. block_q8_0 is an f16
# scale and 32 int8 (34 bytes per 32 values); block_q4_0 an f16 scale and 32 nibbles (18 per 32).
KV_BLOCKS = {"f16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18)}
KV_CACHE_TYPES = tuple(KV_BLOCKS)
_LAYER_INDEX = re.compile(r"blk\.(\d+)\.")


def kv_type_fits(info: GGUFInfo, kv_type: str) -> bool:
    """Whether llama.cpp can store this model's K and V rows in `kv_type`: a quantized row must
    be whole blocks (llama_init_from_model refuses a head size its block does not divide)."""
    block = KV_BLOCKS[kv_type][0]
    k, v = head_sizes(info)
    return k % block == 0 and v % block == 0


@dataclass(frozen=True)
class DeviceShare:
    """What one device holds in a split: a local GPU, an RPC worker's device, or the CPU."""

    name: str
    kind: str  # "gpu", "rpc" or "cpu"
    free: int = 0  # as the device reported it when planned
    layers: int = 0  # offload units: repeating layers, and the output head as one more
    weights: int = 0
    kv: int = 0
    compute: int = 0
    endpoint: str | None = None  # host:port of a worker
    index: int = 0  # the device's number on its worker, or among the local GPUs


@dataclass(frozen=True)
class OffloadPlan:
    n_gpu_layers: int
    n_layers: int
    device: str  # "cpu" or the GPU's name
    reason: str
    kv_cache_type: str = "f16"
    free_vram: int = 0
    weights_on_gpu: int = 0
    kv_on_gpu: int = 0
    compute_buffer: int = 0
    margin: int = 0
    weights_in_ram: int = 0
    kv_in_ram: int = 0
    compute_in_ram: int = 0
    output_in_ram: int = 0  # llama.cpp's host buffer of outputs (logits, embeddings)
    repack_in_ram: int = 0  # the CPU backend's repacked copy of some weights (weights_repacked)
    split: tuple[DeviceShare, ...] = ()  # per device, when layers are split over RPC workers
    context_per_slot: int = 0  # set by appliance.context_sizing with the reason for it
    context_reason: str = ""
    draft: OffloadPlan | None = None  # a speculative-decoding draft model loaded beside it

    @property
    def planned_vram(self) -> int:
        own = self.weights_on_gpu + self.kv_on_gpu + self.compute_buffer
        return own + (self.draft.planned_vram if self.draft else 0)

    @property
    def planned_ram(self) -> int:
        own = (self.weights_in_ram + self.kv_in_ram + self.compute_in_ram + self.output_in_ram
               + self.repack_in_ram)
        return own + (self.draft.planned_ram if self.draft else 0)

    @property
    def all_on_gpu(self) -> bool:
        return self.n_gpu_layers > self.n_layers

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "planned_vram": self.planned_vram,
                "planned_ram": self.planned_ram}


def with_ram(plan: OffloadPlan, info: GGUFInfo, n_ctx_total: int,
             n_ubatch: int = N_UBATCH, repack_types: frozenset[str] = frozenset()) -> OffloadPlan:
    """`plan` with the RAM it leaves on the CPU: the weights not offloaded (llama.cpp maps the
    file, and every page is read on a decode), the CPU layers' KV cache, the CPU scratch, and
    the repacked copy of the CPU's weights of `repack_types` (weights_repacked)."""
    n_cpu_layers = max(0, plan.n_layers - min(plan.n_gpu_layers, plan.n_layers))
    weights_total = sum(t.nbytes for t in info.tensors)
    on_gpu = plan.weights_on_gpu
    if plan.all_on_gpu and not info.tensor_bytes("output.weight"):
        # A tied head goes to the GPU as a copy: the input embedding stays in RAM all the same.
        on_gpu -= info.tensor_bytes("token_embd.weight")
    weights = max(0, weights_total - on_gpu)
    kv = kv_bytes_per_layer(info, n_ctx_total, plan.kv_cache_type) * n_cpu_layers
    compute = compute_buffer_bytes(info, n_ubatch) if plan.n_gpu_layers <= plan.n_layers else 0
    repack = weights_repacked(info, n_cpu_layers, plan.n_gpu_layers <= plan.n_layers,
                              repack_types)
    return replace(plan, weights_in_ram=weights, kv_in_ram=kv, compute_in_ram=compute,
                   repack_in_ram=repack)


def weights_repacked(info: GGUFInfo, n_cpu_layers: int, head_on_cpu: bool,
                     repack_types: frozenset[str]) -> int:
    """Bytes of the CPU backend's repacked copy (llama.cpp's CPU_REPACK buffer): the matrices
    of the layers left on the CPU, and of the output head there, whose type this build repacks
    into interleaved rows for its SIMD kernels (ggml-cpu/repack.cpp; rows in whole groups of 8).
    It is a second copy, in anonymous memory: the file's pages of those tensors were read to
    make it and stay mapped (clean page cache the kernel may drop, but RSS until it does), so
    the planner counts both, as the daemon's RSS shows them. Never the token embedding: it is
    read by row lookup, which no repacked layout serves. A tied head (that tensor, duplicated
    for the matrix product) is counted when its type is repacked: unchecked against llama.cpp,
    as our converter keeps the token embedding in Q6_K, which x86 does not repack."""
    if not repack_types:
        return 0
    head = "output.weight" if info.tensor_bytes("output.weight") else "token_embd.weight"
    total = 0
    for t in info.tensors:
        name = GGML_TYPES.get(t.type, ("",))[0]
        if name not in repack_types or len(t.shape) != 2 or t.shape[1] % 8:
            continue
        layer = _LAYER_INDEX.match(t.name)
        if (layer and int(layer.group(1)) < n_cpu_layers) or (head_on_cpu and t.name == head):
            total += t.nbytes
    return total


def head_sizes(info: GGUFInfo) -> tuple[int, int]:
    """The K and V head sizes (Qwen3 sets them apart from embedding_length / head_count)."""
    head = int(info.arch_value("embedding_length", 0)) // max(
        int(info.arch_value("attention.head_count", 1)), 1)
    return (int(info.arch_value("attention.key_length", head)),
            int(info.arch_value("attention.value_length", head)))


def kv_bytes_per_layer(info: GGUFInfo, n_ctx_total: int, kv_type: str = "f16") -> int:
    """One layer's K and V cache for `n_ctx_total` cells, in `kv_type`'s real bytes."""
    n_kv = int(info.arch_value("attention.head_count_kv", info.arch_value("attention.head_count", 1)))
    k, v = head_sizes(info)
    values, size = KV_BLOCKS[kv_type]
    return n_ctx_total * n_kv * (-(-k // values) + -(-v // values)) * size


def output_head_bytes(info: GGUFInfo) -> int:
    """The output matrix (or the tied embedding, which llama.cpp then copies) and its norm."""
    head = info.tensor_bytes("output.weight") or info.tensor_bytes("token_embd.weight")
    return head + info.tensor_bytes("output_norm.weight")


def compute_buffer_bytes(info: GGUFInfo, n_ubatch: int = N_UBATCH) -> int:
    """llama.cpp's scratch for one micro-batch: dominated by the logits of its tokens."""
    vocab = int(info.arch_value("vocab_size", 0)) or info.array_lengths.get("tokenizer.ggml.tokens", 0)
    hidden = int(info.arch_value("embedding_length", 0))
    ff = int(info.arch_value("feed_forward_length", 0))
    return n_ubatch * (vocab + 4 * hidden + 2 * ff) * 4


def output_buffer_bytes(info: GGUFInfo, n_outputs: int) -> int:
    """llama.cpp's host buffer for `n_outputs` outputs of one decode: a row of logits and one
    of embeddings each. It holds logits even in an embeddings context, and pooling makes every
    token an output, so an embedding model's full decode fills n_batch x n_vocab floats
    (measured: 960 tokens grew a tiny embedding model's RSS by the 556 MiB of their logits)."""
    vocab = int(info.arch_value("vocab_size", 0)) or info.array_lengths.get("tokenizer.ggml.tokens", 0)
    hidden = int(info.arch_value("embedding_length", 0))
    return n_outputs * (vocab + hidden) * 4


def plan_offload(info: GGUFInfo, *, n_ctx_total: int, free_vram: int, device: str,
                 margin: int, gpu_build: bool, forced_layers: int | None = None,
                 n_ubatch: int = N_UBATCH, kv_type: str = "f16",
                 n_outputs: int = 0, repack_types: frozenset[str] = frozenset()) -> OffloadPlan:
    """Layers on the GPU from free VRAM, and what that leaves in RAM; `n_outputs`: the most
    outputs one decode asks for (an embedding model: every token of a full batch);
    `repack_types`: the weight types this llama.cpp build repacks on the CPU."""
    plan = _plan_gpu(info, n_ctx_total=n_ctx_total, free_vram=free_vram, device=device,
                     margin=margin, gpu_build=gpu_build, forced_layers=forced_layers,
                     n_ubatch=n_ubatch, kv_type=kv_type)
    plan = replace(plan, output_in_ram=output_buffer_bytes(info, n_outputs))
    return with_ram(plan, info, n_ctx_total, n_ubatch, repack_types)


def _plan_gpu(info: GGUFInfo, *, n_ctx_total: int, free_vram: int, device: str, margin: int,
              gpu_build: bool, forced_layers: int | None, n_ubatch: int,
              kv_type: str) -> OffloadPlan:
    n_layers = info.n_layers
    if forced_layers is not None:
        return OffloadPlan(min(forced_layers, n_layers + 1), n_layers,
                           device if forced_layers > 0 else "cpu", "set in configuration",
                           kv_type)
    if not gpu_build:
        return OffloadPlan(0, n_layers, "cpu", "CPU only: llama.cpp was built without GPU support",
                           kv_type)
    if free_vram <= 0:
        return OffloadPlan(0, n_layers, "cpu", "CPU only: no NVIDIA GPU found", kv_type)
    kv = kv_bytes_per_layer(info, n_ctx_total, kv_type)
    compute = compute_buffer_bytes(info, n_ubatch)
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
    return OffloadPlan(count, n_layers, device if count else "cpu", reason, kv_type, free_vram,
                       weights, kv_total, compute if count else 0, margin)


def with_draft(plan: OffloadPlan, draft_info: GGUFInfo, *, n_ctx_total: int, margin: int,
               gpu_build: bool) -> OffloadPlan | None:
    """`plan` with a draft model planned in the VRAM the target leaves (the target never gives
    up a layer for it), or None when drafting would not pay: a target all on the GPU with a
    draft that is not would wait on the CPU at every step."""
    left = max(0, plan.free_vram - plan.planned_vram)
    draft = plan_offload(draft_info, n_ctx_total=n_ctx_total, free_vram=left,
                         device=plan.device, margin=margin, gpu_build=gpu_build)
    if plan.all_on_gpu and not draft.all_on_gpu:
        return None
    return replace(plan, draft=draft)


def fewer_layers(n_gpu_layers: int) -> int:
    """The next try after a failed load: a quarter fewer layers (0 ends the retries)."""
    return max(0, n_gpu_layers - max(1, n_gpu_layers // 4))


def plan_split(info: GGUFInfo, devices: list[DeviceShare], *, n_ctx_total: int, margin: int,
               n_ubatch: int = N_UBATCH, kv_type: str = "f16",
               repack_types: frozenset[str] = frozenset()) -> OffloadPlan:
    """Layers across `devices` (in llama.cpp's device order: workers, then local GPUs) and the
    CPU. Local GPUs fill first (no network between them and the output); the workers share what
    is left in proportion to their free memory (as llama.cpp's own default split does); the CPU
    takes the rest. Each device keeps `margin` and a compute buffer free.

    This llama.cpp offloads from the top: n_gpu_layers = k holds the output head and the last
    k - 1 repeating layers, dealt to the devices in order by `tensor_split` (the first device
    gets the lowest of them), so the plan fills devices from the last one backwards. Its VRAM
    figures are the local GPUs' share; a worker's share costs this machine nothing.
    """
    n_layers = info.n_layers
    kv = kv_bytes_per_layer(info, n_ctx_total, kv_type)
    compute = compute_buffer_bytes(info, n_ubatch)
    # Offload units from the top: the output head (no KV), then layer n-1 down to 0.
    units = [output_head_bytes(info)] + [size + kv for size in reversed(info.layer_bytes())]
    budgets = [max(0, d.free - margin - compute) for d in devices]
    workers = [i for i, d in enumerate(devices) if d.kind == "rpc"]
    counts = [0] * len(devices)
    placed = 0

    def fill(i: int, target: float) -> None:
        """Units onto device i within its budget, up to `target` bytes (a unit counts when at
        least half of it is within the target: a large output head must not skip a device)."""
        nonlocal placed
        used = 0
        while (placed < len(units) and used + units[placed] <= budgets[i]
               and used + units[placed] / 2 <= target):
            used += units[placed]
            placed += 1
            counts[i] += 1

    for i in reversed(range(len(devices))):
        if devices[i].kind != "rpc":
            fill(i, budgets[i])
    left, room = sum(units[placed:]), sum(budgets[i] for i in workers)
    share = min(1.0, left / room) if room else 0.0
    for i in reversed(workers):  # the first worker also takes what rounding left over
        fill(i, budgets[i] if i == workers[0] else budgets[i] * share)
    shares, unit = [], 0
    layer_sizes = [output_head_bytes(info), *reversed(info.layer_bytes())]
    for i in reversed(range(len(devices))):
        mine = range(unit, unit + counts[i])
        unit += counts[i]
        shares.append(replace(devices[i], layers=counts[i],
                              weights=sum(layer_sizes[u] for u in mine),
                              kv=kv * sum(1 for u in mine if u > 0),
                              compute=compute if counts[i] else 0))
    shares.reverse()
    n_cpu = len(units) - placed
    cpu_layers = min(n_cpu, n_layers)
    # The CPU always holds the token embedding (llama.cpp keeps the input layer there), the
    # lowest layers, and the output head when nothing was offloaded (tied: the embedding).
    embedding = info.tensor_bytes("token_embd.weight")
    head = output_head_bytes(info) - (embedding if not info.tensor_bytes("output.weight") else 0)
    cpu = DeviceShare("cpu", "cpu", layers=n_cpu,
                      weights=embedding + sum(info.layer_bytes()[:cpu_layers])
                      + (head if placed == 0 else 0),
                      kv=kv * cpu_layers, compute=compute if n_cpu else 0)
    local = [s for s in shares if s.kind == "gpu"]
    used = [s.name for s in shares if s.layers]
    if not used:
        reason = "CPU only: no RPC worker or GPU has room for one layer"
    elif n_cpu == 0:
        reason = f"all layers on {', '.join(used)}"
    else:
        reason = f"{placed} of {n_layers + 1} layers on {', '.join(used)}, {n_cpu} on the CPU"
    return OffloadPlan(
        placed, n_layers, "+".join(used) or "cpu", reason, kv_type,
        free_vram=sum(s.free for s in local), weights_on_gpu=sum(s.weights for s in local),
        kv_on_gpu=sum(s.kv for s in local), compute_buffer=sum(s.compute for s in local),
        margin=margin, weights_in_ram=cpu.weights, kv_in_ram=cpu.kv,
        compute_in_ram=cpu.compute, split=(*shares, cpu),
        repack_in_ram=weights_repacked(info, cpu_layers, placed == 0, repack_types))
