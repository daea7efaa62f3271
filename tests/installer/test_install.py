"""installer/install.sh and uninstall.sh end to end, into a temporary HOME (CPU, --no-start)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.appliance.conftest import free_port
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run(script: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    real_home = Path.home()
    env = {**{k: v for k, v in os.environ.items()
              if not k.startswith(("XDG_", "APPLIANCE_", "VIRTUAL_ENV"))},
           "HOME": str(home),
           # Reuse this machine's llama.cpp build and pip cache: the installer keys them itself.
           "APPLIANCE_WHEELHOUSE": os.environ.get(
               "APPLIANCE_WHEELHOUSE", str(real_home / ".cache/qwen-appliance/wheels")),
           "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(real_home / ".cache/pip"))}
    return subprocess.run(["bash", str(REPO / "installer" / script), *args], env=env,
                          capture_output=True, text=True, timeout=1800)


def test_install_upgrade_uninstall(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    first = run("install.sh", home, "--no-start", "--cpu")
    assert first.returncode == 0, first.stdout + first.stderr
    prefix = home / ".local/share/qwen-appliance"
    venv, models = prefix / "venv", prefix / "models"
    config = home / ".config/qwen-appliance/config.toml"
    unit = home / ".config/systemd/user/appliance.service"
    desktop = home / ".config/autostart/qwen-appliance-tray.desktop"

    version = subprocess.run([venv / "bin/appliance", "--version"], capture_output=True,
                             text=True)
    assert version.returncode == 0 and version.stdout.startswith("appliance ")
    assert f"ExecStart={venv}/bin/appliance serve" in unit.read_text()
    assert f"Exec={venv}/bin/appliance tray" in desktop.read_text()
    starter = models / "gemma-3-270m-q4_k_m.gguf"
    assert starter.stat().st_size > 200_000_000  # the offline model, since no Qwen3 was asked
    assert 'default_model = "gemma-3-270m-q4_k_m"' in config.read_text()
    assert "Qwen/Qwen3-8B" in first.stdout  # says how to add the real model

    mine = models / "mine.gguf"
    mine.write_bytes(b"GGUF my model")
    config.write_text(config.read_text() + "# my note\n")
    second = run("install.sh", home, "--no-start", "--cpu")
    assert second.returncode == 0, second.stdout + second.stderr
    assert mine.read_bytes() == b"GGUF my model" and "# my note" in config.read_text()

    # The unit's own ExecStart, started by hand: it serves, answers, and stops cleanly.
    exec_start = next(line.split("=", 1)[1] for line in unit.read_text().splitlines()
                      if line.startswith("ExecStart="))
    port = free_port()
    env = {**os.environ, "HOME": str(home), "APPLIANCE_PORT": str(port)}
    for key in [k for k in env if k.startswith(("XDG_", "APPLIANCE_CONFIG"))]:
        del env[key]
    daemon = subprocess.Popen(shlex.split(exec_start), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["state"] == "ready":
                    break
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8})
        assert r.status_code == 200 and r.json()["model"] == "gemma-3-270m-q4_k_m"
    finally:
        daemon.send_signal(signal.SIGTERM)
        output, _ = daemon.communicate(timeout=60)
    assert daemon.returncode == 0 and "Traceback" not in output

    removed = run("uninstall.sh", home)
    assert removed.returncode == 0, removed.stderr
    assert not venv.exists() and not unit.exists() and not desktop.exists()
    assert mine.exists() and starter.exists() and config.exists()
    purged = run("uninstall.sh", home, "--purge")
    assert purged.returncode == 0 and not prefix.exists() and not config.parent.exists()


def test_installer_rejects_unknown_options(tmp_path: Path) -> None:
    result = run("install.sh", tmp_path, "--frobnicate")
    assert result.returncode == 1 and "unknown option --frobnicate" in result.stderr
