"""What the tray shows, as one immutable snapshot of the daemon's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

GIB = 2**30


class TrayState(str, Enum):
    STOPPED = "stopped"  # daemon not running
    IDLE = "idle"  # running, no model loaded
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"  # generating
    ERROR = "error"  # last load failed, or the daemon answers with errors


@dataclass(frozen=True)
class ModelChoice:
    id: str
    usable: bool
    loaded: bool
    reason: str | None = None


@dataclass(frozen=True)
class PullInfo:
    """A pull the daemon runs (or just finished)."""

    model: str
    stage: str
    completed: int = 0
    total: int = 0
    finished: bool = False
    error: str | None = None

    @property
    def line(self) -> str:
        if self.error:
            return f"Pull of {self.model} failed"
        if self.finished:
            return f"{self.model} is downloaded"
        if self.total:
            return f"Pulling {self.model}: {self.stage} {self.completed * 100 // self.total} %"
        return f"Pulling {self.model}: {self.stage}"


@dataclass(frozen=True)
class Offer:
    """A recommended model under "Get a model…", with its size and the fit answer here."""

    ref: str
    label: str
    size: int
    fit: str
    installed: bool


@dataclass(frozen=True)
class UpstreamInfo:
    """An upstream server the daemon routes models to, as its last check found it."""

    name: str
    up: bool | None
    models: int = 0
    latency_ms: float | None = None
    error: str | None = None

    @property
    def line(self) -> str:
        if self.up is None:
            return f"Upstream {self.name}: checking…"
        if not self.up:
            return f"Upstream {self.name}: down ({(self.error or 'unreachable')[:60]})"
        latency = f", {self.latency_ms:.0f} ms" if self.latency_ms is not None else ""
        return f"Upstream {self.name}: up, {self.models} models{latency}"


@dataclass(frozen=True)
class Snapshot:
    state: TrayState
    model: str | None = None
    gpu: bool = False
    mem_used: int = 0  # VRAM (GPU) or RAM (CPU only), bytes
    mem_total: int = 0
    daemon_mem: int = 0  # the daemon's own share
    tokens_per_s: float = 0.0
    message: str | None = None  # failure reason or connection error
    models: tuple[ModelChoice, ...] = field(default_factory=tuple)
    pulls: tuple[PullInfo, ...] = field(default_factory=tuple)
    offers: tuple[Offer, ...] = field(default_factory=tuple)
    upstreams: tuple[UpstreamInfo, ...] = field(default_factory=tuple)
    context: str | None = None  # "4 × 8K context, f16 KV" for the loaded chat model

    @property
    def fill(self) -> float:
        """How full the gauge is, 0..1."""
        return min(1.0, self.mem_used / self.mem_total) if self.mem_total else 0.0

    @property
    def running(self) -> bool:
        return self.state is not TrayState.STOPPED


def from_library(library: dict[str, Any] | None) -> dict[str, Any]:
    """The pulls and offers of an /api/library answer, as Snapshot fields."""
    if not library:
        return {}
    pulls = tuple(PullInfo(p["model"], p.get("stage", ""), int(p.get("completed") or 0),
                           int(p.get("total") or 0), bool(p.get("finished")), p.get("error"))
                  for p in library.get("pulls", []))
    offers = tuple(Offer(r["ref"], r["label"], int(r["size"]), str(r.get("fit", "?")),
                         bool(r.get("installed")))
                   for r in library.get("recommended", []))
    return {"pulls": pulls, "offers": offers}


def from_api(status: dict[str, Any], models: dict[str, Any] | None,
             library: dict[str, Any] | None = None) -> Snapshot:
    """Build a snapshot from /api/status, /api/models and /api/library answers."""
    model = status.get("model") or {}
    state = {"loading": TrayState.LOADING, "unloading": TrayState.LOADING,
             "failed": TrayState.ERROR, "unloaded": TrayState.IDLE}.get(status["state"],
                                                                         TrayState.READY)
    if state is TrayState.READY and (model.get("slots_busy") or model.get("queue")):
        state = TrayState.BUSY
    memory = status.get("memory", {})
    gpus = memory.get("gpus") or []
    if gpus:
        used = sum(g["used"] for g in gpus)
        total = sum(g["total"] for g in gpus)
        own = sum(g["process_used"] for g in gpus)
    else:
        ram = memory.get("ram", {})
        used, total, own = ram.get("used", 0), ram.get("total", 0), ram.get("process_rss", 0)
    choices = tuple(ModelChoice(m["id"], m["usable"], m["loaded"], m.get("error"))
                    for m in (models or {}).get("models", []))
    upstreams = tuple(UpstreamInfo(str(u.get("name")), u.get("up"), int(u.get("models") or 0),
                                   u.get("latency_ms"), u.get("error"))
                      for u in status.get("upstreams") or [])
    return Snapshot(state, model.get("id") or status.get("target"), bool(gpus), used, total, own,
                    float(model.get("tokens_per_second") or 0.0), status.get("failure"), choices,
                    upstreams=upstreams, **from_library(library), context=context_summary(model))


def context_summary(model: dict[str, Any]) -> str | None:
    """Slots × context per slot and the KV cache's type, from a status model entry."""
    per_slot = model.get("context_per_slot")
    if not per_slot or not model.get("slots"):
        return None
    size = f"{per_slot // 1024}K" if per_slot % 1024 == 0 else str(per_slot)
    return f"{model['slots']} × {size} context, {model.get('kv_cache_type') or 'f16'} KV"


def stopped(message: str | None = None) -> Snapshot:
    return Snapshot(TrayState.STOPPED, message=message)


def title(s: Snapshot) -> str:
    """The tooltip: what is loaded, memory, speed; or that the daemon is down."""
    if s.state is TrayState.STOPPED:
        return "Qwen Appliance: daemon not running"
    parts = [f"Qwen Appliance: {s.model or 'no model'} ({s.state.value})"]
    parts.append(memory_line(s))
    if s.context and s.state in (TrayState.READY, TrayState.BUSY):
        parts.append(s.context)
    if s.state is TrayState.BUSY and s.tokens_per_s:
        parts.append(f"{s.tokens_per_s:.1f} tok/s")
    if s.state is TrayState.ERROR and s.message:
        parts.append(s.message[:120])
    parts.extend(p.line for p in s.pulls if not p.finished)
    return "\n".join(parts)


def memory_line(s: Snapshot) -> str:
    if s.gpu:
        return (f"VRAM {s.mem_used / GIB:.1f} / {s.mem_total / GIB:.1f} GiB "
                f"(daemon {s.daemon_mem / GIB:.1f})")
    return (f"CPU only, RAM {s.mem_used / GIB:.1f} / {s.mem_total / GIB:.1f} GiB "
            f"(daemon {s.daemon_mem / GIB:.1f})")
