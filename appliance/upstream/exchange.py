"""One request of ours to an upstream, for the dialects that translate rather than pass through:
sent with the pool's client (our own headers and the upstream's key only, no redirects
followed, `timeout_s`), counted in the per-upstream metrics, and every failure turned into our
error with the upstream's status kept (`UpstreamAnswered`): unreachable → 503 with
Retry-After, a timeout → 504, a redirect, a refused key or a broken answer → 502. Messages we
pass on never hold the upstream's key.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, AnyStr, TypeVar

import httpx

from appliance.errors import (
    ApplianceError,
    UpstreamAnswered,
    UpstreamBadAnswer,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from appliance.upstream.pool import RETRY_S, Upstream, UpstreamPool, describe_failure, read_bounded
from appliance.upstream.wire import UpstreamResponse

MAX_ERROR_BYTES = 64 * 2**10  # an upstream's error body; more is not an error message
MAX_ERROR_MESSAGE = 500  # characters of it quoted in ours
EVENT_STREAM = "text/event-stream"
T = TypeVar("T")


async def send_json(pool: UpstreamPool, upstream: Upstream, path: str, body: dict[str, Any],
                    stream: bool) -> UpstreamResponse:
    """POST `body` to `path`; the response once its headers are in, a 200 of the expected
    type (an event stream when `stream`, JSON otherwise), its body still to be read."""
    content = json.dumps(body, ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json",
               "Accept": EVENT_STREAM if stream else "application/json"}
    started = time.perf_counter()
    try:
        response = await guarded_send(pool, upstream,
                                      lambda: upstream.wire.post(path, content, headers))
        pool.metrics.upstream_latency.labels(upstream=upstream.name).observe(
            time.perf_counter() - started)
        await _check(upstream, response, EVENT_STREAM if stream else "application/json")
    except ApplianceError as e:
        count(pool, upstream, e.status, e.code or "error")
        raise
    count(pool, upstream, 200, None)
    return response


async def post_json(pool: UpstreamPool, upstream: Upstream, path: str, body: dict[str, Any]
                    ) -> dict[str, Any]:
    """The upstream's whole JSON answer, read within max_response_bytes and timeout_s."""
    async def whole() -> dict[str, Any]:
        response = await send_json(pool, upstream, path, body, stream=False)
        limit = upstream.settings.max_response_bytes
        try:
            content = await read_bounded(response, limit)
        except ValueError:
            raise bad(upstream, f"answered with more than {limit} bytes "
                      f"(upstreams.{upstream.name}.max_response_bytes)") from None
        except httpx.HTTPError as e:
            raise bad(upstream, f"broke off its answer: {describe_failure(e)}") from None
        finally:
            await response.aclose()
        try:
            data = json.loads(content)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise bad(upstream, "answered with something that is not a JSON object")
        return data

    try:
        return await asyncio.wait_for(whole(), upstream.settings.timeout_s)
    except (TimeoutError, asyncio.TimeoutError):
        raise _timeout(upstream) from None


def count(pool: UpstreamPool, upstream: Upstream, status: int, error: str | None) -> None:
    pool.metrics.upstream_requests.labels(upstream=upstream.name, status=str(status)).inc()
    if error is not None:
        pool.metrics.upstream_errors.labels(upstream=upstream.name, kind=error).inc()


def _timeout(upstream: Upstream) -> UpstreamTimeout:
    return UpstreamTimeout(f"upstream {upstream.name} ({upstream.url}) did not answer within "
                           f"{upstream.settings.timeout_s:g} s (upstreams.{upstream.name}"
                           ".timeout_s)")


async def guarded_send(pool: UpstreamPool, upstream: Upstream,
                       send: Callable[[], Awaitable[T]]) -> T:
    """`send()`, once more on a fresh connection if a pooled one was closed under us, with every
    transport failure turned into our error: unreachable (503 + Retry-After, and the pool told),
    too slow (504), anything else broken (502)."""
    try:
        try:
            return await send()
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            # A pooled connection the upstream closed just as we sent (an end of file, or a
            # reset once the close is through): nothing was answered, so at most a generation
            # is started twice.
            return await send()
    except (TimeoutError, asyncio.TimeoutError, httpx.TimeoutException):
        raise _timeout(upstream) from None
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError,
            httpx.WriteError) as e:
        reason = describe_failure(e)
        pool.unreachable(upstream, reason)
        raise UpstreamUnavailable(f"upstream {upstream.name} ({upstream.url}) is unreachable: "
                                  f"{reason}; retry later", retry_after=RETRY_S) from None
    except httpx.HTTPError as e:
        raise bad(upstream, describe_failure(e)) from None


async def _check(upstream: Upstream, response: UpstreamResponse, expected: str) -> None:
    """Raise for anything but a 200 of the `expected` type, closing the response."""
    status = response.status_code
    if status == 200 and expected in response.headers.get("content-type", ""):
        return
    try:
        content = b"" if 300 <= status < 400 else await read_bounded(response, MAX_ERROR_BYTES)
    except (ValueError, httpx.HTTPError) as e:
        content = str(e).encode()
    finally:
        await response.aclose()
    refuse_redirect_or_key(upstream, response)
    if status == 200:
        kind = response.headers.get("content-type", "no type")[:60]
        raise bad(upstream, f"answered with {kind!r} where {expected} was asked for")
    message = scrub(error_message(content), upstream.key)
    raise UpstreamAnswered(f"upstream {upstream.name} answered HTTP {status}: {message}",
                           status=status, retry_after=_retry_after(response))


def _retry_after(response: UpstreamResponse) -> float | None:
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return seconds if 0 < seconds < 86400 else None


def refuse_redirect_or_key(upstream: Upstream, response: UpstreamResponse) -> None:
    """A redirect (never followed) or our key refused (401/403: the client's key was ours and
    was right, so this is our config) is a bad answer, whatever the dialect."""
    status = response.status_code
    if 300 <= status < 400:
        raise bad(upstream, f"answered a redirect (HTTP {status}) to "
                  f"{response.headers.get('location', '?')[:200]!r}, which is not followed; "
                  f"fix upstreams.{upstream.name}.url")
    if status in (401, 403):
        raise bad(upstream, f"refused our key (HTTP {status}); check "
                  f"upstreams.{upstream.name}.api_key_file")


def error_message(content: bytes) -> str:
    """The message of an OpenAI error body, of `{"error": "text"}`, or the text itself."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        text = error["message"]
    elif isinstance(error, str):
        text = error
    else:
        text = content.decode("utf-8", errors="replace").strip()
    return text[:MAX_ERROR_MESSAGE]


def scrub(text: AnyStr, key: str | None) -> AnyStr:
    """The text (or body) without the upstream's key in it (a server that echoes headers in
    errors)."""
    if not key or len(key) < 4:
        return text
    if isinstance(text, bytes):
        return text.replace(key.encode(), b"[upstream key removed]")
    return text.replace(key, "[upstream key removed]")


def bad(upstream: Upstream, what: str) -> UpstreamBadAnswer:
    return UpstreamBadAnswer(f"upstream {upstream.name} ({upstream.url}) {what}")
