"""Load, unload and switch the resident model; requests name a model and get it just in time.

One model is resident at a time. A switch lets in-flight requests on the old model finish (for
up to `switch_wait_s`), holds new requests meanwhile, then loads the new model. Loading runs in a
worker thread so the event loop keeps answering /health and /api/status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from appliance.config import Settings
from appliance.engine.chat import ChatFormatter
from appliance.engine.runtime import LlamaRuntime, RuntimeOptions, gpu_offload_supported
from appliance.engine.scheduler import Scheduler, SchedulerObserver
from appliance.errors import LoadFailed, ServiceUnavailable
from appliance.gpu import GpuProbe
from appliance.offload import OffloadPlan, fewer_layers, plan_offload
from appliance.registry import ModelEntry, Registry

log = logging.getLogger(__name__)


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass
class LoadedModel:
    entry: ModelEntry
    runtime: LlamaRuntime
    scheduler: Scheduler
    formatter: ChatFormatter
    plan: OffloadPlan
    load_seconds: float
    enable_thinking: bool
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0


RuntimeFactory = Callable[..., LlamaRuntime]


class ModelManager:
    """Owns the resident model and every transition between states."""

    def __init__(self, settings: Settings, registry: Registry, probe: GpuProbe,
                 observer: SchedulerObserver | None = None,
                 runtime_factory: RuntimeFactory = LlamaRuntime) -> None:
        self.settings = settings
        self.registry = registry
        self.probe = probe
        self.observer = observer
        self.runtime_factory = runtime_factory
        self.current: LoadedModel | None = None
        self.state = ModelState.UNLOADED
        self.target: str | None = None  # the model being loaded or unloaded
        self.failure: str | None = None
        self.load_seconds_observed: Callable[[float], None] = lambda _: None
        self._transition = asyncio.Lock()
        self._settled = asyncio.Event()
        self._settled.set()
        self._gpu_build: bool | None = None

    # -- requests --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, name: str | None) -> AsyncIterator[LoadedModel]:
        """The model a request named (loading or switching to it first), held while in use."""
        while True:
            await self._settled.wait()
            model = self.current
            wanted = self._resolve_name(name)
            if model is not None and self.state is ModelState.READY and model.entry.id == wanted:
                break
            await self.load(wanted)
        model.in_flight += 1
        try:
            yield model
        finally:
            model.in_flight -= 1
            model.last_used = time.monotonic()

    def _resolve_name(self, name: str | None) -> str:
        if name:
            return self.registry.resolve(name).id
        if self.current is not None:
            return self.current.entry.id
        if self.settings.default_model:
            return self.registry.resolve(self.settings.default_model).id
        usable = [e for e in self.registry.scan() if e.usable]
        if usable:  # no default configured: the first model in the folder
            return usable[0].id
        raise ServiceUnavailable("no model is loaded, the request names none and the models "
                                 f"folder {self.registry.models_dir} has no usable model")

    # -- transitions -----------------------------------------------------------------------

    async def load(self, name: str) -> LoadedModel:
        """Make `name` the resident model (switching if another one is loaded)."""
        entry = self.registry.resolve(name)
        async with self._transition:
            if (self.current is not None and self.current.entry.id == entry.id
                    and self.state is ModelState.READY):
                return self.current
            self._settled.clear()
            try:
                await self._unload_locked()
                self.state, self.target, self.failure = ModelState.LOADING, entry.id, None
                started = time.perf_counter()
                try:
                    self.current = await asyncio.to_thread(self._load_blocking, entry)
                except Exception as e:
                    self.state, self.failure = ModelState.FAILED, str(e)
                    log.error("loading %s failed: %s", entry.id, e)
                    raise
                self.current.load_seconds = time.perf_counter() - started
                self.load_seconds_observed(self.current.load_seconds)
                self.state, self.target = ModelState.READY, None
                log.info("model %s ready in %.2f s (%s)", entry.id, self.current.load_seconds,
                         self.current.plan.reason)
                return self.current
            finally:
                self._settled.set()

    async def unload(self) -> None:
        async with self._transition:
            self._settled.clear()
            try:
                await self._unload_locked()
            finally:
                self._settled.set()

    async def _unload_locked(self) -> None:
        model = self.current
        if model is None:
            return
        self.state, self.target = ModelState.UNLOADING, model.entry.id
        deadline = time.monotonic() + self.settings.switch_wait_s
        while model.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self._close, model)
        self.current = None
        self.state, self.target = ModelState.UNLOADED, None
        log.info("model %s unloaded", model.entry.id)

    @staticmethod
    def _close(model: LoadedModel) -> None:
        model.scheduler.stop(drain_s=0)  # requests still running past the wait are cancelled
        model.runtime.close()

    def gpu_build(self) -> bool:
        if self._gpu_build is None:
            self._gpu_build = gpu_offload_supported()
        return self._gpu_build

    def plan_for(self, entry: ModelEntry) -> tuple[OffloadPlan, int]:
        """The offload plan for `entry` now, and its context tokens per request slot."""
        assert entry.info is not None
        overrides = self.settings.model_overrides(entry.id)
        trained = entry.info.context_length or self.settings.context_length
        context = min(overrides.context_length or self.settings.context_length, trained)
        devices = self.probe.devices()
        best = max(devices, key=lambda d: d.free, default=None)
        plan = plan_offload(
            entry.info, n_ctx_total=context * self.settings.parallel,
            free_vram=best.free if best else 0, device=best.name if best else "cpu",
            margin=self.settings.vram_margin_mib * 2**20, gpu_build=self.gpu_build(),
            forced_layers=overrides.gpu_layers)
        return plan, context

    def _load_blocking(self, entry: ModelEntry) -> LoadedModel:
        assert entry.info is not None
        plan, context = self.plan_for(entry)
        layers = plan.n_gpu_layers
        while True:
            options = RuntimeOptions(n_gpu_layers=layers, context_per_seq=context,
                                     n_seq=self.settings.parallel, n_threads=self.settings.threads,
                                     flash_attn=self.settings.flash_attn)
            try:
                runtime = self.runtime_factory(entry.path, options)
                break
            except LoadFailed:
                if layers == 0:
                    raise
                layers = fewer_layers(layers)
                log.warning("load of %s failed; retrying with %d GPU layers", entry.id, layers)
        if layers != plan.n_gpu_layers:
            plan = OffloadPlan(layers, plan.n_layers, plan.device if layers else "cpu",
                               f"retried with {layers} GPU layers after a failed load",
                               plan.free_vram, margin=plan.margin)
        meta = entry.info.metadata
        tokens_bos = runtime.token_text(_special(meta, "bos"))
        formatter = ChatFormatter(meta.get("tokenizer.chat_template"),
                                  bos_token=tokens_bos if runtime.add_bos else "",
                                  eos_token=runtime.token_text(_special(meta, "eos")),
                                  architecture=entry.info.architecture)
        thinking = self.settings.model_overrides(entry.id).enable_thinking
        scheduler = Scheduler(runtime, self.settings.parallel, self.settings.max_queue,
                              self.observer, nice=self.settings.engine_nice)
        return LoadedModel(entry, runtime, scheduler, formatter, plan, 0.0,
                           self.settings.enable_thinking if thinking is None else thinking)

    # -- housekeeping ----------------------------------------------------------------------

    async def unload_when_idle(self, poll_s: float = 1.0) -> None:
        """Give memory back after `keep_alive_s` without requests (runs as a background task)."""
        keep_alive = self.settings.keep_alive_s
        if keep_alive <= 0:
            return
        while True:
            await asyncio.sleep(poll_s)
            model = self.current
            if (model is not None and self.state is ModelState.READY and model.in_flight == 0
                    and model.scheduler.idle()
                    and time.monotonic() - model.last_used > keep_alive):
                log.info("unloading %s after %.0f s idle", model.entry.id, keep_alive)
                await self.unload()

    async def drain(self, grace_s: float) -> None:
        """On shutdown: let requests finish for `grace_s`, then end the rest with an error."""
        model = self.current
        if model is None:
            return
        deadline = time.monotonic() + grace_s
        while model.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if model.in_flight:
            log.info("shutting down: ending %d requests still running", model.in_flight)
            model.scheduler.abort_all(ServiceUnavailable("the server is shutting down",
                                                         retry_after=5))

    async def close(self) -> None:
        await self.unload()

    def status(self) -> dict[str, Any]:
        model = self.current
        data: dict[str, Any] = {"state": self.state.value, "target": self.target,
                                "failure": self.failure, "model": None}
        if model is not None:
            data["model"] = {
                "id": model.entry.id,
                "offload": model.plan.describe(),
                "context_per_request": model.runtime.context_per_seq,
                "slots": len(model.scheduler.slots),
                "slots_busy": model.scheduler.busy_slots,
                "queue": model.scheduler.queue_depth,
                "tokens_per_second": round(model.scheduler.tokens_per_second(), 2),
                "load_seconds": round(model.load_seconds, 3),
                "in_flight": model.in_flight,
            }
        return data


def _special(meta: dict[str, Any], kind: str) -> int:
    value = meta.get(f"tokenizer.ggml.{kind}_token_id")
    return int(value) if isinstance(value, int) else 0
