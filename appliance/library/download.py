"""One file from the hub into a partial file: resumed with a Range request after any break,
hashed (sha256) as it arrives, and checked against the hub's LFS sha256 and size at the end.

The URL and headers (token, user agent) are huggingface-hub's; the GET is transport.py's.

Receiving, writing and hashing overlap: this thread only receives, into a few large reused
buffers; the sink's writer thread appends each one to the file and its hasher thread hashes
them (hashlib and file writes drop the GIL); see sink.py. Nothing here waits for the disk
(durability.py). A cancel (the daemon stopping) shuts the socket, so a read that waits on a slow network
returns at once; what was received stays in the partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from appliance.library.errors import (
    OFFLINE_HINT,
    HubUnreachable,
    IntegrityError,
    LibraryError,
)
from appliance.library.sink import CHUNK, Buffer, Sink
from appliance.library.transport import Reader, stream

log = logging.getLogger(__name__)

BUFFERS = 4  # in flight between receiving and writing: 32 MiB of memory at most
HAND_OFF_S = 0.5  # a partly filled buffer goes to the writer after this: progress on slow links
RETRIES = 5  # connection drops resumed in a row before giving up (a made progress resets it)
BACKOFF_S = (0.5, 1, 2, 4, 8)


class Cancelled(LibraryError):
    """The pull was cancelled (the daemon is stopping)."""

    status = 503
    type = "server_error"
    code = "cancelled"


CANCELLED = "the pull was cancelled (the daemon is stopping); pulling again resumes it"


class Cancel(threading.Event):
    """A pull's cancel flag; setting it also runs the hooks of what is under way (a download
    shuts its socket, so a read blocked on a slow network wakes at once)."""

    def __init__(self) -> None:
        super().__init__()
        self._hooks: list[Callable[[], None]] = []
        self._hooks_lock = threading.Lock()

    def set(self) -> None:
        super().set()
        with self._hooks_lock:
            hooks = list(self._hooks)
        for hook in hooks:
            with contextlib.suppress(Exception):
                hook()

    @contextlib.contextmanager
    def hooked(self, hook: Callable[[], None]) -> Iterator[None]:
        with self._hooks_lock:
            self._hooks.append(hook)
        try:
            if self.is_set():
                hook()
            yield
        finally:
            with self._hooks_lock:
                self._hooks.remove(hook)


def hash_file(path: Path, limit: int | None = None) -> Any:
    """sha256 of a file's first `limit` bytes (all of it without a limit)."""
    sha = hashlib.sha256()
    left = limit if limit is not None else path.stat().st_size
    with path.open("rb") as f:
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
    return sha


def download(url: str, partial: Path, *, size: int, sha256: str | None,
             headers: dict[str, str], repo: str, on_bytes: Callable[[int], None],
             cancel: Cancel | None = None, timeout: float = 30.0) -> str:
    """Fetch `url` into `partial`, resuming what is there; return its sha256 once it is whole
    and matches (`sha256` None: the hub gave none, a small git file). Deletes a mismatch."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:
        partial.unlink()
        have = 0
    if have:
        log.info("resuming %s at %d of %d bytes", partial.name, have, size)
    on_bytes(have)
    cancel = cancel or Cancel()
    free: queue.Queue[Buffer] = queue.Queue()
    for _ in range(BUFFERS):
        # Anonymous maps, not bytearrays: those are zero-filled here, 32 MiB of page faults
        # (measured ~0.1 s on a VM) before the request is even sent; a map's pages come as
        # the first bytes land in them.
        free.put(mmap.mmap(-1, CHUNK))
    failures = 0
    with partial.open("a+b") as out:  # read too: a resume hashes what is there
        sink = Sink(out, have, free)
        try:
            while have < size:  # a partial already whole (cut short before its install) is
                if cancel.is_set():  # only hashed again
                    raise Cancelled(CANCELLED)
                request_headers = {**headers, "Accept-Encoding": "identity"}
                if have:
                    request_headers["Range"] = f"bytes={have}-"
                try:
                    with stream(url, request_headers, repo, timeout) as (status, read, abort), \
                            cancel.hooked(abort):
                        if have and status != 206:
                            # The server ignored the Range: start over rather than append twice.
                            sink.restart()
                            have = 0
                            on_bytes(0)
                        while have < size:
                            buffer = free.get()
                            if sink.error is not None:
                                free.put(buffer)
                                sink.drain()  # raises the writer's error
                            try:
                                n = _fill(buffer, read, cancel)
                            except BaseException:
                                free.put(buffer)  # its bytes are fetched again on the retry
                                raise
                            if n:
                                sink.put(buffer, n)
                                have += n
                                on_bytes(have)
                                failures = 0
                            else:
                                free.put(buffer)
                            if cancel.is_set():
                                raise Cancelled(CANCELLED)
                            if not n:
                                break
                    if have >= size:
                        break
                    raise HubUnreachable(f"the connection ended at {have} of {size} bytes")
                except HubUnreachable as e:
                    if cancel.is_set():
                        raise Cancelled(CANCELLED) from None
                    failures += 1
                    if failures > RETRIES:
                        raise HubUnreachable(f"the download from {repo} broke off {failures} "
                                             f"times at {have} of {size} bytes ({e})",
                                             OFFLINE_HINT) from None
                    log.warning("download broke off at %d of %d bytes (%s); resuming", have,
                                size, e)
                    if cancel.wait(BACKOFF_S[min(failures, len(BACKOFF_S)) - 1]):
                        raise Cancelled(CANCELLED) from None
            digest = sink.finish()
        except BaseException:
            with contextlib.suppress(BaseException):
                sink.drain()  # what arrived is written: a later pull resumes after it
            out.flush()
            raise
    actual = partial.stat().st_size
    if actual != size:
        partial.unlink(missing_ok=True)
        raise IntegrityError(f"{url.rsplit('/', 1)[-1]} from {repo} has {actual} bytes, the hub "
                             f"said {size}; it was deleted", "pull it again")
    if sha256 is not None and digest != sha256.lower():
        partial.unlink(missing_ok=True)
        raise IntegrityError(f"{url.rsplit('/', 1)[-1]} from {repo} does not match the hub's "
                             f"sha256 ({digest[:12]}… instead of {sha256[:12]}…); it was deleted",
                             "pull it again; if it fails again the mirror or the repo is broken")
    return digest


def _fill(buffer: Buffer, read: Reader, cancel: threading.Event) -> int:
    """Receive into `buffer` until it is full, the body ends, or HAND_OFF_S passed with some
    bytes in it (so progress flows on slow links); the count received."""
    view = memoryview(buffer)
    n = 0
    started = time.monotonic()
    while n < len(view):
        got = read(view[n:])
        if not got:
            break
        n += got
        if cancel.is_set() or time.monotonic() - started > HAND_OFF_S:
            break
    return n
