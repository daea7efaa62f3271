"""Read a GGUF's header (metadata and tensor table) fast, without touching the weights.

gguf's GGUFReader builds numpy views for every element of every array, which takes seconds on
a 151,936-token vocabulary, and importing gguf (with numpy) costs most of a second of every
`appliance models`: we walk the header ourselves with the few type tables we need, skip the
arrays (only their lengths are kept) and bound everything a crafted header could inflate.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

# GGUF metadata value types (gguf.GGUFValueType).
STRING, ARRAY = 8, 9
_SCALARS: dict[int, struct.Struct] = {
    vtype: struct.Struct(fmt) for vtype, fmt in (
        (0, "<B"), (1, "<b"), (2, "<H"), (3, "<h"), (4, "<I"), (5, "<i"), (6, "<f"), (7, "<?"),
        (10, "<Q"), (11, "<q"), (12, "<d"))}
# ggml tensor types: (name, elements per block, bytes per block), as gguf.GGML_QUANT_SIZES.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
# general.file_type (llama_ftype; gguf.LlamaFileType without its MOSTLY_ prefix).
FILE_TYPES: dict[int, str] = {
    0: "ALL_F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 1024: "GUESSED",
}
DEFAULT_ALIGNMENT = 32
_LAYER = re.compile(r"^blk\.(\d+)\.")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Bounds against crafted headers: real Qwen3 files have ~30 keys, ~400 tensors, a 300k-entry
# vocabulary plus merges, and a chat template of a few kB.
MAX_COUNT = 1_000_000  # tensors, or metadata keys
MAX_ARRAY_ITEMS = 2**24  # all array elements together (skipped, but each one is walked)
MAX_NAME = 65_535  # a key or a tensor name (GGUF: keys up to 65535 bytes)
MAX_STRING = 1 * 2**20  # one string value kept (chat templates are kB)
MAX_KEPT = 16 * 2**20  # all string values kept together

class GGUFError(ValueError):
    """The file is not a usable GGUF; the message says why."""


class TensorInfo(NamedTuple):
    """One tensor's entry (a tuple: thousands are made per listing, from the header cache)."""

    name: str
    shape: tuple[int, ...]
    type: int  # the ggml type number (GGML_TYPES)
    offset: int
    nbytes: int


@dataclass
class GGUFInfo:
    """What the registry and the offload planner need to know about a model file (or about
    every part of a split one: the first part's metadata, all parts' tensors and sizes)."""

    path: Path
    file_size: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[TensorInfo] = field(default_factory=list)

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
        return FILE_TYPES.get(file_type, "unknown") if _is_int(file_type) else "unknown"

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


@dataclass
class RawHeader:
    """One file's header as parsed, before the checks that depend on its role (a split
    model's later parts carry no architecture): what the header cache stores."""

    file_size: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[TensorInfo]


class _Cursor:
    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.size = len(data)
        self.pos = 0
        self.kept = 0  # bytes of string values kept so far
        self.items = 0  # array elements walked so far

    def truncated(self) -> GGUFError:
        return GGUFError("file is truncated inside its header")

    def unpack(self, fmt: struct.Struct) -> Any:
        if self.pos + fmt.size > self.size:
            raise self.truncated()
        (value,) = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return value

    def name(self, what: str) -> str:
        length = self.unpack(_U64)
        if length > MAX_NAME:
            raise GGUFError(f"a {what} is {length} bytes long; the file is corrupt")
        return self._text(length)

    def string(self, key: str) -> str:
        length = self.unpack(_U64)
        self.kept += length
        if length > MAX_STRING or self.kept > MAX_KEPT:
            raise GGUFError(f"metadata {key[:80]} is a string of {length} bytes; too large")
        return self._text(length)

    def _text(self, length: int) -> str:
        if self.pos + length > self.size:
            raise self.truncated()
        raw = self.data[self.pos:self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_array(self, key: str, item_type: int, count: int) -> None:
        self.items += count
        if self.items > MAX_ARRAY_ITEMS:
            raise GGUFError(f"metadata {key[:80]} makes the header's arrays too long "
                            f"({self.items} elements)")
        if item_type == STRING:
            if count * 8 > self.size - self.pos:
                raise self.truncated()
            # The tightest loop we have: each string is its length and its bytes.
            unpack, data, pos = _U64.unpack_from, self.data, self.pos
            try:
                for _ in range(count):
                    pos += 8 + unpack(data, pos)[0]
            except struct.error:
                raise self.truncated() from None
            if pos > self.size:
                raise self.truncated()
            self.pos = pos
        elif item_type in _SCALARS:
            self.pos += _SCALARS[item_type].size * count
            if self.pos > self.size:
                raise self.truncated()
        else:
            raise GGUFError(f"metadata {key[:80]} has nested arrays")

    def value(self, vtype: int, key: str, lengths: dict[str, int]) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == STRING:
            return self.string(key)
        if vtype == ARRAY:
            item_type = self.unpack(_U32)
            count = self.unpack(_U64)
            lengths[key] = count
            self.skip_array(key, item_type, count)
            return None
        raise GGUFError(f"metadata {key[:80]} has unknown value type {vtype}")


def read_header(path: Path) -> RawHeader:
    """Parse the header and tensor table of one file; raise GGUFError when it is not a GGUF
    or a bound is broken."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFError("file is too small to be a GGUF")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GGUFError(f"cannot read: {e.strerror}") from None
    try:
        return _parse(size, data)
    finally:
        data.close()


def read_gguf_info(path: Path) -> GGUFInfo:
    """Parse a model file's header and tensor table; raise GGUFError for anything unusable."""
    return to_info(path, read_header(path))


def to_info(path: Path, header: RawHeader) -> GGUFInfo:
    """The checked info of a model's (first) file."""
    _check_types(header.metadata)
    return GGUFInfo(path, header.file_size, header.metadata, header.array_lengths,
                    header.tensors)


def join_parts(path: Path, first: RawHeader, later: list[RawHeader]) -> GGUFInfo:
    """A split model (`-00001-of-0000N`) as one: the first part's metadata, every part's
    tensors; the parts must agree with the first part's `split.count`."""
    info = to_info(path, first)
    count = first.metadata.get("split.count")
    if count is not None and (not _is_int(count) or count != 1 + len(later)):
        raise GGUFError(f"split.count is {_short(count)} but {1 + len(later)} parts are here")
    tensors = list(info.tensors)
    size = info.file_size
    for part in later:
        tensors += part.tensors
        size += part.file_size
    return GGUFInfo(path, size, info.metadata, info.array_lengths, tensors)


def _parse(size: int, data: mmap.mmap) -> RawHeader:
    cur = _Cursor(data)
    if data[:4] != b"GGUF":
        raise GGUFError("not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.unpack(_U32)
    if version not in (2, 3):
        raise GGUFError(f"unsupported GGUF version {version}")
    n_tensors = cur.unpack(_U64)
    n_kv = cur.unpack(_U64)
    if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
        raise GGUFError("header counts are implausible; the file is corrupt")
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.name("metadata key")
        vtype = cur.unpack(_U32)
        metadata[key] = cur.value(vtype, key, lengths)
    tensors = []
    for _ in range(n_tensors):
        name = cur.name("tensor name")
        n_dims = cur.unpack(_U32)
        if n_dims > 8:
            raise GGUFError(f"tensor {name[:80]} has {n_dims} dimensions; the file is corrupt")
        dims = tuple(cur.unpack(_U64) for _ in range(n_dims))
        raw_type = cur.unpack(_U32)
        offset = cur.unpack(_U64)
        if raw_type not in GGML_TYPES:
            raise GGUFError(f"tensor {name[:80]} has unknown type {raw_type}")
        _, block, type_size = GGML_TYPES[raw_type]
        n = 1
        for d in dims:
            n *= d
        tensors.append(TensorInfo(name, tuple(reversed(dims)), raw_type, offset,
                                  n // block * type_size))
    if "general.architecture" in metadata:  # a model's (first) file: a bad value is the more
        _check_types(metadata)  # useful reason than the truncation it may also cause
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not _is_int(alignment) or not 1 <= alignment <= 2**16 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment is {alignment!r}; it must be a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    end = max((t.offset + t.nbytes for t in tensors), default=0)
    if data_start + end > size:
        raise GGUFError(f"file is truncated: tensor data needs {data_start + end} bytes, "
                        f"the file has {size}")
    return RawHeader(size, metadata, lengths, tensors)


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
