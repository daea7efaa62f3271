"""One file from the hub into a partial file: resumed with a Range request after any break,
hashed (sha256) as it arrives, and checked against the hub's LFS sha256 and size at the end.

The URL and headers (token, user agent) are huggingface-hub's. The bytes come over the standard
library's http.client: measured on localhost, huggingface-hub's httpx2 session streams 64-72 MB/s
where http.client reads 900 MB/s and curl 400 MB/s, and a pull must keep up with curl. Redirects
(the hub sends LFS files to a CDN) are followed, without the token on another host. Where a proxy
is configured (HTTPS_PROXY and friends) the download goes through huggingface-hub's session,
which honours it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import queue
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

log = logging.getLogger(__name__)

CHUNK = 4 * 2**20  # measured: 1 MiB chunks cost ~10 % against curl on localhost, 4 MiB ~2 %
MAX_REDIRECTS = 5
RETRIES = 5  # connection drops resumed in a row before giving up (a made progress resets it)
BACKOFF_S = (0.5, 1, 2, 4, 8)


class Cancelled(LibraryError):
    """The pull was cancelled (the daemon is stopping)."""

    status = 503
    type = "server_error"
    code = "cancelled"


class _Hasher:
    """sha256 on its own thread: hashing (hashlib drops the GIL) overlaps with receiving."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._run, name="pull-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self.sha.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self.sha.hexdigest()


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
             cancel: threading.Event | None = None, timeout: float = 30.0) -> str:
    """Fetch `url` into `partial`, resuming what is there; return its sha256 once it is whole
    and matches (`sha256` None: the hub gave none, a small git file). Deletes a mismatch."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:
        partial.unlink()
        have = 0
    hasher = _Hasher()
    if have:  # resuming: the bytes on disk count towards the hash
        hasher.sha = hash_file(partial, have)
        log.info("resuming %s at %d of %d bytes", partial.name, have, size)
    on_bytes(have)
    failures = 0
    with partial.open("ab") as out:
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the pull was cancelled")
            request_headers = {**headers, "Accept-Encoding": "identity"}
            if have:
                request_headers["Range"] = f"bytes={have}-"
            try:
                with _stream(url, request_headers, repo, timeout) as (status, read):
                    if have and status != 206:
                        # The server ignored the Range: start over rather than append twice.
                        out.truncate(0)
                        out.seek(0)
                        have = 0
                        hasher = _Hasher()
                        on_bytes(0)
                    while chunk := read(CHUNK):
                        out.write(chunk)
                        hasher.update(chunk)
                        have += len(chunk)
                        on_bytes(have)
                        failures = 0
                        if cancel is not None and cancel.is_set():
                            raise Cancelled("the pull was cancelled")
                if have >= size:
                    break
                raise HubUnreachable(f"the connection ended at {have} of {size} bytes")
            except HubUnreachable as e:
                out.flush()
                failures += 1
                if failures > RETRIES:
                    raise HubUnreachable(f"the download from {repo} broke off {failures} times "
                                         f"at {have} of {size} bytes ({e})", OFFLINE_HINT) from None
                log.warning("download broke off at %d of %d bytes (%s); resuming", have, size, e)
                time.sleep(BACKOFF_S[min(failures, len(BACKOFF_S)) - 1])
        out.flush()
    digest = hasher.hexdigest()
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


Reader = Callable[[int], bytes]


@contextlib.contextmanager
def _stream(url: str, headers: dict[str, str], repo: str,
            timeout: float) -> Iterator[tuple[int, Reader]]:
    """(status, read) for a GET of `url`; http.client, or huggingface-hub's session behind a
    proxy. Transport failures and 5xx become HubUnreachable (retried), 4xx our typed errors."""
    scheme = urlsplit(url).scheme
    if urllib.request.getproxies().get(scheme):
        from huggingface_hub.utils import get_session, hf_raise_for_status

        with hub_errors(repo), get_session().stream("GET", url, headers=headers,
                                                    follow_redirects=True,
                                                    timeout=timeout) as response:
            hf_raise_for_status(response)
            chunks = response.iter_bytes(CHUNK)
            yield response.status_code, lambda _: next(chunks, b"")
        return
    with _direct(url, headers, repo, timeout) as answer:
        yield answer


def _unreachable(repo: str, e: Exception) -> HubUnreachable:
    return HubUnreachable(f"cannot reach the hub for {repo} ({type(e).__name__})", OFFLINE_HINT)


@contextlib.contextmanager
def _direct(url: str, headers: dict[str, str], repo: str,
            timeout: float) -> Iterator[tuple[int, Reader]]:
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

            def read(n: int, response: http.client.HTTPResponse = response) -> bytes:
                # Only the network's failures are retried; a full disk (the caller's write)
                # is not one of them.
                try:
                    return response.read(n)
                except (OSError, http.client.HTTPException) as e:
                    raise _unreachable(repo, e) from None

            yield response.status, read
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
