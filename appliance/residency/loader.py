"""Turn a model file into a LoadedModel: check it, plan the offload, load (retrying with fewer GPU
layers when memory runs out), assemble the engine; close everything on any failure.

`preflight` runs before the resident model is evicted, so a file that cannot work (bad header,
a template that does not compile, a remembered failure) never costs the user the model they had.
Embedding models (a GGUF with a pooling type) get an EmbeddingRuntime and its worker instead of
a chat runtime and scheduler. A chat model may get a draft model beside it (draft_pairing.py):
planned with it, loaded after it, and left out (never failing the load) when it cannot load.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import psutil

from appliance.config import ModelOverrides, Settings
from appliance.context_sizing import ContextChoice, allowed_types, choose_context
from appliance.engine.chat import ChatFormatter, compile_template
from appliance.engine.compute_turns import (
    BATCH_WEIGHT,
    INTERACTIVE_WEIGHT,
    NO_TURNS,
    BatchPace,
    ComputeTurns,
    Turns,
)
from appliance.engine.draft import DraftBudget, DraftModel
from appliance.engine.embedding import EmbeddingOptions, EmbeddingRuntime, EmbeddingWorker
from appliance.engine.rpc import RpcWorkers, WorkerDevice
from appliance.engine.runtime import (
    LlamaRuntime,
    RuntimeOptions,
    cpu_repack_types,
    gpu_offload_supported,
)
from appliance.engine.scheduler import Scheduler, SchedulerObserver
from appliance.errors import InvalidRequest, LoadFailed, ModelUnusable, WorkerUnavailable
from appliance.gpu import GpuProbe
from appliance.library.durability import DamagedModel, settle
from appliance.offload import (
    DeviceShare,
    OffloadPlan,
    fewer_layers,
    plan_offload,
    plan_split,
    with_draft,
    with_ram,
)
from appliance.registry import ModelEntry
from appliance.residency import footprint
from appliance.residency.draft_pairing import DraftChoice, DraftPairing
from appliance.residency.model import EMBEDDING, EmbeddingModel, LoadedModel, model_kind

log = logging.getLogger(__name__)

RuntimeFactory = Callable[..., LlamaRuntime]
EmbeddingFactory = Callable[..., EmbeddingRuntime]
Resident = LoadedModel | EmbeddingModel
# Tokens per embedding decode, and so the longest input: RAG chunks are far shorter, and the
# KV cache of one decode (cleared after it) stays ~0.5 GB on a 0.6B model.
EMBEDDING_BATCH_TOKENS = 4096
EMBEDDING_SEQUENCES = 64  # inputs per decode
EMBEDDING_UBATCH = 512  # llama.cpp's micro-batch: bounds the compute buffer (logits per token)
RAM_SHARE = 0.75  # of physical RAM for resident models: the user unit's MemoryMax


def physical_ram() -> int:
    return int(psutil.virtual_memory().total)


def physical_ram_budget() -> int:
    return int(physical_ram() * RAM_SHARE)


T = TypeVar("T")


async def in_daemon_thread(fn: Callable[[], T], name: str) -> T:
    """Run `fn` on a daemon thread: unlike the default executor, a load still running when the
    daemon is told to stop does not hold the process past its stop timeout."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            outcome: tuple[Callable[[Any], None], Any] = (future.set_result, fn())
        except BaseException as e:
            outcome = (future.set_exception, e)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop has closed: the daemon stopped during the load
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


class FailureMemory:
    """Load failures by file (path, size, mtime): a broken file is not retried on every request,
    and a replaced file is tried afresh."""

    def __init__(self) -> None:
        self._failures: dict[tuple[str, int, float], str] = {}

    @staticmethod
    def _key(entry: ModelEntry) -> tuple[str, int, float]:
        return (str(entry.path), *entry.signature)

    def remember(self, entry: ModelEntry, reason: str) -> None:
        self._failures[self._key(entry)] = reason

    def forget(self, entry: ModelEntry) -> None:
        self._failures.pop(self._key(entry), None)

    def reason(self, entry: ModelEntry) -> str | None:
        return self._failures.get(self._key(entry))


class ModelLoader:
    """Plans and loads models; knows llama.cpp and the GPU, nothing of requests or states."""

    def __init__(self, settings: Settings, probe: GpuProbe,
                 observer: SchedulerObserver | None = None,
                 runtime_factory: RuntimeFactory = LlamaRuntime,
                 embedding_factory: EmbeddingFactory = EmbeddingRuntime,
                 ram_budget: Callable[[], int] = physical_ram_budget,
                 ram_total: Callable[[], int] = physical_ram,
                 catalog: Callable[[], list[ModelEntry]] = list,
                 rpc: RpcWorkers | None = None, turns: ComputeTurns | None = None) -> None:
        self.settings = settings
        # One queue for the CPU, shared by every model this daemon loads (compute_turns.py).
        self.turns = turns or ComputeTurns()
        self.catalog = catalog  # the installed models, where drafts are found
        self.pairing = DraftPairing()
        self.probe = probe
        self.observer = observer
        self.runtime_factory = runtime_factory
        self.embedding_factory = embedding_factory
        self.ram_budget = ram_budget  # bytes all resident models may plan in RAM together
        self.ram_total = ram_total  # physical RAM: auto context's KV share on CPU
        self.failures = FailureMemory()
        self._gpu_build: bool | None = None
        self._repack_types: frozenset[str] | None = None
        workers = getattr(settings, "rpc_workers", None)
        # Chat models split their layers over these; embedding models stay local (small).
        self.rpc = rpc if rpc is not None else RpcWorkers(workers) if workers else None

    def gpu_build(self) -> bool:
        if self._gpu_build is None:
            self._gpu_build = gpu_offload_supported()
        return self._gpu_build

    def repack_types(self) -> frozenset[str]:
        """The weight types llama.cpp keeps a repacked copy of on this CPU (planned RAM)."""
        if self._repack_types is None:
            self._repack_types = cpu_repack_types()
        return self._repack_types

    def preflight(self, entry: ModelEntry) -> None:
        """Raise ModelUnusable if `entry` cannot work, without touching what is loaded."""
        settle_before_use(entry)
        remembered = self.failures.reason(entry)
        if remembered:
            raise ModelUnusable(f"model {entry.id!r} failed to load before: {remembered} "
                                "(replace the file, or load it explicitly, to try again)",
                                param="model")
        assert entry.info is not None
        template = entry.info.metadata.get("tokenizer.chat_template")
        if template is not None and model_kind(entry) != EMBEDDING:
            try:
                compile_template(str(template))
            except InvalidRequest as e:
                self.failures.remember(entry, e.message)
                raise ModelUnusable(f"model {entry.id!r} is unusable: {e.message}",
                                    param="model") from None
        if model_kind(entry) != EMBEDDING:
            self._kv_types(entry)  # a KV type the model cannot have: refused before eviction
            if self.rpc is not None:
                # Before anything resident is evicted for it: a worker that is down costs nothing.
                self.rpc.survey()

    def plan_for(self, entry: ModelEntry, extra_vram: int = 0) -> tuple[OffloadPlan, int]:
        """The offload plan for `entry` now, and its context tokens per slot (embedding models:
        per decode). `extra_vram`: VRAM that evicting idle models would free."""
        assert entry.info is not None
        overrides = self.settings.model_overrides(entry.id)
        devices = self.probe.devices()
        best = max(devices, key=lambda d: d.free, default=None)
        free_vram = best.free + extra_vram if best else 0
        embedding = model_kind(entry) == EMBEDDING
        n_ubatch = 512
        if embedding:
            trained = entry.info.context_length or EMBEDDING_BATCH_TOKENS
            wanted = overrides.context_length
            context = min(wanted if isinstance(wanted, int) else EMBEDDING_BATCH_TOKENS, trained)
            n_ubatch = min(EMBEDDING_UBATCH, context)

        def plan(n_ctx_total: int, kv_type: str) -> OffloadPlan:
            return plan_offload(
                entry.info, n_ctx_total=n_ctx_total, free_vram=free_vram,
                device=best.name if best else "cpu",
                margin=self.settings.vram_margin_mib * 2**20, gpu_build=self.gpu_build(),
                forced_layers=overrides.gpu_layers, n_ubatch=n_ubatch, kv_type=kv_type,
                # Pooling makes every token of an embedding decode an output.
                n_outputs=n_ctx_total if embedding else 0, repack_types=self.repack_types())

        if embedding:  # one decode's cache, cleared after it: f16, no sizing
            return plan(context, "f16"), context
        if self.rpc is not None and overrides.gpu_layers is None:
            # Sized like a CPU load (the RAM share): the workers' memory is not this machine's.
            return self._split_choice(entry, overrides)
        choice = self._context_choice(entry, plan, free_vram, overrides)
        chosen, context = choice.plan, choice.context_per_slot
        # The draft is counted beside the chosen plan (the context sizing does not shrink for it).
        draft = self.draft_for(entry).entry
        if draft is not None and draft.info is not None:
            chosen = with_draft(chosen, draft.info, n_ctx_total=context * self.settings.parallel,
                                margin=self.settings.vram_margin_mib * 2**20,
                                gpu_build=self.gpu_build()) or chosen
        return chosen, context

    def _context_choice(self, entry: ModelEntry, plan: Callable[[int, str], OffloadPlan],
                        free_vram: int, overrides: ModelOverrides) -> ContextChoice:
        assert entry.info is not None
        wanted = overrides.context_length or self.settings.context_length
        trained = entry.info.context_length or None
        fixed = None if wanted == "auto" else min(wanted, trained or wanted)
        types = self._kv_types(entry)
        gpu_sizing = self.gpu_build() and free_vram > 0 and overrides.gpu_layers is None
        return choose_context(entry.info, plan=plan, n_seq=self.settings.parallel,
                              context=fixed, types=types, gpu_sizing=gpu_sizing,
                              ram_total=self.ram_total())

    def _kv_types(self, entry: ModelEntry) -> list[str]:
        """The KV types this model may get; ModelUnusable for a type it cannot have."""
        assert entry.info is not None
        overrides = self.settings.model_overrides(entry.id)
        return allowed_types(entry.info, overrides.kv_cache_type or self.settings.kv_cache_type,
                             self.settings.flash_attn, entry.id)

    def draft_for(self, entry: ModelEntry) -> DraftChoice:
        """The draft model for chat model `entry`, or None, with the reason."""
        if self.settings.draft_max == 0:
            return DraftChoice(None, "drafting is off (draft_max = 0)")
        configured = self.settings.model_overrides(entry.id).draft
        return self.pairing.choose(entry, configured, self.catalog())

    def _split_choice(self, entry: ModelEntry, overrides: ModelOverrides) -> tuple[OffloadPlan, int]:
        """Layers over the RPC workers, this machine's GPUs (as llama.cpp sees them) and the
        CPU, with the context sized as for a CPU load (blocking: asks every worker for its free
        memory, once)."""
        assert entry.info is not None and self.rpc is not None
        devices = [DeviceShare(w.name, "rpc", w.free, endpoint=w.endpoint, index=w.index)
                   for w in self.rpc.survey()]
        if self.gpu_build() and getattr(self.settings, "gpu", "auto") != "none":
            for index, handle in enumerate(self.rpc.library.local_gpus()):
                free, _ = self.rpc.library.memory(handle)
                devices.append(DeviceShare(f"GPU {index}", "gpu", free, index=index))

        def plan(n_ctx_total: int, kv_type: str) -> OffloadPlan:
            return plan_split(entry.info, devices, n_ctx_total=n_ctx_total,
                              margin=self.settings.vram_margin_mib * 2**20, kv_type=kv_type,
                              repack_types=self.repack_types())

        wanted = overrides.context_length or self.settings.context_length
        trained = entry.info.context_length or None
        fixed = None if wanted == "auto" else min(wanted, trained or wanted)
        choice = choose_context(entry.info, plan=plan, n_seq=self.settings.parallel,
                                context=fixed, types=self._kv_types(entry), gpu_sizing=False,
                                ram_total=self.ram_total())
        return choice.plan, choice.context_per_slot

    def load(self, entry: ModelEntry, on_fatal: Callable[[BaseException], None]) -> Resident:
        """Blocking: the runtime and engine for `entry`, with the memory its load took; a
        failure leaks nothing."""
        before = footprint.sample(self.probe)
        model = self._load(entry, on_fatal)
        model.footprint = footprint.between(before, footprint.sample(self.probe))
        return model

    def _load(self, entry: ModelEntry, on_fatal: Callable[[BaseException], None]) -> Resident:
        if model_kind(entry) == EMBEDDING:
            return self._load_embedding(entry)
        try:
            plan, context = self.plan_for(entry)
            if plan.split:
                runtime = self._open_split(entry, plan, context)
            else:
                runtime, plan = self._open_runtime(entry, plan, context)
        except WorkerUnavailable:
            raise  # not the file's fault: the next try goes ahead
        except (LoadFailed, ModelUnusable) as e:
            self.failures.remember(entry, e.message)
            raise
        except Exception as e:  # a crafted file can upset the planner or llama.cpp's loader
            self.failures.remember(entry, repr(e))
            raise LoadFailed(f"loading {entry.id} failed: {e!r}") from e
        draft, note = self._open_draft(entry, plan, context)
        if draft is None and plan.draft is not None:
            plan = replace(plan, draft=None)
        try:
            return self._assemble(entry, runtime, plan, on_fatal, draft, note)
        except BaseException as e:
            runtime.close()
            if draft is not None:
                draft.close()
            reason = e.message if isinstance(e, InvalidRequest) else repr(e)
            self.failures.remember(entry, reason)
            raise ModelUnusable(f"model {entry.id!r} is unusable: {reason}",
                                param="model") from None

    def _open_split(self, entry: ModelEntry, plan: OffloadPlan, context: int) -> LlamaRuntime:
        """The runtime with its layers where `plan.split` says; no retry with fewer layers (the
        workers' memory was measured just now, and a worker's failure is not memory)."""
        assert self.rpc is not None
        # Only devices that hold layers: llama.cpp opens a connection to every device it is given.
        on_devices = [s for s in plan.split if s.kind != "cpu" and s.layers]
        workers = [s for s in on_devices if s.kind == "rpc"]
        lease = self.rpc.lease(s.endpoint for s in workers if s.endpoint)
        try:
            handles = self.rpc.handles([_worker_device(s) for s in workers])
            local = self.rpc.library.local_gpus()
            devices = [handles.pop(0) if s.kind == "rpc" else local[s.index] for s in on_devices]
            options = RuntimeOptions(n_gpu_layers=plan.n_gpu_layers, context_per_slot=context,
                                     n_seq=self.settings.parallel, n_threads=self.settings.threads,
                                     flash_attn=self.settings.flash_attn,
                                     kv_cache_type=plan.kv_cache_type, devices=tuple(devices),
                                     tensor_split=tuple(float(s.layers) for s in on_devices))
            runtime = self.runtime_factory(entry.path, options)
        except BaseException:
            lease.release()
            raise
        runtime.lease = lease
        return runtime

    def _open_runtime(self, entry: ModelEntry, plan: OffloadPlan,
                      context: int) -> tuple[LlamaRuntime, OffloadPlan]:
        runtime, layers = self._with_fewer_layers(entry, plan.n_gpu_layers, lambda n: (
            self.runtime_factory(entry.path, RuntimeOptions(
                n_gpu_layers=n, context_per_slot=context, n_seq=self.settings.parallel,
                n_threads=self.settings.threads, flash_attn=self.settings.flash_attn,
                kv_cache_type=plan.kv_cache_type))))
        if layers != plan.n_gpu_layers:
            plan = self._retried(entry, plan, layers, context * self.settings.parallel,
                                 self.repack_types())
        return runtime, plan

    def _open_draft(self, entry: ModelEntry, plan: OffloadPlan,
                    context: int) -> tuple[DraftModel | None, str]:
        """The draft beside `entry`'s runtime, and why there is none when there is none."""
        choice = self.draft_for(entry)
        if choice.entry is None:
            return None, choice.reason
        if plan.draft is None:
            return None, f"{choice.entry.id} does not fit in VRAM beside the model"
        try:
            settle_before_use(choice.entry)
        except ModelUnusable as e:
            return None, e.message
        options = RuntimeOptions(n_gpu_layers=plan.draft.n_gpu_layers, context_per_slot=context,
                                 n_seq=self.settings.parallel, n_threads=self.settings.threads,
                                 flash_attn=self.settings.flash_attn)
        try:
            runtime = self.runtime_factory(choice.entry.path, options)
        except Exception as e:  # the model works without its draft
            log.warning("the draft %s did not load for %s: %s", choice.entry.id, entry.id, e)
            return None, f"{choice.entry.id} did not load: {e}"
        return DraftModel(runtime, choice.entry.id), choice.reason

    @staticmethod
    def _with_fewer_layers(entry: ModelEntry, layers: int,
                           open_with: Callable[[int], T]) -> tuple[T, int]:
        """`open_with(layers)`, retried with fewer GPU layers while the load fails (a plan is an
        estimate; the driver may still refuse): what opened, and with how many layers."""
        while True:
            try:
                return open_with(layers), layers
            except LoadFailed:
                if layers == 0:
                    raise
                layers = fewer_layers(layers)
                log.warning("load of %s failed; retrying with %d GPU layers", entry.id, layers)

    @staticmethod
    def _retried(entry: ModelEntry, plan: OffloadPlan, layers: int, n_ctx: int,
                 repack_types: frozenset[str]) -> OffloadPlan:
        assert entry.info is not None
        retried = replace(plan, n_gpu_layers=layers, device=plan.device if layers else "cpu",
                          reason=f"retried with {layers} GPU layers after a failed load",
                          weights_on_gpu=0, kv_on_gpu=0, compute_buffer=0)
        return with_ram(retried, entry.info, n_ctx, repack_types=repack_types)

    def _load_embedding(self, entry: ModelEntry) -> EmbeddingModel:
        try:
            plan, context = self.plan_for(entry)
            runtime, layers = self._with_fewer_layers(entry, plan.n_gpu_layers, lambda n: (
                self.embedding_factory(entry.path, EmbeddingOptions(
                    n_gpu_layers=n, n_batch=context, n_ubatch=min(EMBEDDING_UBATCH, context),
                    n_seq=EMBEDDING_SEQUENCES, n_threads=self.settings.threads,
                    flash_attn=self.settings.flash_attn))))
            if layers != plan.n_gpu_layers:
                plan = self._retried(entry, plan, layers, context, self.repack_types())
        except (LoadFailed, ModelUnusable) as e:
            self.failures.remember(entry, e.message)
            raise
        except Exception as e:  # a crafted file can upset the planner or llama.cpp's loader
            self.failures.remember(entry, repr(e))
            raise LoadFailed(f"loading {entry.id} failed: {e!r}") from e
        party = self.cpu_turns(entry, plan, BATCH_WEIGHT)
        try:
            worker = EmbeddingWorker(runtime, self.settings.max_queue,
                                     nice=self.settings.engine_nice, pace=BatchPace(party))
        except BaseException:
            party.leave()
            runtime.close()
            raise
        return EmbeddingModel(entry, runtime, worker, plan)

    def _assemble(self, entry: ModelEntry, runtime: LlamaRuntime, plan: OffloadPlan,
                  on_fatal: Callable[[BaseException], None], draft: DraftModel | None = None,
                  draft_note: str = "") -> LoadedModel:
        assert entry.info is not None
        meta = entry.info.metadata
        template = meta.get("tokenizer.chat_template")
        formatter = ChatFormatter(template if isinstance(template, str) else None,
                                  bos_token=runtime.token_text(_special(meta, "bos", runtime))
                                  if runtime.add_bos else "",
                                  eos_token=runtime.token_text(_special(meta, "eos", runtime)),
                                  architecture=entry.info.architecture)
        control_texts = runtime.control_texts()
        thinking = self.settings.model_overrides(entry.id).enable_thinking
        party = self.cpu_turns(entry, plan, INTERACTIVE_WEIGHT)
        try:
            scheduler = Scheduler(runtime, self.settings.parallel, self.settings.max_queue,
                                  self.observer, nice=self.settings.engine_nice,
                                  on_fatal=on_fatal, draft=draft,
                                  draft_budget=DraftBudget(self.settings.draft_max),
                                  turns=party)
        except BaseException:
            party.leave()
            raise
        return LoadedModel(entry, runtime, scheduler, formatter, plan,
                           self.settings.enable_thinking if thinking is None else thinking,
                           control_texts, draft=draft, draft_note=draft_note)

    def cpu_turns(self, entry: ModelEntry, plan: OffloadPlan, weight: float) -> Turns:
        """The model's place in the CPU's queue; none for a model entirely on GPUs (or RPC
        workers): its decodes barely touch this machine's cores, and must not wait for them."""
        if plan.all_on_gpu or not self.settings.cpu_turns:
            return NO_TURNS
        return self.turns.party(entry.id, weight)

    @staticmethod
    def close(model: Resident, reason: str) -> None:
        """Blocking: stop the engine (requests still running end with `reason`), free memory."""
        if isinstance(model, EmbeddingModel):
            model.close(reason)
            return
        model.scheduler.stop(reason)
        model.runtime.close()
        if model.draft is not None:
            model.draft.close()


def settle_before_use(entry: ModelEntry) -> None:
    """A model pulled just before a restart of the machine is checked before llama.cpp reads it
    (durability.py); one pulled in this boot is made durable. Raises ModelUnusable for a damaged
    one (which is removed)."""
    try:
        settle(entry.path.parent, entry.id)
    except DamagedModel as e:
        raise ModelUnusable(f"{e.message}; {e.hint}", param="model") from None
    except OSError as e:  # the disk failed under the fsync or the hash
        raise ModelUnusable(f"model {entry.id!r} cannot be read from the disk: {e}",
                            param="model") from None


def _worker_device(share: DeviceShare) -> WorkerDevice:
    assert share.endpoint is not None
    return WorkerDevice(share.endpoint, share.index, share.free, 0)


def _special(meta: dict[str, Any], kind: str, runtime: LlamaRuntime) -> int:
    value = meta.get(f"tokenizer.ggml.{kind}_token_id")
    return value if isinstance(value, int) and 0 <= value < runtime.n_vocab else 0
