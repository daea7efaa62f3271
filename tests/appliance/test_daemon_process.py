"""The daemon as a service: keys, queue bounds, SIGTERM, the CLI that talks to it."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.appliance.conftest import FOREVER, run_daemon
from tests.conftest import MODEL_A, run_cli


def test_api_key_required_everywhere_but_health(models_dir: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    key_file.chmod(0o600)
    with run_daemon(models_dir, tmp_path, api_key_file=str(key_file)) as d:
        assert httpx.get(d.url + "/health").status_code == 200
        r = httpx.get(d.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        wrong = httpx.get(d.url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        with openai.OpenAI(base_url=d.base_url, api_key="s3cret-key", max_retries=0) as c:
            assert MODEL_A in {m.id for m in c.models.list()}
        # The CLI reads the same key file through the same setting.
        env = {"APPLIANCE_PORT": d.url.rsplit(":", 1)[1], "APPLIANCE_API_KEY_FILE": str(key_file)}
        assert run_cli("models", env=env).returncode == 0


def test_world_readable_key_file_is_refused(models_dir: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("k")
    key_file.chmod(0o644)
    result = run_cli("serve", env={"APPLIANCE_API_KEY_FILE": str(key_file),
                                   "APPLIANCE_MODELS_DIR": str(models_dir)})
    assert result.returncode == 1
    assert "readable by other users" in result.stderr and "Traceback" not in result.stderr


def test_non_loopback_bind_needs_a_key(tmp_path: Path) -> None:
    result = run_cli("serve", "--host", "0.0.0.0", env={"APPLIANCE_CONFIG": str(tmp_path / "x")})
    assert result.returncode == 78  # EX_CONFIG: systemd does not restart a settings mistake
    assert "api_key_file" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_queue_full_is_503_with_retry_after(models_dir: Path, tmp_path: Path) -> None:
    with run_daemon(models_dir, tmp_path, default_model=MODEL_A, parallel="1",
                    max_queue="0") as d, d.http() as http:
        body = {"model": MODEL_A, "prompt": "long", "max_tokens": 100000, "stream": True,
                **FOREVER}
        with http.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # keep the iterator: dropping it closes the stream
            next(lines)
            r = http.post("/v1/completions", json={"model": MODEL_A, "prompt": "x",
                                                   "max_tokens": 2})
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["Retry-After"]) >= 1
        # The closed stream frees its slot within a step or so: wait for that, however slow.
        deadline = time.monotonic() + 60
        while True:
            ok = http.post("/v1/completions",
                           json={"model": MODEL_A, "prompt": "x", "max_tokens": 2})
            if ok.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert ok.status_code == 200, ok.text


def test_sigterm_during_stream_ends_cleanly(models_dir: Path, tmp_path: Path) -> None:
    with run_daemon(models_dir, tmp_path, default_model=MODEL_A, switch_wait_s="2") as d:
        events: list[str] = []

        def stream() -> None:
            body = {"model": MODEL_A, "prompt": "go", "max_tokens": 100000, "stream": True,
                    **FOREVER}
            with httpx.stream("POST", d.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    events.append(line)

        reader = threading.Thread(target=stream)
        reader.start()
        while len(events) < 3:
            time.sleep(0.02)
        d.process.send_signal(signal.SIGTERM)
        assert d.process.wait(timeout=30) == 0
        reader.join(timeout=10)
        assert not reader.is_alive()
        data = [e for e in events if e.startswith("data: ")]
        assert data[-1] == "data: [DONE]"  # the client got a proper end of stream
        assert "shutting down" in data[-2]  # ... saying why it ended early
        assert "Traceback" not in d.log()


def test_cli_against_the_daemon(daemon, tmp_path: Path) -> None:
    env = {"APPLIANCE_PORT": daemon.url.rsplit(":", 1)[1],
           "APPLIANCE_CONFIG": str(tmp_path / "absent.toml")}
    loaded = run_cli("load", MODEL_A, env=env)
    assert loaded.returncode == 0 and MODEL_A in loaded.stdout
    status = run_cli("status", env=env)
    assert status.returncode == 0 and "ready" in status.stdout and "CPU only" in status.stdout
    models = run_cli("models", env=env)
    assert MODEL_A in models.stdout and "unusable" in models.stdout
    assert run_cli("unload", env=env).returncode == 0
    assert "unloaded" in run_cli("status", env=env).stdout
    missing = run_cli("load", "nope", env=env)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


@pytest.mark.parametrize("command", [["status"], ["load", "x"], ["unload"]])
def test_cli_when_daemon_is_down(command: list[str], tmp_path: Path) -> None:
    from tests.appliance.conftest import free_port

    result = run_cli(*command, env={"APPLIANCE_PORT": str(free_port()),
                                    "APPLIANCE_CONFIG": str(tmp_path / "absent.toml")})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not running" in lines[0] and "hint:" in lines[0]


def test_idle_model_is_unloaded_after_keep_alive(models_dir: Path, tmp_path: Path) -> None:
    with run_daemon(models_dir, tmp_path, default_model=MODEL_A, keep_alive_s="1") as d, \
            d.http() as http:
        http.post("/v1/completions", json={"model": MODEL_A, "prompt": "x", "max_tokens": 1})
        deadline = time.monotonic() + 10
        while http.get("/api/status").json()["state"] != "unloaded":
            assert time.monotonic() < deadline, "the idle model was not unloaded"
            time.sleep(0.2)
        # ...and the next request brings it back.
        r = http.post("/v1/completions", json={"model": MODEL_A, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200


def test_tells_systemd_when_ready(models_dir: Path, tmp_path: Path) -> None:
    """Type=notify: READY=1 arrives on $NOTIFY_SOCKET once the daemon serves."""
    import os
    import socket

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        os.environ["NOTIFY_SOCKET"] = str(path)
        try:
            with run_daemon(models_dir, tmp_path) as d:
                message = sock.recv(256).decode()
                assert "READY=1" in message
                assert httpx.get(d.url + "/health").status_code == 200
                d.process.terminate()
                d.process.wait(timeout=30)
                assert "STOPPING=1" in sock.recv(256).decode()
        finally:
            del os.environ["NOTIFY_SOCKET"]


def _tasks(pid: int) -> list[tuple[int, int, int]]:
    """(thread id, nice, CPU ticks) of every thread of a process, from /proc."""
    rows = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        # After the name: state is field 3, utime 14, stime 15, nice 19 (1-based, man 5 proc).
        rows.append((int(task.name), int(fields[16]), int(fields[11]) + int(fields[12])))
    return rows


def test_decoding_runs_at_lower_priority_than_http(models_dir: Path, tmp_path: Path) -> None:
    with run_daemon(models_dir, tmp_path, default_model=MODEL_A, engine_nice="7") as d:
        client = openai.OpenAI(base_url=d.base_url, api_key="unused", max_retries=0)
        stream = client.completions.create(model=MODEL_A, prompt="Count:", max_tokens=4000,
                                           stream=True, extra_body=FOREVER)
        try:
            chunks = iter(stream)
            for _ in zip(range(20), chunks, strict=False):
                pass
            before = {tid: ticks for tid, _, ticks in _tasks(d.process.pid)}
            for _ in zip(range(400), chunks, strict=False):  # decode a while, then look
                pass
            tasks = _tasks(d.process.pid)
        finally:
            stream.close()
        main = [nice for tid, nice, _ in tasks if tid == d.process.pid]
        assert main == [0]  # the event loop answers HTTP at normal priority
        used = {nice: 0 for _, nice, _ in tasks}
        for tid, nice, ticks in tasks:
            used[nice] += ticks - before.get(tid, 0)
        assert used.get(7, 0) > used[0], tasks  # ... and the decoding threads run niced


def test_feeds_the_systemd_watchdog(models_dir: Path, tmp_path: Path) -> None:
    """WatchdogSec: WATCHDOG=1 arrives every WATCHDOG_USEC/2 while the daemon is healthy."""
    import os
    import socket

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        os.environ.update(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="200000")
        try:
            with run_daemon(models_dir, tmp_path, default_model=MODEL_A):
                messages = [sock.recv(256).decode() for _ in range(5)]
        finally:
            del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
    assert sum("WATCHDOG=1" in m for m in messages) >= 3, messages


def test_an_unhealthy_engine_stops_the_watchdog_pings(tmp_path: Path) -> None:
    import asyncio
    import os
    import socket
    from types import SimpleNamespace

    from appliance.server import feed_watchdog

    class Manager:
        healthy = True

        def engine_healthy(self, stall_limit_s: float) -> bool:
            return self.healthy

    manager = Manager()
    app = SimpleNamespace(state=SimpleNamespace(manager=manager))
    path = tmp_path / "notify.sock"

    async def pings(healthy: bool) -> int:
        manager.healthy = healthy
        task = asyncio.create_task(feed_watchdog(app, 0.01))
        await asyncio.sleep(0.2)
        task.cancel()
        count = 0
        while True:
            try:
                count += b"WATCHDOG=1" in sock.recv(256)
            except BlockingIOError:
                return count

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        os.environ["NOTIFY_SOCKET"] = str(path)
        try:
            assert asyncio.run(pings(True)) >= 3
            assert asyncio.run(pings(False)) == 0
        finally:
            del os.environ["NOTIFY_SOCKET"]
