"""`appliance pull / models / du / rm` as a user runs them (child processes, HF_ENDPOINT at the
local hub, no daemon running): plain log lines when the output is not a terminal."""

from __future__ import annotations

import os
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


def test_models_imports_little_and_follows_setting_changes(tiny_gguf: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    """`appliance models` takes its settings from the memo of an earlier call with the same
    inputs (no pydantic-settings import), reads headers from the cache (no gguf, no numpy),
    and any change to the environment or the config file is seen at once."""
    import json
    import shutil
    import subprocess
    import sys

    from appliance import settings_snapshot
    from appliance.config import default_config_file
    from tests.conftest import REPO

    first, second = tmp_path / "first", tmp_path / "second"
    for folder, name in ((first, "one-q4_k_m.gguf"), (second, "two-q4_k_m.gguf")):
        folder.mkdir()
        shutil.copy(tiny_gguf, folder / name)
    config = tmp_path / "config.toml"
    env = {"APPLIANCE_MODELS_DIR": str(first), "APPLIANCE_CONFIG": str(config),
           "APPLIANCE_PORT": "9", "APPLIANCE_GPU": "none", "XDG_CACHE_HOME": str(tmp_path / "c")}
    listed = run_cli("models", env=env)
    assert listed.returncode == 0 and "one-q4_k_m" in listed.stdout, listed.stderr
    memo = tmp_path / "c" / "qwen-appliance"
    assert (memo / "settings-snapshot.json").stat().st_mode & 0o077 == 0
    assert json.loads((memo / "gguf_headers.json").read_text())["entries"]

    probe = ("import sys; from appliance.cli import main; code = main(['models']); "
             "heavy = [m for m in ('pydantic_settings', 'pydantic', 'gguf', 'numpy') "
             "if m in sys.modules]; print('HEAVY', heavy); sys.exit(code)")
    quick = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           cwd=REPO, env={**os.environ, **env})
    assert quick.returncode == 0, quick.stderr
    assert "HEAVY []" in quick.stdout and "one-q4_k_m" in quick.stdout

    moved = run_cli("models", env={**env, "APPLIANCE_MODELS_DIR": str(second)})
    assert "two-q4_k_m" in moved.stdout and "one-q4_k_m" not in moved.stdout
    env.pop("APPLIANCE_MODELS_DIR")
    config.write_text(f'models_dir = "{second}"\n')
    assert "two-q4_k_m" in run_cli("models", env=env).stdout
    config.write_text(f'models_dir = "{first}"\n')
    assert "one-q4_k_m" in run_cli("models", env=env).stdout
    config.write_text(f'models_dir = "{first}"\ncontex_length = 5\n')  # a typo: refused
    typo = run_cli("models", env=env)
    assert typo.returncode == 78 and "contex_length" in typo.stderr

    # The memo's rule for the config file is the settings' own.
    for variables in ({}, {"XDG_CONFIG_HOME": str(tmp_path / "x")},
                      {"APPLIANCE_CONFIG": str(tmp_path / "y.toml")}):
        for name in ("XDG_CONFIG_HOME", "APPLIANCE_CONFIG"):
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        assert settings_snapshot._config_file() == default_config_file()


def test_damaged_settings_memo_is_ignored(tiny_gguf: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_gguf, folder / "one-q4_k_m.gguf")
    env = {"APPLIANCE_MODELS_DIR": str(folder), "APPLIANCE_CONFIG": str(tmp_path / "no.toml"),
           "APPLIANCE_PORT": "9", "APPLIANCE_GPU": "none", "XDG_CACHE_HOME": str(tmp_path / "c")}
    memo = tmp_path / "c" / "qwen-appliance" / "settings-snapshot.json"
    memo.parent.mkdir(parents=True)
    for damage in ("", "{", '{"inputs": 1, "values": 2}', "[]", "x" * 300_000):
        memo.write_text(damage)
        listed = run_cli("models", env=env)
        assert listed.returncode == 0 and "one-q4_k_m" in listed.stdout, (damage[:9], listed)
