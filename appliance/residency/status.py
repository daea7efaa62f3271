"""What /api/status says of each resident model: its memory (measured at load, or the planner's
figure, labelled), its slots, its keep-alive and when it will be unloaded.

Kept apart from each model's own engine figures (`describe()`), which this adds to.
"""

from __future__ import annotations

import time
from typing import Any

from appliance.residency.footprint import MEASURED, PLANNED, Footprint
from appliance.residency.model import EmbeddingModel, LoadedModel

Resident = LoadedModel | EmbeddingModel


def memory_fields(model: Resident) -> dict[str, Any]:
    """`vram` is the measured figure when there is one, else the plan's (`vram_source` says
    which); `rss_at_load` is the daemon's RSS growth during the load (None: it did not grow)."""
    plan = model.plan
    measured = model.footprint or Footprint()
    vram_measured = measured.vram is not None
    return {"vram": measured.vram if vram_measured else plan.planned_vram,
            "vram_source": MEASURED if vram_measured else PLANNED,
            "vram_method": measured.vram_method,
            "rss_at_load": measured.rss,
            "planned_vram": plan.planned_vram,
            "planned_ram": plan.planned_ram}


def lifetime_fields(model: Resident, keep_alive_s: float) -> dict[str, Any]:
    """`keep_alive_s` is the manager's figure for the model (< 0: it stays). In the answer, a
    null `keep_alive_s` means never unloaded by a timer; a null `expires_at` with a number
    there means the model is in use and the countdown starts when its last request ends."""
    if model.pinned:
        seconds, set_by = None, "pin"
    else:
        seconds = keep_alive_s if keep_alive_s >= 0 else None
        set_by = "request" if model.keep_alive_s is not None else "default"
    return {"pinned": model.pinned,
            "keep_alive_s": seconds,
            "keep_alive_set_by": set_by,
            "expires_at": None if model.expires_at is None else round(model.expires_at, 3),
            "last_used_s_ago": round(time.monotonic() - model.last_used, 3)}


def resident_status(model: Resident, *, keep_alive_s: float, loads: int) -> dict[str, Any]:
    """One entry of /api/status `models`."""
    return {**model.describe(), "state": "ready", "loads": loads,
            "memory": memory_fields(model), **lifetime_fields(model, keep_alive_s)}
