"""A pulled model is usable as soon as its bytes are checked, before they are on the disk.

The pull writes into the page cache (as curl does), checks every byte's sha256, writes the
manifest durably with a mark, `unsynced_in` (which page cache holds the unwritten bytes: this boot
and this mount of the models folder's filesystem) and each file's inode, then renames the files
into place without waiting for the disk. `settle` does that waiting later, where nobody waits for
it: in a process the CLI leaves behind, in the daemon's pull thread after the client has its
answer, and at the latest before the model is loaded. It fsyncs the files and the folder, then
removes the mark.

Only a crash of the machine, or the filesystem going away under it (a disk unplugged), loses
what the page cache held, and after either the mark names another boot or mount: such a model is
hashed again before anything uses it, and removed where it does not match (a file cut short or
zero-filled by a power cut). So is a file that is not the one installed (another inode: a pull
killed between its manifest and its rename), and a file the disk failed to write (the fsync's
error is reported once, so it is acted on at once).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import stat
import struct
import subprocess
import sys
import uuid
from pathlib import Path

from appliance.library.errors import LibraryError
from appliance.library.manifest import (
    FileRecord,
    fsync_path,
    manifest_path,
    model_lock,
    read_manifest,
    split_id,
    write_manifest,
)

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# statx(2): struct statx is 256 bytes, stx_mnt_id a u64 at byte 144 (linux/stat.h).
_AT_FDCWD = -100
_STATX_MNT_ID_UNIQUE = 0x4000
_STATX_SIZE = 256
_STATX_MNT_ID_OFFSET = 144
_UNKNOWN = f"unknown-{uuid.uuid4()}"  # no boot or mount id: every mark looks older, so is checked
READ_CHUNK = 8 * 2**20


class DamagedModel(LibraryError):
    """A marked model's files are not what was installed (a crash, a disk error); removed."""

    status = 422
    code = "model_unusable"


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip() or _UNKNOWN
    except OSError:
        return _UNKNOWN


def mount_id(folder: Path) -> str:
    """The mount holding `folder`: its unique id (Linux 6.8+, never reused within a boot: a disk
    unplugged and mounted again gets a new one), else its device number (a remount goes unseen;
    the boot id still catches a crash)."""
    unique = _statx_unique_mount_id(folder)
    if unique is not None:
        return f"mount {unique}"
    try:
        return f"dev {os.stat(folder).st_dev}"
    except OSError:
        return _UNKNOWN


def _statx_unique_mount_id(folder: Path) -> int | None:
    statx = getattr(_libc(), "statx", None)
    if statx is None:
        return None
    statx.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                      ctypes.c_void_p)
    answer = ctypes.create_string_buffer(_STATX_SIZE)
    if statx(_AT_FDCWD, os.fsencode(folder), 0, _STATX_MNT_ID_UNIQUE, answer) != 0:
        return None
    mask, = struct.unpack_from("<I", answer, 0)
    if not mask & _STATX_MNT_ID_UNIQUE:
        return None  # an older kernel
    return int(struct.unpack_from("<Q", answer, _STATX_MNT_ID_OFFSET)[0])


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def page_cache_epoch(models_dir: Path) -> str:
    """Which page cache holds bytes written into `models_dir` now: the boot and the mount."""
    return f"boot {boot_id()} {mount_id(models_dir)}"


def settle(models_dir: Path, model_id: str, *, drop_pages: bool = False,
           lock_held: bool = False) -> str:
    """Make a marked model durable, or check it where its page cache is gone; what was done:
    "durable" (no mark), "synced", "verified" (hashed), "changed" (replaced or removed
    meanwhile), "busy" (a pull of it holds its lock, or the folder is read-only: the files are
    fine, the mark stays). Raises DamagedModel, after removing the model when its lock is free.
    `drop_pages`: once on the disk, the files leave the page cache (a pull does not crowd out a
    resident model). `lock_held`: the caller (a pull) holds the model's lock already."""
    manifest = read_manifest(models_dir, model_id)
    if manifest is None or manifest.unsynced_in is None:
        return "durable"
    if not all(_is_part_of(record.name, model_id) for record in manifest.files):
        # Not a manifest the library wrote (a folder copied from elsewhere, a hand edit): its
        # names are not followed, let alone removed; the files are used as any added by hand.
        log.warning("the manifest of %s names files that are not its own; ignored", model_id)
        return "durable"
    cache_gone = manifest.unsynced_in != page_cache_epoch(models_dir)
    hashed = False
    problem = None
    for record in manifest.files:
        problem, hashed_it = _settle_file(models_dir / record.name, record, cache_gone,
                                          drop_pages)
        hashed |= hashed_it
        if problem is not None:
            break
    with contextlib.nullcontext(True) if lock_held else model_lock(models_dir, model_id) as held:
        if held and read_manifest(models_dir, model_id) != manifest:
            return "changed"
        if problem is not None:
            if held:
                for record in manifest.files:
                    (models_dir / record.name).unlink(missing_ok=True)
                manifest_path(models_dir, model_id).unlink(missing_ok=True)
            why = ("was installed just before the machine stopped, and its files did not all "
                   "reach the disk" if cache_gone else "is not as it was installed")
            raise DamagedModel(f"model {model_id} {why} ({problem}); "
                               + ("it was removed" if held else "it cannot be used"),
                               f"pull it again: appliance pull {manifest.repo or model_id}",
                               "model")
        if not held:
            return "busy"
        try:
            fsync_path(models_dir)  # the renames into the folder
            manifest.unsynced_in = None
            write_manifest(models_dir, manifest)
        except OSError as e:  # a full disk: the files are fine, the mark stays (checked again)
            log.warning("model %s is on the disk but its manifest was not updated: %s",
                        model_id, e)
            return "busy"
    log.info("model %s is on the disk (%s)", model_id, "hashed" if hashed else "synced")
    return "verified" if hashed else "synced"


def _is_part_of(name: object, model_id: str) -> bool:
    """Whether `name` is a GGUF of this model right in the models folder (no other path)."""
    if not isinstance(name, str):
        return False
    path = Path(name)
    return (str(path) == name and path.name == name and path.suffix == ".gguf"
            and split_id(path.stem)[0] == model_id)


def _settle_file(path: Path, record: FileRecord, cache_gone: bool,
                 drop_pages: bool) -> tuple[str | None, bool]:
    """fsync the file where its bytes are still in this page cache and it is the one installed,
    else hash it. (What is wrong, or None; whether it was hashed.)"""
    try:
        # Never a link, a FIFO or a device: only the regular file the pull renamed here.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return f"{record.name}: {e.strerror}", False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return f"{record.name} is not a regular file", False
        if info.st_size != record.size:
            return f"{record.name} has {info.st_size} bytes, {record.size} were installed", False
        hashed = cache_gone or info.st_ino != record.inode
        if hashed and _sha256(fd, record.size) != record.sha256:
            return f"{record.name} does not match its sha256", True
        try:
            os.fsync(fd)  # hashed or not: what was read may come from the page cache
        except OSError as e:  # reported to this fsync only: acted on now
            return f"the disk failed to write {record.name}: {e.strerror}", hashed
        if drop_pages:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return None, hashed
    except OSError as e:
        return f"{record.name}: {e.strerror}", False
    finally:
        os.close(fd)


def _sha256(fd: int, size: int) -> str:
    sha = hashlib.sha256()
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(READ_CHUNK, size - offset), offset)
        if not chunk:
            break
        sha.update(chunk)
        offset += len(chunk)
    return sha.hexdigest()


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
    except (LibraryError, OSError) as e:
        print(getattr(e, "message", str(e)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
