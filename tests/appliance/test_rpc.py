"""llama.cpp RPC workers with real processes: two `appliance worker` (ggml-rpc-server, CPU
backend) on 127.0.0.1, a daemon splitting the tiny model across them, and a local daemon as the
reference. Skipped, with the reason, without the RPC-enabled wheel or ggml-rpc-server (tests/run
builds both)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from appliance.cli import rpc_server_binary
from appliance.engine.rpc import RpcLibrary, probe
from appliance.errors import WorkerUnavailable
from tests.appliance.conftest import FOREVER, free_port, run_daemon
from tests.conftest import MODEL_A, REPO


def _missing() -> str | None:
    try:
        if not RpcLibrary().available:
            return "the llama-cpp-python wheel has no RPC backend (tests/run builds it with -DGGML_RPC=ON)"
    except OSError as e:
        return f"cannot open llama.cpp's libraries: {e}"
    if rpc_server_binary() is None:
        return "ggml-rpc-server is not installed (tests/run builds it with installer/rpc-server.sh)"
    return None


needs_rpc = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@dataclass
class Worker:
    endpoint: str
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)  # as a crash or a pulled cable would
            self.process.wait(timeout=30)


@contextlib.contextmanager
def run_worker(tmp: Path, port: int | None = None) -> Iterator[Worker]:
    port = port or free_port()
    log_path = tmp / f"worker-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "worker", "--port", str(port),
             "--threads", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    worker = Worker(f"127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError("worker exited:\n" + log_path.read_text(errors="replace"))
            try:
                probe(worker.endpoint, timeout=2)
                break
            except WorkerUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield worker
    finally:
        worker.stop()


PROMPT = "The three primary colours are"


def greedy(url: str) -> tuple[str, list[str]]:
    """Greedy completion: text and tokens (end-of-generation banned: every run is 32 tokens)."""
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL_A, "prompt": PROMPT, "max_tokens": 32, "temperature": 0,
        "logprobs": 0, **FOREVER})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["logprobs"]["tokens"]


def test_a_network_address_needs_allow_network() -> None:
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "worker", "--host",
                             "0.0.0.0"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1
    assert "no authentication" in result.stderr and "--allow-network" in result.stderr


def test_an_unreachable_worker_is_named() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(WorkerUnavailable, match=f"127.0.0.1:{port} is unreachable"):
        probe(f"127.0.0.1:{port}", timeout=2)


@needs_rpc
def test_split_over_two_workers_matches_local_and_survives_a_lost_worker(
        models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "local").mkdir()
    with run_daemon(models_dir, tmp_path / "local", default_model=MODEL_A) as local:
        expected = greedy(local.url)
    with run_worker(tmp_path) as first, run_worker(tmp_path) as second:
        workers = f'["{first.endpoint}", "{second.endpoint}"]'
        with run_daemon(models_dir, tmp_path, rpc_workers=workers) as daemon:
            assert greedy(daemon.url) == expected  # token for token

            offload = httpx.get(daemon.url + "/api/status").json()["model"]["offload"]
            split = {s["name"]: s for s in offload["split"]}
            for w in (first, second):
                share = split[f"rpc {w.endpoint}"]
                assert share["kind"] == "rpc" and share["layers"] >= 1, offload
            assert offload["n_gpu_layers"] == sum(s["layers"] for s in offload["split"]
                                                  if s["kind"] != "cpu")

            # A worker lost while no model holds it: the next load fails and names it.
            assert httpx.post(daemon.url + "/api/unload", timeout=60).status_code == 200
            port = int(second.endpoint.rsplit(":", 1)[1])
            second.stop()
            r = httpx.post(daemon.url + f"/api/models/{MODEL_A}/load", timeout=120)
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert second.endpoint in error["message"] and "unreachable" in error["message"]
            assert error["code"] == "rpc_worker_unavailable"
            assert daemon.process.poll() is None
            assert httpx.get(daemon.url + "/health").status_code == 200

            # The worker comes back on its address: loading works again, same output.
            with run_worker(tmp_path, port):
                r = httpx.post(daemon.url + f"/api/models/{MODEL_A}/load", timeout=120)
                assert r.status_code == 200, r.text
                assert greedy(daemon.url) == expected
