"""Several resident models over HTTP: /api/status and `appliance status` list each one,
/v1/models says what each model is (and the embeddings route agrees), one model can be unloaded
by id (and not from a web page), and /health stays ready for a chat model while an embedding
model loads beside it. Real daemons, real llama.cpp on the tiny chat and embedding GGUFs."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from appliance.api.app import create_app
from appliance.config import Settings
from appliance.engine.embedding import EmbeddingOptions, EmbeddingRuntime
from appliance.residency.loader import ModelLoader
from tests.appliance.conftest import FOREVER, Daemon, free_port, run_daemon
from tests.conftest import EMBED, MODEL_A, run_cli

EVIL_ORIGIN = "http://evil.example"


@pytest.fixture(scope="module")
def folder(tiny_gguf: Path, tiny_embedding_gguf: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("resident-models")
    shutil.copy(tiny_gguf, folder / f"{MODEL_A}.gguf")
    shutil.copy(tiny_embedding_gguf, folder / f"{EMBED}.gguf")
    return folder


@pytest.fixture(scope="module")
def daemon(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with run_daemon(folder, tmp_path_factory.mktemp("daemon"), default_model=MODEL_A,
                    parallel="2", keep_alive_embedding_s="900") as d:
        yield d


@pytest.fixture()
def client(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=daemon.base_url, api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c


def status(url: str) -> dict[str, Any]:
    return httpx.get(url + "/api/status", timeout=30).json()


def resident(url: str) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in status(url)["models"]}


def wait_for(predicate: Any, what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_models_say_their_kind_and_the_embeddings_route_agrees(client: openai.OpenAI) -> None:
    listed = {m.id: m.model_extra for m in client.models.list().data}
    assert listed[MODEL_A] == {"kind": "chat", "embedding": "refused"}
    assert listed[EMBED] == {"kind": "embedding", "embedding": "last", "dimensions": 64}
    one = client.models.retrieve(EMBED)
    assert one.id == EMBED and one.model_extra == listed[EMBED]
    # "refused" means what it says: the embeddings route names the embedding models instead.
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL_A, input="x")
    assert EMBED in refused.value.message
    vector = client.embeddings.create(model=EMBED, input="x").data[0].embedding
    assert len(vector) == listed[EMBED]["dimensions"]


def test_status_lists_each_resident_model(daemon: Daemon, client: openai.OpenAI) -> None:
    client.embeddings.create(model=EMBED, input=["one", "two"])
    started = time.time()
    # The worker marks itself idle just after it hands the vectors back.
    models = wait_for(lambda: (r := resident(daemon.url))[EMBED]["slots_busy"] == 0 and r,
                      "the embedding worker to be idle")
    assert set(models) == {MODEL_A, EMBED}
    chat, embedding = models[MODEL_A], models[EMBED]
    assert (chat["kind"], embedding["kind"]) == ("chat", "embedding")
    assert (chat["slots"], embedding["slots"]) == (2, 1)
    for entry in (chat, embedding):
        memory = entry["memory"]
        assert memory["vram"] == 0 and memory["vram_source"] == "planned"  # APPLIANCE_GPU=none
        assert memory["planned_ram"] > 0
        assert memory["rss_at_load"] is None or memory["rss_at_load"] > 0
        assert entry["pinned"] is False and entry["keep_alive_set_by"] == "default"
        assert entry["slots_busy"] == 0 and entry["loads"] == 1
    assert embedding["keep_alive_s"] == 900
    assert embedding["expires_at"] == pytest.approx(started + 900, abs=30)

    # Busy slots show while a stream runs.
    body = {"model": MODEL_A, "prompt": "x", "max_tokens": 4000, "stream": True, **FOREVER}
    with httpx.stream("POST", daemon.url + "/v1/completions", json=body, timeout=60) as running:
        lines = running.iter_lines()
        next(lines)
        busy = wait_for(lambda: resident(daemon.url)[MODEL_A]["slots_busy"] == 1 and
                        resident(daemon.url)[MODEL_A], "a busy slot")
        assert busy["expires_at"] is None  # in use: the countdown starts afterwards


def test_appliance_status_prints_a_table_and_unload_takes_an_id(
        daemon: Daemon, client: openai.OpenAI, tmp_path: Path) -> None:
    env = {"APPLIANCE_PORT": daemon.url.rsplit(":", 1)[1],
           "APPLIANCE_CONFIG": str(tmp_path / "absent.toml")}
    client.embeddings.create(model=EMBED, input="x")
    wait_for(lambda: resident(daemon.url)[EMBED]["slots_busy"] == 0, "the worker to be idle")
    shown = run_cli("status", env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("MODEL "))
    assert "VRAM" in lines[header] and "SLOTS BUSY" in lines[header] \
        and "UNLOADS" in lines[header]
    rows = {line.split()[0]: line for line in lines[header + 1:header + 3]}
    assert set(rows) == {MODEL_A, EMBED}
    assert " embedding " in rows[EMBED] and " 0/1 " in rows[EMBED] and " in 1" in rows[EMBED]
    assert " chat " in rows[MODEL_A] and " 0/2 " in rows[MODEL_A]

    unloaded = run_cli("unload", EMBED, env=env)
    assert unloaded.returncode == 0 and f"unloaded {EMBED}" in unloaded.stdout
    assert set(resident(daemon.url)) == {MODEL_A}  # the chat model stays
    loaded = run_cli("load", EMBED, env=env)
    assert loaded.returncode == 0 and f"loaded {EMBED} (embedding" in loaded.stdout
    assert set(resident(daemon.url)) == {MODEL_A, EMBED}


def test_one_model_unloads_by_id_and_never_from_a_page(daemon: Daemon,
                                                       client: openai.OpenAI) -> None:
    client.embeddings.create(model=EMBED, input="x")
    with daemon.http() as http:
        page = http.post(f"/api/models/{EMBED}/unload", headers={"Origin": EVIL_ORIGIN})
        assert page.status_code == 403 and EMBED in resident(daemon.url)
        missing = http.post("/api/models/nope/unload")
        assert missing.status_code == 404 and "does not exist" in missing.json()["error"]["message"]
        huge = http.post(f"/api/models/{'x' * 5000}/unload")
        assert huge.status_code == 404 and len(huge.text) < 1000
        done = http.post(f"/api/models/{EMBED.upper()}/unload")  # ids in any case
        assert done.status_code == 200
        assert [m["id"] for m in done.json()["models"]] == [MODEL_A]
        again = http.post(f"/api/models/{EMBED}/unload")  # not resident: nothing to do
        assert again.status_code == 200 and again.json()["state"] == "ready"
    assert client.chat.completions.create(  # the chat model never noticed
        model=MODEL_A, messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices


# -- /health while an embedding model loads beside a ready chat model -------------------------


class GatedEmbedding:
    """The real embedding runtime, whose load waits until the test lets it go on."""

    def __init__(self) -> None:
        self.loading = threading.Event()
        self.release = threading.Event()

    def __call__(self, path: Path, options: EmbeddingOptions) -> EmbeddingRuntime:
        self.loading.set()
        self.release.wait(120)
        return EmbeddingRuntime(path, options)


@pytest.fixture()
def gated_daemon(folder: Path, tmp_path: Path) -> Iterator[tuple[str, GatedEmbedding]]:
    """The daemon's app in this process (uvicorn on a loopback port), so its embedding loads
    go through the gate."""
    gate = GatedEmbedding()
    port = free_port()
    settings = Settings(models_dir=folder, port=port, threads=2, context_length=4096,
                        gpu="none", parallel=2, default_model=MODEL_A)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, embedding_factory=gate),
                                           host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.started, "the server to start")
        wait_for(lambda: httpx.get(url + "/health", timeout=5).status_code == 200,
                 "the chat model to load")
        yield url, gate
    finally:
        gate.release.set()
        server.should_exit = True
        thread.join(60)


def test_health_says_loading_from_the_first_request_while_the_default_model_starts(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the default model's load takes the lock (its checks run first), /health must not
    answer "ok" with no model: a service manager or a test would take the daemon as ready."""
    checking, release = threading.Event(), threading.Event()
    preflight = ModelLoader.preflight

    def gated_preflight(self: ModelLoader, entry: Any) -> None:
        checking.set()
        release.wait(120)
        preflight(self, entry)

    monkeypatch.setattr(ModelLoader, "preflight", gated_preflight)
    port = free_port()
    settings = Settings(models_dir=folder, port=port, threads=2, context_length=4096,
                        gpu="none", parallel=2, default_model=MODEL_A)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_config=None))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.started and checking.is_set(), "the server to start")
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 503, health.text
        assert health.json()["status"] == "loading"
        assert health.json()["transition"] == {"action": "loading", "model": MODEL_A}
        assert status(url)["state"] == "loading"
        release.set()
        wait_for(lambda: httpx.get(url + "/health", timeout=5).status_code == 200,
                 "the default model to load")
        ready = httpx.get(url + "/health", timeout=5).json()
        assert ready["model"] == MODEL_A and ready["transition"] is None
    finally:
        release.set()
        server.should_exit = True
        thread.join(60)


def test_health_stays_ready_while_an_embedding_model_loads_beside_the_chat_model(
        gated_daemon: tuple[str, GatedEmbedding]) -> None:
    url, gate = gated_daemon
    result: dict[str, Any] = {}

    def embed() -> None:
        result["response"] = httpx.post(url + "/v1/embeddings", timeout=120,
                                        json={"model": EMBED, "input": ["a", "b"]})

    worker = threading.Thread(target=embed)
    worker.start()
    try:
        assert gate.loading.wait(60), "the embedding model's load never started"
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "ok" and health.json()["model"] == MODEL_A
        assert health.json()["transition"] == {"action": "loading", "model": EMBED}
        now = status(url)
        assert now["state"] == "ready" and now["model"]["id"] == MODEL_A
        assert [m["id"] for m in now["models"]] == [MODEL_A]
        chat = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL_A, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(url + "/health", timeout=10).status_code == 200  # still loading
        assert not result
    finally:
        gate.release.set()
        worker.join(120)
    assert result["response"].status_code == 200 and len(result["response"].json()["data"]) == 2
    after = status(url)
    assert after["transition"] is None and {m["id"] for m in after["models"]} == {MODEL_A, EMBED}
