"""One file from the hub into a partial file: resumed with a Range request after any break,
hashed (sha256) as it arrives, and checked against the hub's LFS sha256 and size at the end.

The bytes come through huggingface-hub's own HTTP session (its proxies, its user agent, its
error types); redirects to a CDN are followed, and the session drops the token on another host.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.library.errors import HubUnreachable, IntegrityError, LibraryError
from appliance.library.hub import OFFLINE_HINT, hub_errors

log = logging.getLogger(__name__)

CHUNK = 4 * 2**20  # measured: 1 MiB chunks cost ~10 % against curl on localhost, 4 MiB ~2 %
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
    from huggingface_hub.utils import get_session, hf_raise_for_status

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
                with hub_errors(repo), get_session().stream(
                        "GET", url, headers=request_headers, follow_redirects=True,
                        timeout=timeout) as response:
                    hf_raise_for_status(response)
                    if have and response.status_code != 206:
                        # The server ignored the Range: start over rather than append twice.
                        out.truncate(0)
                        out.seek(0)
                        have = 0
                        hasher = _Hasher()
                        on_bytes(0)
                    for chunk in response.iter_bytes(CHUNK):
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
