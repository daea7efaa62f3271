"""Each dialect's request as the OpenAI body an upstream gets (appliance/upstream/to_openai.py),
and an upstream's event stream read back (appliance/upstream/chat.py), hostile ones included:
no daemon needed (test_upstream_dialects.py runs them against real servers)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from appliance.api.ollama_schemas import ChatRequest, GenerateRequest
from appliance.api.routes.anthropic_request import MessagesRequest, chat_messages
from appliance.api.routes.responses_request import ResponsesRequest
from appliance.api.routes.responses_request import chat_messages as responses_messages
from appliance.config import UpstreamSettings
from appliance.errors import ApplianceError, UpstreamAnswered, UpstreamBadAnswer
from appliance.metrics import Metrics
from appliance.upstream import UpstreamPool, to_openai
from appliance.upstream.chat import MAX_EVENT_BYTES, open_chat

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


def test_ollama_tool_conversation_gets_ids_and_text_arguments() -> None:
    body = ChatRequest.model_validate({
        "model": "m", "format": "json", "options": {"temperature": 0.2, "num_predict": 9,
                                                    "stop": ["END"], "num_ctx": 99},
        "tools": [{"type": "function", "function": {"name": "get_weather",
                                                    "parameters": SCHEMA}}],
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_time", "arguments": {}}},
                {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": "cold", "tool_name": "get_weather"},
            {"role": "tool", "content": "noon"}]})
    messages = [{"role": m.role, "content": m.content,
                 **({"tool_calls": [{"function": c.function.model_dump()}
                                    for c in m.tool_calls]} if m.tool_calls else {}),
                 **({"name": m.tool_name} if m.tool_name else {})} for m in body.messages]
    sent = to_openai.ollama_chat(body, messages)
    calls = sent["messages"][1]["tool_calls"]
    assert calls[1]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert calls[0]["function"]["arguments"] == "{}" and calls[0]["id"] != calls[1]["id"]
    # Each result answers its call: by name, then the earliest one left.
    assert sent["messages"][2] == {"role": "tool", "content": "cold",
                                   "tool_call_id": calls[1]["id"]}
    assert sent["messages"][3]["tool_call_id"] == calls[0]["id"]
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}  # a format, no think
    assert (sent["temperature"], sent["max_tokens"], sent["stop"]) == (0.2, 9, ["END"])
    assert "num_ctx" not in json.dumps(sent) and "keep_alive" not in sent


def test_ollama_generate_and_raw() -> None:
    body = GenerateRequest.model_validate({"model": "m", "prompt": "Hi", "system": "Brief.",
                                           "think": True, "format": SCHEMA,
                                           "options": {"num_predict": -1}})
    sent = to_openai.ollama_generate(body)
    assert sent["messages"] == [{"role": "system", "content": "Brief."},
                                {"role": "user", "content": "Hi"}]
    assert sent["response_format"]["json_schema"]["schema"] == SCHEMA
    assert sent["chat_template_kwargs"] == {"enable_thinking": True}
    assert "max_tokens" not in sent  # -1: no limit of ours; the upstream's own holds
    raw = to_openai.ollama_raw(GenerateRequest.model_validate(
        {"model": "m", "prompt": "<|im_start|>", "raw": True, "options": {"seed": 3}}))
    assert raw == {"model": "m", "prompt": "<|im_start|>", "seed": 3}


def test_anthropic_forced_tool_and_results() -> None:
    body = MessagesRequest.model_validate({
        "model": "m", "max_tokens": 50, "system": [{"type": "text", "text": "Be brief."}],
        "stop_sequences": ["END"], "top_k": 5,
        "tools": [{"name": "get_weather", "input_schema": SCHEMA}],
        "tool_choice": {"type": "tool", "name": "get_weather",
                        "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                               "name": "get_weather",
                                               "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": "cold"}]}]})
    sent = to_openai.anthropic_messages(body, chat_messages(body))
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["messages"][2]["tool_calls"][0] == {
        "id": "toolu_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    assert sent["messages"][3] == {"role": "tool", "tool_call_id": "toolu_1",
                                   "content": "cold"}
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}  # absent: off
    assert "stop" not in sent  # matched here, so the answer can say which one
    assert (sent["max_tokens"], sent["top_k"]) == (50, 5)


def test_responses_format_tools_and_effort() -> None:
    body = ResponsesRequest.model_validate({
        "model": "m", "input": "Hi", "instructions": "Brief.", "max_output_tokens": 7,
        "reasoning": {"effort": "minimal"}, "parallel_tool_calls": False,
        "tools": [{"type": "function", "name": "f", "parameters": SCHEMA}],
        "tool_choice": "required"})
    sent = to_openai.responses(body, responses_messages(body))
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False
    assert sent["tools"][0]["function"]["name"] == "f"
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}
    assert sent["max_tokens"] == 7
    shaped = ResponsesRequest.model_validate({
        "model": "m", "input": "Hi", "text": {"format": {"type": "json_schema", "name": "o",
                                                         "schema": SCHEMA}}})
    fmt = to_openai.responses(shaped, responses_messages(shaped))["response_format"]
    assert fmt == {"type": "json_schema", "json_schema": {"name": "o", "schema": SCHEMA}}


# -- reading an upstream's stream -----------------------------------------------------------------


def _events(*events: Any) -> bytes:
    return b"".join(e if isinstance(e, bytes) else f"data: {json.dumps(e)}\n\n".encode()
                    for e in events)


async def _read(body: bytes, status: int = 200, content_type: str = "text/event-stream",
                whole: bool = False) -> tuple[list[Any], Any]:
    """Our reading of `body` as sent by an upstream: a real socket server on 127.0.0.1 that
    answers every request with it."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        await reader.readexactly(length)
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = UpstreamSettings(url=f"http://127.0.0.1:{port}/v1", max_response_bytes=2**16)
    pool = UpstreamPool({"up": settings}, {"up": "secret-key"}, Metrics(), lambda _: False)
    upstream = pool.upstreams[0]
    try:
        chat = await open_chat(pool, upstream, {"model": "m", "messages": []}, whole)
        deltas = [d async for d in chat.deltas()]
        return deltas, chat
    finally:
        await pool.close()
        server.close()


def test_a_streamed_answer_is_read_as_deltas_calls_and_usage() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}
    call = {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_9", "function": {"name": "f", "arguments": '{"a"'}}]}}]}
    more = {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                                      "prompt_tokens_details": {"cached_tokens": 2}}}
    deltas, chat = asyncio.run(_read(_events(b": keep-alive\n\n", chunk, call, more,
                                             usage, b"data: [DONE]\n\n")))
    assert [d.content for d in deltas] == ["Hi", "", ""]
    assert deltas[1].tool_calls[0].id == "call_9" and deltas[2].tool_calls[0].id is None
    assert [(c.id, c.name, c.arguments) for c in chat.calls] == [("call_9", "f", '{"a": 1}')]
    o = chat.outcome
    assert (o.finish_reason, o.prompt_tokens, o.completion_tokens, o.cached_tokens) == \
        ("tool_calls", 5, 3, 2)


@pytest.mark.parametrize(("body", "words"), [
    (b"data: {not json\n\n", "not JSON"),
    (b"data: [1, 2]\n\n", "not a JSON object"),
    (b"data: " + b"x" * (MAX_EVENT_BYTES + 10), "event over"),
    (_events({"error": {"message": "out of memory secret-key"}}), "failed mid-answer"),
])
def test_hostile_streams_end_in_our_error(body: bytes, words: str) -> None:
    with pytest.raises(UpstreamBadAnswer, match=words) as e:
        asyncio.run(_read(body))
    assert "secret-key" not in e.value.message


def test_a_whole_answer_is_bounded() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "x" * 1000}}]}
    with pytest.raises(UpstreamBadAnswer, match="max_response_bytes"):
        asyncio.run(_read(_events(*[chunk] * 100), whole=True))
    deltas, _ = asyncio.run(_read(_events(*[chunk] * 100), whole=False))  # streamed: passed on
    assert len(deltas) == 100


def test_upstream_errors_keep_their_status_and_lose_the_key() -> None:
    with pytest.raises(UpstreamAnswered) as e:
        asyncio.run(_read(b'{"error": {"message": "no such model; key secret-key"}}', 404,
                          "application/json"))
    assert e.value.status == 404 and e.value.type == "invalid_request_error"
    assert "no such model" in e.value.message and "secret-key" not in e.value.message
    with pytest.raises(UpstreamAnswered) as e:
        asyncio.run(_read(b"GPU fell over", 500, "text/plain"))
    assert e.value.status == 500 and "GPU fell over" in e.value.message
    for status in (302, 401):
        with pytest.raises(ApplianceError) as e:
            asyncio.run(_read(b"", status, "application/json"))
        assert e.value.status == 502
    with pytest.raises(UpstreamBadAnswer, match="text/html"):
        asyncio.run(_read(b"<html>", 200, "text/html"))
