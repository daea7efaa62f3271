"""A pulled model is usable as soon as its bytes are checked, before they are on the disk.

The pull writes into the page cache (as curl does), checks every byte's sha256, writes the
manifest durably with a mark, `unsynced_boot` (this boot's id), and renames the files into place
without waiting for the disk. `settle` does that waiting later, where nobody waits for it: in a
process the CLI leaves behind, in the daemon's pull thread after the client has its answer, and at
the latest before the model's first load. It fsyncs the files and the folder, then removes the mark.

Only a crash of the machine loses what the page cache held, and after one the boot id differs:
a model still marked from another boot is hashed again before anything uses it, and removed where
it does not match (a file cut short or zero-filled by a power cut). Every other path (the daemon
or the CLI killed, a full disk later) leaves the written bytes in the page cache, on their way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

from appliance.library.download import hash_file
from appliance.library.errors import LibraryError
from appliance.library.manifest import (
    Manifest,
    fsync_path,
    manifest_path,
    model_lock,
    read_manifest,
    split_id,
    write_manifest,
)

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_UNKNOWN_BOOT = f"unknown-{uuid.uuid4()}"  # no boot id: every mark looks older, so is checked


class DamagedModel(LibraryError):
    """A model installed before a crash of the machine does not match its sha256; removed."""

    status = 422
    code = "model_unusable"


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip() or _UNKNOWN_BOOT
    except OSError:
        return _UNKNOWN_BOOT


def settle(models_dir: Path, model_id: str, *, drop_pages: bool = False,
           lock_held: bool = False) -> str:
    """Make a marked model durable, or check it where a restart came first; what was done:
    "durable" (no mark), "synced", "verified", "changed" (replaced or removed meanwhile),
    "busy" (a pull of it holds its lock: that pull writes the manifest; the files are synced).
    Raises DamagedModel, after removing the model when its lock is free. `drop_pages`: once on
    the disk, the files leave the page cache (a pull does not crowd out a resident model).
    `lock_held`: the caller (a pull) holds the model's lock already."""
    manifest = read_manifest(models_dir, model_id)
    if manifest is None or manifest.unsynced_boot is None:
        return "durable"
    if not all(_is_part_of(record.name, model_id) for record in manifest.files):
        # Not a manifest the library wrote (a folder copied from elsewhere, a hand edit): its
        # names are not followed, let alone removed; the files are used as any added by hand.
        log.warning("the manifest of %s names files that are not its own; ignored", model_id)
        return "durable"
    files = [models_dir / record.name for record in manifest.files]
    restarted = manifest.unsynced_boot != boot_id()
    damage = _damage(manifest, files) if restarted else None
    if not restarted:
        _sync(files, drop_pages)
    with contextlib.nullcontext(True) if lock_held else model_lock(models_dir, model_id) as held:
        if held and read_manifest(models_dir, model_id) != manifest:
            return "changed"
        if damage is not None:
            if held:
                for path in files:
                    path.unlink(missing_ok=True)
                manifest_path(models_dir, model_id).unlink(missing_ok=True)
            raise DamagedModel(f"model {model_id} was installed just before the machine "
                               f"stopped, and its files did not all reach the disk ({damage}); "
                               + ("it was removed" if held else "it cannot be used"),
                               f"pull it again: appliance pull {manifest.repo or model_id}",
                               "model")
        if not held:
            return "busy"
        fsync_path(models_dir)  # the renames into the folder
        manifest.unsynced_boot = None
        write_manifest(models_dir, manifest)
    log.info("model %s is on the disk (%s)", model_id, "checked after a restart" if restarted
             else "synced")
    return "verified" if restarted else "synced"


def _is_part_of(name: str, model_id: str) -> bool:
    """Whether `name` is a GGUF of this model right in the models folder (no other path)."""
    path = Path(name)
    return (str(path) == name and path.name == name and path.suffix.lower() == ".gguf"
            and split_id(path.stem)[0] == model_id)


def _sync(files: list[Path], drop_pages: bool) -> None:
    """fsync each file (the kernel has usually written most of it by now); one removed
    meanwhile is skipped (the manifest check after says whether the model changed)."""
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
            if drop_pages:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _damage(manifest: Manifest, files: list[Path]) -> str | None:
    """Hash each file against its record; None when all match, else what does not."""
    for record, path in zip(manifest.files, files, strict=True):
        try:
            size = path.stat().st_size
            if size != record.size:
                return f"{record.name} has {size} bytes, {record.size} were installed"
            if hash_file(path).hexdigest() != record.sha256:
                return f"{record.name} does not match its sha256"
        except OSError as e:
            return f"{record.name}: {e.strerror}"
    return None


def settle_later(models_dir: Path, model_id: str) -> None:
    """Settle the model in a process of its own that outlives this one: the CLI returns as soon
    as the model is usable, and the disk catches up behind it."""
    subprocess.Popen([sys.executable, "-m", "appliance.library.durability", str(models_dir),
                      model_id], start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str]) -> int:
    """`python -m appliance.library.durability MODELS_DIR ID`: settle one model."""
    models_dir, model_id = Path(argv[0]), argv[1]
    try:
        settle(models_dir, model_id, drop_pages=True)
    except LibraryError as e:
        print(e.message, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
