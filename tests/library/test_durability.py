"""A pull installs a model before its bytes are on the disk; settling makes them durable, and a
model still marked once its page cache is gone (a restart of the machine) is checked before use
(durability.py).

A restart is what the disk shows after one: a manifest whose mark names another boot. The tests
write that state as a power cut leaves it (the mark of a boot that is over, the file cut short or
zero-filled where its last pages never reached the disk). A failing disk, which this machine does
not have, is an fsync that raises EIO, as Linux reports a failed writeback."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.library import durability
from appliance.library.durability import DamagedModel, page_cache_epoch, settle
from appliance.library.manifest import (
    STAGING,
    manifest_path,
    model_lock,
    read_manifest,
    recorded_sha256,
)
from appliance.library.pull import Library
from tests.conftest import run_cli
from tests.library.conftest import GGUF_REPO, SPLIT_REPO
from tests.library.hub_server import LocalHub
from tests.library.test_cli import env_for

OTHER_BOOT = "boot 0f0e0d0c-0b0a-0908-0706-050403020100 mount 23"


def edit_manifest(models_dir: Path, model_id: str, **changes: object) -> None:
    path = manifest_path(models_dir, model_id)
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def mark_as_before_a_restart(models_dir: Path, model_id: str) -> None:
    """The manifest as a crash right after the pull leaves it: marked by the boot that ended."""
    edit_manifest(models_dir, model_id, unsynced_in=OTHER_BOOT)


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_pull_is_installed_marked_and_settling_makes_it_durable(library: Library,
                                                                   hub: LocalHub) -> None:
    model = library.pull(library.plan(GGUF_REPO))
    epoch = page_cache_epoch(library.models_dir)
    assert model.manifest is not None and model.manifest.unsynced_in == epoch
    assert epoch.startswith("boot ") and "unknown" not in epoch
    assert read_manifest(library.models_dir, model.id).unsynced_in == epoch
    sha = hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"].sha256
    # Vouched for in this boot already: what is in the page cache is what was checked.
    stat = model.path.stat()
    assert recorded_sha256(model.path, stat.st_size, stat.st_mtime) == sha
    assert settle(library.models_dir, model.id) == "synced"
    settled = read_manifest(library.models_dir, model.id)
    assert settled is not None and settled.unsynced_in is None
    assert [r.sha256 for r in settled.files] == [sha]
    assert settle(library.models_dir, model.id) == "durable"


def test_after_a_restart_an_intact_model_is_checked_once_then_trusted(
        library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    model = library.pull(library.plan(SPLIT_REPO))
    mark_as_before_a_restart(library.models_dir, model.id)
    stat = model.path.stat()
    assert recorded_sha256(model.path, stat.st_size, stat.st_mtime) is None  # not before a check
    hashed: list[int] = []
    real_sha256 = durability._sha256
    monkeypatch.setattr(durability, "_sha256",
                        lambda fd, size: hashed.append(size) or real_sha256(fd, size))
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(durability.os, "fsync", fsync)
    assert settle(library.models_dir, model.id) == "verified"
    assert sorted(hashed) == sorted(p.stat().st_size for p in model.files)  # each part, once
    # And synced: what the hash read may have come from the page cache (a mark that only looks
    # foreign, as on a filesystem whose mount cannot be named the same way twice).
    assert set(map(str, model.files)) <= set(synced)
    assert read_manifest(library.models_dir, model.id).unsynced_in is None
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
    assert sha_of(again.path) == hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"].sha256


def test_a_file_that_is_not_the_one_installed_is_hashed_not_trusted(library: Library) -> None:
    """An update stopped between its manifest and its rename leaves the old file under the new
    manifest, in the same boot: its inode gives it away, the hash decides."""
    old = library.pull(library.plan(GGUF_REPO))
    settle(library.models_dir, old.id)
    # The installed file stays alive under another name: its inode number cannot be handed to a
    # new file (ext4 reuses a freed one at once), so each replacement below has another.
    os.link(old.path, library.models_dir / "installed.keep")
    replacement = library.models_dir / "replacement"
    replacement.write_bytes(old.path.read_bytes())
    os.replace(replacement, old.path)  # the same bytes, another file: hashed, and they match
    edit_manifest(library.models_dir, old.id, unsynced_in=page_cache_epoch(library.models_dir))
    stat = old.path.stat()
    assert recorded_sha256(old.path, stat.st_size, stat.st_mtime) is None
    assert settle(library.models_dir, old.id) == "verified"

    edit_manifest(library.models_dir, old.id, unsynced_in=page_cache_epoch(library.models_dir))
    different = library.models_dir / "different"
    different.write_bytes(bytes(old.path.stat().st_size))
    os.replace(different, old.path)
    with pytest.raises(DamagedModel, match="is not as it was installed"):
        settle(library.models_dir, old.id)
    assert not old.path.exists()


def test_a_disk_that_fails_to_write_the_model_gets_it_removed(
        library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reports a failed writeback to one fsync only: the settle that sees it removes the
    model, so a later settle cannot clear the mark over bytes that never reached the disk."""
    model = library.pull(library.plan(GGUF_REPO))

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(durability.os, "fsync", failing_fsync)
    with pytest.raises(DamagedModel, match=r"the disk failed to write tiny-q4_k_m\.gguf"):
        settle(library.models_dir, model.id)
    monkeypatch.undo()
    assert not model.path.exists() and read_manifest(library.models_dir, model.id) is None


def test_a_manifest_that_cannot_be_updated_leaves_a_usable_model(
        library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk under the mark's removal: the files are on the disk, so the model loads; the
    mark stays (checked again next time), and no temporary manifest is left behind."""
    model = library.pull(library.plan(GGUF_REPO))
    real_open = Path.open

    def full_disk(path: Path, mode: str = "r", *args: object, **kwargs: object):
        if "w" in mode and path.name.endswith(".manifest.json." + str(os.getpid())):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_disk)
    assert settle(library.models_dir, model.id) == "busy"
    monkeypatch.undo()
    assert read_manifest(library.models_dir, model.id).unsynced_in is not None
    assert sorted(p.name for p in library.models_dir.iterdir()) == [
        STAGING, "tiny-q4_k_m.gguf", "tiny-q4_k_m.manifest.json"]
    assert settle(library.models_dir, model.id) == "synced"


def test_a_settle_beside_a_running_pull_leaves_the_manifest_to_it(library: Library) -> None:
    model = library.pull(library.plan(GGUF_REPO))
    with model_lock(library.models_dir, model.id) as held:
        assert held
        assert settle(library.models_dir, model.id) == "busy"
    assert read_manifest(library.models_dir, model.id).unsynced_in is not None
    assert settle(library.models_dir, model.id) == "synced"


def test_a_removal_is_refused_while_the_model_is_being_pulled(library: Library) -> None:
    """`rm` takes the model's lock, so a settle finishing meanwhile cannot bring back the
    manifest of a model just removed; a pull (from another process too) holds the lock for
    minutes, and the removal says so after a short wait rather than hang."""
    from appliance.library.errors import ModelInUse

    model = library.pull(library.plan(GGUF_REPO))
    with model_lock(library.models_dir, model.id):
        with pytest.raises(ModelInUse, match="is being pulled"):
            library.remove(model.id)
        assert model.path.exists()
    size = model.size
    assert library.remove(model.id).removed_bytes == size
    assert not model.path.exists() and read_manifest(library.models_dir, model.id) is None


@pytest.mark.parametrize("name", ["../victim.gguf", "/tmp/victim.gguf", "other-model.gguf",
                                  "sub/tiny-q4_k_m.gguf", "tiny-q4_k_m.txt", "tiny-q4_k_m.GGUF"])
def test_a_manifest_naming_files_not_its_own_is_never_followed(library: Library,
                                                               name: str) -> None:
    """A models folder copied from elsewhere may hold any manifest: a damaged-looking one never
    makes the library touch a file that is not the model's own."""
    model = library.pull(library.plan(GGUF_REPO))
    victim = library.models_dir / "other-model.gguf"
    victim.write_bytes(b"GGUF not ours")
    outside = library.models_dir.parent / "victim.gguf"
    outside.write_bytes(b"GGUF not ours either")
    path = manifest_path(library.models_dir, model.id)
    data = json.loads(path.read_text())
    data["unsynced_in"] = OTHER_BOOT
    data["files"].append({"name": name.replace("/tmp", str(library.models_dir.parent)),
                          "size": 1, "sha256": "0" * 64})
    path.write_text(json.dumps(data))
    assert settle(library.models_dir, model.id) == "durable"
    assert victim.exists() and outside.exists() and model.path.exists()


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_model_file_that_is_not_a_regular_file_is_never_opened_through(
        library: Library, tmp_path: Path, kind: str) -> None:
    """A FIFO would block a read for ever (and every load behind it); a link leads elsewhere.
    Both are refused without being read, and removed as links are: the target stays."""
    model = library.pull(library.plan(GGUF_REPO))
    mark_as_before_a_restart(library.models_dir, model.id)
    model.path.unlink()
    target = tmp_path / "elsewhere.gguf"
    if kind == "fifo":
        os.mkfifo(model.path)
    else:
        target.write_bytes(b"x" * 10)
        model.path.symlink_to(target)
    with pytest.raises(DamagedModel):
        settle(library.models_dir, model.id)
    assert not model.path.exists() and not model.path.is_symlink()
    assert kind == "fifo" or target.read_bytes() == b"x" * 10


@pytest.mark.parametrize("change", [{"files": [{"name": 5, "size": 1, "sha256": "0"}]},
                                    {"files": [{"name": "tiny-q4_k_m.gguf", "size": "big",
                                                "sha256": "0"}]},
                                    {"unsynced_in": ["a", "list"]}, {"files": []}])
def test_a_manifest_with_fields_of_the_wrong_type_is_not_ours(library: Library,
                                                              change: dict) -> None:
    model = library.pull(library.plan(GGUF_REPO))
    edit_manifest(library.models_dir, model.id, **change)
    assert read_manifest(library.models_dir, model.id) is None
    assert settle(library.models_dir, model.id) == "durable"
    assert model.path.exists()


def test_the_epoch_is_the_same_in_another_process(tmp_path: Path) -> None:
    """The CLI marks, the process it leaves settles: both must name the same page cache, or
    every pull would be hashed again (as it was on btrfs when a mount was looked up by device
    number in /proc/self/mountinfo)."""
    code = ("import sys; from pathlib import Path; from appliance.library.durability import "
            "page_cache_epoch; print(page_cache_epoch(Path(sys.argv[1])))")
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                           text=True, check=True, cwd=Path(__file__).parents[2])
    assert child.stdout.strip() == page_cache_epoch(tmp_path)
    assert "unknown" not in page_cache_epoch(tmp_path)


def test_the_cli_pull_ends_settled_by_the_process_it_leaves(hub: LocalHub,
                                                            tmp_path: Path) -> None:
    """With no daemon running, a model the CLI pulled is on the disk soon after (that the
    command itself does not wait for it is bench/pull_speed.py's figure: durable 1.5-1.8 s after
    it returned, for 1 GB)."""
    env = env_for(hub, tmp_path)
    pulled = run_cli("pull", GGUF_REPO, env=env)
    assert pulled.returncode == 0, pulled.stderr
    folder = Path(env["APPLIANCE_MODELS_DIR"])
    deadline = time.monotonic() + 60
    while (manifest := read_manifest(folder, "tiny-q4_k_m")) is None or \
            manifest.unsynced_in is not None:
        assert time.monotonic() < deadline, "the pull was never settled"
        time.sleep(0.05)
    assert manifest.repo == GGUF_REPO


def test_a_folder_where_no_lock_can_be_made_does_not_stop_a_settle(tmp_path: Path) -> None:
    """A read-only models folder (or a `.pulls` that is not a folder) has no lock file: a
    settle goes on without the lock (the files were checked; the mark stays), a pull fails."""
    (tmp_path / STAGING).write_text("not a folder")
    with model_lock(tmp_path, "m") as held:
        assert held is False
    with pytest.raises(OSError), model_lock(tmp_path, "m", on_wait=lambda: None):
        pass
