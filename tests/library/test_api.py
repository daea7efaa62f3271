"""The library through a real daemon (`appliance serve`, a child with HF_ENDPOINT at the local
hub): NDJSON pull progress shaped like Ollama's, two clients sharing one download, a pull that
outlives its client, serving undisturbed by a pull, removal of a loaded model, hostile input."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from tests.appliance.conftest import run_daemon
from tests.conftest import MODEL_A
from tests.library.conftest import GGUF_REPO, SPLIT_REPO, ST_REPO
from tests.library.hub_server import LocalHub
from tests.tray.conftest import wait_for


@pytest.fixture()
def served(hub: LocalHub, tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(models_dir / f"{MODEL_A}.gguf", folder)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # huggingface-hub reads it at import: children
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with run_daemon(folder, tmp_path, default_model=MODEL_A) as daemon:
        yield daemon, folder


def lines_of(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.iter_lines() if line.strip()]


def test_pull_streams_ollama_shaped_progress(served, hub: LocalHub) -> None:
    daemon, folder = served
    with daemon.http() as http, http.stream("POST", "/api/models/pull",
                                            json={"model": f"{GGUF_REPO}:Q8_0"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = lines_of(r)
    assert lines[0]["status"] == "pulling manifest"
    assert lines[-1] == {"status": "success", "stage": "done", "model": "tiny-q8_0"}
    downloads = [x for x in lines if x["stage"] == "download"]
    sha = hub.repos[GGUF_REPO].files["Tiny-Q8_0.gguf"].sha256
    assert downloads[-1]["digest"] == f"sha256:{sha}"
    assert downloads[-1]["completed"] == downloads[-1]["total"]
    assert (folder / "tiny-q8_0.gguf").exists()
    with daemon.http() as http:
        ids = [m["id"] for m in http.get("/api/models").json()["models"]]
        assert "tiny-q8_0" in ids  # the daemon's registry sees it at once
        view = http.get("/api/library").json()
    pulled = next(m for m in view["models"] if m["id"] == "tiny-q8_0")
    assert pulled["source"].startswith(GGUF_REPO) and pulled["fit"] == "CPU only"
    assert len(view["recommended"]) == 5


def test_two_clients_share_one_download_and_serving_goes_on(served, hub: LocalHub) -> None:
    """Two pulls and a listing sent at once to a daemon that has had no library request yet
    (its pulls are set up by the first one): one job, one download, and the listing sees it."""
    daemon, _ = served
    hub.gate = threading.Event()  # the file's bytes wait until both clients are in
    start = threading.Barrier(3)
    joined = [threading.Event() for _ in range(2)]
    results: dict[int, list[dict]] = {}

    def client(i: int) -> None:
        lines = []
        with daemon.http() as http:
            start.wait(timeout=60)
            with http.stream("POST", "/api/models/pull", json={"model": GGUF_REPO}) as r:
                for raw in r.iter_lines():
                    if raw.strip():
                        lines.append(json.loads(raw))
                        joined[i].set()  # a progress line: it follows the job
        results[i] = lines

    def lister() -> None:
        with daemon.http() as http:
            start.wait(timeout=60)
            http.get("/api/library").raise_for_status()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    threads.append(threading.Thread(target=lister))
    for t in threads:
        t.start()
    # The condition that matters: both clients follow the pull (the hub holds its bytes, so it
    # cannot have ended); a client that failed instead ends without joining.
    wait_for(lambda: all(j.is_set() for j in joined) or len(results) == 2, 180,
             "both clients to follow the pull")
    assert all(j.is_set() for j in joined), results
    with daemon.http() as http:
        pulls = http.get("/api/library").json()["pulls"]
        assert [(p["model"], p["finished"]) for p in pulls] == [("tiny-q4_k_m", False)]
        # The loaded model answers while the pull is held mid-way.
        answer = http.post("/v1/completions", json={"model": MODEL_A, "prompt": "Hi",
                                                    "max_tokens": 4})
        assert answer.status_code == 200
    hub.gate.set()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1]
    assert all(r[-1]["status"] == "success" for r in results.values()), results
    assert hub.gets[f"{GGUF_REPO}/Tiny-Q4_K_M.gguf"] == 1


def test_pull_survives_its_client_leaving(served, hub: LocalHub) -> None:
    daemon, folder = served
    hub.gate = threading.Event()
    with daemon.http() as http, http.stream("POST", "/api/models/pull",
                                            json={"model": ST_REPO}) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one line, then the client goes away
    hub.gate.set()
    wait_for(lambda: (folder / "tiny-q4_k_m.gguf").exists(), 300, "the pull to finish")
    assert (folder / "tiny-q4_k_m.manifest.json").exists()


def test_remove_refuses_a_loaded_model_unless_forced(served) -> None:
    daemon, folder = served
    with daemon.http() as http:
        r = http.delete(f"/api/models/{MODEL_A}")
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "model_in_use"
        assert (folder / f"{MODEL_A}.gguf").exists()
        r = http.delete(f"/api/models/{MODEL_A}", params={"force": "true"})
        assert r.status_code == 200 and r.json()["unloaded"] is True
        assert not (folder / f"{MODEL_A}.gguf").exists()
        assert http.get("/api/status").json()["model"] is None
        assert http.delete(f"/api/models/{MODEL_A}").status_code == 404


@pytest.mark.parametrize("body, status", [
    ({"model": "../../x"}, 400),
    ({"model": "/etc/passwd"}, 400),
    ({"model": "~/.ssh/id_rsa.gguf"}, 400),
    ({"model": "tiny/x" + "y" * 5000}, 400),
    ({"model": "~nouser-appliance-test/x.gguf"}, 400),  # no such user's home
    ({"model": "Qw\u00e9n/x"}, 400),  # not ASCII: the hub's names are
    ({"model": "Qwen/Qwen\uff13"}, 400),
    ({"model": GGUF_REPO, "revision": "m\u00e4in"}, 400),
    ({"model": f"{GGUF_REPO}:../../Q4"}, 400),
    ({"model": GGUF_REPO, "quant": "Q4_K_M; rm -rf /"}, 400),
    ({"model": GGUF_REPO, "quant": "Q9_ZZ"}, 404),
    ({"model": GGUF_REPO, "revision": "../../main"}, 400),
    ({"model": "tiny/Nope"}, 404),
    ({"model": "tiny/Tiny-Gated-GGUF"}, 403),
    ({"model": 12}, 400),
    ({}, 400),
])
def test_hostile_pulls(served, hub: LocalHub, body: dict, status: int) -> None:
    daemon, folder = served
    with daemon.http() as http:
        r = http.post("/api/models/pull", json=body)
    assert r.status_code == status, r.text
    assert "error" in r.json()
    assert hub.gets.total() == 0
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        f"{MODEL_A}.gguf"]


@pytest.mark.parametrize("model_id", ["..%2F..%2Fx", "%2Fetc%2Fpasswd", "a" * 300, ".hidden",
                                      "x%00y"])
def test_hostile_removals(served, model_id: str) -> None:
    daemon, folder = served
    with daemon.http() as http:
        r = http.delete(f"/api/models/{model_id}")
    assert 400 <= r.status_code < 500, r.text
    assert (folder / f"{MODEL_A}.gguf").exists()


def test_pull_from_a_web_page_is_refused(served) -> None:
    daemon, _ = served
    with daemon.http() as http:
        r = http.post("/api/models/pull", json={"model": GGUF_REPO},
                      headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        # No Origin: no browser (curl -d); the body is read as JSON and this one is not JSON.
        r = http.post("/api/models/pull", content=b"model=x",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 400


def test_sigterm_cancels_a_pull_and_keeps_its_partial(hub: LocalHub, tmp_path: Path,
                                                      models_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon stopped mid-pull (the hub slowed to 256 kB/s: a minute for the file) exits
    cleanly and soon, the client's stream ends with the reason, nothing half-installed shows
    in the models folder, and the partial file is resumed by the next pull."""
    import signal
    import subprocess
    import time

    from appliance.library.hub import Hub
    from appliance.library.pull import Library

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(models_dir / f"{MODEL_A}.gguf", folder)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"]
    hub.faults.rate = 256 * 1024
    lines: list[dict] = []
    with run_daemon(folder, tmp_path, switch_wait_s="5") as daemon:
        def follow() -> None:
            with daemon.http() as http, http.stream(
                    "POST", "/api/models/pull", json={"model": GGUF_REPO}) as r:
                lines.extend(lines_of(r))

        client = threading.Thread(target=follow)
        client.start()
        partial = folder / ".pulls" / "tiny-q4_k_m" / f"{source.sha256}.partial"
        wait_for(lambda: partial.exists() and partial.stat().st_size > 0, 60,
                 "the first bytes of the pull")
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        try:  # its stop timeout: switch_wait_s + 5 s
            code = daemon.process.wait(timeout=10 + 30)
        except subprocess.TimeoutExpired:
            pytest.fail("the daemon did not stop while a pull ran:\n" + daemon.log())
        took = time.monotonic() - started
        client.join(timeout=30)
    assert code == 0, daemon.log()
    assert took < 10, f"the stop took {took:.1f} s"
    assert lines and lines[-1]["status"] == "error" and "cancel" in lines[-1]["error"], lines
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        f"{MODEL_A}.gguf"]
    kept = partial.stat().st_size
    assert 0 < kept < source.size
    assert [p.name for p in partial.parent.iterdir()] == [partial.name]
    assert partial.read_bytes() == source.path.read_bytes()[:kept]  # every byte it has is right
    # The next pull (the CLI's, or the daemon's after a restart) fetches only the rest.
    hub.faults.rate = None
    model = Library(folder, hub=Hub(hub.url, token=False)).pull(
        Library(folder, hub=Hub(hub.url, token=False)).plan(GGUF_REPO))
    assert hub.starts[-1] == (f"{GGUF_REPO}/Tiny-Q4_K_M.gguf", kept)
    assert model.path.read_bytes() == source.path.read_bytes()


def test_a_split_model_is_one_model_everywhere(served, hub: LocalHub) -> None:
    """Pulled split GGUF: one id in /v1/models and /api/tags (its size all parts together),
    loaded from its first part by llama.cpp, and removed whole."""
    import ollama
    from openai import OpenAI

    daemon, folder = served
    with daemon.http() as http:
        r = http.post("/api/models/pull", json={"model": SPLIT_REPO, "stream": False})
        assert r.status_code == 200, r.text
    parts = sorted(folder.glob("tiny-split-q4_k_m-*-of-*.gguf"))
    assert len(parts) >= 2
    with OpenAI(base_url=daemon.base_url, api_key="unused", max_retries=0, timeout=120) as oa:
        ids = [m.id for m in oa.models.list()]
        assert ids.count("tiny-split-q4_k_m") == 1 and not any("-of-" in i for i in ids)
        answer = oa.completions.create(model="tiny-split-q4_k_m", prompt="Hello",
                                       max_tokens=4)
        assert answer.usage is not None and answer.usage.completion_tokens > 0
    tags = {m.model: m for m in ollama.Client(host=daemon.url).list().models}
    assert tags["tiny-split-q4_k_m:latest"].size == sum(p.stat().st_size for p in parts)
    assert not any("-of-" in (name or "") for name in tags)
    with daemon.http() as http:
        assert http.delete("/api/models/tiny-split-q4_k_m").status_code == 409  # loaded
        r = http.delete("/api/models/tiny-split-q4_k_m", params={"force": "true"})
        assert r.status_code == 200 and sorted(r.json()["removed"]) == [p.name for p in parts]
        assert "tiny-split-q4_k_m" not in [m["id"] for m in http.get("/api/models").json()[
            "models"]]
    assert not list(folder.glob("tiny-split-q4_k_m*"))


def test_the_daemon_settles_its_pulls_and_checks_what_a_restart_cut_short(
        served, hub: LocalHub) -> None:
    """A pull through the daemon is on the disk soon after its client has the answer. A model
    whose manifest is still marked by an earlier boot (the machine stopped before its bytes
    reached the disk) is hashed before its load: intact, it loads and is trusted from then on;
    damaged, it is removed and the request says why, in the dialect's shape, with no eviction."""
    from appliance.library.manifest import read_manifest
    from tests.library.test_durability import mark_as_before_a_restart

    daemon, folder = served
    with daemon.http() as http, http.stream("POST", "/api/models/pull",
                                            json={"model": GGUF_REPO}) as r:
        assert lines_of(r)[-1]["status"] == "success"
    wait_for(lambda: read_manifest(folder, "tiny-q4_k_m").unsynced_in is None, 60,
             "the daemon to settle its pull")

    for name in ("intact", "broken"):
        shutil.copy(folder / "tiny-q4_k_m.gguf", folder / f"{name}.gguf")
        manifest = json.loads((folder / "tiny-q4_k_m.manifest.json").read_text())
        manifest["id"], manifest["files"][0]["name"] = name, f"{name}.gguf"
        (folder / f"{name}.manifest.json").write_text(json.dumps(manifest))
        mark_as_before_a_restart(folder, name)
    with (folder / "broken.gguf").open("r+b") as f:
        f.seek(-8192, 2)
        f.write(bytes(8192))

    with daemon.http() as http:
        ok = http.post("/v1/completions", json={"model": "intact", "prompt": "Hi",
                                                "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        assert read_manifest(folder, "intact").unsynced_in is None
        bad = http.post("/v1/chat/completions", json={
            "model": "broken", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
        assert bad.status_code == 422, bad.text
        error = bad.json()["error"]
        assert error["code"] == "model_unusable" and "pull it again" in error["message"]
        assert "installed just before the machine stopped" in error["message"]
        resident = [m["name"] for m in http.get("/api/ps").json()["models"]]
        assert resident == ["intact:latest"], resident  # the refusal came before any eviction
    assert not (folder / "broken.gguf").exists()
    assert not (folder / "broken.manifest.json").exists()
