"""A pull installs a model before its bytes are on the disk; settling makes them durable, and a
model still marked after a restart of the machine is checked before use (durability.py).

A restart is what the disk shows after one: a manifest whose mark names another boot id. The
tests write that state as a power cut leaves it (the mark of a boot that is over, the file cut
short or zero-filled where its last pages never reached the disk)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from appliance.library import durability
from appliance.library.durability import DamagedModel, boot_id, settle
from appliance.library.manifest import manifest_path, read_manifest, recorded_sha256
from appliance.library.pull import Library
from tests.conftest import run_cli
from tests.library.conftest import GGUF_REPO, SPLIT_REPO
from tests.library.hub_server import LocalHub
from tests.library.test_cli import env_for

OTHER_BOOT = "0f0e0d0c-0b0a-0908-0706-050403020100"


def mark_as_before_a_restart(models_dir: Path, model_id: str) -> None:
    """The manifest as a crash right after the pull leaves it: marked by the boot that ended."""
    path = manifest_path(models_dir, model_id)
    data = json.loads(path.read_text())
    data["unsynced_boot"] = OTHER_BOOT
    path.write_text(json.dumps(data))


def test_a_pull_is_installed_marked_and_settling_makes_it_durable(library: Library,
                                                                   hub: LocalHub) -> None:
    model = library.pull(library.plan(GGUF_REPO))
    assert model.manifest is not None and model.manifest.unsynced_boot == boot_id()
    assert read_manifest(library.models_dir, model.id).unsynced_boot == boot_id()
    sha = hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"].sha256
    # Vouched for in this boot already: what is in the page cache is what was checked.
    assert recorded_sha256(model.path, model.path.stat().st_size, model.path.stat().st_mtime) \
        == sha
    assert settle(library.models_dir, model.id) == "synced"
    settled = read_manifest(library.models_dir, model.id)
    assert settled is not None and settled.unsynced_boot is None
    assert [r.sha256 for r in settled.files] == [sha]
    assert settle(library.models_dir, model.id) == "durable"


def test_after_a_restart_an_intact_model_is_checked_once_then_trusted(
        library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    model = library.pull(library.plan(SPLIT_REPO))
    mark_as_before_a_restart(library.models_dir, model.id)
    stat = model.path.stat()
    assert recorded_sha256(model.path, stat.st_size, stat.st_mtime) is None  # not before a check
    hashed: list[Path] = []
    real_hash = durability.hash_file
    monkeypatch.setattr(durability, "hash_file", lambda p: hashed.append(p) or real_hash(p))
    assert settle(library.models_dir, model.id) == "verified"
    assert sorted(hashed) == sorted(model.files)  # every part, each once
    assert read_manifest(library.models_dir, model.id).unsynced_boot is None
    assert settle(library.models_dir, model.id) == "durable"


@pytest.mark.parametrize("damage", ["zeroed", "short"])
def test_after_a_restart_a_damaged_model_is_removed_and_pulled_again(
        library: Library, hub: LocalHub, damage: str) -> None:
    model = library.pull(library.plan(GGUF_REPO))
    mark_as_before_a_restart(library.models_dir, model.id)
    size = model.path.stat().st_size
    with model.path.open("r+b") as f:
        if damage == "zeroed":  # the last pages never written: zeros where data was
            f.seek(size - 3 * 4096)
            f.write(bytes(3 * 4096))
        else:  # the size committed before the last blocks
            f.truncate(size - 4096)
    with pytest.raises(DamagedModel, match="installed just before the machine stopped") as e:
        settle(library.models_dir, model.id)
    assert "it was removed" in e.value.message and "pull it again" in e.value.hint
    assert not model.path.exists() and not manifest_path(library.models_dir, model.id).exists()

    gets = hub.gets.total()
    again = library.pull(library.plan(GGUF_REPO))
    assert hub.gets.total() > gets  # downloaded again, not resumed onto nothing
    assert settle(library.models_dir, again.id) == "synced"


def test_pulling_over_a_damaged_model_replaces_it(library: Library, hub: LocalHub) -> None:
    """`appliance pull` of a model that a crash damaged: not "a different model is installed",
    not "up to date": it is checked, removed and pulled."""
    model = library.pull(library.plan(GGUF_REPO))
    settle(library.models_dir, model.id)
    mark_as_before_a_restart(library.models_dir, model.id)
    with model.path.open("r+b") as f:
        f.seek(4096)
        f.write(bytes(4096))
    again = library.pull(library.plan(GGUF_REPO))
    sha = hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"].sha256
    assert durability.hash_file(again.path).hexdigest() == sha


def test_a_settle_beside_a_running_pull_leaves_the_manifest_to_it(library: Library) -> None:
    from appliance.library.manifest import model_lock

    model = library.pull(library.plan(GGUF_REPO))
    with model_lock(library.models_dir, model.id) as held:
        assert held
        assert settle(library.models_dir, model.id) == "busy"
    assert read_manifest(library.models_dir, model.id).unsynced_boot == boot_id()
    assert settle(library.models_dir, model.id) == "synced"


def test_the_cli_returns_before_the_disk_and_a_process_it_leaves_settles(
        hub: LocalHub, tmp_path: Path) -> None:
    env = env_for(hub, tmp_path)
    pulled = run_cli("pull", GGUF_REPO, env=env)
    assert pulled.returncode == 0, pulled.stderr
    folder = Path(env["APPLIANCE_MODELS_DIR"])
    deadline = time.monotonic() + 60
    while (manifest := read_manifest(folder, "tiny-q4_k_m")) is None or \
            manifest.unsynced_boot is not None:
        assert time.monotonic() < deadline, "the pull was never settled"
        time.sleep(0.05)
    assert manifest.repo == GGUF_REPO


@pytest.mark.parametrize("name", ["../victim.gguf", "/tmp/victim.gguf", "other-model.gguf",
                                  "sub/tiny-q4_k_m.gguf", "tiny-q4_k_m.txt"])
def test_a_manifest_naming_files_not_its_own_is_never_followed(library: Library,
                                                               name: str) -> None:
    """A models folder copied from elsewhere may hold any manifest: a damaged-looking one never
    makes the library remove a file that is not the model's own."""
    model = library.pull(library.plan(GGUF_REPO))
    victim = library.models_dir / "other-model.gguf"
    victim.write_bytes(b"GGUF not ours")
    outside = library.models_dir.parent / "victim.gguf"
    outside.write_bytes(b"GGUF not ours either")
    path = manifest_path(library.models_dir, model.id)
    data = json.loads(path.read_text())
    data["unsynced_boot"] = OTHER_BOOT
    data["files"].append({"name": name.replace("/tmp", str(library.models_dir.parent)),
                          "size": 1, "sha256": "0" * 64})
    path.write_text(json.dumps(data))
    assert settle(library.models_dir, model.id) == "durable"
    assert victim.exists() and outside.exists() and model.path.exists()
