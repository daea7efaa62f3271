"""Anthropic's Messages API: /v1/messages (whole or streamed as Anthropic's SSE events) and
/v1/messages/count_tokens, so an app written for Anthropic's client needs only a new base URL.

Requests go through `core` like every dialect's: the same batching, prefix reuse, cancellation
and bounds. Thinking comes back as `thinking` blocks, Qwen3's `<tool_call>`s as `tool_use`
blocks, and errors in Anthropic's shape, so its client raises its own exception types.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from appliance.api.core import (
    AnswerStops,
    ClientGone,
    Generation,
    GenerationStream,
    Outcome,
    max_new_tokens,
    off_loop,
    prepare_chat,
    sampling_params,
    start_generation,
    until_disconnect,
)
from appliance.api.deps import ManagerDep, MetricsDep, SettingsDep, UpstreamsDep
from appliance.api.grammar import response_grammar, tool_call_grammar
from appliance.api.routes.anthropic_request import (
    Conversation,
    MessagesRequest,
    chat_messages,
    sampling_of,
)
from appliance.engine.output import ChatOutputParser, Delta, ToolCall
from appliance.errors import ApplianceError
from appliance.metrics import Metrics
from appliance.residency.manager import ModelManager
from appliance.residency.model import LoadedModel, Prompt
from appliance.upstream import to_openai
from appliance.upstream.chat import open_for

router = APIRouter()
PREFIX = "/v1/messages"
CLIENT_GONE = 499  # nginx's "client closed request": logged, never seen by anyone
# Our thinking is not Anthropic's, so there is nothing to sign: clients pass it back unchecked.
SIGNATURE = ""

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def anthropic_shape(status: int, message: str, type_: str, param: str | None,
                    code: str | None) -> dict:
    """Anthropic's error body; the type follows the status, as Anthropic's own errors do."""
    kind = ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


# -- the shared preparation ---------------------------------------------------------------------


async def _prompt(model: LoadedModel, body: Conversation, messages: list[dict[str, Any]]
                  ) -> Prompt:
    tools = body.offered_tools
    return await prepare_chat(model, messages, [t.model_dump() for t in tools] if tools else None,
                              body.thinking_on)


@router.post(f"{PREFIX}/count_tokens")
async def count_tokens(body: Conversation, manager: ManagerDep,
                       upstreams: UpstreamsDep) -> Response:
    messages = chat_messages(body)
    if await upstreams.route(body.model) is not None:
        # An OpenAI server cannot count a prompt: an estimate, said so in a header.
        return JSONResponse({"input_tokens": estimate_tokens(body, messages)},
                            headers={"X-Token-Count": "estimated"})
    async with manager.use(body.model) as model:
        prompt = await _prompt(model, body, messages)
    return JSONResponse({"input_tokens": len(prompt.tokens)})


def estimate_tokens(body: Conversation, messages: list[dict[str, Any]]) -> int:
    """An upper estimate of an upstream model's prompt: one token per 3 bytes of the
    conversation and tools as JSON (Qwen's tokenizer averages about 4 bytes a token on English
    and code), so an app that checks whether a prompt fits errs on the side of room."""
    tools = [t.model_dump() for t in body.offered_tools or []]
    size = len(json.dumps([messages, tools], ensure_ascii=False).encode())
    return max(1, -(-size // 3))


@router.post(PREFIX, response_model=None)
async def create_message(body: MessagesRequest, request: Request, manager: ManagerDep,
                         metrics: MetricsDep, settings: SettingsDep,
                         upstreams: UpstreamsDep) -> Response:
    messages = chat_messages(body)  # a malformed conversation is a 400 before any model work
    stack = contextlib.AsyncExitStack()
    if (upstream := await upstreams.route(body.model)) is not None:
        try:
            chat = await open_for(request, upstreams, upstream,
                                  to_openai.anthropic_messages(body, messages),
                                  whole=not body.stream)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        stack.push_async_callback(chat.aclose)  # also when the client leaves mid-stream
        # The prompt's size is known once the upstream's usage comes, at the end.
        source: Source = chat
        name, prompt_tokens = body.model, 0
    else:
        source, name, prompt_tokens = await _local(body, messages, manager, metrics, stack)
    answer = _Answer(source, AnswerStops(source, body.stop_sequences or []),
                     one_call=body.one_call or body.forced_tool is not None,
                     show_thinking=not (body.thinking and body.thinking.display == "omitted"))
    meta = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": name}
    if body.stream:
        return GenerationStream(_stream(answer, meta, prompt_tokens), stack,
                                media_type="text/event-stream")
    async with stack:
        try:
            blocks = await until_disconnect(request, _whole(answer))
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
    return JSONResponse({**meta, "content": blocks, **answer.ending(),
                         "usage": answer.usage()})


async def _local(body: MessagesRequest, messages: list[dict[str, Any]], manager: ModelManager,
                 metrics: Metrics, stack: contextlib.AsyncExitStack
                 ) -> tuple[Source, str, int]:
    """A local model's generation, held by `stack`: its source, the model's id, the prompt's
    token count."""
    tools = body.offered_tools
    forced = body.forced_tool
    grammar = None
    if tools and forced is not None:
        grammar = await off_loop(tool_call_grammar, tools, forced or None)
    elif body.output_format is not None:
        grammar = await off_loop(response_grammar, body.output_format)
    model = await stack.enter_async_context(manager.use(body.model))
    try:
        prompt = await _prompt(model, body, messages)
        generation = start_generation(
            model, prompt.tokens, sampling_params(sampling_of(body), model, grammar),
            max_new_tokens(body.max_tokens, len(prompt.tokens), model, None), [], metrics,
            thinking_budget=body.thinking_budget)
        stack.callback(generation.cancel)
    except BaseException:
        await stack.aclose()
        raise
    parser = ChatOutputParser(prompt=prompt.text, parse_tools=tools is not None,
                              forced_tool=forced is not None)
    return _Local(generation, parser), model.id, len(prompt.tokens)


# -- the answer as blocks -----------------------------------------------------------------------


class Source(Protocol):
    """Where an answer's pieces come from: the engine (through the output parser) or an
    upstream's OpenAI answer (appliance.upstream.chat)."""

    outcome: Outcome | None

    def deltas(self) -> AsyncIterator[Delta]: ...

    def finish(self) -> tuple[Delta, list[ToolCall]]: ...

    def cancel(self) -> None: ...


class _Local:
    """A Generation read through the output parser."""

    def __init__(self, generation: Generation, parser: ChatOutputParser) -> None:
        self.generation = generation
        self.parser = parser

    @property
    def outcome(self) -> Outcome | None:
        return self.generation.outcome

    async def deltas(self) -> AsyncIterator[Delta]:
        async for text in self.generation.texts():
            yield self.parser.feed(text)

    def finish(self) -> tuple[Delta, list[ToolCall]]:
        return self.parser.finish()

    def cancel(self) -> None:
        self.generation.cancel()


@dataclass
class Piece:
    kind: str  # "thinking", "text" or "tool_use"
    text: str = ""
    call: ToolCall | None = None


class _Answer:
    """One generation read as Anthropic content pieces, and how it ended."""

    def __init__(self, source: Source, stops: AnswerStops, one_call: bool,
                 show_thinking: bool) -> None:
        self.source = source
        self.stops = stops
        self.one_call = one_call
        self.show_thinking = show_thinking
        self.called = False

    async def pieces(self) -> AsyncIterator[Piece]:
        async for delta in self.source.deltas():
            if self.stops.stopped:
                continue  # cancelled at a stop sequence: read on only for the final counts
            if delta.reasoning:
                yield self._thought(delta.reasoning)
            if delta.content and (shown := self.stops.feed(delta.content)):
                yield Piece("text", shown)
        if self.stops.stopped:
            return  # whatever the parser still holds came after the stop sequence
        tail, calls = self.source.finish()
        if tail.reasoning:
            yield self._thought(tail.reasoning)
        shown = self.stops.feed(tail.content)
        shown += "" if self.stops.stopped else self.stops.flush()
        if shown:
            yield Piece("text", shown)
        if self.stops.stopped:
            return
        for call in calls[:1] if self.one_call else calls:
            self.called = True
            yield Piece("tool_use", call=call)

    def _thought(self, text: str) -> Piece:
        return Piece("thinking", text if self.show_thinking else "")

    def outcome(self) -> Outcome:
        assert self.source.outcome is not None
        return self.source.outcome

    def ending(self) -> dict[str, Any]:
        if self.stops.matched is not None:
            reason = "stop_sequence"
        elif self.called:
            reason = "tool_use"
        elif self.outcome().finish_reason == "length":
            reason = "max_tokens"
        else:
            reason = "end_turn"
        return {"stop_reason": reason, "stop_sequence": self.stops.matched}

    def usage(self) -> dict[str, int]:
        # Anthropic counts cached prompt tokens apart from input_tokens; the sum is the prompt.
        o = self.outcome()
        return {"input_tokens": o.prompt_tokens - o.cached_tokens,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": o.cached_tokens,
                "output_tokens": o.completion_tokens}


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"),
            "name": call.name, "input": tool_input(call.arguments)}


def tool_input(arguments: str) -> dict[str, Any]:
    """The call's arguments as an object; a model that double-encodes them is forgiven."""
    try:
        value = json.loads(arguments)
        if isinstance(value, str):
            value = json.loads(value)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def empty_block(kind: str) -> dict[str, Any]:
    if kind == "thinking":
        return {"type": "thinking", "thinking": "", "signature": SIGNATURE}
    return {"type": "text", "text": ""}


async def _whole(answer: _Answer) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    async for piece in answer.pieces():
        if piece.kind == "tool_use":
            assert piece.call is not None
            blocks.append(tool_use_block(piece.call))
            continue
        if not blocks or blocks[-1]["type"] != piece.kind:
            blocks.append(empty_block(piece.kind))
        blocks[-1][piece.kind] += piece.text
    if not blocks:
        blocks.append(empty_block("text"))  # an app reading content[0].text finds it
    return blocks


async def _stream(answer: _Answer, meta: dict[str, Any], prompt_tokens: int
                  ) -> AsyncIterator[bytes]:
    # The prompt's cached share is known only at the end: message_delta carries the split.
    yield sse("message_start", {"type": "message_start", "message": {
        **meta, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}})
    index = -1
    open_kind: str | None = None

    def start(block: dict[str, Any]) -> bytes:
        out = sse("content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": block})
        if index == 0:
            out += sse("ping", {"type": "ping"})
        return out

    def stop() -> bytes:
        out = b""
        if open_kind == "thinking":
            out += delta({"type": "signature_delta", "signature": SIGNATURE})
        return out + sse("content_block_stop", {"type": "content_block_stop", "index": index})

    def delta(payload: dict[str, Any]) -> bytes:
        return sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                           "delta": payload})

    try:
        async for piece in answer.pieces():
            if piece.kind != open_kind or piece.kind == "tool_use":
                if open_kind is not None:
                    yield stop()
                index += 1
                open_kind = piece.kind
                if piece.kind == "tool_use":
                    assert piece.call is not None
                    block = tool_use_block(piece.call)
                    # The call is parsed whole, so its input goes out as one input_json_delta.
                    yield start({**block, "input": {}})
                    yield delta({"type": "input_json_delta",
                                 "partial_json": json.dumps(block["input"], ensure_ascii=False)})
                    continue
                yield start(empty_block(piece.kind))
            if piece.text:
                kind = "thinking_delta" if piece.kind == "thinking" else "text_delta"
                yield delta({"type": kind, piece.kind: piece.text})
    except ApplianceError as e:
        yield sse("error", anthropic_shape(e.status, e.message, e.type, e.param, e.code))
        return
    if open_kind is not None:
        yield stop()
    if index < 0:
        index, open_kind = 0, "text"
        yield start(empty_block("text"))
        yield stop()
    yield sse("message_delta", {"type": "message_delta", "delta": answer.ending(),
                                "usage": answer.usage()})
    yield sse("message_stop", {"type": "message_stop"})
