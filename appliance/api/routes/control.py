"""Health, metrics and the control API the tray and the CLI use."""

from __future__ import annotations

import os
from typing import Any

import psutil
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from appliance import __version__
from appliance.api.deps import ManagerDep, MetricsDep, ProbeDep, RegistryDep
from appliance.gpu import GpuProbe
from appliance.lifecycle import ModelManager, ModelState
from appliance.metrics import Metrics

router = APIRouter()


def memory_status(probe: GpuProbe) -> dict[str, Any]:
    """Measured memory: NVML for each GPU, psutil for RAM."""
    process = psutil.Process(os.getpid())
    ram = psutil.virtual_memory()
    return {
        "gpu_probe": probe.name,
        "gpus": [{"index": d.index, "name": d.name, "total": d.total, "used": d.used,
                  "free": d.free, "process_used": d.process_used} for d in probe.devices()],
        "ram": {"total": ram.total, "used": ram.total - ram.available,
                "process_rss": process.memory_info().rss},
    }


@router.get("/health", response_model=None)
async def health(manager: ManagerDep) -> JSONResponse:
    status = manager.status()
    loading = manager.state in (ModelState.LOADING, ModelState.UNLOADING)
    body = {"status": "loading" if loading else "ok", "state": status["state"],
            "model": status["model"]["id"] if status["model"] else None}
    return JSONResponse(body, status_code=503 if loading else 200,
                        headers={"Retry-After": "1"} if loading else None)


@router.get("/api/status")
async def api_status(manager: ManagerDep, probe: ProbeDep) -> dict[str, Any]:
    return {"version": __version__, "pid": os.getpid(), **manager.status(),
            "memory": memory_status(probe)}


@router.get("/api/models")
async def api_models(registry: RegistryDep, manager: ManagerDep) -> dict[str, Any]:
    current = manager.current.entry.id if manager.current else None
    models = []
    for entry in registry.scan():
        item = entry.describe()
        item["aliases"] = registry.aliases_of(entry.id)
        item["loaded"] = entry.id == current
        models.append(item)
    return {"models": models, "models_dir": str(registry.models_dir)}


@router.post("/api/models/{model_id}/load")
async def api_load(model_id: str, manager: ManagerDep) -> dict[str, Any]:
    await manager.load(model_id)
    return manager.status()


@router.post("/api/models/{model_id}/unload")
async def api_unload(model_id: str, manager: ManagerDep) -> dict[str, Any]:
    if manager.current is not None and model_id.lower() in (manager.current.entry.id, "current"):
        await manager.unload()
    return manager.status()


@router.post("/api/unload")
async def api_unload_current(manager: ManagerDep) -> dict[str, Any]:
    await manager.unload()
    return manager.status()


def refresh_gauges(manager: ModelManager, probe: GpuProbe) -> Any:
    def refresh(metrics: Metrics) -> None:
        model = manager.current
        metrics.queue_depth.set(model.scheduler.queue_depth if model else 0)
        metrics.slots_busy.set(model.scheduler.busy_slots if model else 0)
        for d in probe.devices():
            metrics.vram_used.labels(gpu=str(d.index)).set(d.used)
            metrics.vram_total.labels(gpu=str(d.index)).set(d.total)
    return refresh


@router.get("/metrics")
async def prometheus(metrics: MetricsDep, manager: ManagerDep, probe: ProbeDep) -> Response:
    return Response(metrics.render(refresh_gauges(manager, probe)),
                    media_type=CONTENT_TYPE_LATEST)
