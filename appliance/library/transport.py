"""One GET to the hub, as the library makes it: over the standard library's http.client
(measured on localhost, huggingface-hub's httpx2 session streams 64-72 MB/s where http.client
reads 900 MB/s, and importing that session cost every `appliance pull` ~0.5 s before its first
byte), or through huggingface-hub's session where a proxy is configured (HTTPS_PROXY and
friends: it honours them). Redirects (the hub sends LFS files to a CDN) are followed, without
the token on another host. Transport failures and 5xx become HubUnreachable (a download retries
them); 4xx statuses become our typed errors by the caller's `Refusal`.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any
from urllib.parse import urljoin, urlsplit

from appliance.library.errors import (
    OFFLINE_HINT,
    TOKEN_HINT,
    BadHubAnswer,
    GatedRepo,
    HubUnreachable,
    LibraryError,
    RepoNotFound,
)

MAX_REDIRECTS = 5

# Receives into the view it is given, with at most one system call; the count, 0 at the end.
Reader = Callable[[memoryview], int]
# Raises our error for a status of 400 or more, given the hub's X-Error-Code header.
Refusal = Callable[[int, str | None], None]


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
def stream(url: str, headers: dict[str, str], repo: str, timeout: float,
           refusal: Refusal | None = None) -> Iterator[tuple[int, Reader, Callable[[], None]]]:
    """(status, read, abort) for a GET of `url`; http.client, or huggingface-hub's session
    behind a proxy. Transport failures and 5xx become HubUnreachable (retried), 4xx our typed
    errors (`refusal`; by default a download's: the file is gone, or it needs a token).
    `abort` (from another thread) makes a waiting read return."""
    if proxied(url):
        from huggingface_hub.utils import get_session, hf_raise_for_status

        with hub_errors(repo), get_session().stream("GET", url, headers=headers,
                                                    follow_redirects=True,
                                                    timeout=timeout) as response:
            hf_raise_for_status(response)
            yield response.status_code, _Chunks(response.iter_bytes(2**20)), response.close
        return
    with _direct(url, headers, repo, timeout, refusal or partial(file_refusal, repo)) as answer:
        yield answer


def proxied(url: str) -> bool:
    return bool(urllib.request.getproxies().get(urlsplit(url).scheme))


def read_all(read: Reader, limit: int, what: str) -> bytes:
    """A whole (small) body, refused past `limit` bytes: a hostile mirror's answer is bounded."""
    body = bytearray()
    piece = bytearray(2**16)
    while got := read(memoryview(piece)):
        body += piece[:got]
        if len(body) > limit:
            raise BadHubAnswer(f"the hub's answer about {what} is over {limit} bytes",
                               "check HF_ENDPOINT, or try again later")
    return bytes(body)


def _unreachable(repo: str, e: Exception) -> HubUnreachable:
    return HubUnreachable(f"cannot reach the hub for {repo} ({type(e).__name__})", OFFLINE_HINT)


@contextlib.contextmanager
def _direct(url: str, headers: dict[str, str], repo: str, timeout: float,
            refusal: Refusal) -> Iterator[tuple[int, Reader, Callable[[], None]]]:
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
                refusal(response.status, response.getheader("X-Error-Code"))
                raise HubUnreachable(f"the hub answered HTTP {response.status} for {repo}",
                                     OFFLINE_HINT)

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


def file_refusal(repo: str, status: int, code: str | None) -> None:
    if code == "GatedRepo" or status in (401, 403):
        raise GatedRepo(f"hub repository {repo} is gated or private", TOKEN_HINT)
    if status in (404, 410):
        raise RepoNotFound(f"a file of {repo} is gone from the hub (HTTP {status})",
                           "pull again: the repo may have changed")
    raise HubUnreachable(f"the hub answered HTTP {status} for {repo}", OFFLINE_HINT)


class hub_errors:
    """Turn huggingface-hub's exceptions into ours, each one line with a hint."""

    def __init__(self, repo: str, revision: str | None = None) -> None:
        self.repo = repo
        self.revision = revision

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: Any) -> bool:
        if error is None or isinstance(error, LibraryError):
            return False
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if isinstance(error, GatedRepoError):
            raise GatedRepo(f"hub repository {self.repo} is gated", TOKEN_HINT) from None
        if isinstance(error, RevisionNotFoundError):
            raise RepoNotFound(f"hub repository {self.repo} has no revision {self.revision}",
                               "leave out --revision for the main branch") from None
        if isinstance(error, RepositoryNotFoundError):
            status = getattr(getattr(error, "response", None), "status_code", 404)
            if status == 401:
                raise GatedRepo(f"hub repository {self.repo} needs a token (it is private, "
                                "gated or absent)", TOKEN_HINT) from None
            raise RepoNotFound(f"hub repository {self.repo} does not exist",
                               "check the spelling, e.g. Qwen/Qwen3-8B-GGUF") from None
        if isinstance(error, OfflineModeIsEnabled):
            raise HubUnreachable("HF_HUB_OFFLINE is set: the hub is not asked",
                                 "unset HF_HUB_OFFLINE, or pull a local file") from None
        if isinstance(error, HfHubHTTPError):
            status = getattr(getattr(error, "response", None), "status_code", None)
            raise HubUnreachable(f"the hub answered HTTP {status} for {self.repo}",
                                 OFFLINE_HINT) from None
        if isinstance(error, OSError) or _is_transport_error(error):
            raise HubUnreachable(f"cannot reach the hub for {self.repo} "
                                 f"({type(error).__name__})", OFFLINE_HINT) from None
        return False


def _is_transport_error(error: BaseException) -> bool:
    """httpx's (or huggingface-hub's httpx2's) connection and timeout errors."""
    return any(c.__name__ in ("TransportError", "TimeoutException", "NetworkError")
               for c in type(error).__mro__)
