"""Where each model came from, in a small JSON file next to it, and the models folder as models.

Names are chosen so the registry (which scans `*.gguf`) never sees anything but finished models:
manifests end in `.manifest.json`, pulls in progress live in the hidden `.pulls/` folder, and a
split GGUF's parts (`ID-00001-of-00003.gguf`, ...) are listed here as one model, ID.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_SUFFIX = ".manifest.json"
STAGING = ".pulls"
SPLIT = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})$", re.I)
MAX_MANIFEST_BYTES = 64 * 1024  # a manifest is a few hundred bytes; a huge one is not ours


@dataclass
class FileRecord:
    name: str  # in the models folder
    size: int
    sha256: str
    inode: int | None = None  # while the manifest is marked: which file was installed


@dataclass
class Manifest:
    id: str
    source: str  # "hub", "hub+convert" or "local"
    files: list[FileRecord]
    quant: str | None = None
    repo: str | None = None
    revision: str | None = None  # the hub commit
    hub_files: list[str] = field(default_factory=list)
    origin_path: str | None = None  # a local import's source
    converter_version: str | None = None
    created: float = field(default_factory=time.time)
    # Set while the files may not be on the disk yet: which page cache holds them (the boot and
    # the mount); None once they are (durability.py). Marked files are checked before use.
    unsynced_in: str | None = None

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def source_line(self) -> str:
        if self.repo:
            line = f"{self.repo}@{(self.revision or '?')[:10]}"
            return line + " (converted)" if self.source == "hub+convert" else line
        return f"local {self.origin_path}" if self.origin_path else self.source


def manifest_path(models_dir: Path, model_id: str) -> Path:
    return models_dir / f"{model_id}{MANIFEST_SUFFIX}"


def write_manifest(models_dir: Path, manifest: Manifest) -> Path:
    """Write the manifest durably (a few hundred bytes: two small fsyncs), so that whatever it
    says about its files, a mark included, survives a crash of the machine."""
    path = manifest_path(models_dir, manifest.id)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with temp.open("w") as f:
            f.write(json.dumps(asdict(manifest), indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_path(models_dir)
    return path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: the names in it, renames included)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def model_lock(models_dir: Path, model_id: str, on_wait: Callable[[], None] | None = None,
               wait_s: float = 0.0) -> Iterator[bool]:
    """Hold the model's lock (one process at a time pulls, settles or removes a model) and yield
    True. Where another holds it: with `on_wait`, call it and wait as long as it takes (a pull);
    else try for `wait_s` seconds, then yield False (as where a read-only folder has no lock
    file)."""
    folder = models_dir / STAGING
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = (folder / f"{model_id}.lock").open("a")
    except OSError:
        if on_wait is not None:
            raise
        yield False
        return
    with lock:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    break
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)  # flock has no timeout: a few tries within the deadline
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(models_dir: Path, model_id: str) -> Manifest | None:
    """The manifest, or None when there is none or it is not one of ours."""
    path = manifest_path(models_dir, model_id)
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        data = json.loads(path.read_text())
        data["files"] = [FileRecord(**f) for f in data["files"]]
        manifest = Manifest(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return manifest if _well_typed(manifest) else None


def _well_typed(manifest: Manifest) -> bool:
    """Whether the fields the library acts on have their types (a hand-edited or crafted file
    is not ours)."""
    def optional(value: object, kind: type) -> bool:
        return value is None or isinstance(value, kind)

    return (isinstance(manifest.id, str) and bool(manifest.files)
            and optional(manifest.unsynced_in, str) and optional(manifest.repo, str)
            and all(isinstance(f.name, str) and isinstance(f.size, int) and f.size >= 0
                    and isinstance(f.sha256, str) and optional(f.inode, int)
                    for f in manifest.files))


@dataclass
class Installed:
    """One model in the folder: a GGUF, or every part of a split one."""

    id: str
    files: list[Path]
    manifest: Manifest | None
    removed_bytes: int = 0  # set by a removal: what it freed

    @property
    def path(self) -> Path:
        """What llama.cpp opens: the file, or the first part."""
        return self.files[0]

    @property
    def size(self) -> int:
        total = 0
        for f in self.files:
            with contextlib.suppress(OSError):
                total += f.stat().st_size
        return total

    @property
    def complete(self) -> bool:
        return missing_parts(self.files) is None


def recorded_sha256(path: Path, size: int, mtime: float) -> str | None:
    """The sha256 the library recorded for a model file it installed (checked against the hub
    then, or hashed on import), while the file (`size`, `mtime` as last seen) is unchanged since:
    same size, and no newer than its manifest, written after it. Saves hashing a pulled file a
    second time for Ollama's digests; any doubt answers None, and the caller hashes."""
    model_id, _ = split_id(path.stem)
    manifest = read_manifest(path.parent, model_id)
    try:
        written = manifest_path(path.parent, model_id).stat().st_mtime
    except OSError:
        return None
    if manifest is None or mtime > written:
        return None
    if manifest.unsynced_in is not None:
        from appliance.library.durability import page_cache_epoch

        if manifest.unsynced_in != page_cache_epoch(path.parent):
            return None  # a restart came before it was on the disk: checked at its load
        try:
            inode = path.stat().st_ino
        except OSError:
            return None
        if all(r.inode != inode for r in manifest.files if r.name == path.name):
            return None  # not the file installed
    for record in manifest.files:
        if record.name == path.name and record.size == size and \
                re.fullmatch(r"[0-9a-f]{64}", record.sha256 or ""):
            return record.sha256
    return None


def split_id(stem: str) -> tuple[str, int]:
    """(model id, part number) of a file stem; part 0 for a file that is not split."""
    match = SPLIT.match(stem)
    if match:
        return match.group("stem").lower(), int(match.group("part"))
    return stem.lower(), 0


def group_models(models_dir: Path) -> dict[str, list[Path]]:
    """The folder's .gguf files by model id, a split model's parts in order."""
    groups: dict[str, list[tuple[int, Path]]] = {}
    if models_dir.is_dir():
        for path in models_dir.glob("*.gguf"):
            mid, part = split_id(path.stem)
            groups.setdefault(mid, []).append((part, path))
    return {mid: [p for _, p in sorted(parts)] for mid, parts in sorted(groups.items())}


def missing_parts(files: list[Path]) -> str | None:
    """Why a split model is incomplete, or None when it is whole (or not split)."""
    match = SPLIT.match(files[0].stem)
    if match is None:
        return None if len(files) == 1 else f"{len(files)} files share one id"
    count = int(match.group("count"))
    numbers = [int(m.group("part")) if (m := SPLIT.match(f.stem)) else 0 for f in files]
    if numbers != list(range(1, count + 1)):
        return f"split model is incomplete: parts {numbers} of {count} are here"
    return None


def installed(models_dir: Path) -> list[Installed]:
    """Every model in the folder, split parts grouped under one id, sorted by id."""
    return [Installed(mid, files, read_manifest(models_dir, mid))
            for mid, files in group_models(models_dir).items()]


def find(models_dir: Path, model_id: str) -> Installed | None:
    mid = model_id.lower()
    return next((m for m in installed(models_dir) if m.id == mid), None)


def disk_use(models_dir: Path) -> dict[str, int]:
    """Bytes in models, in pulls in progress (resumable), and free on the disk."""
    import shutil

    models = sum(m.size for m in installed(models_dir))
    staging = 0
    root = models_dir / STAGING
    if root.is_dir():
        for path in root.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file():
                    staging += path.stat().st_size
    free = shutil.disk_usage(models_dir).free if models_dir.is_dir() else 0
    return {"models": models, "partial": staging, "free": free}
