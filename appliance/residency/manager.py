"""Which model is resident, and every transition between states.

One model is resident at a time. A request names a model and gets it just in time. A switch
first checks the new file (preflight), then lets requests on the old model finish for up to
`switch_wait_s` (woken by a condition, not by polling), ends the rest with an error, and loads
the new one. Idle models leave after `keep_alive_s` (a timer, re-armed when the last request
ends; a request may set its own, as Ollama's `keep_alive` does). If the engine thread dies, the
model is dropped, /health says why, and the next request loads it afresh.
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
from appliance.errors import ServiceUnavailable
from appliance.registry import ModelEntry, Registry
from appliance.residency.loader import ModelLoader, in_daemon_thread
from appliance.residency.model import LoadedModel

log = logging.getLogger(__name__)


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


class ModelManager:
    """The state machine around one resident model; loading itself is the loader's job."""

    def __init__(self, settings: Settings, registry: Registry, loader: ModelLoader) -> None:
        self.settings = settings
        self.registry = registry
        self.loader = loader
        self.current: LoadedModel | None = None
        self.state = ModelState.UNLOADED
        self.target: str | None = None  # the model being loaded or unloaded
        self.failure: str | None = None  # why the last load failed
        self.engine_failure: str | None = None  # why the engine died, until the next load
        self.load_seconds_observed: Callable[[float], None] = lambda _: None
        self._transition = asyncio.Lock()
        self._settled = asyncio.Event()
        self._settled.set()
        self._idle = asyncio.Condition()
        self._keep_alive: asyncio.TimerHandle | None = None
        self._expires_at: float | None = None  # wall clock of the armed timer; inf: stays
        self._idle_timeout: float | None = None  # idle seconds before unloading; None: never
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()  # held so they are not collected mid-run

    # -- requests --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, name: str | None, keep_alive_s: float | None = None
                  ) -> AsyncIterator[LoadedModel]:
        """The model a request named (loading or switching to it first), held while in use.

        `keep_alive_s` is how long the model stays once idle, from this request on (the latest
        request to start sets it, as in Ollama): 0 unloads it when the requests holding it end,
        a negative value keeps it loaded, None means the configured `keep_alive_s`.
        """
        while True:
            await self._settled.wait()
            wanted = await asyncio.to_thread(self._resolve_name, name)
            model = self.current
            if model is not None and self.state is ModelState.READY and model.id == wanted.id:
                break
            await self.load(wanted.id)
        model.in_flight += 1
        self._idle_timeout = self._timeout(keep_alive_s)
        self._cancel_keep_alive()
        try:
            yield model
        finally:
            model.in_flight -= 1
            model.last_used = time.monotonic()
            if model.in_flight == 0:
                async with self._idle:
                    self._idle.notify_all()
                self._arm_keep_alive(model)

    def _resolve_name(self, name: str | None) -> ModelEntry:
        if name:
            return self.registry.resolve(name)
        if self.current is not None:
            return self.current.entry
        if self.settings.default_model:
            return self.registry.resolve(self.settings.default_model)
        usable = [e for e in self.registry.scan() if e.usable]
        if usable:  # no default configured: the first model in the folder
            return usable[0]
        raise ServiceUnavailable("no model is loaded, the request names none and the models "
                                 f"folder {self.registry.models_dir} has no usable model")

    # -- transitions -----------------------------------------------------------------------

    async def load(self, name: str, *, explicit: bool = False) -> LoadedModel:
        """Make `name` the resident model; `explicit` (a user's load) retries a remembered
        failure."""
        entry = await asyncio.to_thread(self.registry.resolve, name)
        async with self._transition:
            if self.current is not None and self.current.id == entry.id \
                    and self.state is ModelState.READY:
                return self.current
            if explicit:
                self.loader.failures.forget(entry)
            await asyncio.to_thread(self.loader.preflight, entry)
            self._settled.clear()
            try:
                await self._unload_locked(f"the server switched to model {entry.id}")
                self.state, self.target, self.failure = ModelState.LOADING, entry.id, None
                started = time.perf_counter()
                try:
                    model = await in_daemon_thread(
                        lambda: self.loader.load(entry, self._fatal_callback()), "model-load")
                except Exception as e:
                    self.state, self.target = ModelState.FAILED, None
                    self.failure = getattr(e, "message", str(e))
                    log.error("loading %s failed: %s", entry.id, self.failure)
                    raise
                model.load_seconds = time.perf_counter() - started
                self.current, self.engine_failure = model, None
                self.load_seconds_observed(model.load_seconds)
                self.state, self.target = ModelState.READY, None
                self._idle_timeout = self._timeout(None)
                self._arm_keep_alive(model)
                log.info("model %s ready in %.2f s (%s)", entry.id, model.load_seconds,
                         model.plan.reason)
                return model
            finally:
                self._settled.set()

    async def unload(self, reason: str = "the model was unloaded") -> None:
        async with self._transition:
            self._settled.clear()
            try:
                await self._unload_locked(reason)
            finally:
                self._settled.set()

    async def _unload_locked(self, reason: str) -> None:
        model = self.current
        if model is None:
            return
        self._cancel_keep_alive()
        self.state, self.target = ModelState.UNLOADING, model.id
        await self._wait_idle(model, self.settings.switch_wait_s)
        await asyncio.to_thread(self.loader.close, model, reason)
        self.current = None
        self.state, self.target = ModelState.UNLOADED, None
        log.info("model %s unloaded", model.id)

    async def _wait_idle(self, model: LoadedModel, timeout: float) -> None:
        async with self._idle:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait_for(lambda: model.in_flight == 0),
                                       timeout)

    # -- keep-alive ------------------------------------------------------------------------

    def _timeout(self, keep_alive_s: float | None) -> float | None:
        """Seconds idle before unloading; None: never (a negative request, or setting 0)."""
        if keep_alive_s is None:
            return self.settings.keep_alive_s if self.settings.keep_alive_s > 0 else None
        return None if keep_alive_s < 0 or math.isinf(keep_alive_s) else keep_alive_s

    def _arm_keep_alive(self, model: LoadedModel) -> None:
        self._cancel_keep_alive()
        timeout = self._idle_timeout
        if model.in_flight:
            return
        if timeout is None:
            self._expires_at = math.inf
            return
        self._expires_at = time.time() + timeout
        self._keep_alive = self._loop.call_later(timeout, self._keep_alive_expired, model,
                                                 timeout)

    def _cancel_keep_alive(self) -> None:
        self._expires_at = None
        if self._keep_alive is not None:
            self._keep_alive.cancel()
            self._keep_alive = None

    def _keep_alive_expired(self, model: LoadedModel, timeout: float) -> None:
        self._keep_alive = None
        if self.current is model and model.in_flight == 0 and self.state is ModelState.READY:
            log.info("unloading %s after %.0f s idle", model.id, timeout)
            self._background(self.unload("the model was unloaded after being idle"))

    def expires_at(self) -> float | None:
        """When the resident model will be unloaded (wall clock; inf: it stays), None when no
        model is resident. A model in use counts its timeout from now."""
        if self.current is None or self.state is not ModelState.READY:
            return None
        if self._expires_at is not None:
            return self._expires_at
        timeout = self._idle_timeout
        return math.inf if timeout is None else time.time() + timeout

    # -- engine failure --------------------------------------------------------------------

    def _fatal_callback(self) -> Callable[[BaseException], None]:
        def on_fatal(error: BaseException) -> None:  # engine thread
            self._loop.call_soon_threadsafe(self._engine_died, error)
        return on_fatal

    def _engine_died(self, error: BaseException) -> None:
        model = self.current
        if model is None or model.scheduler.fatal is not error:
            return
        self.engine_failure = f"the engine of {model.id} stopped: {error!r}"
        log.error("%s; it will be loaded again on the next request", self.engine_failure)
        self._background(self._drop(model))

    async def _drop(self, model: LoadedModel) -> None:
        async with self._transition:
            if self.current is not model:
                return
            self._cancel_keep_alive()
            self.current = None
            self.state, self.failure = ModelState.FAILED, self.engine_failure
            await asyncio.to_thread(model.runtime.close)

    def engine_healthy(self, stall_limit_s: float) -> bool:
        """False when the engine thread died or one decode step has run past `stall_limit_s`:
        the systemd watchdog stops being fed, and systemd restarts the daemon."""
        model = self.current
        if model is None:
            return True
        return model.scheduler.alive() and model.scheduler.stalled_for() < stall_limit_s

    def _background(self, coroutine: Any) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- shutdown --------------------------------------------------------------------------

    async def drain(self, grace_s: float) -> None:
        """On shutdown: let requests finish for `grace_s`, then end the rest with an error."""
        model = self.current
        if model is None:
            return
        await self._wait_idle(model, grace_s)
        if model.in_flight:
            log.info("shutting down: ending %d requests still running", model.in_flight)
            model.scheduler.abort_all(ServiceUnavailable("the server is shutting down",
                                                         retry_after=5))

    async def close(self) -> None:
        self._cancel_keep_alive()
        if self.state is ModelState.LOADING:
            # The load runs on a daemon thread; waiting for it could outlast the stop timeout.
            log.info("shutting down during the load of %s; not waiting for it", self.target)
            return
        await self.unload("the server is shutting down")

    def status(self) -> dict[str, Any]:
        model = self.current
        return {"state": self.state.value, "target": self.target, "failure": self.failure,
                "engine_failure": self.engine_failure,
                "model": model.describe() if model is not None else None}
