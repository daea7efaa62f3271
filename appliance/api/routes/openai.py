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
    grammar_waits_for_thinking,
    max_new_tokens,
    off_loop,
    prepare_chat,
    prepare_text,
    sampling_params,
    until_disconnect,
)
from appliance.api.deps import ManagerDep, MetricsDep, RegistryDep, SettingsDep, UpstreamsDep
from appliance.api.errors import error_body
from appliance.api.grammar import response_grammar, tool_call_grammar
from appliance.api.schemas import ChatCompletionRequest, CompletionRequest
from appliance.engine.logprobs import TokenLogprob
from appliance.engine.output import ChatOutputParser, Delta, ToolCall, ToolCallDelta
from appliance.errors import ApplianceError, InvalidRequest, ModelNotFound
from appliance.registry import ModelEntry, Registry
from appliance.residency.model import CHAT, EMBEDDING, RERANKER, is_reranker, pooling_name
from appliance.upstream import UpstreamPool
from appliance.upstream.proxy import routed

router = APIRouter()
CLIENT_GONE = 499  # nginx's "client closed request": logged, never seen by anyone


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def model_card(entry: ModelEntry) -> dict[str, Any]:
    """What a model is: `kind` chat, embedding or reranker; `embedding` is how it embeds (its
    pooling: last, mean or cls) or, for a chat model or a reranker, "refused": /v1/embeddings
    does not pool chat models, it names the embedding models installed instead."""
    pooling = pooling_name(entry)
    if pooling is None:
        return {"kind": CHAT, "embedding": "refused"}
    if is_reranker(entry):  # scores pairs at /v1/rerank; it has no vectors to give
        return {"kind": RERANKER, "embedding": "refused", "rerank": "yes/no"}
    assert entry.info is not None
    return {"kind": EMBEDDING, "embedding": pooling,
            "dimensions": entry.info.arch_value("embedding_length")}


def _model_list(registry: Registry) -> list[dict[str, Any]]:
    data = []
    for entry in registry.scan():
        if not entry.usable:
            continue
        card = model_card(entry)
        for name in [entry.id, *registry.aliases_of(entry.id)]:
            data.append({"id": name, "object": "model", "created": int(entry.signature[1]),
                         "owned_by": "qwen-appliance", **card})
    return data


async def _all_models(registry: Registry, upstreams: UpstreamPool) -> list[dict[str, Any]]:
    """Ours, then the upstreams' (from their cached listings) that no local name shadows."""
    local = await off_loop(_model_list, registry)
    return local + upstreams.listing({m["id"] for m in local})


@router.get("/v1/models")
async def list_models(registry: RegistryDep, upstreams: UpstreamsDep) -> dict[str, Any]:
    return {"object": "list", "data": await _all_models(registry, upstreams)}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, registry: RegistryDep,
                    upstreams: UpstreamsDep) -> dict[str, Any]:
    models = await _all_models(registry, upstreams)
    for model in models:  # upstream ids keep their case; ours are lower case
        if model["id"] == model_id:
            return model
    for model in models:
        if model["id"].lower() == model_id.lower():
            return model
    raise ModelNotFound(f"model {model_id[:256]!r} does not exist", param="model")


# -- logprobs: OpenAI's two shapes ------------------------------------------------------------


def _token_text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": _token_text(e.piece), "logprob": e.logprob, "bytes": list(e.piece),
             "top_logprobs": [{"token": _token_text(a.piece), "logprob": a.logprob,
                               "bytes": list(a.piece)} for a in e.top]} for e in entries]


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy shape; `offset` is where the first token starts in the choice's text."""
    tokens, offsets = [], []
    for e in entries:
        tokens.append(_token_text(e.piece))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_token_text(a.piece): a.logprob for a in e.top} for e in entries],
            "text_offset": offsets}


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


def _tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}} for call in calls]


def _tool_call_deltas(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    out = []
    for d in deltas:
        item: dict[str, Any] = {"index": d.index, "function": {"arguments": d.arguments}}
        if d.id is not None:  # a call's first delta: its id and name (the stream helper needs it)
            item.update(id=d.id, type="function")
            item["function"]["name"] = d.name
        out.append(item)
    return out


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
                           metrics: MetricsDep, settings: SettingsDep,
                           upstreams: UpstreamsDep) -> Response:
    if (answer := await routed(upstreams, request, body.model, "chat/completions",
                               body.stream)) is not None:
        return answer
    messages = _messages(body)
    tools = body.tools if body.tools and body.tool_choice != "none" else None
    grammar, forced_tool = await off_loop(_chat_grammar, body)
    stack = contextlib.AsyncExitStack()
    model = await stack.enter_async_context(manager.use(body.model))
    try:
        kwargs = body.chat_template_kwargs or {}
        thinking = kwargs.get("enable_thinking", body.enable_thinking)
        thinking = model.enable_thinking if thinking is None else bool(thinking)
        # A grammar shapes the answer: with thinking on it starts after the model's </think>,
        # and the prompt opens the thinking so that there is one to close.
        after_think = grammar is not None and thinking and grammar_waits_for_thinking(model)
        if grammar is not None and not after_think:
            thinking = False
        prompt = await prepare_chat(model, messages,
                                    [t.model_dump() for t in tools] if tools else None, thinking)
        limit = body.max_completion_tokens or body.max_tokens
        generation = Generation(model, prompt.tokens,
                                sampling_params(body, model, grammar, after_think),
                                max_new_tokens(limit, len(prompt.tokens), model,
                                               settings.max_tokens_default),
                                body.stop or [], metrics, body.thinking_budget, n=body.n,
                                logprobs=body.logprobs_top(), open_thinking=after_think)
        stack.callback(generation.cancel)
        prompt_text = prompt.text + ("<think>\n" if after_think else "")
        parsers = [ChatOutputParser(prompt=prompt_text, parse_tools=tools is not None,
                                    forced_tool=forced_tool) for _ in range(body.n)]
    except BaseException:
        await stack.aclose()
        raise
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": model.id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return GenerationStream(_chat_stream(generation, parsers, meta, include_usage,
                                             body.logprobs), stack,
                                media_type="text/event-stream")
    async with stack:
        try:
            answers = await until_disconnect(request, _chat_whole(generation, parsers))
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
    choices = []
    for index, (reasoning, content, calls, entries) in enumerate(answers):
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = _tool_calls_json(calls)
        choices.append({"index": index, "message": message,
                        "logprobs": {"content": chat_logprobs(entries)} if body.logprobs
                        else None,
                        "finish_reason": "tool_calls" if calls
                        else generation.finish_reasons[index]})
    return JSONResponse({**meta, "object": "chat.completion", "choices": choices,
                         "usage": generation.usage()})


async def _chat_whole(generation: Generation, parsers: list[ChatOutputParser]
                      ) -> list[tuple[str, str, list[ToolCall], list[TokenLogprob]]]:
    reasoning: list[list[str]] = [[] for _ in parsers]
    content: list[list[str]] = [[] for _ in parsers]
    entries: list[list[TokenLogprob]] = [[] for _ in parsers]
    async for piece in generation.pieces():
        delta = parsers[piece.index].feed(piece.text)
        reasoning[piece.index].append(delta.reasoning)
        content[piece.index].append(delta.content)
        entries[piece.index] += piece.logprobs or []
    answers = []
    for i, parser in enumerate(parsers):
        tail, calls = parser.finish()
        answers.append(("".join(reasoning[i]) + tail.reasoning,
                        "".join(content[i]) + tail.content, calls, entries[i]))
    return answers


def _delta_json(delta: Delta) -> list[dict[str, Any]]:
    """One chunk's delta per kind of text, in the order generated."""
    out: list[dict[str, Any]] = []
    if delta.reasoning:
        out.append({"reasoning_content": delta.reasoning})
    if delta.content:
        out.append({"content": delta.content})
    if delta.tool_calls:
        out.append({"tool_calls": _tool_call_deltas(delta.tool_calls)})
    return out


async def _chat_stream(generation: Generation, parsers: list[ChatOutputParser],
                       meta: dict[str, Any], include_usage: bool, logprobs: bool
                       ) -> AsyncIterator[bytes]:
    held: list[list[TokenLogprob]] = [[] for _ in parsers]  # until a chunk of their choice

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
        if logprobs:
            entries, held[index] = held[index], []
            choice["logprobs"] = {"content": chat_logprobs(entries)} if entries else None
        data = {**meta, "object": "chat.completion.chunk", "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return sse(data)

    for index in range(len(parsers)):
        yield chunk(index, {"role": "assistant", "content": ""})
    try:
        async for piece in generation.pieces():
            held[piece.index] += piece.logprobs or []
            for delta in _delta_json(parsers[piece.index].feed(piece.text)):
                yield chunk(piece.index, delta)
    except ApplianceError as e:
        yield sse(error_body(e.message, e.type, e.param, e.code))
        yield sse("[DONE]")
        return
    for index, parser in enumerate(parsers):
        tail, calls = parser.finish()
        for delta in _delta_json(tail):
            yield chunk(index, delta)
        yield chunk(index, {}, "tool_calls" if calls else generation.finish_reasons[index])
    if include_usage:
        yield sse({**meta, "object": "chat.completion.chunk", "choices": [],
                   "usage": generation.usage()})
    yield sse("[DONE]")


# -- completions -------------------------------------------------------------------------------


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, manager: ManagerDep,
                      metrics: MetricsDep, upstreams: UpstreamsDep) -> Response:
    if (answer := await routed(upstreams, request, body.model, "completions",
                               body.stream)) is not None:
        return answer
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
                                body.stop or [], metrics, body.thinking_budget, n=body.n,
                                logprobs=body.logprobs)
        stack.callback(generation.cancel)
    except BaseException:
        await stack.aclose()
        raise
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.id}
    echo = prompt.text if body.echo else ""
    want_logprobs = body.logprobs is not None

    def choice(index: int, text: str, finish: str | None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream() -> AsyncIterator[bytes]:
            offsets = [len(echo)] * body.n  # where each choice's next token starts
            if echo:
                for i in range(body.n):
                    yield sse({**meta, "object": "text_completion",
                               "choices": [choice(i, echo, None)]})
            try:
                async for piece in generation.pieces():
                    shaped = None
                    if want_logprobs:
                        shaped = completion_logprobs(piece.logprobs or [], offsets[piece.index])
                        offsets[piece.index] += sum(map(len, shaped["tokens"]))
                    yield sse({**meta, "object": "text_completion",
                               "choices": [choice(piece.index, piece.text, None, shaped)]})
            except ApplianceError as e:
                yield sse(error_body(e.message, e.type, e.param, e.code))
                yield sse("[DONE]")
                return
            for i in range(body.n):
                yield sse({**meta, "object": "text_completion",
                           "choices": [choice(i, "", generation.finish_reasons[i])]})
            if include_usage:
                yield sse({**meta, "object": "text_completion", "choices": [],
                           "usage": generation.usage()})
            yield sse("[DONE]")

        return GenerationStream(stream(), stack, media_type="text/event-stream")
    async with stack:
        try:
            texts, entries = await until_disconnect(request, _join(generation))
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
    return JSONResponse({**meta, "object": "text_completion", "choices": [
        choice(i, echo + texts[i], generation.finish_reasons[i],
               completion_logprobs(entries[i], len(echo)) if want_logprobs else None)
        for i in range(body.n)], "usage": generation.usage()})


async def _join(generation: Generation) -> tuple[list[str], list[list[TokenLogprob]]]:
    n = generation.request.n
    texts: list[list[str]] = [[] for _ in range(n)]
    entries: list[list[TokenLogprob]] = [[] for _ in range(n)]
    async for piece in generation.pieces():
        texts[piece.index].append(piece.text)
        entries[piece.index] += piece.logprobs or []
    return ["".join(t) for t in texts], entries
