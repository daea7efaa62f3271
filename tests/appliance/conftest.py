"""A real daemon (`appliance serve` in a child process) on a free loopback port, tiny models."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL_A, REPO

# Ban every added token (the end-of-generation ones among them) so a stream runs until stopped.
FOREVER = {"logit_bias": {str(t): -100 for t in range(151643, 151669)}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    url: str
    process: subprocess.Popen
    log_path: Path
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def http(self, **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_daemon(models_dir: Path, tmp: Path, port: int | None = None,
               **settings: str) -> Iterator[Daemon]:
    """`port`: a given one (a daemon restarted where its clients expect it), else a free one."""
    port = port or free_port()
    env = {**os.environ, "APPLIANCE_PORT": str(port), "APPLIANCE_MODELS_DIR": str(models_dir),
           "APPLIANCE_CONFIG": str(tmp / "absent.toml"), "APPLIANCE_THREADS": "2",
           "APPLIANCE_CONTEXT_LENGTH": "4096", "APPLIANCE_GPU": "none",
           **{f"APPLIANCE_{k.upper()}": v for k, v in settings.items()}}
    log_path = tmp / f"daemon-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    daemon = Daemon(f"http://127.0.0.1:{port}", process, log_path)
    if "API_KEY_FILE" in {k.upper() for k in settings}:
        daemon.api_key = Path(settings.get("api_key_file") or settings["API_KEY_FILE"]).read_text().strip()
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError("daemon exited:\n" + daemon.log())
            try:
                if httpx.get(daemon.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("daemon did not become healthy:\n" + daemon.log())
            time.sleep(0.1)
        yield daemon
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def daemon(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with run_daemon(models_dir, tmp_path_factory.mktemp("daemon"), default_model=MODEL_A,
                    parallel="4", max_queue="8") as d:
        yield d


@pytest.fixture()
def client(daemon: Daemon):
    from openai import OpenAI

    with OpenAI(base_url=daemon.base_url, api_key=daemon.api_key or "unused",
                max_retries=0, timeout=60) as c:
        yield c
