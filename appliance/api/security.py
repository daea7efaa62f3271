"""Safe localhost defaults as one ASGI middleware, in front of everything else (CORS included):

- the Host header must be a loopback name or in `allowed_hosts` (against DNS rebinding);
- a request that changes state and carries an `Origin` must come from `cors_origins` or from the
  daemon's own origin: any web page can POST to 127.0.0.1, even with `mode: 'no-cors'`;
- request bodies to JSON routes must say `application/json` (no form posts from a page); only
  under `/api/` a request with no `Origin` (so from no browser) may use curl's default form type;
- the bearer key (or `x-api-key`, which Anthropic clients send) when one is configured;
- the body is read here, within `max_body_bytes`, chunked or not, so an oversized body is a 413
  before any route sees it; a JSON body nested deeper than `MAX_NESTING` is a 400 (request
  handling walks client JSON recursively: 500 levels in 3 KB reached Python's recursion limit).

The CORS middleware, when `cors_origins` is set, sits outside this one: it answers preflights
(which carry no key) and adds its headers to our refusals, so a page sees why it was refused.
"""

from __future__ import annotations

import hmac
import json
import re
from urllib.parse import urlsplit

import anyio.to_thread
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.errors import ErrorShapes
from appliance.config import LOOPBACK_NAMES

OPEN_PATHS = {"/health"}  # the health check works without a key, for service managers
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
GUARDED_PREFIXES = ("/api/", "/v1/")
CURL_DEFAULT_TYPES = {"", "application/x-www-form-urlencoded"}
MAX_NESTING = 160  # arrays and objects inside each other; a JSON schema may nest 128 (grammar.py)
_STRINGS = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def nests_deeper_than(body: bytes, limit: int) -> bool:
    """Whether a JSON body nests arrays and objects more than `limit` deep (brackets inside
    strings do not count). Blocking: ~60 ms for a few MB of strings."""
    import numpy as np

    brackets = np.frombuffer(_STRINGS.sub(b"", body).translate(None, _NOT_BRACKETS), np.uint8)
    depth = np.cumsum(np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1))
    return bool(depth.size) and int(depth.max()) > limit


def host_name(header: str) -> str:
    """The host part of a Host header: `127.0.0.1:8471` → `127.0.0.1`, `[::1]:80` → `[::1]`."""
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, *, allowed_hosts: set[str], api_key: str | None,
                 max_body_bytes: int, cors_origins: list[str] | None = None,
                 shapes: ErrorShapes | None = None) -> None:
        self.app = app
        self.shapes = shapes or ErrorShapes()
        self.allowed_hosts = {h.lower() for h in allowed_hosts} | LOOPBACK_NAMES
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.cors_origins = {o.rstrip("/").lower() for o in cors_origins or []}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host_header = headers.get("host", "")
        host = host_name(host_header).lower()
        if host not in self.allowed_hosts:
            await self._reject(scope, send, 403, f"host {host or '(none)'!r} is not allowed; "
                               "add it to allowed_hosts to serve it", "permission_error",
                               "host_not_allowed")
            return
        method, path = scope["method"], scope["path"]
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host_header):
            if method in STATE_CHANGING and path.startswith(GUARDED_PREFIXES):
                await self._reject(scope, send, 403, f"requests from the web page at "
                                   f"{origin[:100]!r} are not allowed; add its origin to "
                                   "cors_origins to allow it", "permission_error",
                                   "origin_not_allowed")
                return
        if self.api_key is not None and path not in OPEN_PATHS:
            if not self._key_matches(headers):
                await self._reject(scope, send, 401, "missing or wrong API key (send "
                                   "Authorization: Bearer KEY)", "authentication_error",
                                   "invalid_api_key")
                return
        if method not in STATE_CHANGING:
            await self.app(scope, receive, send)
            return
        content_type = headers.get("content-type", "")
        if (origin is None and path.startswith("/api/")
                and content_type.split(";")[0].strip().lower() in CURL_DEFAULT_TYPES):
            # `curl -d` (Ollama's documented way) sends a form type; a request without Origin
            # comes from no browser, so its JSON body is read as JSON.
            scope = _with_json_type(scope)
            content_type = "application/json"
        if path.startswith(GUARDED_PREFIXES) and not is_json_type(content_type):
            length = headers.get("content-length")
            if length not in (None, "0") or "transfer-encoding" in headers:
                await self._reject(scope, send, 415, "request bodies must be JSON "
                                   "(Content-Type: application/json)", "invalid_request_error",
                                   "unsupported_media_type")
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._too_large(scope, send, length)
            return
        body = await self._read_body(receive)
        if body is None:
            await self._too_large(scope, send, None)
            return
        # Fewer opening brackets than the limit (almost every body) cannot nest past it: only
        # the rest is scanned, off the event loop.
        if (is_json_type(content_type) and body.count(b"[") + body.count(b"{") > MAX_NESTING
                and await anyio.to_thread.run_sync(nests_deeper_than, body, MAX_NESTING)):
            await self._reject(scope, send, 400, f"the JSON body nests arrays and objects "
                               f"deeper than {MAX_NESTING} levels", "invalid_request_error",
                               "json_too_deep")
            return
        await self.app(scope, _replay(body, receive), send)

    def _origin_allowed(self, origin: str, host_header: str) -> bool:
        normalized = origin.rstrip("/").lower()
        if normalized in self.cors_origins:
            return True
        # The daemon's own pages (/docs) send their own origin.
        parts = urlsplit(normalized)
        return parts.scheme in ("http", "https") and parts.netloc == host_header.lower()

    def _key_matches(self, headers: dict[str, str]) -> bool:
        assert self.api_key is not None
        given = headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
        return hmac.compare_digest(token.encode(), self.api_key.encode())

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the limit (the rest is not read)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # the client left; the route sees a short body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _reject(self, scope: Scope, send: Send, status: int, message: str, type_: str,
                      code: str) -> None:
        body = self.shapes.body(scope["path"], status, message, type_, None, code)
        await reject(send, status, body)

    async def _too_large(self, scope: Scope, send: Send, length: str | None) -> None:
        size = f"of {length} bytes " if length and length.isdigit() else ""
        await self._reject(scope, send, 413, f"request body {size}is over the "
                           f"{self.max_body_bytes}-byte limit", "invalid_request_error",
                           "payload_too_large")


def _with_json_type(scope: Scope) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands out the buffered body once, then waits for the disconnect."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def reject(send: Send, status: int, body_json: dict) -> None:
    body = json.dumps(body_json).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
