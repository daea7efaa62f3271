"""GGUF headers already read, kept in one small JSON file so `appliance models` need not walk
every model's 300k-entry vocabulary on every call.

An entry is keyed by the file's absolute path, size, mtime_ns and inode: any change to the file
is a miss. The file is written atomically (temporary name, then rename), bounded in entries and
bytes, and distrusted on reading: anything malformed (a crash mid-write on another filesystem,
an old format, a hand edit) is ignored, and rebuilt by the next save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.gguf_info import (
    GGML_TYPES,
    GGUFError,
    GGUFInfo,
    RawHeader,
    TensorInfo,
    join_parts,
    read_header,
    to_info,
)

log = logging.getLogger(__name__)

HEADERS_FILE = "gguf_headers.json"
FORMAT = 2  # bump when RawHeader or the reader's rules change: old entries are then ignored
MAX_ENTRIES = 256
MAX_FILE_BYTES = 32 * 2**20  # a larger cache file is not ours: ignored
MAX_ENTRY_BYTES = 2 * 2**20  # a header this large (crafted strings) is re-read, not cached


@dataclass(frozen=True)
class FileKey:
    path: str
    size: int
    mtime_ns: int
    ino: int

    @classmethod
    def of(cls, path: Path) -> FileKey:
        absolute = os.path.abspath(path)
        st = os.stat(absolute)
        return cls(absolute, st.st_size, st.st_mtime_ns, st.st_ino)


class HeaderCache:
    """Parsed headers by file key; `path` None keeps them in memory only (the same interface,
    nothing written)."""

    def __init__(self, path: Path | None = None, max_entries: int = MAX_ENTRIES) -> None:
        self.path = path
        self.max_entries = max_entries
        self._entries: dict[FileKey, dict[str, Any]] = {}  # key -> {"header"|"error", "at"}
        self._dirty = False
        self.hits = self.misses = 0
        if path is not None:
            self._entries = _load(path)

    def header(self, path: Path) -> RawHeader:
        """One file's parsed header, from the cache or read now; raises GGUFError (a file
        found unreadable stays so, cached, until it changes)."""
        try:
            key = FileKey.of(path)
        except OSError as e:
            raise GGUFError(f"cannot read: {e.strerror}") from None
        entry = self._entries.get(key)
        if entry is not None:
            try:
                if "error" in entry:
                    self.hits += 1
                    raise GGUFError(str(entry["error"]))
                header = entry.get("parsed") or _header_from_json(entry["header"])
                if header.file_size != key.size:
                    raise ValueError("the cached size is not the file's")
                entry["parsed"] = header
                self.hits += 1
                return header
            except (TypeError, ValueError, KeyError, IndexError):
                del self._entries[key]  # a malformed entry: read the file again
        self.misses += 1
        try:
            header = read_header(path)
        except GGUFError as e:
            self._store(key, {"error": str(e)[:500]})
            raise
        self._store(key, {"parsed": header})
        return header

    def model_info(self, files: list[Path]) -> GGUFInfo:
        """A model's info: its file, or the parts of a split model joined (first part first)."""
        first = self.header(files[0])
        if len(files) == 1:
            return to_info(files[0], first)
        later = []
        for part in files[1:]:
            try:
                later.append(self.header(part))
            except GGUFError as e:
                raise GGUFError(f"part {part.name} is unusable: {e}") from None
        return join_parts(files[0], first, later)

    def _store(self, key: FileKey, entry: dict[str, Any]) -> None:
        for old in [k for k in self._entries if k.path == key.path]:
            del self._entries[old]  # the same file, before it changed
        entry["at"] = time.time()
        self._entries[key] = entry
        self._dirty = True

    def save(self) -> None:
        """Write the cache if anything was added (atomically; a failure only costs speed)."""
        if self.path is None or not self._dirty:
            return
        kept = sorted(((k, e) for k, e in self._entries.items() if os.path.exists(k.path)),
                      key=lambda item: item[1]["at"])[-self.max_entries:]
        items = []
        for k, e in kept:
            item: dict[str, Any] = {"path": k.path, "size": k.size, "mtime_ns": k.mtime_ns,
                                    "ino": k.ino, "at": e["at"]}
            if "error" in e:
                item["error"] = e["error"]
            else:
                header = e.get("header") or _header_to_json(e["parsed"])
                if len(json.dumps(header)) > MAX_ENTRY_BYTES:
                    continue  # crafted strings: re-read next time rather than bloat the file
                item["header"] = header
            items.append(item)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp.write_text(json.dumps({"format": FORMAT, "entries": items},
                                       separators=(",", ":")))
            os.replace(temp, self.path)
            self._dirty = False
        except OSError as e:
            log.debug("header cache %s not written: %s", self.path, e)
            with contextlib.suppress(OSError):
                temp.unlink()


def _load(path: Path) -> dict[FileKey, dict[str, Any]]:
    """The cache file's entries; empty when it is absent, too large or not ours."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return {}
        entries: dict[FileKey, dict[str, Any]] = {}
        for item in data["entries"][:MAX_ENTRIES]:
            key = FileKey(item["path"], item["size"], item["mtime_ns"], item["ino"])
            if not (isinstance(key.path, str) and all(
                    _is_int(v) for v in (key.size, key.mtime_ns, key.ino))):
                continue
            entry: dict[str, Any] = {"at": float(item["at"])}
            if isinstance(item.get("error"), str):
                entry["error"] = item["error"]
            elif isinstance(item.get("header"), dict):
                entry["header"] = item["header"]  # checked when it is used
            else:
                continue
            entries[key] = entry
        return entries
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.debug("header cache %s ignored: %s", path, e)
        return {}


def _header_to_json(header: RawHeader) -> dict[str, Any]:
    # Tensors by column: one list per field reads and checks far faster than a list per tensor.
    return {"size": header.file_size, "metadata": header.metadata,
            "arrays": header.array_lengths,
            "tensors": {"names": [t.name for t in header.tensors],
                        "shapes": [list(t.shape) for t in header.tensors],
                        "types": [t.type for t in header.tensors],
                        "offsets": [t.offset for t in header.tensors],
                        "nbytes": [t.nbytes for t in header.tensors]}}


_SCALAR = (int, float, str, type(None))  # bool is an int


def _header_from_json(data: dict[str, Any]) -> RawHeader:
    """A cached header, checked to have the shapes the reader makes; raises on anything else."""
    metadata = data["metadata"]
    arrays = data["arrays"]
    if not (isinstance(metadata, dict) and isinstance(arrays, dict)
            and all(isinstance(v, _SCALAR) for v in metadata.values())
            and all(_is_int(v) for v in arrays.values())):
        raise ValueError("malformed metadata")
    columns = data["tensors"]
    names, shapes, types = columns["names"], columns["shapes"], columns["types"]
    offsets, nbytes = columns["offsets"], columns["nbytes"]
    if not (len(names) == len(shapes) == len(types) == len(offsets) == len(nbytes)
            and all(type(n) is str for n in names)
            and all(type(s) is list and len(s) <= 8 for s in shapes)
            and all(type(d) is int for s in shapes for d in s)
            and all(type(t) is int and t in GGML_TYPES for t in types)
            and all(type(v) is int for v in offsets)
            and all(type(v) is int for v in nbytes)):
        raise ValueError("malformed tensors")
    tensors = list(map(TensorInfo, names, map(tuple, shapes), types, offsets, nbytes))
    size = data["size"]
    if not _is_int(size):
        raise ValueError("malformed size")
    return RawHeader(size, metadata, arrays, tensors)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
