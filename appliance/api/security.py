"""Safe localhost defaults as one ASGI middleware: Host allowlist (against DNS rebinding),
bearer key when configured, and a request body limit."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.errors import error_body
from appliance.config import LOOPBACK_NAMES

OPEN_PATHS = {"/health"}  # the health check works without a key, for service managers


class _TooLarge(Exception):
    pass


def host_name(header: str) -> str:
    """The host part of a Host header: `127.0.0.1:8471` → `127.0.0.1`, `[::1]:80` → `[::1]`."""
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, *, allowed_hosts: set[str], api_key: str | None,
                 max_body_bytes: int) -> None:
        self.app = app
        self.allowed_hosts = {h.lower() for h in allowed_hosts} | LOOPBACK_NAMES
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = host_name(headers.get("host", "")).lower()
        if host not in self.allowed_hosts:
            await _reject(send, 403, f"host {host or '(none)'!r} is not allowed; add it to "
                          "allowed_hosts to serve it", "permission_error", "host_not_allowed")
            return
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                await _reject(send, 401, "missing or wrong API key (send Authorization: Bearer "
                              "KEY)", "authentication_error", "invalid_api_key")
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _reject(send, 413, f"request body of {length} bytes is over the "
                          f"{self.max_body_bytes}-byte limit", "invalid_request_error",
                          "payload_too_large")
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _reject(send, 413, f"request body is over the {self.max_body_bytes}-byte "
                              "limit", "invalid_request_error", "payload_too_large")


async def _reject(send: Send, status: int, message: str, type_: str, code: str) -> None:
    body = json.dumps(error_body(message, type_, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
