"""One chat completion asked of an upstream for another dialect, read back as the engine's
pieces (`Delta`s, then the whole tool calls and an `Outcome`), so each dialect writes its own
answer shape from it with the writer it uses for local models.

The upstream is always asked to stream, with usage in its last chunk: one path for whole and
streamed answers, and each piece is passed on as it arrives. Sending goes through `exchange`
(the pool's client and safety, metrics, errors with the upstream's status kept). Events are
bounded (`MAX_EVENT_BYTES`), a whole answer by `max_response_bytes`. Closing the stream (a
client that leaves, a stop sequence matched here) closes the upstream connection, which is how
an OpenAI server learns to stop.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Request

from appliance.api.core import Outcome, until_disconnect
from appliance.engine.output import Delta, ToolCall, ToolCallDelta
from appliance.errors import UpstreamBadAnswer, UpstreamTimeout
from appliance.upstream.exchange import bad, error_message, scrub, send_json
from appliance.upstream.pool import Upstream, UpstreamPool, describe_failure
from appliance.upstream.wire import UpstreamResponse

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 4 * 2**20  # one SSE line; a hostile upstream must not grow it without end


async def open_chat(pool: UpstreamPool, upstream: Upstream, body: dict[str, Any],
                    whole: bool, path: str = "chat/completions") -> UpstreamChat:
    """Send `body` (an OpenAI chat-completions request, or a completions one for `path`
    "completions") streamed; the answer once its headers are in. `whole`: the caller reads
    it all, so it is bounded by max_response_bytes."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    response = await send_json(pool, upstream, path, body, stream=True)
    return UpstreamChat(pool, upstream, response,
                        upstream.settings.max_response_bytes if whole else None)


class UpstreamChat:
    """The upstream's streamed answer as deltas; after `deltas()` ends, `calls` holds the whole
    tool calls and `outcome` the counts (the upstream's usage, or the chunks counted when it
    sent none, e.g. after `cancel()`)."""

    def __init__(self, pool: UpstreamPool, upstream: Upstream, response: UpstreamResponse,
                 limit: int | None) -> None:
        self.pool = pool
        self.upstream = upstream
        self.model: str | None = None  # as the upstream names it
        self.calls: list[ToolCall] = []
        self.outcome: Outcome | None = None
        self._response = response
        self._limit = limit
        self._cancelled = False
        self._finish = "stop"
        self._usage: dict[str, Any] | None = None
        self._chunks = 0
        self._call_parts: dict[int, list[str]] = {}  # index → id, name, arguments so far

    def cancel(self) -> None:
        """Stop reading (a stop sequence matched here): the upstream is closed at once."""
        self._cancelled = True

    def finish(self) -> tuple[Delta, list[ToolCall]]:
        """As a ChatOutputParser ends: nothing held back, and the whole tool calls."""
        return Delta(), self.calls

    async def aclose(self) -> None:
        await self._response.aclose()

    async def deltas(self) -> AsyncIterator[Delta]:
        try:
            async for event in self._events():
                if self._cancelled:
                    break
                delta = self._read(event)
                if delta:
                    yield delta
        finally:
            await self._response.aclose()
        self._finished()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        """The `data:` JSON objects of the SSE stream, up to [DONE]."""
        buffer = b""
        read = 0
        try:
            async for chunk in self._response.aiter_bytes():
                read += len(chunk)
                if self._limit is not None and read > self._limit:
                    raise bad(self.upstream, f"answered with more than {self._limit} bytes "
                               f"(upstreams.{self.upstream.name}.max_response_bytes)")
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > MAX_EVENT_BYTES:
                    raise bad(self.upstream, f"sent an event over {MAX_EVENT_BYTES} bytes")
                for line in lines:
                    data = line.strip()
                    if not data.startswith(b"data:"):
                        continue  # comments, event names, keep-alives
                    data = data[5:].strip()
                    if data == b"[DONE]":
                        return
                    yield self._parse(data)
        except httpx.HTTPError as e:
            kind = "upstream_timeout" if isinstance(e, httpx.TimeoutException) else "bad_gateway"
            self.pool.metrics.upstream_errors.labels(upstream=self.upstream.name,
                                                     kind=kind).inc()
            error = (UpstreamTimeout if kind == "upstream_timeout" else UpstreamBadAnswer)(
                f"upstream {self.upstream.name} broke off the stream: {describe_failure(e)}")
            raise error from None

    def _parse(self, data: bytes) -> dict[str, Any]:
        try:
            event = json.loads(data)
        except ValueError:
            raise bad(self.upstream, "sent an event that is not JSON") from None
        if not isinstance(event, dict):
            raise bad(self.upstream, "sent an event that is not a JSON object")
        if "error" in event:  # an OpenAI server's way to fail mid-stream
            message = scrub(error_message(data), self.upstream.key)
            raise UpstreamBadAnswer(f"upstream {self.upstream.name} failed mid-answer: "
                                    f"{message}")
        return event

    def _read(self, event: dict[str, Any]) -> Delta:
        if isinstance(event.get("model"), str) and self.model is None:
            self.model = event["model"][:256]
        if isinstance(event.get("usage"), dict):
            self._usage = event["usage"]
        choices = event.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return Delta()
        choice = choices[0]  # we never ask for n > 1
        if isinstance(choice.get("finish_reason"), str):
            self._finish = choice["finish_reason"]
        raw = choice.get("delta")
        if not isinstance(raw, dict):  # a /v1/completions chunk carries its text bare
            text = choice.get("text")
            raw = {"content": text} if isinstance(text, str) else None
        if raw is None:
            return Delta()
        self._chunks += 1
        reasoning = raw.get("reasoning_content") or raw.get("reasoning")
        content = raw.get("content")
        return Delta(reasoning=reasoning if isinstance(reasoning, str) else "",
                     content=content if isinstance(content, str) else "",
                     tool_calls=self._tool_call_deltas(raw.get("tool_calls")))

    def _tool_call_deltas(self, raw: Any) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        for item in raw if isinstance(raw, list) else []:
            if not isinstance(item, dict) or not isinstance(item.get("index", 0), int):
                continue
            index = item.get("index", 0)
            function = item.get("function") if isinstance(item.get("function"), dict) else {}
            name, arguments = function.get("name"), function.get("arguments")
            arguments = arguments if isinstance(arguments, str) else ""
            parts = self._call_parts.get(index)
            if parts is None:
                if not isinstance(name, str) or not name:
                    continue  # a call must start with its name
                call_id = item.get("id") if isinstance(item.get("id"), str) else None
                parts = [call_id or f"call_{uuid.uuid4().hex[:24]}", name, ""]
                self._call_parts[index] = parts
                out.append(ToolCallDelta(index, parts[0][:256], name[:256], arguments))
            elif arguments:
                out.append(ToolCallDelta(index, arguments=arguments))
            parts[2] += arguments
            if sum(len(p[2]) for p in self._call_parts.values()) > MAX_EVENT_BYTES:
                raise bad(self.upstream, f"sent tool-call arguments over {MAX_EVENT_BYTES} "
                           "bytes")
        return out

    def _finished(self) -> None:
        self.calls = [ToolCall(p[0][:256], p[1][:256], p[2])
                      for _, p in sorted(self._call_parts.items())]
        usage = self._usage or {}
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        completion = usage.get("completion_tokens")
        finish = "tool_calls" if self.calls and self._finish == "stop" else self._finish
        self.outcome = Outcome(
            finish_reason="stop" if self._cancelled else finish,
            prompt_tokens=_count_of(usage.get("prompt_tokens")),
            completion_tokens=_count_of(completion) if completion is not None else self._chunks,
            cached_tokens=_count_of(cached))


def _count_of(value: Any) -> int:
    return value if isinstance(value, int) and 0 <= value < 2**40 else 0


async def open_for(request: Request, pool: UpstreamPool, upstream: Upstream,
                   body: dict[str, Any], whole: bool, path: str = "chat/completions"
                   ) -> UpstreamChat:
    """`open_chat`, given up (ClientGone) as soon as the client leaves: the upstream may take
    a long prompt's time to send its headers."""
    return await until_disconnect(request, open_chat(pool, upstream, body, whole, path))


async def read_whole(request: Request, chat: UpstreamChat) -> Delta:
    """All of the answer's text (ClientGone as soon as the client leaves); the tool calls and
    the counts are then in `chat.calls` and `chat.outcome`."""
    async def collect() -> Delta:
        reasoning, content = [], []
        async for delta in chat.deltas():
            reasoning.append(delta.reasoning)
            content.append(delta.content)
        return Delta("".join(reasoning), "".join(content))

    try:
        return await until_disconnect(request, collect())
    finally:
        await chat.aclose()
