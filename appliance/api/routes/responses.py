"""OpenAI's Responses API, stateless: POST /v1/responses, whole or streamed as the Responses
events, so an app written for `client.responses` needs only a new base URL.

Requests go through `core` like every dialect's: the same batching, prefix reuse, bounded
grammars, cancellation and errors (OpenAI's shape, the default under /v1/). Qwen3's thinking
becomes a `reasoning` item, its `<tool_call>`s `function_call` items, the answer a `message`.
Nothing is stored: a tool loop sends the whole conversation back in `input` each turn.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from appliance.api.core import (
    ClientGone,
    Generation,
    GenerationStream,
    Outcome,
    grammar_waits_for_thinking,
    max_new_tokens,
    off_loop,
    prepare_chat,
    sampling_params,
    until_disconnect,
)
from appliance.api.deps import ManagerDep, MetricsDep, SettingsDep, UpstreamsDep
from appliance.api.grammar import schema_grammar, tool_call_grammar
from appliance.api.routes.responses_request import ResponsesRequest, chat_messages
from appliance.config import Settings
from appliance.engine.output import ChatOutputParser, Delta
from appliance.errors import ApplianceError
from appliance.metrics import Metrics
from appliance.residency.manager import ModelManager
from appliance.upstream import to_openai
from appliance.upstream.chat import open_for

router = APIRouter()
PATH = "/v1/responses"
CLIENT_GONE = 499  # nginx's "client closed request": logged, never seen by anyone


def _grammar(body: ResponsesRequest) -> str | None:
    """Blocking: the grammar for a forced function call or for text.format, by core's bounded
    path (errors name the field: tools.N... or text.format.schema...)."""
    tools = body.offered_tools
    forced = body.forced_tool
    if tools and forced is not None:
        return tool_call_grammar(tools, forced or None, "tools.{}.parameters")
    fmt = body.text_format
    if fmt.type == "json_object":
        return schema_grammar({"type": "object"}, "text.format")
    if fmt.type == "json_schema":
        return schema_grammar(fmt.schema_ or {"type": "object"}, "text.format.schema")
    return None


@router.post(PATH, response_model=None)
async def create_response(body: ResponsesRequest, request: Request, manager: ManagerDep,
                          metrics: MetricsDep, settings: SettingsDep,
                          upstreams: UpstreamsDep) -> Response:
    messages = chat_messages(body)  # a malformed conversation is a 400 before any model work
    stack = contextlib.AsyncExitStack()
    if (upstream := await upstreams.route(body.model)) is not None:
        try:
            chat = await open_for(request, upstreams, upstream,
                                  to_openai.responses(body, messages), whole=not body.stream)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        stack.push_async_callback(chat.aclose)  # also when the client leaves mid-stream
        deltas, done, name = chat.deltas(), chat, body.model
    else:
        generation, parser, name = await _local(body, messages, manager, metrics, settings,
                                                stack)
        deltas, done = _deltas(generation, parser), generation
    shell = {"id": f"resp_{uuid.uuid4().hex}", "object": "response",
             "created_at": int(time.time()), "model": name, **body.echo()}
    writer = _Writer(shell, body.call_limit, streaming=body.stream)
    if body.stream:
        return GenerationStream(_stream(deltas, done, writer), stack,
                                media_type="text/event-stream")
    async with stack:
        try:
            await until_disconnect(request, _whole(deltas, done, writer))
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
    return JSONResponse(writer.final(done))


async def _local(body: ResponsesRequest, messages: list[dict[str, Any]], manager: ModelManager,
                 metrics: Metrics, settings: Settings, stack: contextlib.AsyncExitStack
                 ) -> tuple[Generation, ChatOutputParser, str]:
    """A local model's generation, held by `stack`, its output parser and the model's id."""
    tools = body.offered_tools
    grammar = await off_loop(_grammar, body)
    model = await stack.enter_async_context(manager.use(body.model))
    try:
        thinking = body.thinking(model.enable_thinking)
        # As on chat completions: with thinking on, a grammar shapes what follows </think>.
        after_think = grammar is not None and thinking and grammar_waits_for_thinking(model)
        if grammar is not None and not after_think:
            thinking = False
        prompt = await prepare_chat(model, messages,
                                    [t.model_dump() for t in tools] if tools else None, thinking)
        generation = Generation(model, prompt.tokens,
                                sampling_params(body.sampling(), model, grammar, after_think),
                                max_new_tokens(body.max_output_tokens, len(prompt.tokens), model,
                                               settings.max_tokens_default),
                                [], metrics, body.thinking_budget, open_thinking=after_think)
        stack.callback(generation.cancel)
        parser = ChatOutputParser(prompt=prompt.text + ("<think>\n" if after_think else ""),
                                  parse_tools=tools is not None,
                                  forced_tool=body.forced_tool is not None)
    except BaseException:
        await stack.aclose()
        raise
    return generation, parser, model.id


class Finished(Protocol):
    """What the writer reads of a finished answer: a Generation's or an upstream's outcome."""

    @property
    def outcome(self) -> Outcome | None: ...


async def _deltas(generation: Generation, parser: ChatOutputParser) -> AsyncIterator[Delta]:
    async for text in generation.texts():
        delta = parser.feed(text)
        if delta:
            yield delta
    tail, _ = parser.finish()
    if tail:
        yield tail


async def _whole(deltas: AsyncIterator[Delta], done: Finished, writer: _Writer) -> None:
    async for delta in deltas:
        writer.feed(delta)
    writer.close(done)


async def _stream(deltas: AsyncIterator[Delta], done: Finished, writer: _Writer
                  ) -> AsyncIterator[bytes]:
    yield writer.started()
    try:
        async for delta in deltas:
            if events := writer.feed(delta):
                yield events
    except ApplianceError as e:
        # The client gets a proper end, saying why: an error event, then response.failed.
        yield writer.failed(done, e)
        return
    yield writer.close(done)
    yield writer.finished(done)


# -- output items and their events --------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Writer:
    """The response's output items as they are generated (reasoning, message, function calls,
    in the order the model writes them) and, when streaming, the Responses events that
    describe each change, numbered in order."""

    def __init__(self, shell: dict[str, Any], call_limit: int | None, streaming: bool) -> None:
        self.shell = shell
        self.output: list[dict[str, Any]] = []
        self._call_limit = call_limit
        self._streaming = streaming
        self._open: dict[str, Any] | None = None  # the item being written, the last in output
        self._sequence = 0
        self._events: list[bytes] = []

    # events

    def _event(self, kind: str, **fields: Any) -> None:
        if not self._streaming:
            return
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        # Serialized at once: the items they show go on changing.
        self._events.append(f"event: {kind}\ndata: "
                            f"{json.dumps(data, ensure_ascii=False)}\n\n".encode())

    def _flush(self) -> bytes:
        out, self._events = b"".join(self._events), []
        return out

    def _item_event(self, kind: str, **fields: Any) -> None:
        item = self._open
        assert item is not None
        self._event(kind, item_id=item["id"], output_index=len(self.output) - 1, **fields)

    # the response around the items

    def started(self) -> bytes:
        snapshot = {**self.shell, "status": "in_progress", "output": [], "error": None,
                    "incomplete_details": None, "usage": None}
        self._event("response.created", response=snapshot)
        self._event("response.in_progress", response=snapshot)
        return self._flush()

    def final(self, generation: Finished, error: ApplianceError | None = None
              ) -> dict[str, Any]:
        outcome = generation.outcome
        usage = None
        if outcome is not None:
            usage = {"input_tokens": outcome.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": outcome.cached_tokens},
                     "output_tokens": outcome.completion_tokens,
                     "output_tokens_details": {"reasoning_tokens": outcome.thinking_tokens},
                     "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}
        status = ("failed" if error is not None else
                  "incomplete" if outcome is not None and outcome.finish_reason == "length"
                  else "completed")
        return {**self.shell, "status": status,
                "completed_at": int(time.time()) if status == "completed" else None,
                "output": self.output,
                "error": {"code": error.code or error.type, "message": error.message}
                if error is not None else None,
                "incomplete_details": {"reason": "max_output_tokens"}
                if status == "incomplete" else None,
                "usage": usage}

    def finished(self, generation: Finished) -> bytes:
        response = self.final(generation)
        kind = "response.incomplete" if response["status"] == "incomplete" else \
            "response.completed"
        self._event(kind, response=response)
        return self._flush()

    def failed(self, generation: Finished, error: ApplianceError) -> bytes:
        self._close_open("incomplete")
        self._event("error", code=error.code or error.type, message=error.message,
                    param=error.param)
        self._event("response.failed", response=self.final(generation, error))
        return self._flush()

    # items

    def feed(self, delta: Delta) -> bytes:
        """Take one parsed piece of the answer; the events it makes (b"" when not streaming)."""
        if delta.reasoning:
            self._text("reasoning", delta.reasoning)
        if delta.content:
            self._text("message", delta.content)
        for call in delta.tool_calls:
            if self._call_limit is not None and call.index >= self._call_limit:
                continue  # parallel_tool_calls false, or past max_tool_calls
            if call.id is not None:
                self._close_open("completed")
                self._add({"type": "function_call", "id": _new_id("fc"), "call_id": call.id,
                           "name": call.name, "arguments": "", "status": "in_progress"})
            item = self._open
            if call.arguments and item is not None and item["type"] == "function_call":
                item["arguments"] += call.arguments
                self._item_event("response.function_call_arguments.delta", delta=call.arguments)
        return self._flush()

    def close(self, generation: Finished) -> bytes:
        """The answer is complete: close the last item (an empty message when there is none,
        so `output_text` reads "")."""
        if not self.output:
            self._open_text("message")
        outcome = generation.outcome
        self._close_open("incomplete" if outcome is not None and outcome.finish_reason == "length"
                         else "completed")
        return self._flush()

    def _add(self, item: dict[str, Any]) -> None:
        self.output.append(item)
        self._open = item
        self._event("response.output_item.added", output_index=len(self.output) - 1,
                    item=dict(item))

    def _open_text(self, kind: str) -> dict[str, Any]:
        if kind == "reasoning":
            item = {"type": "reasoning", "id": _new_id("rs"), "summary": [], "content": [],
                    "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"type": "message", "id": _new_id("msg"), "role": "assistant",
                    "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self._add(item)
        self._item_event("response.content_part.added", content_index=0, part=dict(part))
        item["content"].append(part)
        return item

    def _text(self, kind: str, text: str) -> None:
        item = self._open
        if item is None or item["type"] != kind:
            self._close_open("completed")
            item = self._open_text(kind)
        item["content"][0]["text"] += text
        event = ("response.reasoning_text.delta" if kind == "reasoning"
                 else "response.output_text.delta")
        extra = {} if kind == "reasoning" else {"logprobs": []}
        self._item_event(event, content_index=0, delta=text, **extra)

    def _close_open(self, status: str) -> None:
        item = self._open
        if item is None:
            return
        if item["type"] == "function_call":
            self._item_event("response.function_call_arguments.done",
                             arguments=item["arguments"])
        else:
            part = item["content"][0]
            if item["type"] == "reasoning":
                self._item_event("response.reasoning_text.done", content_index=0,
                                 text=part["text"])
            else:
                self._item_event("response.output_text.done", content_index=0,
                                 text=part["text"], logprobs=[])
            self._item_event("response.content_part.done", content_index=0, part=part)
        item["status"] = status
        self._event("response.output_item.done", output_index=len(self.output) - 1, item=item)
        self._open = None
