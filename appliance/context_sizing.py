"""Context per slot and KV cache type, sized to the memory there is (`context_length = "auto"`).

The rule, for `parallel` slots (context always per slot):

On a GPU (a GPU build, free VRAM measured, `gpu_layers` not set), for each KV type allowed
(`kv_cache_type = "auto"`: f16, then q8_0; q4_0 only when set explicitly, it loses more), the
largest per-slot context, in steps of 1024 up to the model's trained maximum, that keeps every
layer and the output head on the GPU with the margin. Then:
  - f16 when it gives every slot at least PREFERRED_CONTEXT (8192, or the trained maximum);
  - otherwise q8_0 when it gives more than f16 (q8_0 is "needed");
  - a type's context counts only from FLOOR_CONTEXT (4096) up: below that a thinking model cannot
    finish an answer. When no allowed type keeps all layers on the GPU at the floor, the context
    is the floor, with the most compact allowed type, and the layers that fit go to the GPU.

On CPU only (or with `gpu_layers` forced): the largest per-slot context up to CPU_MAX_CONTEXT
(8192) whose KV cache takes at most CPU_KV_SHARE of physical RAM; f16 when it reaches the cap,
else q8_0 when it gives more. The cap: on a CPU, reading a prompt runs at tens to a few hundred
tokens/s for an 8B model, so a slot's 8K of context already takes a minute or more to fill, and
32K slots would hold RAM (4 × 32K f16 is 18 GiB for Qwen3-8B) that the desktop needs for
prompts nobody waits for. Set `context_length` to have more.

A fixed `context_length` keeps its value; with `kv_cache_type = "auto"` it gets f16 unless f16
puts fewer layers on the GPU than q8_0 (GPU), or takes more than the RAM share (CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from appliance.errors import ModelUnusable
from appliance.gguf_info import GGUFInfo
from appliance.offload import KV_BLOCKS, OffloadPlan, head_sizes, kv_bytes_per_layer, kv_type_fits

AUTO = "auto"
STEP = 1024
PREFERRED_CONTEXT = 8192
FLOOR_CONTEXT = 4096
CPU_MAX_CONTEXT = 8192
CPU_KV_SHARE = 0.25  # of physical RAM; with the weights an 8B model stays under half of 24 GB
AUTO_TYPES = ("f16", "q8_0")  # what "auto" may choose, in order of preference

# plan(n_ctx_total, kv_type) -> the offload plan for the machine as it is now
Planner = Callable[[int, str], OffloadPlan]


@dataclass(frozen=True)
class ContextChoice:
    plan: OffloadPlan
    context_per_slot: int


def listing_context(context_length: int | str) -> int:
    """The per-slot context a fit answer plans for, before a model is loaded: with "auto" the
    floor, since auto keeps every layer on the GPU whenever it can at the floor."""
    return context_length if isinstance(context_length, int) else FLOOR_CONTEXT


def allowed_types(info: GGUFInfo, kv_setting: str, flash_attn: bool, model_id: str) -> list[str]:
    """The KV types the setting allows for this model; an impossible explicit one is refused."""
    if kv_setting != AUTO:
        if kv_setting != "f16" and not kv_type_fits(info, kv_setting):
            k, v = head_sizes(info)
            raise ModelUnusable(
                f"kv_cache_type {kv_setting} stores rows in blocks of {KV_BLOCKS[kv_setting][0]}"
                f" values; {model_id} has K/V heads of {k}/{v}: set kv_cache_type = \"f16\" "
                f"under [models.{model_id}]", param="model")
        return [kv_setting]
    return [t for t in AUTO_TYPES
            if t == "f16" or (flash_attn and kv_type_fits(info, t))]


def choose_context(info: GGUFInfo, *, plan: Planner, n_seq: int, context: int | None,
                   types: list[str], gpu_sizing: bool, ram_total: int) -> ContextChoice:
    """The plan and per-slot context for `context` (None: auto) and the allowed `types`.
    `gpu_sizing`: whether free VRAM decides (a GPU build, a GPU, no forced layer count)."""
    trained = info.context_length or PREFERRED_CONTEXT
    kv_ram = int(ram_total * CPU_KV_SHARE)
    if context is not None:
        return _fixed(info, plan, n_seq, context, types, gpu_sizing, kv_ram)
    if gpu_sizing:
        return _auto_gpu(plan, n_seq, trained, types)
    return _auto_cpu(info, plan, n_seq, min(trained, CPU_MAX_CONTEXT), types, kv_ram)


def _fixed(info: GGUFInfo, plan: Planner, n_seq: int, context: int, types: list[str],
           gpu_sizing: bool, kv_ram: int) -> ContextChoice:
    first = plan(context * n_seq, types[0])
    chosen, why = first, "set in configuration"
    if len(types) > 1:
        compact = plan(context * n_seq, types[-1])
        if gpu_sizing and compact.n_gpu_layers > first.n_gpu_layers:
            chosen, why = compact, f"{types[-1]} KV puts more layers on the GPU"
        elif not gpu_sizing and _kv_total(info, context * n_seq, types[0]) > kv_ram:
            chosen, why = compact, f"{types[0]} KV would take over {CPU_KV_SHARE:.0%} of RAM"
    return _done(chosen, context, f"context {context} per slot {why}")


def _auto_gpu(plan: Planner, n_seq: int, trained: int, types: list[str]) -> ContextChoice:
    floor = min(FLOOR_CONTEXT, trained)
    best: dict[str, int] = {}
    for kv_type in types:
        fits = _largest(trained, lambda c, t=kv_type: plan(c * n_seq, t).all_on_gpu)
        if fits >= floor:
            best[kv_type] = fits
    preferred = min(PREFERRED_CONTEXT, trained)
    rule = "auto: the largest that keeps every layer on the GPU"
    if best.get(types[0], 0) >= preferred or len(best) == 1:
        kv_type = types[0] if types[0] in best else next(iter(best))
    elif best:
        kv_type = max(best, key=lambda t: (best[t], -types.index(t)))
        if kv_type != types[0]:
            rule += f", {kv_type} KV since f16 gives under {preferred} per slot"
    else:
        kv_type = types[-1]
        return _done(plan(floor * n_seq, kv_type), floor,
                     f"auto: not every layer fits the GPU even at {floor} per slot, "
                     f"so {floor} with {kv_type} KV")
    return _done(plan(best[kv_type] * n_seq, kv_type), best[kv_type], rule)


def _auto_cpu(info: GGUFInfo, plan: Planner, n_seq: int, cap: int, types: list[str],
              kv_ram: int) -> ContextChoice:
    best = {t: _largest(cap, lambda c, t=t: _kv_total(info, c * n_seq, t) <= kv_ram)
            for t in types}
    kv_type = types[0]
    if best[kv_type] < cap and len(types) > 1 and best[types[-1]] > best[kv_type]:
        kv_type = types[-1]
    context = max(best[kv_type], min(STEP, cap))
    return _done(plan(context * n_seq, kv_type), context,
                 f"auto: the largest up to {cap} per slot whose KV cache takes at most "
                 f"{CPU_KV_SHARE:.0%} of RAM")


def _largest(limit: int, fits: Callable[[int], bool]) -> int:
    """The largest multiple of STEP up to `limit` (or `limit` itself when under one step) for
    which `fits` holds, 0 if none; `fits` must hold for every context below one that fits."""
    if limit < STEP:
        return limit if fits(limit) else 0
    low, high = 0, limit // STEP  # fits(low * STEP) holds (vacuously for 0)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle * STEP):
            low = middle
        else:
            high = middle - 1
    return low * STEP


def _kv_total(info: GGUFInfo, n_ctx_total: int, kv_type: str) -> int:
    return kv_bytes_per_layer(info, n_ctx_total, kv_type) * info.n_layers


def _done(plan: OffloadPlan, context: int, why: str) -> ContextChoice:
    return ContextChoice(replace(plan, context_per_slot=context, context_reason=why), context)
