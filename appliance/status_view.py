"""`appliance status` as a person reads it: the resident models as a table, one row each, with
their memory (measured or planned, said so), slots, keep-alive and when each will be unloaded;
then the upstreams, one row each.
Plain functions of an /api/status answer, so every case is tested without a daemon.
"""

from __future__ import annotations

import time
from typing import Any

COLUMNS = ("MODEL", "KIND", "VRAM", "RAM PLANNED", "RSS AT LOAD", "SLOTS BUSY", "KEEP-ALIVE",
           "UNLOADS")


def size(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB"


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def vram_cell(model: dict[str, Any]) -> str:
    memory = model["memory"]
    if not memory["vram"] and memory["vram_source"] == "planned":
        return "none"
    return f"{size(memory['vram'])} {memory['vram_source']}"


def keep_alive_cell(model: dict[str, Any]) -> str:
    if model["pinned"]:
        return "pinned"
    seconds = model["keep_alive_s"]
    text = "forever" if seconds is None else duration(seconds)
    return f"{text} ({model['keep_alive_set_by']})"


def unloads_cell(model: dict[str, Any], now: float) -> str:
    if model["pinned"] or model["keep_alive_s"] is None:
        return "never"
    if model["expires_at"] is not None:
        return f"in {duration(model['expires_at'] - now)}"
    # In use: the countdown starts when its last request ends.
    return f"{duration(model['keep_alive_s'])} after use"


def row(model: dict[str, Any], now: float) -> tuple[str, ...]:
    return (model["id"], model["kind"], vram_cell(model), size(model["memory"]["planned_ram"]),
            size(model["memory"]["rss_at_load"]), f"{model['slots_busy']}/{model['slots']}",
            keep_alive_cell(model), unloads_cell(model, now))


def resident_table(models: list[dict[str, Any]], now: float | None = None) -> list[str]:
    """The table's lines, columns aligned; empty when nothing is resident."""
    if not models:
        return []
    now = time.time() if now is None else now
    rows = [COLUMNS, *(row(m, now) for m in models)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def transition_line(status: dict[str, Any]) -> str | None:
    """`loading MODEL…` while a load or unload runs beside the resident models."""
    transition = status.get("transition")
    if not transition:
        return None
    return f"{transition['action']} {transition['model']}…"


UPSTREAM_COLUMNS = ("UPSTREAM", "STATE", "LATENCY", "MODELS", "CHECKED", "LAST ERROR")


def upstream_row(upstream: dict[str, Any], now: float) -> tuple[str, ...]:
    up = upstream.get("up")
    state = "checking" if up is None else "up" if up else "down"
    latency = upstream.get("latency_ms")
    checked = upstream.get("last_check")
    return (upstream["name"], state, "-" if latency is None else f"{latency:.0f} ms",
            str(upstream.get("models", 0)),
            "never" if checked is None else f"{duration(now - checked)} ago",
            (upstream.get("error") or "-")[:120])


def upstream_lines(status: dict[str, Any], now: float | None = None) -> list[str]:
    """The upstreams as a table (name, up or down, latency of the last check, models routed,
    when last checked, the last error); empty when none is configured."""
    upstreams = status.get("upstreams") or []
    if not upstreams:
        return []
    now = time.time() if now is None else now
    rows = [UPSTREAM_COLUMNS, *(upstream_row(u, now) for u in upstreams)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(UPSTREAM_COLUMNS))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]
