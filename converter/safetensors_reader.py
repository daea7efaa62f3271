"""Read tensors one at a time from memory-mapped safetensors files, single-file or sharded.

The whole model is never loaded: each tensor is a numpy view of the mapped file, so its pages
are page cache the kernel can drop, and only a converted copy costs anonymous memory.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converter.errors import ConversionError

# safetensors dtype → (numpy dtype used to view the raw bytes, bytes per element).
# BF16 has no numpy dtype: its raw bytes are viewed as uint16 and widened by hand.
DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives and what it looks like, read from a safetensors header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bits (as uint16) to float32 exactly: bf16 is the top half of an f32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_header(path: Path) -> tuple[dict[str, TensorEntry], int]:
    """Parse one safetensors header; returns the tensors and the file's size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ConversionError("file is too short to be safetensors", "re-download it", path)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise ConversionError(
                    "not a safetensors file (bad header length)", "re-download it", path
                )
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise ConversionError("shard is missing", "download the complete checkpoint", path) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConversionError(
            "not a safetensors file (header is not JSON)", "re-download it", path
        ) from None

    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in DTYPES:
            raise ConversionError(
                f"tensor {name} has unsupported dtype {dtype}",
                "supported dtypes are " + ", ".join(DTYPES),
                path,
            )
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (data_start + int(o) for o in info["data_offsets"])
        entry = TensorEntry(name, dtype, shape, path, begin, end)
        if entry.nbytes != entry.n_elements * DTYPES[dtype].itemsize:
            raise ConversionError(
                f"tensor {name}: shape {list(shape)} does not match its {entry.nbytes} bytes",
                "the file is corrupt; re-download it",
                path,
            )
        if end > size:
            raise ConversionError(
                f"file is truncated (tensor {name} ends at byte {end}, file has {size})",
                "re-download it",
                path,
            )
        entries[name] = entry
    return entries, size


class SafetensorsCheckpoint:
    """All tensors of a checkpoint folder, read lazily from memory-mapped shards."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tensors: dict[str, TensorEntry] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        for shard in self._shard_files():
            entries, _ = read_header(shard)
            self.tensors.update(entries)

    def _shard_files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConversionError(
                    "index is not valid JSON with a weight_map", "re-download it", index
                ) from None
            return [self.folder / name for name in sorted(set(weight_map.values()))]
        single = self.folder / SINGLE_FILE
        if single.exists():
            return [single]
        found = sorted(self.folder.glob("*.safetensors"))
        if not found:
            raise ConversionError(
                "no safetensors weights found",
                f"expected {SINGLE_FILE} or {INDEX_FILE} in the folder",
                self.folder,
            )
        return found

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes viewed in its stored dtype (bf16 as uint16), without copying."""
        entry = self.tensors[name]
        mapped = self._maps.get(entry.file)
        if mapped is None:
            with entry.file.open("rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[entry.file] = mapped
        array = np.frombuffer(mapped, dtype=DTYPES[entry.dtype], count=entry.n_elements,
                              offset=entry.begin)
        return array.reshape(entry.shape)

    def as_f32(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array."""
        raw = self.raw(name)
        if self.tensors[name].dtype == "BF16":
            return bf16_to_f32(raw)
        return raw.astype(np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def close(self) -> None:
        for mapped in self._maps.values():
            try:
                mapped.close()
            except BufferError:
                pass  # a caller still holds a view; the map closes when it is collected
        self._maps.clear()
