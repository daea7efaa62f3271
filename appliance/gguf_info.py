"""Read a GGUF's header (metadata and tensor table) fast, without touching the weights.

gguf's GGUFReader builds numpy views for every element of every array, which takes seconds on
a 151,936-token vocabulary; the registry scans many files, so we walk the header ourselves with
the gguf package's type tables and skip the arrays we do not need.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

_SCALARS: dict[int, str] = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H", gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q", gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}
_LAYER = re.compile(r"^blk\.(\d+)\.")


class GGUFError(ValueError):
    """The file is not a usable GGUF; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: gguf.GGMLQuantizationType
    offset: int
    nbytes: int


@dataclass
class GGUFInfo:
    """What the registry and the offload planner need to know about a model file."""

    path: Path
    file_size: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[TensorInfo] = field(default_factory=list)
    # Where each array's items lie in the file (start, end): read them when needed (the
    # vocabulary's digest for draft pairing) without parsing them on every scan.
    array_spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def n_layers(self) -> int:
        return int(self.arch_value("block_count", 0))

    @property
    def context_length(self) -> int:
        return int(self.arch_value("context_length", 0))

    @property
    def parameter_count(self) -> int:
        total = 0
        for t in self.tensors:
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    @property
    def quantization(self) -> str:
        file_type = self.metadata.get("general.file_type")
        try:
            return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except (TypeError, ValueError):
            return "unknown"

    @property
    def has_chat_template(self) -> bool:
        return isinstance(self.metadata.get("tokenizer.chat_template"), str)

    def layer_bytes(self) -> list[int]:
        """Bytes of each repeating layer's tensors, by layer index."""
        sizes = [0] * self.n_layers
        for t in self.tensors:
            match = _LAYER.match(t.name)
            if match and int(match.group(1)) < len(sizes):
                sizes[int(match.group(1))] += t.nbytes
        return sizes

    def non_layer_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if not _LAYER.match(t.name))

    def tensor_bytes(self, name: str) -> int:
        return sum(t.nbytes for t in self.tensors if t.name == name)


class _Cursor:
    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise GGUFError("file is truncated inside its header")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.pos + length > len(self.data):
            raise GGUFError("file is truncated inside its header")
        raw = self.data[self.pos:self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.unpack("<Q")  # read first: `pos += unpack()` would add to the old pos
        self.pos += length

    def value(self, vtype: int, key: str, lengths: dict[str, int],
              spans: dict[str, tuple[int, int]]) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        if vtype == gguf.GGUFValueType.ARRAY:
            item_type = self.unpack("<I")
            count = self.unpack("<Q")
            lengths[key] = count
            start = self.pos
            if item_type == gguf.GGUFValueType.STRING:
                for _ in range(count):
                    self.skip_string()
            elif item_type in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[item_type]) * count
            else:
                raise GGUFError(f"metadata {key} has nested arrays")
            spans[key] = (start, self.pos)
            return None
        raise GGUFError(f"metadata {key} has unknown value type {vtype}")


def read_gguf_info(path: Path) -> GGUFInfo:
    """Parse the header and tensor table; raise GGUFError for anything unusable."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            if size < 24:
                raise GGUFError("file is too small to be a GGUF")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GGUFError(f"cannot read: {e.strerror}") from None
    try:
        return _parse(path, size, data)
    finally:
        data.close()


def _parse(path: Path, size: int, data: mmap.mmap) -> GGUFInfo:
    cur = _Cursor(data)
    if data[:4] != b"GGUF":
        raise GGUFError("not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"unsupported GGUF version {version}")
    n_tensors = cur.unpack("<Q")
    n_kv = cur.unpack("<Q")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise GGUFError("header counts are implausible; the file is corrupt")
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    spans: dict[str, tuple[int, int]] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.unpack("<I")
        metadata[key] = cur.value(vtype, key, lengths, spans)
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > 8:
            raise GGUFError(f"tensor {name} has {n_dims} dimensions; the file is corrupt")
        dims = tuple(cur.unpack("<Q") for _ in range(n_dims))
        raw_type = cur.unpack("<I")
        offset = cur.unpack("<Q")
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(f"tensor {name} has unknown type {raw_type}") from None
        n = 1
        for d in dims:
            n *= d
        tensors.append(TensorInfo(name, tuple(reversed(dims)), qtype, offset,
                                  n // block * type_size))
    _check_types(metadata)
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    data_start = -(-cur.pos // alignment) * alignment
    end = max((t.offset + t.nbytes for t in tensors), default=0)
    if data_start + end > size:
        raise GGUFError(f"file is truncated: tensor data needs {data_start + end} bytes, "
                        f"the file has {size}")
    return GGUFInfo(path, size, metadata, lengths, tensors, spans)


# Keys whose values we compute with: (suffix after the architecture or full key, upper bound).
_COUNTS = {"context_length": 2**24, "block_count": 10_000, "embedding_length": 2**20,
           "feed_forward_length": 2**22, "attention.head_count": 2**14,
           "attention.head_count_kv": 2**14, "attention.key_length": 2**16,
           "attention.value_length": 2**16}


def _check_types(metadata: dict[str, Any]) -> None:
    """Every value the daemon computes with has the type and range it must have: a crafted
    header is refused here, with the key's name, instead of failing later in a request."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFError("general.architecture is missing or not a string")
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if (not _is_int(alignment) or not 1 <= alignment <= 2**16
            or alignment & (alignment - 1)):
        raise GGUFError(f"general.alignment is {alignment!r}; it must be a power of two")
    for suffix, bound in _COUNTS.items():
        key = f"{arch}.{suffix}"
        value = metadata.get(key)
        if key in metadata and (not _is_int(value) or not 0 <= value <= bound):
            raise GGUFError(f"{key} is {_short(value)}; it must be a whole number up to {bound}")
    for key in ("general.file_type", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id"):
        if key in metadata and not _is_int(metadata[key]):
            raise GGUFError(f"{key} is {_short(metadata[key])}; it must be a whole number")
    for key in ("tokenizer.chat_template", "general.name"):
        if key in metadata and not isinstance(metadata[key], str):
            raise GGUFError(f"{key} is {_short(metadata[key])}; it must be a string")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    return "a list" if value is None else repr(value)[:40]
