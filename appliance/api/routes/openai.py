"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from appliance.api.core import (
    ClientGone,
    Generation,
    GenerationStream,
    max_new_tokens,
    off_loop,
    prepare_chat,
    prepare_text,
    sampling_params,
    until_disconnect,
)
from appliance.api.deps import ManagerDep, MetricsDep, RegistryDep, SettingsDep
from appliance.api.errors import error_body
from appliance.api.grammar import response_grammar, tool_call_grammar
from appliance.api.schemas import ChatCompletionRequest, CompletionRequest
from appliance.engine.output import ChatOutputParser, ToolCall
from appliance.errors import ApplianceError, InvalidRequest
from appliance.registry import Registry

router = APIRouter()
CLIENT_GONE = 499  # nginx's "client closed request": logged, never seen by anyone


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def _model_list(registry: Registry) -> list[dict[str, Any]]:
    data = []
    for entry in registry.scan():
        if not entry.usable:
            continue
        for name in [entry.id, *registry.aliases_of(entry.id)]:
            data.append({"id": name, "object": "model", "created": int(entry.signature[1]),
                         "owned_by": "qwen-appliance"})
    return data


@router.get("/v1/models")
async def list_models(registry: RegistryDep) -> dict[str, Any]:
    return {"object": "list", "data": await off_loop(_model_list, registry)}


# -- chat -------------------------------------------------------------------------------------


def _messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for i, message in enumerate(body.messages):
        try:
            content = message.text()
        except ValueError as e:
            raise InvalidRequest(str(e), param=f"messages.{i}.content") from None
        item: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                "content": content}
        if message.tool_calls:
            item["tool_calls"] = [c.model_dump() for c in message.tool_calls]
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        if message.name:
            item["name"] = message.name
        if message.reasoning_content:
            item["reasoning_content"] = message.reasoning_content
        out.append(item)
    return out


def _tool_calls_json(calls: list[ToolCall], streaming: bool) -> list[dict[str, Any]]:
    result = []
    for index, call in enumerate(calls):
        item: dict[str, Any] = {"id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments}}
        if streaming:
            item["index"] = index
        result.append(item)
    return result


def _chat_grammar(body: ChatCompletionRequest) -> tuple[str | None, bool]:
    """The grammar for the answer, and whether a tool call is forced."""
    tools = body.tools if body.tools and body.tool_choice != "none" else None
    if tools and (body.tool_choice == "required" or not isinstance(body.tool_choice,
                                                                  (str, type(None)))):
        named = None if body.tool_choice == "required" else body.tool_choice.function.get("name")
        return tool_call_grammar(tools, named), True
    return response_grammar(body.response_format), False


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, manager: ManagerDep,
                           metrics: MetricsDep, settings: SettingsDep) -> Response:
    messages = _messages(body)
    tools = body.tools if body.tools and body.tool_choice != "none" else None
    grammar, forced_tool = await off_loop(_chat_grammar, body)
    stack = contextlib.AsyncExitStack()
    model = await stack.enter_async_context(manager.use(body.model))
    try:
        kwargs = body.chat_template_kwargs or {}
        thinking = kwargs.get("enable_thinking", body.enable_thinking)
        thinking = model.enable_thinking if thinking is None else bool(thinking)
        if grammar is not None:
            thinking = False  # the grammar must shape the answer from its first token
        prompt = await prepare_chat(model, messages,
                                    [t.model_dump() for t in tools] if tools else None, thinking)
        limit = body.max_completion_tokens or body.max_tokens
        generation = Generation(model, prompt.tokens, sampling_params(body, model, grammar),
                                max_new_tokens(limit, len(prompt.tokens), model,
                                               settings.max_tokens_default),
                                body.stop or [], metrics)
        stack.callback(generation.cancel)
        parser = ChatOutputParser(prompt=prompt.text, parse_tools=tools is not None,
                                  forced_tool=forced_tool)
    except BaseException:
        await stack.aclose()
        raise
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": model.id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return GenerationStream(_chat_stream(generation, parser, meta, include_usage), stack,
                                media_type="text/event-stream")
    async with stack:
        try:
            reasoning, content, calls = await until_disconnect(
                request, _chat_whole(generation, parser))
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = _tool_calls_json(calls, streaming=False)
    assert generation.outcome is not None
    finish = "tool_calls" if calls else generation.outcome.finish_reason
    return JSONResponse({**meta, "object": "chat.completion", "choices": [
        {"index": 0, "message": message, "finish_reason": finish}],
        "usage": generation.usage()})


async def _chat_whole(generation: Generation, parser: ChatOutputParser
                      ) -> tuple[str, str, list[ToolCall]]:
    reasoning, content = [], []
    async for text in generation.texts():
        delta = parser.feed(text)
        reasoning.append(delta.reasoning)
        content.append(delta.content)
    tail, calls = parser.finish()
    reasoning.append(tail.reasoning)
    content.append(tail.content)
    return "".join(reasoning), "".join(content), calls


async def _chat_stream(generation: Generation, parser: ChatOutputParser, meta: dict[str, Any],
                       include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        data = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if include_usage:
            data["usage"] = None
        return sse(data)

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for text in generation.texts():
            delta = parser.feed(text)
            if delta.reasoning:
                yield chunk({"reasoning_content": delta.reasoning})
            if delta.content:
                yield chunk({"content": delta.content})
    except ApplianceError as e:
        yield sse(error_body(e.message, e.type, e.param, e.code))
        yield sse("[DONE]")
        return
    tail, calls = parser.finish()
    if tail.reasoning:
        yield chunk({"reasoning_content": tail.reasoning})
    if tail.content:
        yield chunk({"content": tail.content})
    if calls:
        yield chunk({"tool_calls": _tool_calls_json(calls, streaming=True)})
    assert generation.outcome is not None
    yield chunk({}, "tool_calls" if calls else generation.outcome.finish_reason)
    if include_usage:
        yield sse({**meta, "object": "chat.completion.chunk", "choices": [],
                   "usage": generation.usage()})
    yield sse("[DONE]")


# -- completions -------------------------------------------------------------------------------


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, manager: ManagerDep,
                      metrics: MetricsDep) -> Response:
    stack = contextlib.AsyncExitStack()
    model = await stack.enter_async_context(manager.use(body.model))
    try:
        raw = body.prompt
        if isinstance(raw, list) and isinstance(raw[0], int):
            prompt = model.check_tokens(raw, "prompt")
        else:
            prompt = await prepare_text(model, raw[0] if isinstance(raw, list) else raw)
        if not prompt.tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        generation = Generation(model, prompt.tokens, sampling_params(body, model, None),
                                max_new_tokens(body.max_tokens or 16, len(prompt.tokens), model,
                                               None),
                                body.stop or [], metrics)
        stack.callback(generation.cancel)
    except BaseException:
        await stack.aclose()
        raise
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.id}
    echo = prompt.text if body.echo else ""

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream() -> AsyncIterator[bytes]:
            if echo:
                yield sse({**meta, "object": "text_completion", "choices": [choice(echo, None)]})
            try:
                async for text in generation.texts():
                    yield sse({**meta, "object": "text_completion",
                               "choices": [choice(text, None)]})
            except ApplianceError as e:
                yield sse(error_body(e.message, e.type, e.param, e.code))
                yield sse("[DONE]")
                return
            assert generation.outcome is not None
            yield sse({**meta, "object": "text_completion",
                       "choices": [choice("", generation.outcome.finish_reason)]})
            if include_usage:
                yield sse({**meta, "object": "text_completion", "choices": [],
                           "usage": generation.usage()})
            yield sse("[DONE]")

        return GenerationStream(stream(), stack, media_type="text/event-stream")
    async with stack:
        try:
            text = await until_disconnect(request, _join(generation))
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
    assert generation.outcome is not None
    return JSONResponse({**meta, "object": "text_completion",
                         "choices": [choice(echo + text, generation.outcome.finish_reason)],
                         "usage": generation.usage()})


async def _join(generation: Generation) -> str:
    return "".join([t async for t in generation.texts()])
