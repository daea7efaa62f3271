"""What `context_length = "auto"` chooses for Qwen3-8B Q4_K_M on common cards, from the planner
itself (no GPU needed): layers on the GPU, context per slot, KV type, planned VRAM.

    python bench/context_table.py [--slots 4] [--shape qwen3-8b]

The file is a header-only model of the published Q4_K_M (real tensor sizes, no weights); each
card is a fake probe whose free VRAM is the card's size less 512 MiB that a desktop holds.
Writes bench/results/context_table-SHAPE.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.context_sizing import choose_context  # noqa: E402
from appliance.offload import plan_offload  # noqa: E402
from tests.appliance.shapes import header_info  # noqa: E402

GIB = 2**30
MIB = 2**20
DESKTOP = 512 * MIB
MARGIN = 512 * MIB  # vram_margin_mib's default
CARDS_GB = (8, 12, 16, 24)


def plan_for_card(info, free: int, n_ctx_total: int, kv_type: str):
    return plan_offload(info, n_ctx_total=n_ctx_total, free_vram=free, device="card",
                        margin=MARGIN, gpu_build=True, kv_type=kv_type)


def row(info, card_gb: int, slots: int, types: list[str]) -> dict:
    free = card_gb * GIB - DESKTOP
    choice = choose_context(info, plan=partial(plan_for_card, info, free), n_seq=slots,
                            context=None, types=types, gpu_sizing=True, ram_total=32 * GIB)
    plan = choice.plan
    return {"card_gb": card_gb, "free_vram_gib": round(free / GIB, 2),
            "kv_types_allowed": types, "gpu_layers": f"{min(plan.n_gpu_layers, plan.n_layers)}"
            f"/{plan.n_layers}" + (" + head" if plan.all_on_gpu else ""),
            "all_on_gpu": plan.all_on_gpu, "context_per_slot": choice.context_per_slot,
            "context_total": choice.context_per_slot * slots, "kv_cache_type": plan.kv_cache_type,
            "kv_gib": round((plan.kv_on_gpu + plan.kv_in_ram) / GIB, 2),
            "planned_vram_gib": round(plan.planned_vram / GIB, 2),
            "reason": plan.context_reason}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--shape", default="qwen3-8b")
    args = parser.parse_args()
    info = header_info(args.shape)
    rows = [row(info, gb, args.slots, types) for types in (["f16", "q8_0"], ["q4_0"])
            for gb in CARDS_GB]
    result = {"shape": args.shape, "quant": "Q4_K_M", "slots": args.slots,
              "weights_gib": round(sum(t.nbytes for t in info.tensors) / GIB, 2),
              "desktop_mib": DESKTOP // MIB, "margin_mib": MARGIN // MIB, "rows": rows}
    out = REPO / "bench" / "results" / f"context_table-{args.shape}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| card | KV allowed | layers on GPU | context per slot | total | KV type | KV GiB |"
          " planned VRAM GiB |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['card_gb']} GB | {'/'.join(r['kv_types_allowed'])} | {r['gpu_layers']} | "
              f"{r['context_per_slot']} | {r['context_total']} | {r['kv_cache_type']} | "
              f"{r['kv_gib']} | {r['planned_vram_gib']} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
