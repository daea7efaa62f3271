"""The disk side of a download: a writer thread appends the received buffers to the partial file
and a hasher thread hashes them in the same order, so receiving, writing and hashing overlap.

Nothing here waits for the disk. The bytes go into the page cache, as curl's do, and the pull
installs the model once they are checked; making them durable comes after (durability.py). On
the 2-core VM the disk takes ~1.9 s per GB where the page cache takes 0.7-2.5 s, so waiting for it
inside the pull cost 0.2-0.5 s per GB against curl (bench/pull_speed.py: 0.67-0.79x with an
fsync before the rename, 0.9x and more without).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
from typing import Any

CHUNK = 8 * 2**20  # one buffer; measured: 1 MiB chunks cost ~10 % against curl, 4 MiB ~2 %
# One write() at most: the kernel sizes page-cache folios by the write, and 2 MiB folios come
# from the free blocks a VM hands back to its host (free page reporting), each touch then a
# fault on the host. Measured writing 1 GiB on the 2-core VM (dd): 2.2-2.4 s in 2 MiB writes,
# 0.5 s in 512 KiB, 0.38 s in 256 KiB, 0.4 s in 64 KiB, 0.7 s in 16 KiB (curl's size).
WRITE_SLICE = 256 * 2**10
Buffer = bytearray | mmap.mmap


class Sink:
    """The partial file's writer and hasher threads. Buffers go in with `put`, in order;
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
        self._threads = [threading.Thread(target=self._write, name="pull-write", daemon=True),
                         threading.Thread(target=self._hash, name="pull-hash", daemon=True)]
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
                        view = view[os.write(self.fd, view[:WRITE_SLICE]):]
                    self.written += n
                except BaseException as e:  # a full disk: the receiver stops and raises it
                    self.error = e
            self._hashes.put(item)
        self._hashes.put(None)

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
        """Every byte written (into the page cache, not yet durable); the sha256 in hex."""
        self.drain()
        return self._sha.hexdigest()
