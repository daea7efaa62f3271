"""The download's disk side: pieces of any size at any offset land in order, past the page cache
where the filesystem allows, hashed together with what a resumed partial already held."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import queue
from pathlib import Path

import pytest

from appliance.gguf_info import read_gguf_info
from appliance.library import sink as sink_module
from appliance.library.pull import Library
from appliance.library.sink import ALIGN, CHUNK, Sink, open_direct
from tests.library.conftest import GGUF_REPO
from tests.library.hub_server import LocalHub

# A resume point off a block boundary, then pieces that start and end off one, a piece smaller
# than a block, whole blocks, and a full buffer.
EXISTING = 5 * ALIGN + 1264
PIECES = [1000, 3 * ALIGN + 17, ALIGN, 3, CHUNK, 2 * ALIGN - 1]


def _write_pieces(path: Path, data: bytes, direct: bool = True) -> tuple[Sink, str]:
    path.write_bytes(data[:EXISTING])
    free: queue.Queue = queue.Queue()
    with path.open("a+b") as out:
        sink = Sink(path, out, EXISTING, free, direct=direct)
        try:
            offset = EXISTING
            for n in PIECES:
                buffer = mmap.mmap(-1, CHUNK + ALIGN)
                start = sink.start_in_buffer(offset)
                buffer[start:start + n] = data[offset:offset + n]
                sink.put(buffer, start, n)
                offset += n
            digest = sink.finish()
        finally:
            sink.close()
    return sink, digest


def _needs_direct(folder: Path) -> None:
    probe = folder / "probe"
    probe.touch()
    fd = open_direct(probe)
    if fd is None:
        pytest.skip(f"the filesystem of {folder} refuses O_DIRECT")
    os.close(fd)


@pytest.fixture()
def data() -> bytes:
    return os.urandom(EXISTING + sum(PIECES))


def test_pieces_off_block_boundaries_land_in_order_past_the_page_cache(tmp_path: Path,
                                                                        data: bytes) -> None:
    _needs_direct(tmp_path)
    path = tmp_path / "model.partial"
    sink, digest = _write_pieces(path, data)
    assert sink.direct, "the writer fell back to the page cache on a filesystem with O_DIRECT"
    assert path.read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()


def test_through_the_page_cache_when_asked(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "model.partial"
    sink, digest = _write_pieces(path, data, direct=False)
    assert not sink.direct
    assert path.read_bytes() == data and digest == hashlib.sha256(data).hexdigest()


def test_a_filesystem_refusing_direct_writes_gets_the_page_cache(
        tmp_path: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some filesystems accept an O_DIRECT open and refuse the write (EINVAL): the bytes of
    that write and every later one go through the page cache, none lost or doubled. Only the
    third direct write fails, after two have landed."""
    real_pwrite = os.pwrite
    calls = []

    def pwrite(fd: int, view: memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, view, offset)

    monkeypatch.setattr(sink_module.os, "pwrite", pwrite)
    _needs_direct(tmp_path)
    path = tmp_path / "model.partial"
    sink, digest = _write_pieces(path, data)
    assert len(calls) == 3 and not sink.direct
    assert path.read_bytes() == data and digest == hashlib.sha256(data).hexdigest()


def test_a_full_disk_is_reported_not_swallowed(tmp_path: Path, data: bytes,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def pwrite(fd: int, view: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sink_module.os, "pwrite", pwrite)
    _needs_direct(tmp_path)
    path = tmp_path / "model.partial"
    with pytest.raises(OSError, match="No space"):
        _write_pieces(path, data)


def _resident_fraction(path: Path) -> float:
    """The share of the file's pages in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # mapping faults nothing
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        vec = ctypes.create_string_buffer(pages)
        assert libc.mincore(ctypes.c_void_p(address), size, vec) == 0, ctypes.get_errno()
        return sum(b & 1 for b in vec.raw) / pages
    finally:
        del address
        mapped.close()


def test_a_pull_over_a_slow_link_lands_whole_and_leaves_the_page_cache_alone(
        library: Library, hub: LocalHub) -> None:
    """Through the real hub at a slow rate: buffers are handed over part-filled, at offsets off
    any block boundary, yet the file is whole, and its body did not go through the page cache
    (a resident model's weights stay in memory while a big pull runs): only the header the
    pull checks is read back."""
    library.models_dir.mkdir(parents=True, exist_ok=True)
    _needs_direct(library.models_dir)
    source = hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"]
    hub.faults.rate = 12 * 2**20  # a ~1.4 s download: several part-filled hand-offs
    model = library.pull(library.plan(GGUF_REPO))
    resident = _resident_fraction(model.path)
    assert hashlib.sha256(model.path.read_bytes()).hexdigest() == source.sha256
    info = read_gguf_info(model.path)
    header = info.file_size - max(t.offset + t.nbytes for t in info.tensors)
    # The header (and the kernel's read-ahead after it), a few edge pages: far from all of it.
    assert resident <= (header + 4 * 2**20) / source.size < 0.75, (resident, header)
