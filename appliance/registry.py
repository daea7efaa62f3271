"""Which models exist: every .gguf in the models folder, with metadata read from its header.

A split GGUF (`NAME-00001-of-00003.gguf`, ...) is one model, NAME: its entry's path is the first
part (llama.cpp finds the others beside it), its info joins every part's tensors, and it is
unusable until every part is there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ModelNotFound, ModelUnusable
from appliance.gguf_info import GGUFError, GGUFInfo
from appliance.library.headers import HeaderCache
from appliance.library.manifest import group_models, missing_parts, split_id

log = logging.getLogger(__name__)

# A folder changed within this long before a scan began may change again within the same mtime
# tick unseen (coarse file-system clocks), so such a scan is not trusted by `local_now`.
RACY_NS = 2_000_000_000


def model_id(path: Path) -> str:
    """A readable id from the file name: `Qwen3-8B-Q4_K_M.gguf` → `qwen3-8b-q4_k_m` (a split
    model's parts share their stem's id)."""
    return split_id(path.stem)[0]


@dataclass
class ModelEntry:
    id: str
    path: Path  # what llama.cpp opens: the file, or a split model's first part
    info: GGUFInfo | None
    error: str | None  # why the model is unusable, or None
    signature: tuple[int, float]  # (size, mtime) of `path`: re-read the header when it changes
    files: list[Path] = field(default_factory=list)  # every part, the first one first
    size: int = 0  # bytes of every part together

    def __post_init__(self) -> None:
        if not self.files:
            self.files = [self.path]
        if not self.size:
            self.size = self.signature[0]

    @property
    def usable(self) -> bool:
        return self.error is None

    def describe(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "path": str(self.path), "usable": self.usable,
                                "error": self.error, "file_size": self.size}
        if len(self.files) > 1:
            data["files"] = [f.name for f in self.files]
        if self.info is not None:
            data.update({
                "architecture": self.info.architecture,
                "name": self.info.metadata.get("general.name"),
                "parameters": self.info.parameter_count,
                "quantization": self.info.quantization,
                "trained_context_length": self.info.context_length,
                "layers": self.info.n_layers,
                "chat_template": self.info.has_chat_template,
            })
        return data


class Registry:
    """The models folder, re-scanned on demand; headers are re-read only for changed files
    (and, with a disk-backed HeaderCache, not even across processes)."""

    def __init__(self, models_dir: Path, aliases: dict[str, str] | None = None,
                 headers: HeaderCache | None = None) -> None:
        self.models_dir = models_dir
        self.aliases = {k.lower(): v.lower() for k, v in (aliases or {}).items()}
        self.headers = headers or HeaderCache()
        self._entries: dict[str, ModelEntry] = {}
        self._stamps: dict[str, tuple[tuple[str, int, int], ...]] = {}
        self._lock = threading.Lock()
        # (folder mtime, scan start, local names) of the last scan, replaced as one object
        # so `local_now` reads it without the lock.
        self._known: tuple[int | None, int, frozenset[str]] | None = None

    def scan(self) -> list[ModelEntry]:
        with self._lock:
            started, folder = time.time_ns(), _mtime_ns(self.models_dir)
            found: dict[str, ModelEntry] = {}
            stamps: dict[str, tuple[tuple[str, int, int], ...]] = {}
            for mid, files in group_models(self.models_dir).items():
                try:
                    stats = [os.stat(f) for f in files]
                except OSError:
                    continue
                stamp = tuple((str(f), s.st_size, s.st_mtime_ns) for f, s in zip(files, stats, strict=True))
                stamps[mid] = stamp
                old = self._entries.get(mid)
                if old is not None and self._stamps.get(mid) == stamp:
                    found[mid] = old
                    continue
                found[mid] = self._read(mid, files, stats)
            self._entries, self._stamps = found, stamps
            names = set(found) | {a for a, target in self.aliases.items() if target in found}
            self._known = (folder, started, frozenset(names))
            self.headers.save()
            return list(found.values())

    def _read(self, mid: str, files: list[Path], stats: list[os.stat_result]) -> ModelEntry:
        info, error = None, missing_parts(files)
        if error is None:
            try:
                info = self.headers.model_info(files)
            except GGUFError as e:
                error = str(e)
            except Exception as e:  # a crafted file must never stop a scan
                error = f"unreadable header: {e!r}"
        if error is not None:
            log.warning("model %s is unusable: %s", files[0], error)
        return ModelEntry(mid, files[0], info, error, (stats[0].st_size, stats[0].st_mtime),
                          files, sum(s.st_size for s in stats))

    def resolve(self, name: str) -> ModelEntry:
        """The entry for an id or alias; raises ModelNotFound or ModelUnusable."""
        key = name.lower()
        key = self.aliases.get(key, key)
        entry = self._entries.get(key)
        if entry is None or not entry.path.exists():
            self.scan()
            entry = self._entries.get(key)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none; add .gguf files to " + str(
                self.models_dir)
            raise ModelNotFound(f"model {name!r} does not exist (available: {known})",
                                param="model")
        if not entry.usable:
            raise ModelUnusable(f"model {entry.id!r} is unusable: {entry.error}", param="model")
        return entry

    def local_now(self, name: str) -> bool | None:
        """Whether `name` is a local id or alias (usable or not), by the last scan while the
        folder has not changed since; None when only a scan can tell. One stat and no scan,
        so it may run on the event loop: adding, removing or renaming a file changes the
        folder's mtime, and which ids exist depends on nothing else."""
        known = self._known
        if known is None:
            return None
        folder, started, names = known
        if folder is not None and folder > started - RACY_NS:
            return None
        if _mtime_ns(self.models_dir) != folder:
            return None
        key = name.lower()
        return key in names

    def aliases_of(self, mid: str) -> list[str]:
        return sorted(a for a, target in self.aliases.items() if target == mid)


def _mtime_ns(folder: Path) -> int | None:
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None  # no folder (yet): no local models
