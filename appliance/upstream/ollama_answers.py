"""Upstream models through Ollama's API: listed by /api/tags and /api/show (from the pool's
cached listings, never a request upstream), and answered on /api/chat, /api/generate and
/api/embed from the upstream's OpenAI answer.

Answers are NDJSON lines as its chunks arrive, or one object, with Ollama's
counts (the upstream's usage) and timings measured here, in nanoseconds. The route passes in
the function that shapes one answer object, the one it uses for local models, so an upstream
answer reads exactly like a local one; errors before the answer are Ollama's `{"error": ...}`
with the upstream's status (the route's error shape), and an error mid-stream ends the stream
with an `{"error": ...}` line, as Ollama does.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from appliance.api.core import ClientGone, GenerationStream, until_disconnect
from appliance.api.ollama_models import DEFAULT_TAG, iso_time, ollama_name
from appliance.engine.output import Delta, ToolCall
from appliance.errors import ApplianceError
from appliance.upstream.chat import UpstreamChat, open_for, read_whole
from appliance.upstream.exchange import bad, post_json
from appliance.upstream.pool import Upstream, UpstreamPool

NDJSON = "application/x-ndjson"
CLIENT_GONE = 499
# Shapes one answer object from a delta, the tool calls, and the final stats (None until done).
Chunk = Callable[[Delta, list[ToolCall], "dict[str, Any] | None"], dict[str, Any]]


# -- listing ----------------------------------------------------------------------------------


def tags(upstreams: UpstreamPool, local: set[str]) -> list[dict[str, Any]]:
    """The upstreams' models (their cached listings) that no local name shadows, marked by
    their upstream; size and digest are the upstream's to know, so they are empty."""
    seen = {name.lower() for name in local}
    out = []
    for item in upstreams.listing(set()):
        name = ollama_name(item["id"])
        if name.lower() in seen:
            continue
        out.append({"name": name, "model": name, "size": 0, "digest": "", "modified_at":
                    iso_time(0), "upstream": item["upstream"],
                    "details": _details(item["upstream"], item["id"])})
    return out


async def upstream_of(upstreams: UpstreamPool, name: str) -> tuple[Upstream, str] | None:
    """The upstream serving an Ollama-style name and its id there (`id:latest` is `id`)."""
    for candidate in dict.fromkeys((name, name.removesuffix(f":{DEFAULT_TAG}"))):
        upstream = await upstreams.route(candidate)
        if upstream is not None:
            return upstream, candidate
    return None


def show(upstream: Upstream, model_id: str) -> dict[str, Any]:
    """/api/show for an upstream model: what its OpenAI listing says, which is nothing of its
    file, template or size."""
    return {"license": "", "modelfile": f"# served by upstream {upstream.name}\n",
            "parameters": "", "template": "", "model_info": {},
            "capabilities": ["completion", "tools"], "modified_at": iso_time(0),
            "upstream": upstream.name, "details": _details(upstream.name, model_id)}


def _details(upstream: str, model_id: str) -> dict[str, Any]:
    return {"format": "", "family": "", "families": None, "parameter_size": "",
            "quantization_level": "", "remote_host": upstream, "remote_model": model_id}


# -- answers ----------------------------------------------------------------------------------


def _line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


@dataclass
class _Clock:
    started: float
    first: float | None = None  # the first text

    def stats(self, chat: UpstreamChat) -> dict[str, Any]:
        outcome = chat.outcome
        assert outcome is not None
        end = time.perf_counter()
        first = self.first or end
        return {"done_reason": "length" if outcome.finish_reason == "length" else "stop",
                "total_duration": _ns(end - self.started), "load_duration": 0,
                "prompt_eval_count": outcome.prompt_tokens,
                "prompt_eval_duration": _ns(first - self.started),
                "eval_count": outcome.completion_tokens,
                # At least 1 ns: clients divide eval_count by it for tokens per second.
                "eval_duration": max(1, _ns(end - first))}


async def answer(request: Request, pool: UpstreamPool, upstream: Upstream,
                 body: dict[str, Any], stream: bool, chunk: Chunk,
                 path: str = "chat/completions") -> Response:
    """The upstream's answer to `body` (an OpenAI request for `path`) in Ollama's shape."""
    clock = _Clock(time.perf_counter())
    try:
        chat = await open_for(request, pool, upstream, body, whole=not stream, path=path)
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
    if stream:
        stack = contextlib.AsyncExitStack()
        stack.push_async_callback(chat.aclose)  # also when the client leaves mid-stream
        return GenerationStream(_stream(chat, chunk, clock), stack, media_type=NDJSON)
    try:
        delta = await read_whole(request, chat)
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(chunk(delta, chat.calls, clock.stats(chat)))


async def _stream(chat: UpstreamChat, chunk: Chunk, clock: _Clock) -> AsyncIterator[bytes]:
    try:
        async for delta in chat.deltas():
            if delta.reasoning or delta.content:
                clock.first = clock.first or time.perf_counter()
                yield _line(chunk(Delta(delta.reasoning, delta.content), [], None))
    except ApplianceError as e:
        yield _line({"error": e.message})
        return
    if chat.calls:
        yield _line(chunk(Delta(), chat.calls, None))
    yield _line(chunk(Delta(), [], clock.stats(chat)))


async def embed(request: Request, pool: UpstreamPool, upstream: Upstream, body: dict[str, Any],
                name: str, count: int, legacy: bool) -> Response:
    """/api/embed (or the legacy /api/embeddings) from the upstream's /v1/embeddings."""
    started = time.perf_counter()
    try:
        data = await until_disconnect(request, post_json(pool, upstream, "embeddings", body))
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
    vectors = _vectors(upstream, data, count)
    if legacy:
        return JSONResponse({"embedding": vectors[0]})
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = usage.get("prompt_tokens")
    return JSONResponse({"model": name, "embeddings": vectors,
                         "total_duration": _ns(time.perf_counter() - started),
                         "load_duration": 0,
                         "prompt_eval_count": tokens if isinstance(tokens, int) else 0})


def _vectors(upstream: Upstream, data: dict[str, Any], count: int) -> list[list[float]]:
    """The vectors in input order; a 502 for anything that is not `count` lists of numbers."""
    items = data.get("data")
    if not isinstance(items, list) or len(items) != count:
        raise bad(upstream, f"answered /embeddings without {count} vectors")
    vectors: list[list[float] | None] = [None] * count
    for position, item in enumerate(items):
        index = item.get("index", position) if isinstance(item, dict) else None
        vector = item.get("embedding") if isinstance(item, dict) else None
        if not (isinstance(index, int) and 0 <= index < count and isinstance(vector, list)
                and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                        for x in vector)):
            raise bad(upstream, "answered /embeddings with something that is not a vector")
        vectors[index] = vector
    if any(v is None for v in vectors):
        raise bad(upstream, "answered /embeddings with a vector missing")
    return vectors  # type: ignore[return-value]
