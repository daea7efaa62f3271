"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from appliance.api.deps import ManagerDep, MetricsDep, RegistryDep, SettingsDep
from appliance.api.errors import error_body
from appliance.api.generation import (
    Generation,
    max_new_tokens,
    response_grammar,
    sampling_params,
    tool_call_grammar,
)
from appliance.api.schemas import ChatCompletionRequest, CompletionRequest
from appliance.engine.output import ChatOutputParser, ToolCall
from appliance.errors import ApplianceError, InvalidRequest
from appliance.lifecycle import LoadedModel

router = APIRouter()


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def tokenize_prompt(model: LoadedModel, text: str) -> list[int]:
    rt = model.runtime
    bos = model.formatter.bos_token
    add_bos = rt.add_bos and not (bos and text.startswith(bos))
    return rt.tokenize(text, add_special=add_bos, parse_special=True)


@router.get("/v1/models")
async def list_models(registry: RegistryDep) -> dict[str, Any]:
    data = []
    for entry in registry.scan():
        if not entry.usable:
            continue
        for name in [entry.id, *registry.aliases_of(entry.id)]:
            data.append({"id": name, "object": "model", "created": int(entry.signature[1]),
                         "owned_by": "qwen-appliance"})
    return {"object": "list", "data": data}


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


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, manager: ManagerDep, metrics: MetricsDep,
                           settings: SettingsDep) -> JSONResponse | StreamingResponse:
    stack = contextlib.AsyncExitStack()
    model = await stack.enter_async_context(manager.use(body.model))
    try:
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        grammar = response_grammar(body.response_format)
        if tools and (body.tool_choice == "required" or not isinstance(body.tool_choice,
                                                                      (str, type(None)))):
            named = None if body.tool_choice == "required" else body.tool_choice.function.get("name")
            grammar = tool_call_grammar(tools, named)
        kwargs = body.chat_template_kwargs or {}
        thinking = kwargs.get("enable_thinking", body.enable_thinking)
        thinking = model.enable_thinking if thinking is None else bool(thinking)
        if grammar is not None:
            thinking = False  # the grammar must shape the answer from its first token
        prompt = model.formatter.render(
            _messages(body), tools=[t.model_dump() for t in tools] if tools else None,
            enable_thinking=thinking)
        tokens = tokenize_prompt(model, prompt)
        limit = body.max_completion_tokens or body.max_tokens
        generation = Generation(model, tokens, sampling_params(body, model, grammar),
                                max_new_tokens(limit, len(tokens), model,
                                               settings.max_tokens_default),
                                body.stop or [], metrics)
        parser = ChatOutputParser(prompt=prompt, parse_tools=tools is not None)
    except BaseException:
        await stack.aclose()
        raise
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": model.entry.id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_chat_stream(generation, parser, meta, include_usage, stack),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    async with stack:
        reasoning, content = [], []
        async for text in generation.texts():
            delta = parser.feed(text)
            reasoning.append(delta.reasoning)
            content.append(delta.content)
        tail, calls = parser.finish()
        reasoning.append(tail.reasoning)
        content.append(tail.content)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
    if "".join(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = _tool_calls_json(calls, streaming=False)
    assert generation.outcome is not None
    finish = "tool_calls" if calls else generation.outcome.finish_reason
    return JSONResponse({**meta, "object": "chat.completion", "choices": [
        {"index": 0, "message": message, "finish_reason": finish}],
        "usage": generation.usage()})


async def _chat_stream(generation: Generation, parser: ChatOutputParser, meta: dict[str, Any],
                       include_usage: bool, stack: contextlib.AsyncExitStack
                       ) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        data = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if include_usage:
            data["usage"] = None
        return sse(data)

    async with stack:
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
async def completions(body: CompletionRequest, manager: ManagerDep, metrics: MetricsDep,
                      settings: SettingsDep) -> JSONResponse | StreamingResponse:
    stack = contextlib.AsyncExitStack()
    model = await stack.enter_async_context(manager.use(body.model))
    try:
        if body.suffix:
            raise InvalidRequest("suffix (fill-in-the-middle) is not supported", param="suffix")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            tokens = [int(t) for t in prompt]
            if any(not 0 <= t < model.runtime.n_vocab for t in tokens):
                raise InvalidRequest("prompt has token ids outside the vocabulary",
                                     param="prompt")
            prompt_text = ""
        else:
            prompt_text = prompt[0] if isinstance(prompt, list) else prompt
            tokens = tokenize_prompt(model, prompt_text)
        if not tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        generation = Generation(model, tokens, sampling_params(body, model, None),
                                max_new_tokens(body.max_tokens or 16, len(tokens), model, None),
                                body.stop or [], metrics)
    except BaseException:
        await stack.aclose()
        raise
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": model.entry.id}
    echo = prompt_text if body.echo else ""

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream() -> AsyncIterator[bytes]:
            async with stack:
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

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    async with stack:
        text = "".join([t async for t in generation.texts()])
    assert generation.outcome is not None
    return JSONResponse({**meta, "object": "text_completion",
                         "choices": [choice(echo + text, generation.outcome.finish_reason)],
                         "usage": generation.usage()})
