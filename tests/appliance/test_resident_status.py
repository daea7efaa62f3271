"""What /api/status says of each resident model: kind, memory (measured around the load on a
GPU, the planner's figure otherwise, labelled), slots, keep-alive, expiry, pin; and a ready chat
model staying ready while an embedding model loads beside it. In-process on the fake runtimes
and a fake GPU (the only part this machine cannot have); the HTTP side is in
test_resident_api.py."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.config import Settings
from appliance.engine.embedding import EmbeddingOptions
from appliance.engine.runtime import RuntimeOptions
from appliance.gpu import GpuMemory, GpuProbe, NoGpu
from appliance.registry import Registry
from appliance.residency.loader import ModelLoader
from appliance.residency.manager import ModelManager, ModelState
from tests.appliance.fakes import FakeRuntime
from tests.appliance.test_manager_paths import wait_for
from tests.appliance.test_residency import FakeEmbeddingRuntime, embed, models, planned_ram

__all__ = ["models"]  # the fixture, shared with test_residency
MIB = 2**20
GIB = 2**30


class MeteredGpu:
    """A GPU whose memory moves only when a fake runtime opens or closes on it, by a known
    amount; `per_process` False is a driver that does not account by process (a container)."""

    name = "fake"

    def __init__(self, total: int = 80 * GIB, per_process: bool = True) -> None:
        self.total, self.per_process = total, per_process
        self.used = 3 * GIB  # another program's share, never ours
        self.ours = 0
        self._lock = threading.Lock()

    def allocate(self, n: int) -> None:
        with self._lock:
            self.used += n
            self.ours += n

    def devices(self) -> list[GpuMemory]:
        with self._lock:
            return [GpuMemory(0, "Fake GPU", self.total, self.used, self.total - self.used,
                              self.ours if self.per_process else 0)]

    def close(self) -> None:
        pass


def factories(gpu: MeteredGpu | None, chat_bytes: int, embed_bytes: int) -> dict[str, Any]:
    """Runtime factories that take their bytes on the fake GPU as they open and give them back
    as they close."""
    def chat(path: Path, options: RuntimeOptions) -> FakeRuntime:
        runtime = FakeRuntime(path, options)
        if gpu is not None:
            gpu.allocate(chat_bytes)
            close = runtime.close
            runtime.close = lambda: (gpu.allocate(-chat_bytes), close())  # type: ignore[method-assign]
        return runtime

    def embedding(path: Path, options: EmbeddingOptions) -> FakeEmbeddingRuntime:
        runtime = FakeEmbeddingRuntime(path, options)
        if gpu is not None:
            gpu.allocate(embed_bytes)
            close = runtime.close
            runtime.close = lambda: (gpu.allocate(-embed_bytes), close())  # type: ignore[method-assign]
        return runtime
    return {"runtime_factory": chat, "embedding_factory": embedding}


def run(scenario: Any, folder: Path, *, probe: GpuProbe | None = None,
        factory_kw: dict[str, Any] | None = None, **settings: Any) -> Any:
    async def main() -> Any:
        config = Settings(**{"models_dir": folder, "parallel": 2, "context_length": 2**20,
                             "threads": 1, "engine_nice": 0, "switch_wait_s": 0.3, **settings})
        registry = Registry(folder)
        registry.scan()
        kw = factory_kw or {"runtime_factory": FakeRuntime,
                            "embedding_factory": FakeEmbeddingRuntime}
        loader = ModelLoader(config, probe or NoGpu(), **kw)
        if probe is not None:
            loader._gpu_build = True  # the fake GPU stands in for a CUDA build
        manager = ModelManager(config, registry, loader)
        try:
            return await scenario(manager)
        finally:
            await manager.close()
    return asyncio.run(main())


def by_id(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in status["models"]}


def test_every_resident_model_is_listed_with_memory_slots_and_lifetime(models: Path) -> None:
    chat_ram, embed_ram = planned_ram(models, "a"), planned_ram(models, "e1")

    async def scenario(manager: ModelManager) -> None:
        async with manager.use("a"):
            await embed(manager, "e1", ["x"])
            held = by_id(manager.status())
            assert held["a"]["slots_busy"] == 0 and held["a"]["slots"] == 2
            # In use: no countdown yet, it starts when the last request ends.
            assert held["a"]["expires_at"] is None and held["a"]["keep_alive_s"] == 300
        # The worker marks itself idle just after it hands the vectors back.
        await wait_for(lambda: by_id(manager.status())["e1"]["slots_busy"] == 0)
        before = time.time()
        listed = by_id(manager.status())
        assert set(listed) == {"a", "e1"}
        chat, embedding = listed["a"], listed["e1"]
        assert (chat["kind"], embedding["kind"]) == ("chat", "embedding")
        assert embedding["slots"] == 1 and embedding["slots_busy"] == 0
        for entry, ram in ((chat, chat_ram), (embedding, embed_ram)):
            memory = entry["memory"]
            # No GPU: nothing to measure in VRAM, the plan's 0 stands and says so.
            assert memory["vram"] == 0 and memory["vram_source"] == "planned"
            assert memory["vram_method"] is None and memory["planned_ram"] == ram
            assert entry["loads"] == 1 and entry["pinned"] is False
            assert entry["keep_alive_set_by"] == "default"
        assert chat["keep_alive_s"] == 300 and embedding["keep_alive_s"] == 600
        assert chat["expires_at"] == pytest.approx(before + 300, abs=5)
        assert embedding["expires_at"] == pytest.approx(before + 600, abs=5)
        again = manager.status()
        assert again["model"] == by_id(again)["a"]  # the chat model, for older clients

        await embed(manager, "e1", ["x"], keep_alive_s=-1)  # a request: stay
        forever = by_id(manager.status())["e1"]
        assert forever["keep_alive_s"] is None and forever["expires_at"] is None
        assert forever["keep_alive_set_by"] == "request"
        await embed(manager, "e1", ["x"], keep_alive_s=30)
        assert by_id(manager.status())["e1"]["expires_at"] == pytest.approx(time.time() + 30,
                                                                            abs=5)
    run(scenario, models, keep_alive_s=300, keep_alive_embedding_s=600)


def test_a_pinned_model_says_it_is_never_unloaded(models: Path) -> None:
    async def scenario(manager: ModelManager) -> None:
        async with manager.use("a"):
            pass
        entry = manager.status()["models"][0]
        assert entry["pinned"] and entry["keep_alive_set_by"] == "pin"
        assert entry["keep_alive_s"] is None and entry["expires_at"] is None
    run(scenario, models, models={"a": {"pin": True}})


def test_vram_is_measured_per_model_around_its_load(models: Path) -> None:
    gpu = MeteredGpu()

    async def scenario(manager: ModelManager) -> None:
        async with manager.use("a"):
            pass
        await embed(manager, "e1", ["x"])
        listed = by_id(manager.status())
        for model_id, taken in (("a", 700 * MIB), ("e1", 90 * MIB)):
            memory = listed[model_id]["memory"]
            assert memory["vram"] == taken  # not the planner's figure: what the load took
            assert memory["vram_source"] == "measured"
            assert memory["vram_method"] == "nvml-process"
            assert memory["planned_vram"] > 0 and memory["planned_vram"] != taken
        await manager.unload(model_id="e1")
        async with manager.use("b"):  # a switch: a leaves, b's load is measured alone
            pass
        assert by_id(manager.status())["b"]["memory"]["vram"] == 700 * MIB
        assert gpu.ours == 700 * MIB
    run(scenario, models, probe=gpu, factory_kw=factories(gpu, 700 * MIB, 90 * MIB))


def test_without_per_process_accounting_the_device_delta_is_used(models: Path) -> None:
    gpu = MeteredGpu(per_process=False)

    async def scenario(manager: ModelManager) -> None:
        await embed(manager, "e1", ["x"])
        memory = manager.status()["models"][0]["memory"]
        assert (memory["vram"], memory["vram_source"], memory["vram_method"]) == (
            90 * MIB, "measured", "nvml-device")
    run(scenario, models, probe=gpu, factory_kw=factories(gpu, 700 * MIB, 90 * MIB))


def test_when_nothing_moved_on_the_gpu_the_plan_stands_labelled(models: Path) -> None:
    gpu = MeteredGpu()

    async def scenario(manager: ModelManager) -> None:
        async with manager.use("a"):
            pass
        memory = manager.status()["models"][0]["memory"]
        assert memory["vram_source"] == "planned" and memory["vram_method"] is None
        assert memory["vram"] == memory["planned_vram"] > 0
    run(scenario, models, probe=gpu, factory_kw=factories(None, 0, 0))


def test_rss_grown_during_the_load_is_the_models_share(models: Path) -> None:
    held: list[np.ndarray] = []

    def heavy(path: Path, options: EmbeddingOptions) -> FakeEmbeddingRuntime:
        held.append(np.ones(64 * MIB // 8))  # written: every page is resident
        return FakeEmbeddingRuntime(path, options)

    async def scenario(manager: ModelManager) -> None:
        await embed(manager, "e1", ["x"])
        rss = manager.status()["models"][0]["memory"]["rss_at_load"]
        assert rss is not None and 60 * MIB <= rss < 200 * MIB
    run(scenario, models, factory_kw={"runtime_factory": FakeRuntime,
                                      "embedding_factory": heavy})


def test_a_ready_chat_model_stays_ready_while_an_embedding_model_loads(models: Path) -> None:
    release = threading.Event()

    def slow(path: Path, options: EmbeddingOptions) -> FakeEmbeddingRuntime:
        release.wait(60)
        return FakeEmbeddingRuntime(path, options)

    async def scenario(manager: ModelManager) -> None:
        async with manager.use("a"):
            pass
        loading = asyncio.create_task(embed(manager, "e1", ["x"]))
        try:
            await wait_for(lambda: manager.state is ModelState.LOADING)
            status = manager.status()
            assert status["state"] == "ready" and manager.serving_state() is ModelState.READY
            assert status["transition"] == {"action": "loading", "model": "e1"}
            assert [m["id"] for m in status["models"]] == ["a"]
            async with manager.use("a") as chat:  # and it serves
                assert chat.id == "a"
        finally:
            release.set()
        await loading
        status = manager.status()
        assert status["transition"] is None and sorted(by_id(status)) == ["a", "e1"]
    try:
        run(scenario, models, factory_kw={"runtime_factory": FakeRuntime,
                                          "embedding_factory": slow})
    finally:
        release.set()


def test_a_chat_model_loading_with_none_ready_is_loading(models: Path) -> None:
    release = threading.Event()

    def slow(path: Path, options: RuntimeOptions) -> FakeRuntime:
        release.wait(60)
        return FakeRuntime(path, options)

    async def scenario(manager: ModelManager) -> None:
        await embed(manager, "e1", ["x"])
        loading = asyncio.create_task(manager.load("a"))
        try:
            await wait_for(lambda: manager.state is ModelState.LOADING)
            assert manager.status()["state"] == "loading"  # the embedding model is no chat
        finally:
            release.set()
        await loading
        assert manager.status()["state"] == "ready"
    try:
        run(scenario, models, factory_kw={"runtime_factory": slow,
                                          "embedding_factory": FakeEmbeddingRuntime})
    finally:
        release.set()


def test_ollama_ps_gives_each_model_its_own_memory(models: Path) -> None:
    """The daemon's app in this process on the fake runtimes and the metered fake GPU, asked
    by the official ollama client: each resident model shows the VRAM its own load took (not
    the whole process's) and its own size, the same figures /api/status has."""
    import httpx
    import ollama
    import uvicorn

    from appliance.api.app import create_app
    from tests.appliance.conftest import free_port

    gpu = MeteredGpu()
    port = free_port()
    settings = Settings(models_dir=models, port=port, threads=1, context_length=4096,
                        parallel=2, engine_nice=0, keep_alive_s=300)
    app = create_app(settings, probe=gpu, **factories(gpu, 700 * MIB, 90 * MIB))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        client = ollama.Client(host=url, timeout=60)
        assert client.ps().models == []
        for model_id in ("e1", "a"):
            httpx.post(f"{url}/api/models/{model_id}/load", timeout=60).raise_for_status()
        status = by_id(httpx.get(url + "/api/status", timeout=30).json())
        listed = {m.model: m for m in client.ps().models}
        assert [m.model for m in client.ps().models] == ["a:latest", "e1:latest"]  # chat first
        for model_id, taken in (("a", 700 * MIB), ("e1", 90 * MIB)):
            shown, memory = listed[f"{model_id}:latest"], status[model_id]["memory"]
            assert shown.size_vram == taken == memory["vram"]  # its own, not 790 MiB each
            assert shown.size == taken + memory["planned_ram"] > taken
            assert shown.expires_at is not None
        assert listed["a:latest"].context_length == 4096
        assert listed["e1:latest"].context_length == status["e1"]["max_input_tokens"]
        httpx.post(f"{url}/api/models/a/unload", timeout=60).raise_for_status()
        assert [m.model for m in client.ps().models] == ["e1:latest"]
    finally:
        server.should_exit = True
        thread.join(60)
