"""The disk side of a download: a writer thread appends the received buffers to the partial file,
a hasher thread hashes them in the same order, and `finish` makes the file durable (one fsync).

The writer bypasses the page cache (O_DIRECT) for the block-aligned middle of each buffer: the
device reads our buffer itself, where a buffered write copies every byte into the page cache
first. Measured on a 2-core VM (bench/pull_stages.py): the writer thread's CPU fell from
~1.0 s to 0.05 s per 512 MB at the same disk-bound wall time, and a multi-GB pull no longer
evicts what the page cache holds (a resident model's mmapped weights). The few bytes before the
first block boundary and after the last (a resume, a short hand-off on a slow link, the file's
end) go through the page cache; the final fsync flushes them and the disk's write cache. Where
the filesystem refuses O_DIRECT (tmpfs on old kernels, some FUSE mounts) everything is written
through the page cache, with writeback started every WRITEBACK bytes so that the fsync at the
end finds little left to do.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHUNK = 8 * 2**20  # one buffer; measured: 1 MiB chunks cost ~10 % against curl, 4 MiB ~2 %
WRITEBACK = 64 * 2**20  # page-cache writes: start the kernel writing back every this many bytes
ALIGN = 4096  # O_DIRECT's unit for offsets, lengths and memory: a multiple of any disk's block
Buffer = bytearray | mmap.mmap


def start_writeback() -> Callable[[int, int, int], Any]:
    """sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE): start writing pages back without
    waiting (Linux); elsewhere nothing, and the final fsync does it all."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
        call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    except (OSError, AttributeError):
        return lambda fd, offset, n: None
    return lambda fd, offset, n: call(fd, offset, n, 2)


def open_direct(path: Path) -> int | None:
    """A write descriptor of `path` that bypasses the page cache, or None where there is none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


class Sink:
    """The partial file's writer and hasher threads. Buffers go in with `put`, in order; each
    comes back on `free` once written and hashed. The hash covers the bytes already in the file
    (a resumed pull) first. A buffer's bytes start at `start_in_buffer(offset)`, where offset is
    the file position of its first byte: memory and file then meet block boundaries together,
    as O_DIRECT requires."""

    def __init__(self, path: Path, out: Any, have: int, free: queue.Queue[Buffer],
                 direct: bool = True) -> None:
        self.out = out
        self.fd = out.fileno()  # opened for appending: page-cache writes land at the end
        self.free = free
        self.written = have
        self.error: BaseException | None = None
        self._existing = have
        self._synced = have
        self._sha = hashlib.sha256()
        self._writeback = start_writeback()
        self._direct = open_direct(path) if direct else None
        self.direct = self._direct is not None  # whether the writer bypasses the page cache
        self._start()

    def _start(self) -> None:
        self._writes: queue.Queue[tuple[Buffer, int, int] | None] = queue.Queue()
        self._hashes: queue.Queue[tuple[Buffer, int, int] | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._write, name="pull-write", daemon=True),
                         threading.Thread(target=self._hash, name="pull-hash", daemon=True)]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def start_in_buffer(offset: int) -> int:
        return offset % ALIGN

    def put(self, buffer: Buffer, start: int, n: int) -> None:
        """Append buffer[start:start + n]."""
        self._writes.put((buffer, start, n))

    def _write(self) -> None:
        while (item := self._writes.get()) is not None:
            buffer, start, n = item
            if self.error is None:
                try:
                    self._append(memoryview(buffer)[start:start + n])
                except BaseException as e:  # a full disk: the receiver stops and raises it
                    self.error = e
            self._hashes.put(item)
        self._hashes.put(None)

    def _append(self, view: memoryview) -> None:
        if self._direct is None:
            self._cached(view)
            return
        start = self.written
        head = min(len(view), -start % ALIGN)  # up to the next block boundary
        middle = head + (len(view) - head) // ALIGN * ALIGN
        if head:
            self._cached(view[:head])
        if middle > head:
            try:
                self._pwrite_direct(view[head:middle])
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # The filesystem took the open but refuses the write: the page cache from now.
                os.close(self._direct)
                self._direct = None
                self.direct = False
                self._cached(view[self.written - start:])
                return
        if middle < len(view):
            self._cached(view[middle:])

    def _pwrite_direct(self, view: memoryview) -> None:
        assert self._direct is not None
        while view:
            n = os.pwrite(self._direct, view, self.written)
            view = view[n:]
            self.written += n

    def _cached(self, view: memoryview) -> None:
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.written += n
        if self._direct is None and self.written - self._synced >= WRITEBACK:
            self._writeback(self.fd, self._synced, self.written - self._synced)
            self._synced = self.written

    def _hash(self) -> None:
        if self._existing:
            try:
                self._sha = self._hash_existing()
            except BaseException as e:  # reported by the receiving thread
                self.error = e
        while (item := self._hashes.get()) is not None:
            buffer, start, n = item
            if self.error is None:
                self._sha.update(memoryview(buffer)[start:start + n])
            self.free.put(buffer)

    def _hash_existing(self) -> Any:
        sha = hashlib.sha256()
        left = self._existing
        offset = 0
        while left > 0:
            chunk = os.pread(self.fd, min(CHUNK, left), offset)
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
            offset += len(chunk)
        return sha

    def drain(self) -> None:
        """Wait until every buffer handed over is written and hashed; raise what was hit."""
        self._writes.put(None)
        for thread in self._threads:
            thread.join()
        if self.error is not None:
            raise self.error

    def restart(self) -> None:
        """Empty the file and the hash (the server ignored a Range); the sink runs again."""
        self.drain()
        self.out.truncate(0)
        self.out.seek(0)
        self.written = self._existing = self._synced = 0
        self._sha = hashlib.sha256()
        self._start()

    def finish(self) -> str:
        """Every byte written and on the disk (one fsync); the sha256 in hex."""
        self.drain()
        self.out.flush()
        os.fsync(self.fd)  # the page-cache pieces, the file's size and the disk's write cache
        return self._sha.hexdigest()

    def close(self) -> None:
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None
