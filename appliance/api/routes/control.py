"""Health, metrics and the control API the tray and the CLI use."""

from __future__ import annotations

import os
from typing import Any

import psutil
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from appliance import __version__
from appliance.api.core import off_loop
from appliance.api.deps import ManagerDep, MetricsDep, ProbeDep, RegistryDep, UpstreamsDep
from appliance.gpu import GpuProbe
from appliance.metrics import Metrics
from appliance.registry import Registry
from appliance.residency.manager import ModelManager, ModelState

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
    if manager.engine_failure:  # until the next load brings a working engine back
        body.update(status="error", reason=manager.engine_failure)
    unhealthy = loading or manager.engine_failure is not None
    return JSONResponse(body, status_code=503 if unhealthy else 200,
                        headers={"Retry-After": "1"} if unhealthy else None)


@router.get("/api/status")
async def api_status(manager: ManagerDep, probe: ProbeDep,
                     upstreams: UpstreamsDep) -> dict[str, Any]:
    return {"version": __version__, "pid": os.getpid(), **manager.status(),
            "memory": await off_loop(memory_status, probe), "upstreams": upstreams.status()}


def _describe_models(registry: Registry, current: str | None) -> list[dict[str, Any]]:
    models = []
    for entry in registry.scan():
        item = entry.describe()
        item["aliases"] = registry.aliases_of(entry.id)
        item["loaded"] = entry.id == current
        models.append(item)
    return models


@router.get("/api/models")
async def api_models(registry: RegistryDep, manager: ManagerDep) -> dict[str, Any]:
    current = manager.current.id if manager.current else None
    return {"models": await off_loop(_describe_models, registry, current),
            "models_dir": str(registry.models_dir)}


@router.post("/api/models/{model_id}/load")
async def api_load(model_id: str, manager: ManagerDep) -> dict[str, Any]:
    await manager.load(model_id, explicit=True)
    return manager.status()


@router.post("/api/models/{model_id}/unload")
async def api_unload(model_id: str, manager: ManagerDep) -> dict[str, Any]:
    wanted = model_id.lower()
    if wanted == "current" and manager.current is not None:
        wanted = manager.current.id
    if wanted in manager.resident:
        await manager.unload(model_id=wanted)
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
