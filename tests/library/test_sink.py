"""The download's disk side: pieces of any size land in order, hashed together with what a
resumed partial already held, without waiting for the disk; once the pull is settled
(durability.py) the file is on the disk and out of the page cache."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import queue
import subprocess
from pathlib import Path

import pytest

from appliance.library import sink as sink_module
from appliance.library.durability import settle
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


def test_the_sink_never_waits_for_the_disk(tmp_path: Path, data: bytes,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting for the disk inside the pull cost 0.2-0.5 s per GB against curl: the sink leaves
    it to settling, after the model is installed."""
    def no_sync(fd: int) -> None:
        raise AssertionError("the sink waited for the disk")

    monkeypatch.setattr(sink_module.os, "fsync", no_sync)
    monkeypatch.setattr(sink_module.os, "fdatasync", no_sync)
    path = tmp_path / "model.partial"
    assert _write_pieces(path, data) == hashlib.sha256(data).hexdigest()
    assert path.read_bytes() == data


def _filesystem(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()


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


def test_a_pull_over_a_slow_link_lands_whole_and_settled_leaves_the_page_cache(
        library: Library, hub: LocalHub) -> None:
    """Through the real hub at a slow rate: buffers are handed over part-filled, yet the file is
    whole; settled as the CLI and the daemon settle a pull, it is on the disk and its body is
    out of the page cache (a big pull does not crowd out a resident model's weights)."""
    library.models_dir.mkdir(parents=True, exist_ok=True)
    source = hub.repos[GGUF_REPO].files["Tiny-Q4_K_M.gguf"]
    hub.faults.rate = 12 * 2**20  # a ~1.4 s download: several part-filled hand-offs
    if _filesystem(library.models_dir) == "tmpfs":
        pytest.skip("a tmpfs file is its pages: they cannot leave the page cache")
    model = library.pull(library.plan(GGUF_REPO))
    assert settle(library.models_dir, model.id, drop_pages=True) == "synced"
    resident = _resident_fraction(model.path)
    assert hashlib.sha256(model.path.read_bytes()).hexdigest() == source.sha256
    assert resident < 0.05, resident
