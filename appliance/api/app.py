"""The FastAPI app factory: models load in the lifespan, never at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from functools import partial

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance import __version__
from appliance.api.errors import ErrorShapes, install_error_handlers
from appliance.api.routes import (
    anthropic,
    control,
    embeddings,
    library,
    ollama,
    openai,
    responses,
)
from appliance.api.security import SecurityMiddleware
from appliance.config import Settings
from appliance.engine.embedding import EmbeddingRuntime
from appliance.engine.runtime import LlamaRuntime
from appliance.errors import ModelNotFound, ModelUnusable
from appliance.gpu import GpuProbe, open_probe
from appliance.metrics import Metrics
from appliance.registry import Registry
from appliance.residency.loader import EmbeddingFactory, ModelLoader, RuntimeFactory
from appliance.residency.manager import ModelManager
from appliance.upstream import UpstreamPool

log = logging.getLogger(__name__)


class RequestCounter:
    """Counts responses by route and status for /metrics (pure ASGI: streaming stays cheap)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")
                self.metrics.requests.labels(route=path, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(settings: Settings, *, probe: GpuProbe | None = None,
               runtime_factory: RuntimeFactory = LlamaRuntime,
               embedding_factory: EmbeddingFactory = EmbeddingRuntime) -> FastAPI:
    """Build the daemon's app; `probe` and the runtime factories are the seams for tests."""
    api_key = settings.read_api_key()
    upstream_keys = settings.read_upstream_keys()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gpu = probe or await asyncio.to_thread(open_probe, settings.gpu)
        metrics = app.state.metrics
        registry = Registry(settings.models_dir.expanduser(), settings.aliases)
        await asyncio.to_thread(registry.scan)
        loader = ModelLoader(settings, gpu, observer=metrics, runtime_factory=runtime_factory,
                             catalog=registry.scan,
                             embedding_factory=embedding_factory)
        manager = ModelManager(settings, registry, loader)
        manager.load_seconds_observed = metrics.model_load_seconds.set
        app.state.registry, app.state.manager, app.state.probe = registry, manager, gpu
        upstreams = UpstreamPool(settings.upstreams, upstream_keys, metrics,
                                 is_local=partial(_is_local, registry),
                                 local_now=registry.local_now)
        app.state.upstreams = upstreams
        upstreams.start()
        tasks = []
        if settings.default_model:
            manager.starting = settings.default_model
            tasks.append(asyncio.create_task(_load_default(manager, settings.default_model)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await upstreams.close()
            await manager.close()
            gpu.close()

    app = FastAPI(title="Qwen Appliance", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    shapes = ErrorShapes()  # dialects add their own error shapes for their paths
    ollama.register_error_shape(shapes)
    shapes.add(anthropic.PREFIX, anthropic.anthropic_shape)
    install_error_handlers(app, shapes)
    app.include_router(openai.router)
    app.include_router(ollama.router)
    app.include_router(anthropic.router)
    app.include_router(responses.router)
    app.include_router(control.router)
    app.include_router(library.router)
    app.include_router(embeddings.router)
    app.add_middleware(RequestCounter, metrics=app.state.metrics)
    app.add_middleware(SecurityMiddleware, allowed_hosts=set(settings.allowed_hosts)
                       | {settings.host}, api_key=api_key,
                       max_body_bytes=settings.max_body_bytes, cors_origins=settings.cors_origins,
                       shapes=shapes)
    if settings.cors_origins:
        # Outermost: it answers preflights and labels our refusals. An explicit origin list
        # only, and no credentials: a page can call, not impersonate.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_credentials=False, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-Api-Key",
                                          "Anthropic-Version"])
    return app


def _is_local(registry: Registry, name: str) -> bool:
    """Whether `name` is a local model or alias (blocking: it may rescan the folder)."""
    try:
        registry.resolve(name)
    except ModelNotFound:
        return False
    except ModelUnusable:
        return True  # local, and its own error says why it cannot serve
    return True


async def _load_default(manager: ModelManager, name: str) -> None:
    try:
        await manager.load(name)
    except Exception as e:  # the daemon keeps serving; the status shows the failure
        log.error("default model %s did not load: %s", name, e)
    finally:
        manager.starting = None
