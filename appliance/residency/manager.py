"""Which models are resident, and every transition between states.

Several models can be resident: by default one chat model and embedding models beside it, more
chat models up to `max_chat_models`. A request names a model and gets it just in time.

- Admission: a model loads only if the offload planner's figures for it fit beside the resident
  ones (RAM within the loader's budget; on a GPU, all layers in free VRAM when evicting idle
  models would make that possible). Otherwise the least recently used *idle*, unpinned model is
  unloaded first. A model serving requests is never evicted to make room: the load waits for one
  to go idle (up to `switch_wait_s`, woken by a condition), then answers 503 with Retry-After.
- A switch between chat models past `max_chat_models` keeps the single-model behaviour: the old
  one's requests may finish for `switch_wait_s`, the rest end with an error.
- Keep-alive per model: a timer per model, re-armed when its last request ends; the default per
  kind (`keep_alive_s`, `keep_alive_embedding_s`), a per-request override (`use(...,
  keep_alive_s=...)`: < 0 forever, 0 unload after this request, > 0 seconds), and `pin = true`
  under `[models.ID]` (never unloaded by a timer or for room; an explicit unload still works).
- If a chat engine thread dies, that model is dropped, /health says why, and the next request
  loads it afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from enum import Enum
from typing import Any

from appliance.config import Settings
from appliance.errors import InvalidRequest, ServiceUnavailable
from appliance.registry import ModelEntry, Registry
from appliance.residency.loader import ModelLoader, Resident, in_daemon_thread
from appliance.residency.model import CHAT, EMBEDDING, LoadedModel, model_kind
from appliance.residency.status import resident_status

log = logging.getLogger(__name__)
MIB = 2**20


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


class ModelManager:
    """The state machine around the resident models; loading itself is the loader's job."""

    def __init__(self, settings: Settings, registry: Registry, loader: ModelLoader) -> None:
        self.settings = settings
        self.registry = registry
        self.loader = loader
        self.resident: dict[str, Resident] = {}
        self._chat_id: str | None = None  # the current (most recently used) chat model
        self.state = ModelState.UNLOADED
        self.target: str | None = None  # the model being loaded or unloaded
        self.failure: str | None = None  # why the last load failed
        self.engine_failure: str | None = None  # why an engine died, until the next load
        # The default model from start-up until its load settles: health says "loading" from
        # the first request on, not "ok" for the moment before the load takes the lock.
        self.starting: str | None = None
        self.load_seconds_observed: Callable[[float], None] = lambda _: None
        self.loads: dict[str, int] = {}  # loads per model id since start (reloads show here)
        self._transition = asyncio.Lock()
        self._idle = asyncio.Condition()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()  # held so they are not collected mid-run

    @property
    def current(self) -> LoadedModel | None:
        """The current chat model (what `status()["model"]` shows), if resident."""
        model = self.resident.get(self._chat_id) if self._chat_id else None
        return model if isinstance(model, LoadedModel) else None

    # -- requests --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, name: str | None, *, kind: str = CHAT,
                  keep_alive_s: float | None = None) -> AsyncIterator[Any]:
        """The model a request named (loaded just in time), held while in use. `kind` is what
        the route serves; `keep_alive_s` overrides the model's keep-alive from now on."""
        while True:
            wanted = await asyncio.to_thread(self._resolve_name, name, kind)
            model = self.resident.get(wanted.id)
            if model is not None:
                break
            await self.load(wanted.id)
        model.in_flight += 1
        # The latest request sets the keep-alive, as in Ollama: None brings back the default.
        model.keep_alive_s = keep_alive_s
        if kind == CHAT:
            self._chat_id = model.id
        self._cancel_keep_alive(model)
        try:
            yield model
        finally:
            model.in_flight -= 1
            model.last_used = time.monotonic()
            if model.in_flight == 0:
                async with self._idle:
                    self._idle.notify_all()
                if self.resident.get(model.id) is model:
                    self._arm_keep_alive(model)

    def _resolve_name(self, name: str | None, kind: str) -> ModelEntry:
        entry = self.registry.resolve(name) if name else self._default_entry(kind)
        if model_kind(entry) != kind:
            if kind == EMBEDDING:
                installed = self.installed(EMBEDDING)
                raise InvalidRequest(
                    f"model {entry.id!r} is a chat model and cannot embed; embedding models "
                    f"installed: {', '.join(installed) or 'none (add a Qwen3-Embedding GGUF)'}",
                    param="model")
            raise InvalidRequest(f"model {entry.id!r} is an embedding model: use it with "
                                 "/v1/embeddings or /v1/rerank", param="model")
        return entry

    def installed(self, kind: str) -> list[str]:
        """Ids of the usable models of one kind in the models folder (blocking: scans)."""
        return [e.id for e in self.registry.scan() if e.usable and model_kind(e) == kind]

    def _default_entry(self, kind: str) -> ModelEntry:
        resident = [m for m in self.resident.values() if m.kind == kind]
        if kind == CHAT and self.current is not None:
            return self.current.entry
        if resident:
            return max(resident, key=lambda m: m.last_used).entry
        if kind == CHAT and self.settings.default_model:
            return self.registry.resolve(self.settings.default_model)
        usable = [e for e in self.registry.scan() if e.usable and model_kind(e) == kind]
        if usable:  # no default configured: the first model of that kind in the folder
            return usable[0]
        raise ServiceUnavailable(f"no {kind} model is loaded, the request names none and the "
                                 f"models folder {self.registry.models_dir} has none")

    # -- transitions -----------------------------------------------------------------------

    async def load(self, name: str, *, explicit: bool = False) -> Resident:
        """Make `name` resident (making room first); `explicit` (a user's load) retries a
        remembered failure."""
        entry = await asyncio.to_thread(self.registry.resolve, name)
        async with self._transition:
            model = self.resident.get(entry.id)
            if model is not None:
                if model.kind == CHAT:
                    self._chat_id = model.id
                return model
            if explicit:
                self.loader.failures.forget(entry)
            await asyncio.to_thread(self.loader.preflight, entry)
            await self._make_room(entry)
            self.state, self.target, self.failure = ModelState.LOADING, entry.id, None
            started = time.perf_counter()
            try:
                model = await in_daemon_thread(
                    lambda: self.loader.load(entry, self._fatal_callback()), "model-load")
            except Exception as e:
                self.state = ModelState.READY if self.resident else ModelState.FAILED
                # A failed state keeps naming the model that failed (the tray shows it).
                self.target = None if self.resident else entry.id
                self.failure = getattr(e, "message", str(e))
                log.error("loading %s failed: %s", entry.id, self.failure)
                raise
            model.load_seconds = time.perf_counter() - started
            model.pinned = self._pinned(entry.id)
            self.resident[model.id] = model
            self.loads[model.id] = self.loads.get(model.id, 0) + 1
            if model.kind == CHAT:
                self._chat_id, self.engine_failure = model.id, None
            self.load_seconds_observed(model.load_seconds)
            self.state, self.target = ModelState.READY, None
            self._arm_keep_alive(model)
            log.info("model %s (%s) ready in %.2f s (%s)", entry.id, model.kind,
                     model.load_seconds, model.plan.reason)
            return model

    def _pinned(self, model_id: str) -> bool:
        return bool(getattr(self.settings.model_overrides(model_id), "pin", False))

    async def _make_room(self, entry: ModelEntry) -> None:
        """Unload what must go before `entry` loads: chat models past the cap (a switch), then
        idle models, least recently used first, until the planner's figures fit."""
        if model_kind(entry) == CHAT:
            cap = max(1, getattr(self.settings, "max_chat_models", 1))
            while True:
                chats = [m for m in self.resident.values() if m.kind == CHAT and not m.pinned]
                if len(chats) + self._count_pinned(CHAT) < cap or not chats:
                    break
                victim = min(chats, key=lambda m: (m.busy, m.last_used))
                await self._unload_model(victim, f"the server switched to model {entry.id}")
        deadline = time.monotonic() + self.settings.switch_wait_s
        while self.resident:
            reason = await asyncio.to_thread(self._does_not_fit, entry)
            if reason is None:
                return
            idle = [m for m in self.resident.values() if not m.busy and not m.pinned]
            if idle:
                victim = min(idle, key=lambda m: m.last_used)
                log.info("unloading idle %s to make room for %s (%s)", victim.id, entry.id,
                         reason)
                await self._unload_model(victim, f"unloaded to make room for {entry.id}")
                continue
            busy = [m.id for m in self.resident.values() if m.busy and not m.pinned]
            left = deadline - time.monotonic()
            if not busy or left <= 0:
                held = ", ".join(m.id + (" (pinned)" if m.pinned else " (serving requests)")
                                 for m in self.resident.values())
                raise ServiceUnavailable(f"model {entry.id} does not fit beside {held}: "
                                         f"{reason}", retry_after=5 if busy else 60)
            await self._wait_any_idle(left)

    def _count_pinned(self, kind: str) -> int:
        return sum(1 for m in self.resident.values() if m.kind == kind and m.pinned)

    def _does_not_fit(self, entry: ModelEntry) -> str | None:
        """Why `entry` does not fit beside the resident models now, or None (blocking: NVML)."""
        plan, _ = self.loader.plan_for(entry)
        ram_used = sum(m.plan.planned_ram for m in self.resident.values())
        budget = self.loader.ram_budget()
        if ram_used + plan.planned_ram > budget:
            return (f"it needs {plan.planned_ram // MIB} MiB of RAM, "
                    f"{max(0, budget - ram_used) // MIB} MiB of the budget are free")
        if plan.free_vram > 0 and not plan.all_on_gpu:  # a GPU, and this plan leaves layers off it
            idle_vram = sum(m.plan.planned_vram for m in self.resident.values()
                            if not m.busy and not m.pinned)
            if idle_vram:
                better, _ = self.loader.plan_for(entry, extra_vram=idle_vram)
                if better.n_gpu_layers > plan.n_gpu_layers:
                    return (f"only {plan.n_gpu_layers} of {plan.n_layers + 1} layers fit in "
                            "free VRAM")
        return None

    async def _wait_any_idle(self, timeout: float) -> None:
        async with self._idle:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait_for(lambda: any(
                    not m.busy and not m.pinned for m in self.resident.values())), timeout)

    async def unload(self, reason: str = "the model was unloaded", *,
                     model_id: str | None = None) -> None:
        """Unload one resident model (pinned or not), or every one when `model_id` is None."""
        async with self._transition:
            targets = [m for m in self.resident.values()
                       if model_id is None or m.id == model_id.lower()]
            for model in targets:
                await self._unload_model(model, reason)

    async def _unload_model(self, model: Resident, reason: str) -> None:
        """Caller holds the transition lock. New requests stop finding the model at once;
        running ones may finish for `switch_wait_s`; the rest end with `reason`."""
        self._cancel_keep_alive(model)
        if self.resident.get(model.id) is not model:
            return
        del self.resident[model.id]  # before any await: no request can take it from now on
        self.state, self.target = ModelState.UNLOADING, model.id
        await self._wait_idle(model, self.settings.switch_wait_s)
        await asyncio.to_thread(self.loader.close, model, reason)
        self.state = ModelState.READY if self.resident else ModelState.UNLOADED
        self.target = None
        log.info("model %s unloaded", model.id)

    async def _wait_idle(self, model: Resident, timeout: float) -> None:
        async with self._idle:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait_for(lambda: model.in_flight == 0),
                                       timeout)

    # -- keep-alive ------------------------------------------------------------------------

    def keep_alive_for(self, model: Resident) -> float:
        """Seconds idle before unloading (< 0: never); the request's override wins."""
        if model.keep_alive_s is not None:
            return model.keep_alive_s
        if model.kind == EMBEDDING:
            default = getattr(self.settings, "keep_alive_embedding_s", self.settings.keep_alive_s)
        else:
            default = self.settings.keep_alive_s
        return default if default > 0 else -1.0  # in settings, 0 means never

    def _arm_keep_alive(self, model: Resident) -> None:
        self._cancel_keep_alive(model)
        if model.pinned or model.busy:
            return
        seconds = self.keep_alive_for(model)
        if seconds < 0:
            return
        self._timers[model.id] = self._loop.call_later(seconds, self._keep_alive_expired, model)
        model.expires_at = time.time() + seconds

    def _cancel_keep_alive(self, model: Resident) -> None:
        timer = self._timers.pop(model.id, None)
        if timer is not None:
            timer.cancel()
        model.expires_at = None

    def expires_at(self, model: Resident | None = None) -> float | None:
        """When `model` (by default the current chat model) will be unloaded (wall clock; inf:
        it stays), None when there is none. A model in use counts its timeout from now."""
        model = model or self.current
        if model is None:
            return None
        if model.expires_at is not None:
            return model.expires_at
        seconds = -1.0 if model.pinned else self.keep_alive_for(model)
        return math.inf if seconds < 0 else time.time() + seconds

    def _keep_alive_expired(self, model: Resident) -> None:
        self._timers.pop(model.id, None)
        if self.resident.get(model.id) is model and not model.busy and not model.pinned:
            log.info("unloading %s after %.0f s idle", model.id, self.keep_alive_for(model))
            self._background(self.unload("the model was unloaded after being idle",
                                         model_id=model.id))

    # -- engine failure --------------------------------------------------------------------

    def _fatal_callback(self) -> Callable[[BaseException], None]:
        def on_fatal(error: BaseException) -> None:  # engine thread
            self._loop.call_soon_threadsafe(self._engine_died, error)
        return on_fatal

    def _engine_died(self, error: BaseException) -> None:
        model = next((m for m in self.resident.values()
                      if isinstance(m, LoadedModel) and m.scheduler.fatal is error), None)
        if model is None:
            return
        self.engine_failure = f"the engine of {model.id} stopped: {error!r}"
        log.error("%s; it will be loaded again on the next request", self.engine_failure)
        self._background(self._drop(model))

    async def _drop(self, model: LoadedModel) -> None:
        async with self._transition:
            if self.resident.get(model.id) is not model:
                return
            self._cancel_keep_alive(model)
            del self.resident[model.id]
            self.state = ModelState.READY if self.resident else ModelState.FAILED
            self.failure = self.engine_failure
            model.scheduler.turns.leave()  # its thread is gone: it never takes a turn again
            await asyncio.to_thread(model.runtime.close)

    def engine_healthy(self, stall_limit_s: float) -> bool:
        """False when a chat engine thread died or one decode step has run past
        `stall_limit_s`: the systemd watchdog stops being fed, and systemd restarts the daemon."""
        return all(m.scheduler.alive() and m.scheduler.stalled_for() < stall_limit_s
                   for m in self.resident.values() if isinstance(m, LoadedModel))

    def _background(self, coroutine: Any) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- shutdown --------------------------------------------------------------------------

    async def drain(self, grace_s: float) -> None:
        """On shutdown: let requests finish for `grace_s`, then end the rest with an error."""
        models = list(self.resident.values())
        deadline = time.monotonic() + grace_s
        for model in models:
            await self._wait_idle(model, max(0.0, deadline - time.monotonic()))
        for model in models:
            if model.in_flight and isinstance(model, LoadedModel):
                log.info("shutting down: ending %d requests still running on %s",
                         model.in_flight, model.id)
                model.scheduler.abort_all(ServiceUnavailable("the server is shutting down",
                                                             retry_after=5))

    async def close(self) -> None:
        for model in list(self.resident.values()):
            self._cancel_keep_alive(model)
        if self.state is ModelState.LOADING:
            # The load runs on a daemon thread; waiting for it could outlast the stop timeout.
            log.info("shutting down during the load of %s; not waiting for it", self.target)
            return
        await self.unload("the server is shutting down")

    def serving_state(self) -> ModelState:
        """The state clients see: a ready chat model stays ready while another model loads or
        unloads beside it (a switch away from it removes it from the resident ones first)."""
        current = self.current
        if (self.state in (ModelState.LOADING, ModelState.UNLOADING) and current is not None
                and self.target != current.id):
            return ModelState.READY
        if self.state is ModelState.UNLOADED and self.starting:
            return ModelState.LOADING
        return self.state

    def transition(self) -> dict[str, str] | None:
        """The load or unload running now, whichever model it concerns."""
        if self.state in (ModelState.LOADING, ModelState.UNLOADING) and self.target:
            return {"action": self.state.value, "model": self.target}
        if self.state is ModelState.UNLOADED and self.starting:
            return {"action": ModelState.LOADING.value, "model": self.starting}
        return None

    def status(self) -> dict[str, Any]:
        models = [resident_status(m, keep_alive_s=self.keep_alive_for(m),
                                  loads=self.loads.get(m.id, 0))
                  for m in sorted(self.resident.values(), key=lambda m: (m.kind, m.id))]
        current = self.current
        return {"state": self.serving_state().value, "target": self.target,
                "transition": self.transition(), "failure": self.failure,
                "engine_failure": self.engine_failure,
                "model": next((m for m in models if current and m["id"] == current.id), None),
                "models": models}
