"""A small local stand-in for the Hugging Face hub, speaking the endpoints huggingface-hub uses:
model info (`/api/models/{repo}[/revision/{rev}]`, with siblings and LFS sha256s when asked for
`blobs`) and file download (`/{repo}/resolve/{rev}/{file}`: HEAD with X-Repo-Commit, ETag /
X-Linked-Etag = sha256, X-Linked-Size; GET with Range). 127.0.0.1 only, threads, bounded.

Faults on demand: a download cut once after a fraction of its bytes, a file served corrupted,
a gated repo (401 GatedRepo), and a count of what was served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_MIN = 1024  # files at least this big are "LFS" files, with a sha256 in the metadata


@dataclass
class HubFile:
    path: Path
    sha256: str
    size: int

    @classmethod
    def of(cls, path: Path) -> HubFile:
        sha = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(2**22):
                sha.update(chunk)
        return cls(path, sha.hexdigest(), path.stat().st_size)


@dataclass
class HubRepo:
    files: dict[str, HubFile]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False


@dataclass
class Faults:
    cut_once: dict[str, float] = field(default_factory=dict)  # file -> fraction sent, first GET
    corrupt: set[str] = field(default_factory=set)  # files served with one byte flipped
    down: bool = False  # every request gets its connection closed
    rate: int | None = None  # bytes per second of each file GET (a slow network), or no limit


class LocalHub:
    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.faults = Faults()
        self.gets: Counter[str] = Counter()  # file GETs by "repo/file"
        self.starts: list[tuple[str, int]] = []  # (repo/file, first byte) of each file GET
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.gate: threading.Event | None = None  # when given: downloads wait for it (bounded)

    def add(self, repo: str, files: dict[str, Path], gated: bool = False) -> HubRepo:
        entry = HubRepo({name: HubFile.of(path) for name, path in files.items()}, gated=gated)
        self.repos[repo] = entry
        return entry

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _json(self, status: int, data: object, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            self._json(status, {"error": message}, {"X-Error-Code": code,
                                                     "X-Error-Message": message})

        def _repo(self, name: str) -> HubRepo | None:
            repo = hub.repos.get(name)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if repo.gated and "authorization" not in {k.lower() for k in self.headers}:
                self._error(401, "GatedRepo", "Access to model is restricted")
                return None
            return repo

        def do_GET(self) -> None:
            self._serve()

        def do_HEAD(self) -> None:
            self._serve()

        def _serve(self) -> None:
            if hub.faults.down:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            path = unquote(urlsplit(self.path).path)
            if (match := _INFO.match(path)) and self.command == "GET":
                repo = self._repo(match["repo"])
                if repo is None:
                    return
                if match["rev"] not in (None, "main", repo.commit):
                    self._error(404, "RevisionNotFound", "Invalid rev id")
                    return
                blobs = "blobs=" in (urlsplit(self.path).query or "")
                siblings = []
                for name, f in sorted(repo.files.items()):
                    item: dict[str, object] = {"rfilename": name}
                    if blobs:
                        item.update(size=f.size, blobId=f.sha256[:40])
                        if f.size >= LFS_MIN:
                            item["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
                    siblings.append(item)
                self._json(200, {"id": match["repo"], "modelId": match["repo"],
                                 "sha": repo.commit, "private": False, "gated": repo.gated,
                                 "siblings": siblings, "tags": []})
                return
            if match := _RESOLVE.match(path):
                repo = self._repo(match["repo"])
                if repo is None:
                    return
                f = repo.files.get(match["file"])
                if f is None or match["rev"] not in ("main", repo.commit):
                    self._error(404, "EntryNotFound", "Entry not found")
                    return
                self._file(f"{match['repo']}/{match['file']}", repo, f)
                return
            self._error(404, "NotFound", "not found")

        def _file(self, key: str, repo: HubRepo, f: HubFile) -> None:
            start, end = 0, f.size - 1
            status = 200
            wanted = self.headers.get("Range")
            if wanted and (m := _RANGE.match(wanted)):
                start = int(m[1])
                end = int(m[2]) if m[2] else f.size - 1
                if start >= f.size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{f.size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            length = end - start + 1
            self.send_response(status)
            self.send_header("X-Repo-Commit", repo.commit)
            etag = f'"{f.sha256}"' if f.size >= LFS_MIN else f'"{f.sha256[:40]}"'
            self.send_header("ETag", etag)
            if f.size >= LFS_MIN:
                self.send_header("X-Linked-Etag", etag)
                self.send_header("X-Linked-Size", str(f.size))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
            self.end_headers()
            if self.command == "HEAD":
                return
            with hub.lock:
                hub.gets[key] += 1
                hub.starts.append((key, start))
                cut = hub.faults.cut_once.pop(key, None)
            if hub.gate is not None:
                hub.gate.wait(300)  # a bound: a test that forgets the gate still ends
            send = length if cut is None else max(0, int(f.size * cut) - start)
            if key in hub.faults.corrupt:
                data = bytearray(f.path.read_bytes()[start:start + send])
                data[len(data) // 2] ^= 0xFF
                self.wfile.write(bytes(data))
            elif hub.faults.rate:
                _send_slowly(self, f.path, start, send, hub.faults.rate)
            else:
                with f.path.open("rb") as src:
                    offset, left = start, send
                    while left > 0:  # sendfile: the bench compares us with curl, not the server
                        try:
                            n = os.sendfile(self.connection.fileno(), src.fileno(), offset, left)
                        except (BrokenPipeError, ConnectionResetError):
                            return  # the client left (a cancelled pull)
                        if n == 0:
                            break
                        offset, left = offset + n, left - n
            if cut is not None:  # the connection drops mid-file, as real networks do
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(2)

    return Handler


def _send_slowly(handler: BaseHTTPRequestHandler, path: Path, start: int, length: int,
                 rate: int) -> None:
    """`length` bytes from `start` at about `rate` bytes per second, in small pieces."""
    piece = max(1, rate // 20)
    with path.open("rb") as src:
        src.seek(start)
        began = time.monotonic()
        sent = 0
        while sent < length:
            data = src.read(min(piece, length - sent))
            if not data:
                return
            try:
                handler.wfile.write(data)
            except OSError:  # the client left (a cancelled pull)
                return
            sent += len(data)
            ahead = sent / rate - (time.monotonic() - began)
            if ahead > 0:
                time.sleep(ahead)


class _HubServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that drops its connection (a pull cancelled, a daemon stopped with a
        keep-alive connection open) is normal for a hub: no traceback on stderr for it."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(hub: LocalHub) -> Iterator[LocalHub]:
    server = _HubServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.server = server
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def main() -> None:
    """Serve files as one hub repo from a process of its own, so a bench's pull shares no
    interpreter (no GIL) with the server, as with a real hub: prints the URL, serves until its
    stdin closes.  python -m tests.library.hub_server owner/name NAME=PATH ..."""
    repo, *files = sys.argv[1:]
    hub = LocalHub()
    hub.add(repo, {name: Path(path) for name, path in (f.split("=", 1) for f in files)})
    with serve(hub):
        print(hub.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
