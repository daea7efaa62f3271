"""Fault injection: `kill -9` of the daemon under load, then the way a user would bring it back.

Without a systemd user manager that is the tray's Start (`DaemonControl.start()`, which spawns
`appliance serve` in its own session); with one, systemd's `Restart=` on a transient unit.
Either way the daemon must serve again, with every model listed, unchanged and usable.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from appliance.tray.service import DaemonControl
from tests.appliance.conftest import FOREVER, free_port
from tests.conftest import MODEL_A, MODEL_B, REPO

STREAMS = 4  # two run in the two slots, two wait in the queue
START_DEADLINE_S = 120  # a cold start loads the model; a loaded CI machine is slow


def wait_for(condition: Callable[[], Any], what: str, timeout: float = START_DEADLINE_S,
             log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.05)


def serving_pid(url: str) -> int | None:
    """The pid of the daemon answering at `url` once it is healthy, else None."""
    try:
        if httpx.get(url + "/health", timeout=2).status_code != 200:
            return None
        return int(httpx.get(url + "/api/status", timeout=5).json()["pid"])
    except (httpx.TransportError, ValueError, KeyError):
        return None


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("*.gguf"))}


class Load:
    """Streaming completions that never end by themselves, each in its own thread."""

    def __init__(self, url: str, n: int) -> None:
        self.url = url
        self.lines: list[list[str]] = [[] for _ in range(n)]
        self.errors: list[BaseException | None] = [None] * n
        self.threads = [threading.Thread(target=self._stream, args=(i,), daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def _stream(self, i: int) -> None:
        body = {"model": MODEL_A, "prompt": f"stream {i}", "max_tokens": 100000, "stream": True,
                **FOREVER}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    self.lines[i].append(line)
        except httpx.HTTPError as e:
            self.errors[i] = e

    def tokens(self, i: int) -> int:
        return sum(1 for line in self.lines[i] if line.startswith("data: {"))


def catalogue(url: str) -> list[tuple[str, bool, int]]:
    """Every model the daemon lists: id, usable, file size (the broken one included)."""
    models = httpx.get(url + "/api/models", timeout=30).json()["models"]
    return sorted((m["id"], m["usable"], m["file_size"]) for m in models)


def check_models_intact(url: str, models_dir: Path, before: dict[str, str],
                        listed_before: list[tuple[str, bool, int]]) -> None:
    assert digests(models_dir) == before  # nothing on disk was touched by the crash
    assert catalogue(url) == listed_before
    listed = {m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
    assert {MODEL_A, MODEL_B} <= listed
    for model in (MODEL_A, MODEL_B):  # the second one is loaded just in time
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Say hello."}]})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model and r.json()["usage"]["completion_tokens"] >= 1


def kill_under_load(url: str, log: Path | None) -> int:
    """Start STREAMS streams, kill -9 the daemon while they run, and return its pid."""
    pid = wait_for(lambda: serving_pid(url), "the daemon to answer", log=log)
    load = Load(url, STREAMS)

    def loaded() -> bool:
        # Under load: both slots decoding and the other requests waiting for one.
        decoding = sum(load.tokens(i) >= 3 for i in range(STREAMS))
        model = httpx.get(url + "/api/status", timeout=5).json()["model"] or {}
        return decoding == 2 and model.get("queue", 0) == STREAMS - 2

    wait_for(loaded, "two streams decoding and two queued", log=log)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), f"pid {pid} to die", timeout=30)
    for t in load.threads:
        t.join(timeout=30)
        assert not t.is_alive()
    # Every client sees its stream cut, none a clean end: the crash was real and mid-stream.
    assert all(isinstance(e, httpx.TransportError) for e in load.errors), load.errors
    assert not any("data: [DONE]" in lines for lines in load.lines)
    return pid


def serve_env(models_dir: Path, tmp_path: Path, port: int) -> dict[str, str]:
    return {"APPLIANCE_PORT": str(port), "APPLIANCE_MODELS_DIR": str(models_dir),
            "APPLIANCE_CONFIG": str(tmp_path / "absent.toml"), "APPLIANCE_THREADS": "2",
            "APPLIANCE_CONTEXT_LENGTH": "16384", "APPLIANCE_GPU": "none",
            "APPLIANCE_PARALLEL": "2", "APPLIANCE_DEFAULT_MODEL": MODEL_A,
            "APPLIANCE_SWITCH_WAIT_S": "1"}


@pytest.fixture()
def reap_daemons() -> Iterator[Callable[[str], None]]:
    """Ends, at teardown, every daemon this test started on its port: they are not our children."""
    ports: list[str] = []
    yield ports.append
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if ("appliance.cli" in " ".join(proc.info["cmdline"] or [])
                    and proc.environ().get("APPLIANCE_PORT") in ports):
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except psutil.TimeoutExpired:
                    proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def test_kill_9_under_load_then_tray_start_restores_service(
        models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        reap_daemons: Callable[[str], None]) -> None:
    port = free_port()
    reap_daemons(str(port))
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # where start() logs
    log = tmp_path / "state/qwen-appliance/daemon.log"
    control = DaemonControl(serve_env=serve_env(models_dir, tmp_path, port))
    # The nohup path, even on a desktop where the real appliance.service is installed: the
    # systemd path is the next test's, on a unit of its own.
    monkeypatch.setattr(control, "uses_systemd", lambda: False)
    before = digests(models_dir)

    assert "started the daemon" in control.start()
    first = wait_for(lambda: serving_pid(url), "the first daemon", log=log)
    listed_before = catalogue(url)
    assert {(MODEL_A, True), (MODEL_B, True), ("broken", False)} <= {m[:2] for m in listed_before}
    killed = kill_under_load(url, log)
    assert killed == first

    assert "started the daemon" in control.start()  # what the tray's Start menu item runs
    second = wait_for(lambda: serving_pid(url), "the restarted daemon", log=log)
    assert second != first
    check_models_intact(url, models_dir, before, listed_before)
    text = log.read_text(errors="replace")
    assert text.count("serving on") == 2 and "Traceback" not in text


def user_manager() -> bool:
    if shutil.which("systemd-run") is None or shutil.which("systemctl") is None:
        return False
    return subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True,
                          timeout=10).returncode == 0


def unit_value(key: str) -> str:
    """A [Service] value of the installed user unit, so the test follows what we ship."""
    text = (REPO / "systemd/appliance.service.in").read_text()
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")][-1]


@pytest.mark.skipif(not user_manager(), reason="no systemd user manager on this machine "
                    "(`systemctl --user` cannot connect); the nohup path is tested instead")
def test_kill_9_under_load_systemd_restarts_service(models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    unit = f"appliance-fault-test-{port}"
    url = f"http://127.0.0.1:{port}"
    env = serve_env(models_dir, tmp_path, port)

    def main_pid() -> int:
        out = subprocess.run(["systemctl", "--user", "show", "-p", "MainPID", "--value", unit],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out.strip() or 0)

    before = digests(models_dir)
    subprocess.run(["systemd-run", "--user", f"--unit={unit}", "--collect",
                    f"--working-directory={REPO}", "-p", "Type=notify", "-p", "NotifyAccess=main",
                    "-p", f"Restart={unit_value('Restart')}", "-p", "RestartSec=1",
                    *(f"--setenv={k}={v}" for k, v in env.items()),
                    sys.executable, "-m", "appliance.cli", "serve"], check=True, timeout=60)
    try:
        first = wait_for(lambda: serving_pid(url), "the service")
        assert first == main_pid()
        listed_before = catalogue(url)
        kill_under_load(url, None)
        second = wait_for(lambda: (pid := serving_pid(url)) and pid != first and pid,
                          "systemd to restart the service")
        assert second == main_pid()
        check_models_intact(url, models_dir, before, listed_before)
    finally:
        subprocess.run(["systemctl", "--user", "stop", unit], capture_output=True, timeout=90)
        subprocess.run(["systemctl", "--user", "reset-failed", unit], capture_output=True,
                       timeout=10)
