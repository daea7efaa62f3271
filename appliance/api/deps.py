"""The app's shared objects as FastAPI dependencies, so handlers read plainly.

Async on purpose: FastAPI runs a plain `def` dependency on a worker thread, one thread hop per
dependency per request, for what is an attribute read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from appliance.config import Settings
from appliance.gpu import GpuProbe
from appliance.metrics import Metrics
from appliance.registry import Registry
from appliance.residency.manager import ModelManager
from appliance.upstream import UpstreamPool


async def _manager(request: Request) -> ModelManager:
    return request.app.state.manager


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def _registry(request: Request) -> Registry:
    return request.app.state.registry


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _upstreams(request: Request) -> UpstreamPool:
    return request.app.state.upstreams


async def _probe(request: Request) -> GpuProbe:
    return request.app.state.probe


ManagerDep = Annotated[ModelManager, Depends(_manager)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
RegistryDep = Annotated[Registry, Depends(_registry)]
SettingsDep = Annotated[Settings, Depends(_settings)]
ProbeDep = Annotated[GpuProbe, Depends(_probe)]
UpstreamsDep = Annotated[UpstreamPool, Depends(_upstreams)]
