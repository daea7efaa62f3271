"""Forward one OpenAI request to an upstream and its answer back, after our own checks.

By the time a request gets here the security layer (Host, Origin, key, body size, JSON type)
and the route's validation have passed. What goes upstream is the client's JSON body as sent
and our own headers only: the upstream's key replaces the client's, nothing else of the
client's request (cookies, x-api-key, ...) is passed on.

- Streams pass through chunk by chunk as they arrive (no re-parsing, no buffering); a client
  that leaves closes the upstream connection, which is how an OpenAI server learns to stop.
- A non-streamed answer is read up to `max_response_bytes` and within `timeout_s` in all.
- Upstream errors keep their status and OpenAI body; anything not in that shape is wrapped in
  it. A refused connection is a 503 with Retry-After, a timeout 504, and a broken or oversized
  answer, a redirect, or our key refused upstream (401/403) a 502 naming the upstream.
- The upstream's key is scrubbed from any body we hold whole, should a server ever echo it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import Request
from fastapi.responses import Response

from appliance.api.core import ClientGone, GenerationStream, until_disconnect
from appliance.api.errors import error_body
from appliance.errors import (
    ApplianceError,
    UpstreamBadAnswer,
)
from appliance.upstream.exchange import (
    MAX_ERROR_BYTES,
    bad,
    error_message,
    guarded_send,
    refuse_redirect_or_key,
    scrub,
)
from appliance.upstream.pool import Upstream, UpstreamPool, describe_failure, read_bounded
from appliance.upstream.wire import UpstreamResponse

log = logging.getLogger(__name__)

CLIENT_GONE = 499
STREAM_TYPES = ("text/event-stream", "application/json", "application/x-ndjson")
PASSED_HEADERS = ("retry-after",)  # of the upstream's response headers, only these


async def proxy(pool: UpstreamPool, upstream: Upstream, request: Request, path: str,
                stream: bool) -> Response:
    """The upstream's answer to the client's request, as a response to send back."""
    requests = pool.metrics.upstream_requests
    try:
        answer = await _proxy(pool, upstream, request, path, stream)
    except ApplianceError as e:
        requests.labels(upstream=upstream.name, status=str(e.status)).inc()
        pool.metrics.upstream_errors.labels(upstream=upstream.name, kind=e.code or "error").inc()
        raise
    requests.labels(upstream=upstream.name, status=str(answer.status_code)).inc()
    return answer


async def _proxy(pool: UpstreamPool, upstream: Upstream, request: Request, path: str,
                 stream: bool) -> Response:
    body = await request.body()  # the bytes FastAPI read and validated; cached
    headers = {"Content-Type": "application/json",
               "Accept": "text/event-stream" if stream else "application/json"}
    started = time.perf_counter()
    try:
        answer = await until_disconnect(request, _send(pool, upstream, path, body, headers,
                                                       stream))
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
    response = answer.response
    pool.metrics.upstream_latency.labels(upstream=upstream.name).observe(
        time.perf_counter() - started)
    if answer.content is None and response.status_code == 200:
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith(STREAM_TYPES):
            await response.aclose()
            raise bad(upstream, f"answered a stream as {content_type[:60] or 'no type'!r}")
        stack = contextlib.AsyncExitStack()
        stack.push_async_callback(response.aclose)  # also when the client leaves mid-stream
        return GenerationStream(_relay(pool, upstream, response, content_type), stack,
                                media_type=content_type)
    content = answer.content
    if content is None:  # an error answer to a stream request: read its message, let go
        try:
            content = await until_disconnect(request, read_bounded(response, MAX_ERROR_BYTES))
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        except (ValueError, httpx.HTTPError) as e:
            content = str(e).encode()
        finally:
            await response.aclose()
    return _whole(upstream, response, content)


@dataclass
class _Answer:
    response: UpstreamResponse
    content: bytes | None  # None: the body is still to be streamed


async def _send(pool: UpstreamPool, upstream: Upstream, path: str, body: bytes,
                headers: dict[str, str], stream: bool) -> _Answer:
    """The upstream's response with its headers read, and its whole body unless streamed."""
    async def once() -> _Answer:
        if stream:
            return _Answer(await upstream.wire.post(path, body, headers), None)
        return await asyncio.wait_for(_send_whole(upstream, path, body, headers),
                                      upstream.settings.timeout_s)
    return await guarded_send(pool, upstream, once)


async def _send_whole(upstream: Upstream, path: str, body: bytes, headers: dict[str, str]
                      ) -> _Answer:
    """Send, and read the body within the upstream's size limit (a bounded buffer)."""
    response = await upstream.wire.post(path, body, headers)
    try:
        limit = upstream.settings.max_response_bytes
        try:
            return _Answer(response, await read_bounded(response, limit))
        except ValueError:
            raise UpstreamBadAnswer(f"upstream {upstream.name} answered with more than {limit} "
                                    f"bytes (upstreams.{upstream.name}.max_response_bytes)"
                                    ) from None
    finally:
        await response.aclose()


def _whole(upstream: Upstream, response: UpstreamResponse, content: bytes) -> Response:
    """A complete answer, or an error answer, with the upstream's status."""
    status = response.status_code
    refuse_redirect_or_key(upstream, response)
    content = scrub(content, upstream.key)
    headers = {k: v for k in PASSED_HEADERS if (v := response.headers.get(k))}
    if status >= 400:
        return Response(_error_json(upstream, status, content), status_code=status,
                        headers=headers, media_type="application/json")
    if "json" not in response.headers.get("content-type", ""):
        raise bad(upstream, "answered with something that is not JSON")
    return Response(content, status_code=status, headers=headers,
                    media_type="application/json")


async def _relay(pool: UpstreamPool, upstream: Upstream, response: UpstreamResponse,
                 content_type: str) -> AsyncIterator[bytes]:
    """The upstream's stream, each chunk passed on as it arrives."""
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.HTTPError as e:
        kind = "upstream_timeout" if isinstance(e, httpx.TimeoutException) else "bad_gateway"
        pool.metrics.upstream_errors.labels(upstream=upstream.name, kind=kind).inc()
        message = (f"upstream {upstream.name} broke off the stream: {describe_failure(e)}")
        log.warning("%s", message)
        if content_type.startswith("text/event-stream"):
            # A blank line first: the upstream may have stopped in the middle of an event.
            event = json.dumps(error_body(message, "server_error", None, kind))
            yield f"\n\ndata: {event}\n\ndata: [DONE]\n\n".encode()


def _error_json(upstream: Upstream, status: int, content: bytes) -> bytes:
    """The upstream's error as sent when it is OpenAI-shaped; otherwise wrapped in that shape."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and isinstance(
            data["error"].get("message"), str):
        return content
    message = f"upstream {upstream.name} answered HTTP {status}: {error_message(content)}"
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps(error_body(message, kind, None, "upstream_error")).encode()


async def routed(pool: UpstreamPool, request: Request, model: str | None, path: str,
                 stream: bool = False) -> Response | None:
    """The upstream's answer when `model` is an upstream model; None when it is ours."""
    upstream = await pool.route(model)
    if upstream is None:
        return None
    return await proxy(pool, upstream, request, path, stream)
