"""Several resident models: admission by the planner's figures, eviction of idle models only,
pin, per-kind and per-request keep-alive; in-process on the fake runtimes with a fake memory
budget and a fake GPU (fast, deterministic). The real runtime is in test_embeddings.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from appliance.config import Settings
from appliance.engine.compute_turns import NO_TURNS, TurnParty
from appliance.engine.embedding import EmbeddingJob, EmbeddingOptions
from appliance.errors import InvalidRequest, ServiceUnavailable
from appliance.gpu import GpuMemory, NoGpu
from appliance.registry import Registry
from appliance.residency.loader import ModelLoader
from appliance.residency.manager import ModelManager, ModelState
from appliance.residency.model import EMBEDDING
from tests.appliance.fakes import FakeRuntime, write_gguf
from tests.appliance.test_manager_paths import collect, wait_for

GIB = 2**30
BIG_E1 = {"e1": {"context_length": 2**21}}  # e1's KV cache as large as a chat model's


class FakeEmbeddingRuntime:
    """Bytes are tokens; a vector is the byte histogram, so equal texts give equal vectors."""

    n_vocab = 257
    n_embd = 8
    pooling_name = "last"
    instances: ClassVar[list[FakeEmbeddingRuntime]] = []

    def __init__(self, path: Path, options: EmbeddingOptions) -> None:
        self.path, self.options = path, options
        self.n_batch, self.n_seq = options.n_batch, options.n_seq
        self.closed = False
        self.gate = threading.Event()  # cleared: embed waits (a request held in flight)
        self.gate.set()
        self.decodes = 0
        FakeEmbeddingRuntime.instances.append(self)

    def tokenize(self, text: str) -> list[int]:
        return [*text.encode(), 256]

    def embed(self, inputs: list[list[int]], cancelled: Callable[[], bool],
              pace: object = None) -> np.ndarray:
        self.gate.wait(30)
        self.decodes += 1
        rows = np.zeros((len(inputs), self.n_embd), dtype=np.float32)
        for i, ids in enumerate(inputs):
            for t in ids:
                rows[i, t % self.n_embd] += 1
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def close(self) -> None:
        self.closed = True


class FakeGpu:
    """One GPU whose free memory is what the manager's resident models planned to use."""

    name = "fake"

    def __init__(self, total: int) -> None:
        self.total = total
        self.manager: ModelManager | None = None

    def devices(self) -> list[GpuMemory]:
        used = sum(m.plan.planned_vram for m in self.manager.resident.values()) \
            if self.manager else 0
        return [GpuMemory(0, "Fake GPU", self.total, used, self.total - used, used)]

    def close(self) -> None:
        pass


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    write_gguf(tmp_path / "a.gguf")
    write_gguf(tmp_path / "b.gguf")
    for name in ("e1", "e2", "e3"):
        write_gguf(tmp_path / f"{name}.gguf", template=None, **{"qwen3.pooling_type": 3})
    return tmp_path


def run(scenario: Callable[[ModelManager], Any], folder: Path, /, *, ram: int = 64 * GIB,
        gpu: FakeGpu | None = None, **settings: Any) -> Any:
    async def main() -> Any:
        config = Settings(**{"models_dir": folder, "parallel": 2, "context_length": 2**20,
                             "threads": 1, "engine_nice": 0, "switch_wait_s": 0.3, **settings})
        registry = Registry(folder)
        registry.scan()
        loader = ModelLoader(config, gpu or NoGpu(), runtime_factory=FakeRuntime,
                             embedding_factory=FakeEmbeddingRuntime, ram_budget=lambda: ram)
        if gpu is not None:
            loader._gpu_build = True  # the fake GPU stands in for a CUDA build
        manager = ModelManager(config, registry, loader)
        if gpu is not None:
            gpu.manager = manager
        try:
            return await scenario(manager)
        finally:
            await manager.close()
    FakeEmbeddingRuntime.instances.clear()
    return asyncio.run(main())


def planned_ram(models: Path, model_id: str, **settings: Any) -> int:
    """The planner's RAM figure for one model, as the manager will see it."""
    config = Settings(models_dir=models, parallel=2, context_length=2**20, threads=1,
                      **settings)
    registry = Registry(models)
    registry.scan()
    plan, _ = ModelLoader(config, NoGpu()).plan_for(registry.resolve(model_id))
    return plan.planned_ram


async def embed(manager: ModelManager, name: str, texts: list[str],
                **use: Any) -> np.ndarray:
    async with manager.use(name, kind=EMBEDDING, **use) as model:
        done = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def finish(rows: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(done.set_result, (rows, error))

        model.submit(EmbeddingJob(model.tokenize(texts), finish))
        rows, error = await done
        assert error is None
        return rows


def resident(manager: ModelManager) -> list[str]:
    return sorted(manager.resident)


def test_chat_and_embedding_models_serve_side_by_side(models: Path) -> None:
    async def scenario(manager: ModelManager) -> None:
        async with manager.use("a") as chat:
            _, events, ended = collect(chat, 40)
            rows = await embed(manager, "e1", ["one", "two", "one"])  # while the chat runs
            assert np.allclose(rows[0], rows[2]) and not np.allclose(rows[0], rows[1])
            await asyncio.to_thread(ended.wait, 10)
            assert len(events) == 41 and chat.in_flight == 1
        assert resident(manager) == ["a", "e1"] and manager.loads == {"a": 1, "e1": 1}
        status = manager.status()
        assert status["model"]["id"] == "a"  # the chat model, for older clients
        kinds = {m["id"]: m["kind"] for m in status["models"]}
        assert kinds == {"a": "chat", "e1": "embedding"}
        assert all(m["memory"]["planned_ram"] > 0 for m in status["models"])
        assert all(m["expires_at"] is not None for m in status["models"])
    run(scenario, models)


def test_the_kind_of_model_is_checked(models: Path) -> None:
    async def scenario(manager: ModelManager) -> None:
        with pytest.raises(InvalidRequest, match="installed: e1, e2, e3"):
            async with manager.use("a", kind=EMBEDDING):
                pass
        with pytest.raises(InvalidRequest, match="embedding model"):
            async with manager.use("e1"):
                pass
        assert manager.resident == {}  # neither was loaded for nothing
        async with manager.use(None, kind=EMBEDDING) as model:  # none named: the first one
            assert model.id == "e1"
    run(scenario, models)


def test_the_least_recently_used_idle_model_is_evicted(models: Path) -> None:
    chat, emb = planned_ram(models, "a"), planned_ram(models, "e1")

    async def scenario(manager: ModelManager) -> None:
        for name in ("a", "e1", "e2"):
            if name == "a":
                async with manager.use("a"):
                    pass
            else:
                await embed(manager, name, ["x"])
        await embed(manager, "e1", ["x"])
        async with manager.use("a"):
            pass
        assert resident(manager) == ["a", "e1", "e2"]
        await embed(manager, "e3", ["x"])  # e2 was used least recently
        assert resident(manager) == ["a", "e1", "e3"]
        await embed(manager, "e2", ["x"])  # now e1 is the oldest (then a, then e3)
        assert resident(manager) == ["a", "e2", "e3"]
        assert manager.loads == {"a": 1, "e1": 1, "e2": 2, "e3": 1}
    run(scenario, models, ram=chat + 2 * emb + emb // 2)


def test_a_model_that_does_not_fit_beside_a_busy_one_waits_then_gets_503(
        models: Path) -> None:
    chat = planned_ram(models, "a")

    async def scenario(manager: ModelManager) -> None:
        async with manager.use("a") as model:
            model.runtime.gate.clear()  # the chat request is held mid-decode
            _, events, ended = collect(model, 5)
            started = asyncio.get_running_loop().time()
            try:
                with pytest.raises(ServiceUnavailable, match="serving requests") as refused:
                    await embed(manager, "e1", ["x"])
            finally:
                model.runtime.gate.set()
            assert asyncio.get_running_loop().time() - started >= 0.3  # switch_wait_s
            assert refused.value.retry_after
            assert resident(manager) == ["a"] and not model.runtime.closed
            await asyncio.to_thread(ended.wait, 10)
            assert len(events) == 6  # the chat request never noticed
    run(scenario, models, ram=chat + chat // 4, models=BIG_E1)


def test_a_waiting_load_proceeds_when_the_busy_model_goes_idle(models: Path) -> None:
    chat = planned_ram(models, "a")

    async def scenario(manager: ModelManager) -> None:
        release = asyncio.Event()

        async def hold() -> None:
            async with manager.use("a"):
                await release.wait()

        holder = asyncio.create_task(hold())
        await wait_for(lambda: "a" in manager.resident and manager.resident["a"].busy)
        waiting = asyncio.create_task(embed(manager, "e1", ["x"]))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        release.set()
        await holder
        await waiting
        assert resident(manager) == ["e1"]
    run(scenario, models, ram=chat + chat // 4, switch_wait_s=5, models=BIG_E1)


def test_a_pinned_model_is_never_evicted_nor_timed_out(models: Path) -> None:
    chat = planned_ram(models, "a")

    async def scenario(manager: ModelManager) -> None:
        async with manager.use("a"):
            pass
        assert manager.resident["a"].pinned
        with pytest.raises(ServiceUnavailable, match="pinned"):
            await embed(manager, "e1", ["x"])
        await asyncio.sleep(0.3)  # three keep-alive periods: a pinned model stays
        assert resident(manager) == ["a"]
        await manager.unload(model_id="a")  # the user may still unload it
        assert manager.resident == {} and manager.state is ModelState.UNLOADED
    run(scenario, models, ram=chat + chat // 4, keep_alive_s=0.1,
        models={"a": {"pin": True}, **BIG_E1})


def test_keep_alive_per_kind_and_per_request(models: Path) -> None:
    async def scenario(manager: ModelManager) -> None:
        await embed(manager, "e1", ["x"], keep_alive_s=0)  # Ollama's 0: unload right after
        await wait_for(lambda: "e1" not in manager.resident)
        async with manager.use("a", keep_alive_s=-1):  # < 0: stay until told otherwise
            pass
        await embed(manager, "e2", ["x"])  # the embedding default: 0.1 s
        await wait_for(lambda: "e2" not in manager.resident)
        assert "a" in manager.resident  # the chat default (0.05 s) was overridden
        assert manager.status()["models"][0]["expires_at"] is None
        async with manager.use("a", keep_alive_s=0.05):  # the override changes again
            pass
        await wait_for(lambda: manager.state is ModelState.UNLOADED)
        assert "a" not in manager.resident
    run(scenario, models, keep_alive_s=0.05, keep_alive_embedding_s=0.1)


def test_switching_chat_models_keeps_one_chat_model_and_the_embedding_model(
        models: Path) -> None:
    async def scenario(manager: ModelManager) -> None:
        async with manager.use("a"):
            pass
        await embed(manager, "e1", ["x"])
        async with manager.use("b"):
            pass
        assert resident(manager) == ["b", "e1"]
        assert manager.status()["model"]["id"] == "b"
    run(scenario, models)


def test_two_chat_models_when_allowed_and_memory_permits(models: Path) -> None:
    async def scenario(manager: ModelManager) -> None:
        for name in ("a", "b"):
            async with manager.use(name):
                pass
        assert resident(manager) == ["a", "b"]
    run(scenario, models, max_chat_models=2)


def test_an_idle_model_is_evicted_for_a_full_gpu_offload(models: Path) -> None:
    # The GPU holds one model with every layer: loading e1 while a idles would otherwise give
    # e1 a partial offload; the manager evicts a instead.
    config = Settings(models_dir=models, parallel=2, context_length=2**20, threads=1)
    registry = Registry(models)
    registry.scan()
    probe = FakeGpu(64 * GIB)
    loader = ModelLoader(config, probe)
    loader._gpu_build = True
    full = loader.plan_for(registry.resolve("a"))[0]
    assert full.all_on_gpu
    margin = config.vram_margin_mib * 2**20
    gpu = FakeGpu(full.planned_vram + margin + full.planned_vram // 2)

    async def scenario(manager: ModelManager) -> None:
        async with manager.use("a"):
            pass
        assert manager.resident["a"].plan.all_on_gpu
        await embed(manager, "e1", ["x"])
        assert resident(manager) == ["e1"] and manager.resident["e1"].plan.all_on_gpu
    run(scenario, models, gpu=gpu, models={"e1": {"context_length": 2**21}})


def test_models_on_the_cpu_take_turns_when_asked_and_gpu_ones_never(models: Path) -> None:
    registry = Registry(models)
    registry.scan()
    entry = registry.resolve("a")
    loader = ModelLoader(Settings(models_dir=models, parallel=2, context_length=2**20,
                                  threads=1, cpu_turns=True), NoGpu())
    on_cpu = loader.plan_for(entry)[0]
    assert not on_cpu.all_on_gpu
    chat, embedding = loader.cpu_turns(entry, on_cpu, 2.0), loader.cpu_turns(entry, on_cpu, 1.0)
    assert isinstance(chat, TurnParty) and isinstance(embedding, TurnParty)
    assert chat._turns is embedding._turns  # one queue for the whole daemon

    gpu_loader = ModelLoader(Settings(models_dir=models, parallel=2, context_length=2**20,
                                      threads=1, cpu_turns=True), FakeGpu(64 * GIB))
    gpu_loader._gpu_build = True
    on_gpu = gpu_loader.plan_for(entry)[0]
    assert on_gpu.all_on_gpu and gpu_loader.cpu_turns(entry, on_gpu, 2.0) is NO_TURNS

    off = ModelLoader(Settings(models_dir=models, parallel=2, context_length=2**20, threads=1),
                      NoGpu())  # the default
    assert off.cpu_turns(entry, on_cpu, 2.0) is NO_TURNS
