"""The download's disk side: pieces of any size land in order, hashed together with what a
resumed partial already held, made durable window by window while the writing goes on, and out
of the page cache once on the disk."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import queue
import time
from pathlib import Path

import pytest

from appliance.gguf_info import read_gguf_info
from appliance.library import sink as sink_module
from appliance.library.pull import Library
from appliance.library.sink import CHUNK, Sink
from tests.library.conftest import GGUF_REPO
from tests.library.hub_server import LocalHub

EXISTING = 5 * 4096 + 1264  # a resume point off any block boundary
PIECES = [1000, 3 * 4096 + 17, 4096, 3, CHUNK, 2 * 4096 - 1]


def _put_pieces(sink: Sink, data: bytes, pieces: list[int]) -> None:
    offset = EXISTING
    for n in pieces:
        buffer = mmap.mmap(-1, CHUNK)
        buffer[:n] = data[offset:offset + n]
        sink.put(buffer, n)
        offset += n


def _write_pieces(path: Path, data: bytes, pieces: list[int] = PIECES) -> str:
    path.write_bytes(data[:EXISTING])
    with path.open("a+b") as out:
        sink = Sink(out, EXISTING, queue.Queue())
        _put_pieces(sink, data, pieces)
        return sink.finish()


@pytest.fixture()
def data() -> bytes:
    return os.urandom(EXISTING + sum(PIECES))


def test_pieces_land_in_order_hashed_after_what_was_there(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "model.partial"
    digest = _write_pieces(path, data)
    assert path.read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()


def test_a_full_disk_is_reported_not_swallowed(tmp_path: Path, data: bytes,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.partial"
    path.write_bytes(b"")
    real_write = os.write
    with path.open("a+b") as out:
        def write(fd: int, view: memoryview) -> int:  # the partial's writes only
            if fd == out.fileno():
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, view)

        monkeypatch.setattr(sink_module.os, "write", write)
        sink = Sink(out, 0, queue.Queue())
        sink.put(mmap.mmap(-1, CHUNK), 4096)
        with pytest.raises(OSError, match="No space"):
            sink.finish()


def test_windows_become_durable_while_the_writing_goes_on_then_leave_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The syncer makes each window durable while later pieces are still being written (the
    disk works while the bytes arrive), and no page of the file stays cached at the end."""
    monkeypatch.setattr(sink_module, "SYNC_EVERY", 2**20)
    pieces = [2**20] * 12
    data = os.urandom(EXISTING + sum(pieces))
    path = tmp_path / "model.partial"
    path.write_bytes(data[:EXISTING])
    synced: list[int] = []
    real_fdatasync = os.fdatasync
    with path.open("a+b") as out:
        def fdatasync(fd: int) -> None:
            real_fdatasync(fd)
            if fd == out.fileno():
                synced.append(os.fstat(fd).st_size)

        monkeypatch.setattr(sink_module.os, "fdatasync", fdatasync)
        sink = Sink(out, EXISTING, queue.Queue())
        _put_pieces(sink, data, pieces)
        deadline = time.monotonic() + 60
        while len(synced) < 2 and time.monotonic() < deadline:  # before finish() is called
            time.sleep(0.01)
        assert len(synced) >= 2, synced
        digest = sink.finish()
    assert _resident_fraction(path) < 0.1  # first: reading the file back caches it
    assert digest == hashlib.sha256(data).hexdigest() and path.read_bytes() == data


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
    """Through the real hub at a slow rate: buffers are handed over part-filled, yet the file is
    whole, and its body does not stay in the page cache (a resident model's weights stay in
    memory while a big pull runs): only the header the pull checks is read back."""
    library.models_dir.mkdir(parents=True, exist_ok=True)
    source = hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"]
    hub.faults.rate = 12 * 2**20  # a ~1.4 s download: several part-filled hand-offs
    model = library.pull(library.plan(GGUF_REPO))
    resident = _resident_fraction(model.path)
    assert hashlib.sha256(model.path.read_bytes()).hexdigest() == source.sha256
    info = read_gguf_info(model.path)
    header = info.file_size - max(t.offset + t.nbytes for t in info.tensors)
    # The header (and the kernel's read-ahead after it), a few edge pages: far from all of it.
    assert resident <= (header + 4 * 2**20) / source.size < 0.75, (resident, header)
