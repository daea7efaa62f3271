"""The disk side of a download: a writer thread appends the received buffers to the partial file,
a hasher thread hashes them in the same order, a syncer thread makes what is written durable as
the download goes, and `finish` makes the rest durable (one fsync).

Why a syncer: a durable file costs the disk's own write rate, ~1.9 s per GB on the 2-core VM,
where writing into the page cache alone (what curl does) costs 0.7-2.5 s. Waited for at the end,
the two add up; synced every SYNC_EVERY bytes in a thread of its own (fdatasync runs while the
writer goes on appending), the disk works while the bytes arrive and the final fsync finds one
window left. Measured on the VM, 1 GiB from memory (bench/pull_stages.py): page cache + one fsync
at the end 2.4 s, O_DIRECT 3.4-4.1 s, this 1.8-2.0 s. Once a window is on the disk its pages
leave the page cache (POSIX_FADV_DONTNEED), as all of the file's do at the end: a multi-GB pull
does not evict what the page cache holds (a resident model's mmapped weights).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
from typing import Any

CHUNK = 8 * 2**20  # one buffer; measured: 1 MiB chunks cost ~10 % against curl, 4 MiB ~2 %
SYNC_EVERY = 64 * 2**20  # the syncer makes this much durable at a time
Buffer = bytearray | mmap.mmap


def forget_pages(fd: int, offset: int, length: int) -> None:
    """Drop clean pages of the file from the page cache (a hint: where there is none, nothing)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class Sink:
    """The partial file's writer, hasher and syncer threads. Buffers go in with `put`, in order;
    each comes back on `free` once written and hashed. The hash covers the bytes already in the
    file (a resumed pull) first."""

    def __init__(self, out: Any, have: int, free: queue.Queue[Buffer]) -> None:
        self.out = out
        self.fd = out.fileno()  # opened for appending
        self.free = free
        self.written = have
        self.error: BaseException | None = None
        self._existing = have
        self._sha = hashlib.sha256()
        self._start()

    def _start(self) -> None:
        self._writes: queue.Queue[tuple[Buffer, int] | None] = queue.Queue()
        self._hashes: queue.Queue[tuple[Buffer, int] | None] = queue.Queue()
        self._synced = self.written
        self._writing = True
        self._progress = threading.Condition()
        self._threads = [threading.Thread(target=self._write, name="pull-write", daemon=True),
                         threading.Thread(target=self._hash, name="pull-hash", daemon=True),
                         threading.Thread(target=self._sync, name="pull-sync", daemon=True)]
        for thread in self._threads:
            thread.start()

    def put(self, buffer: Buffer, n: int) -> None:
        """Append the buffer's first n bytes."""
        self._writes.put((buffer, n))

    def _write(self) -> None:
        while (item := self._writes.get()) is not None:
            buffer, n = item
            if self.error is None:
                try:
                    view = memoryview(buffer)[:n]
                    while view:
                        view = view[os.write(self.fd, view):]
                    with self._progress:
                        self.written += n
                        self._progress.notify()
                except BaseException as e:  # a full disk: the receiver stops and raises it
                    self.error = e
            self._hashes.put(item)
        self._hashes.put(None)
        with self._progress:
            self._writing = False
            self._progress.notify()

    def _sync(self) -> None:
        while True:
            with self._progress:
                self._progress.wait_for(
                    lambda: not self._writing or self.written - self._synced >= SYNC_EVERY)
                if not self._writing:
                    return  # what is left is finish()'s
                upto = self.written
            try:
                os.fdatasync(self.fd)
                forget_pages(self.fd, self._synced, upto - self._synced)
            except BaseException as e:  # an I/O error surfaces here first
                self.error = e
                return
            self._synced = upto

    def _hash(self) -> None:
        if self._existing:
            try:
                self._sha = self._hash_existing()
            except BaseException as e:  # reported by the receiving thread
                self.error = e
        while (item := self._hashes.get()) is not None:
            buffer, n = item
            if self.error is None:
                self._sha.update(memoryview(buffer)[:n])
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
        self.written = self._existing = 0
        self._sha = hashlib.sha256()
        self._start()

    def finish(self) -> str:
        """Every byte written and on the disk (one fsync); the sha256 in hex."""
        self.drain()
        self.out.flush()
        os.fsync(self.fd)  # the last window, the file's size and the disk's write cache
        forget_pages(self.fd, 0, 0)  # 0: to the end of the file
        return self._sha.hexdigest()
