"""`appliance pull / models / du / rm` as a user runs them (child processes, HF_ENDPOINT at the
local hub, no daemon running): plain log lines when the output is not a terminal."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli
from tests.library.conftest import GGUF_REPO, SPLIT_REPO
from tests.library.hub_server import LocalHub


def env_for(hub: LocalHub, tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "models"
    folder.mkdir(exist_ok=True)
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": "", "APPLIANCE_MODELS_DIR": str(folder),
            "APPLIANCE_CONFIG": str(tmp_path / "absent.toml"), "APPLIANCE_PORT": "9",
            "APPLIANCE_GPU": "none", "XDG_CACHE_HOME": str(tmp_path / "cache")}


def test_pull_models_du_rm(hub: LocalHub, tmp_path: Path) -> None:
    env = env_for(hub, tmp_path)
    dry = run_cli("pull", GGUF_REPO, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("tiny-q4_k_m: gguf from tiny/Tiny-GGUF @ 0123456789, Q4_K_M")
    assert "quantizations: Q4_K_M, Q8_0" in dry.stdout and "here: ~CPU only" in dry.stdout
    assert hub.gets.total() == 0

    pulled = run_cli("pull", GGUF_REPO, env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert "\r" not in pulled.stderr  # a log, not a terminal: no redraws
    lines = pulled.stderr.splitlines()
    assert "download: pulling Tiny-Q4_K_M.gguf (16.3 MB)" in lines
    assert "download: 100 % (16.3 MB of 16.3 MB" in pulled.stderr
    assert sum(line.startswith("download: ") for line in lines) <= 12  # per 10 %, not per chunk
    assert pulled.stdout.startswith("tiny-q4_k_m is ready")
    split = run_cli("pull", SPLIT_REPO, env=env)
    assert split.returncode == 0, split.stderr

    models = run_cli("models", "--no-measure", env=env)
    assert models.returncode == 0, models.stderr
    rows = {line[2:].split()[0]: line for line in models.stdout.splitlines()[1:-1]}
    assert set(rows) == {"tiny-q4_k_m", "tiny-split-q4_k_m"}
    assert "Q4_K_M" in rows["tiny-q4_k_m"] and "tiny/Tiny-GGUF@0123456789" in rows["tiny-q4_k_m"]
    assert rows["tiny-split-q4_k_m"].rstrip().endswith("CPU only")
    assert "daemon not running" in models.stdout.splitlines()[-1]

    du = run_cli("du", env=env)
    assert du.returncode == 0 and "total in" in du.stdout

    rm = run_cli("rm", "tiny-split-q4_k_m", env=env)
    assert rm.returncode == 0, rm.stderr
    gone = run_cli("rm", "tiny-split-q4_k_m", env=env)
    assert gone.returncode == 1
    assert gone.stderr.startswith("appliance: error: model 'tiny-split-q4_k_m' is not installed")
    assert len(gone.stderr.splitlines()) == 1


def test_errors_are_one_line_with_a_hint(hub: LocalHub, tmp_path: Path) -> None:
    env = env_for(hub, tmp_path)
    gated = run_cli("pull", "tiny/Tiny-Gated-GGUF", env=env)
    assert gated.returncode == 1
    assert len(gated.stderr.strip().splitlines()) == 1 and "HF_TOKEN" in gated.stderr
    offline = run_cli("pull", GGUF_REPO, env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert offline.returncode == 1
    assert len(offline.stderr.strip().splitlines()) == 1
    assert "cannot reach the hub" in offline.stderr and "pull a local file" in offline.stderr


def test_models_measures_decode_speed_once(hub: LocalHub, tmp_path: Path) -> None:
    env = env_for(hub, tmp_path)
    assert run_cli("pull", GGUF_REPO, env=env).returncode == 0
    quiet = run_cli("models", env=env)  # not a terminal: no measuring unasked
    assert "measuring" not in quiet.stderr and "speed not measured yet" in quiet.stdout
    first = run_cli("models", "--measure", env=env)
    assert first.returncode == 0, first.stderr
    assert "measuring this machine's decode speed once" in first.stderr
    assert (tmp_path / "cache" / "qwen-appliance" / "decode_speed.json").exists()
    assert "tok/s" in first.stdout
    second = run_cli("models", env=env)
    assert "measuring" not in second.stderr and "tok/s" in second.stdout
