"""One file from the hub into a partial file: resumed with a Range request after any break,
hashed (sha256) as it arrives, and checked against the hub's LFS sha256 and size at the end.

The URL and headers (token, user agent) are huggingface-hub's. The bytes come over the standard
library's http.client: measured on localhost, huggingface-hub's httpx2 session streams 64-72 MB/s
where http.client reads 900 MB/s and curl 400 MB/s, and a pull must keep up with curl. Redirects
(the hub sends LFS files to a CDN) are followed, without the token on another host. Where a proxy
is configured (HTTPS_PROXY and friends) the download goes through huggingface-hub's session,
which honours it.

Receiving, writing and hashing overlap: this thread only receives, into a few large reused
buffers; the sink's writer thread appends each one to the file, its hasher thread hashes them
and its syncer makes them durable as they come (hashlib, file writes and syncs drop the GIL); see
sink.py. A cancel (the daemon stopping) shuts the socket, so a read that waits on a slow network
returns at once; what was received stays in the partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import mmap
import queue
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from appliance.library.errors import (
    GatedRepo,
    HubUnreachable,
    IntegrityError,
    LibraryError,
    RepoNotFound,
)
from appliance.library.hub import OFFLINE_HINT, TOKEN_HINT, hub_errors
from appliance.library.sink import CHUNK, Buffer, Sink

log = logging.getLogger(__name__)

BUFFERS = 4  # in flight between receiving and writing: 32 MiB of memory at most
HAND_OFF_S = 0.5  # a partly filled buffer goes to the writer after this: progress on slow links
MAX_REDIRECTS = 5
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
        sink = Sink(partial, out, have, free)
        try:
            while have < size:  # a partial already whole (cut short before its install) is
                if cancel.is_set():  # only hashed again
                    raise Cancelled(CANCELLED)
                request_headers = {**headers, "Accept-Encoding": "identity"}
                if have:
                    request_headers["Range"] = f"bytes={have}-"
                try:
                    with _stream(url, request_headers, repo, timeout) as (status, read, abort), \
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
                                sink.put(buffer, 0, n)
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


# Receives into the view it is given, with at most one system call; the count, 0 at the end.
Reader = Callable[[memoryview], int]


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


class _Chunks:
    """A Reader over an iterator of byte strings (huggingface-hub's session behind a proxy)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._left = memoryview(b"")

    def __call__(self, view: memoryview) -> int:
        if not self._left:
            self._left = memoryview(next(self._chunks, b""))
        n = min(len(view), len(self._left))
        view[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


def _body_reader(response: http.client.HTTPResponse) -> Reader:
    """Straight from the socket into our buffer where the body has a length (a hub file
    always has): readinto1 makes no bytes object and no copy, where read1 allocates up to the
    asked size and copies it; measured in bench/pull_stages.py. A chunked body: read1."""
    fp = response.fp
    if response.chunked or response.length is None or fp is None:
        def read1(view: memoryview) -> int:
            data = response.read1(len(view))
            view[:len(data)] = data
            return len(data)

        return read1

    def readinto1(view: memoryview) -> int:
        left = response.length or 0
        if not left:
            return 0
        n = fp.readinto1(view[:left] if len(view) > left else view)
        if not n:
            return 0  # closed before its Content-Length: the caller says so
        response.length = left - n
        return n

    return readinto1


@contextlib.contextmanager
def _stream(url: str, headers: dict[str, str], repo: str,
            timeout: float) -> Iterator[tuple[int, Reader, Callable[[], None]]]:
    """(status, read, abort) for a GET of `url`; http.client, or huggingface-hub's session
    behind a proxy. Transport failures and 5xx become HubUnreachable (retried), 4xx our typed
    errors. `abort` (from another thread) makes a waiting read return."""
    scheme = urlsplit(url).scheme
    if urllib.request.getproxies().get(scheme):
        from huggingface_hub.utils import get_session, hf_raise_for_status

        with hub_errors(repo), get_session().stream("GET", url, headers=headers,
                                                    follow_redirects=True,
                                                    timeout=timeout) as response:
            hf_raise_for_status(response)
            yield response.status_code, _Chunks(response.iter_bytes(2**20)), response.close
        return
    with _direct(url, headers, repo, timeout) as answer:
        yield answer


def _unreachable(repo: str, e: Exception) -> HubUnreachable:
    return HubUnreachable(f"cannot reach the hub for {repo} ({type(e).__name__})", OFFLINE_HINT)


@contextlib.contextmanager
def _direct(url: str, headers: dict[str, str], repo: str,
            timeout: float) -> Iterator[tuple[int, Reader, Callable[[], None]]]:
    origin = urlsplit(url).netloc
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme == "https":
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.netloc, timeout=timeout, context=ssl.create_default_context())
        elif parts.scheme == "http":
            connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
        else:
            raise HubUnreachable(f"the hub sent the download of {repo} to {parts.scheme}:",
                                 OFFLINE_HINT)
        sent = dict(headers)
        if parts.netloc != origin:  # a CDN gets no token
            sent.pop("authorization", None)
            sent.pop("Authorization", None)
        try:
            try:
                connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                                   headers=sent)
                sock = connection.sock  # the response may take it over from the connection
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as e:
                raise _unreachable(repo, e) from None
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                response.read()
                if not location:
                    raise HubUnreachable(f"the hub redirected {repo} nowhere", OFFLINE_HINT)
                url = urljoin(url, location)
                continue
            if response.status >= 400:
                _raise_for(response.status, response.getheader("X-Error-Code"), repo)

            body = _body_reader(response)

            def read(view: memoryview, response: http.client.HTTPResponse = response,
                     body: Reader = body) -> int:
                # Only the network's failures are retried; a full disk (the writer's) is not.
                try:
                    n = body(view)
                except (OSError, http.client.HTTPException) as e:
                    raise _unreachable(repo, e) from None
                if not n and response.length:  # closed before its Content-Length
                    raise HubUnreachable(f"the connection for {repo} ended early",
                                         OFFLINE_HINT)
                return n

            def abort(sock: socket.socket | None = sock) -> None:
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)

            yield response.status, read, abort
            return
        finally:
            connection.close()
    raise HubUnreachable(f"too many redirects for {repo}", OFFLINE_HINT)


def _raise_for(status: int, code: str | None, repo: str) -> None:
    if code == "GatedRepo" or status in (401, 403):
        raise GatedRepo(f"hub repository {repo} is gated or private", TOKEN_HINT)
    if status in (404, 410):
        raise RepoNotFound(f"a file of {repo} is gone from the hub (HTTP {status})",
                           "pull again: the repo may have changed")
    raise HubUnreachable(f"the hub answered HTTP {status} for {repo}", OFFLINE_HINT)
