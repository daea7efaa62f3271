"""OpenAI's Responses API (stateless) through the official `openai` client, against a real
daemon: text and message input, instructions, streaming with the client's helpers, forced and
round-tripped function calls, structured output, reasoning, errors, and a client that leaves.

Answers are compared with /v1/chat/completions on the same conversation: the same template,
tokens and sampling must give the same greedy text and prompt size.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.appliance.conftest import FOREVER, Daemon
from tests.conftest import MODEL_A

# The tiny random model answers a chat in newlines only: ban them so the text depends on the
# prompt (a bias is finite: a grammar may still pick them where they are all it allows).
NO_NEWLINES = {"198": -100, "271": -100}
PLAIN: dict[str, Any] = {"temperature": 0.0, "reasoning": {"effort": "none"},
                         "extra_body": {"logit_bias": NO_NEWLINES}}
CHAT_PLAIN: dict[str, Any] = {"temperature": 0.0, "extra_body": {
    "logit_bias": NO_NEWLINES, "chat_template_kwargs": {"enable_thinking": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "enum": ["Paris", "Oslo"]},
               "days": {"type": "integer", "enum": [1, 2, 3]}},
               "required": ["city", "days"], "additionalProperties": False},
           "strict": True}
CHAT_WEATHER = {"type": "function", "function": {
    k: WEATHER[k] for k in ("name", "description", "parameters")}}


def chat_text(client: openai.OpenAI, messages: list[dict[str, Any]], n: int,
              **kwargs: Any) -> tuple[str, int]:
    r = client.chat.completions.create(model=MODEL_A, messages=messages, max_tokens=n,
                                       **CHAT_PLAIN, **kwargs)
    return r.choices[0].message.content or "", r.usage.prompt_tokens


# -- create ---------------------------------------------------------------------------------------


def test_create_with_a_string(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL_A, input="Hello!", max_output_tokens=12, **PLAIN)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL_A
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    [message] = r.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.status == "incomplete"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    text, prompt_tokens = chat_text(client, [{"role": "user", "content": "Hello!"}], 12)
    assert r.output_text == text and text.strip()
    usage = r.usage
    assert usage.input_tokens == prompt_tokens and usage.output_tokens == 12
    assert usage.total_tokens == prompt_tokens + 12
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert usage.input_tokens_details.cached_tokens >= 0


def test_messages_and_instructions_read_as_chat(client: openai.OpenAI) -> None:
    conversation = [
        {"role": "user", "content": "Hi"},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Hello! How can I help?", "annotations": []}]},
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Name a "}, {"type": "input_text", "text": "city."}]},
    ]
    r = client.responses.create(model=MODEL_A, input=conversation, instructions="Be brief.",
                                max_output_tokens=10, metadata={"app": "test"}, user="u1",
                                store=False, **PLAIN)
    text, prompt_tokens = chat_text(client, [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Name a city."}], 10)
    assert r.usage.input_tokens == prompt_tokens
    assert r.output_text == text
    assert r.instructions == "Be brief." and r.metadata == {"app": "test"}
    assert r.max_output_tokens == 10 and r.temperature == 0.0


# -- streaming ------------------------------------------------------------------------------------


def test_stream_helper_assembles_what_create_returns(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL_A, "input": ASK, "max_output_tokens": 16, **PLAIN}
    whole = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    # Cut by max_output_tokens: the last event is response.incomplete (as on OpenAI's API,
    # where the helper's get_final_response() wants response.completed).
    final = events[-1].response
    assert events[-1].type == "response.incomplete"
    assert len(deltas) > 3 and "".join(deltas) == final.output_text == whole.output_text
    assert final.status == whole.status == "incomplete"
    assert final.usage.output_tokens == 16 and final.id.startswith("resp_")


def test_stream_events_come_in_order_and_numbered(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL_A, input="Hello!", max_output_tokens=6,
                                          stream=True, **PLAIN))
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added",
                         "response.output_text.delta"]
    deltas = [i for i, k in enumerate(kinds) if k == "response.output_text.delta"]
    assert kinds[deltas[-1] + 1:] == ["response.output_text.done", "response.content_part.done",
                                      "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, last = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == [] and created.id == last.id
    done = events[-2].item
    assert done.status == "incomplete" and done.content[0].text == "".join(
        events[i].delta for i in deltas)
    assert last.output[0].content[0].text == done.content[0].text


def test_raw_stream_is_server_sent_events(daemon: Daemon) -> None:
    body = {"model": MODEL_A, "input": "Hi", "max_output_tokens": 3, "stream": True,
            "reasoning": {"effort": "none"}}
    with daemon.http() as http, http.stream("POST", "/v1/responses", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines
            if line.startswith("data: ")]
    assert names == [d["type"] for d in data]  # each event line names its data
    assert "[DONE]" not in lines[-1]


# -- function calls -------------------------------------------------------------------------------


def test_forced_function_call_streams_and_is_assembled(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL_A, input=ASK, tools=[WEATHER],
                                 tool_choice={"type": "function", "name": "get_weather"},
                                 # room for the grammar's bounded whitespace: a random model
                                 # may use it, and the call must complete, not be cut short
                                 max_output_tokens=400, temperature=0.7,
                                 reasoning={"effort": "none"},
                                 extra_body={"seed": 2}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    fragments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert final.status == "completed"
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    arguments = json.loads(call.arguments)
    assert arguments["city"] in ("Paris", "Oslo") and arguments["days"] in (1, 2, 3)
    assert len(fragments) > 3 and "".join(fragments) == call.arguments  # in pieces
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.name == "get_weather"
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == call.arguments


def test_a_tool_loop_round_trip(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL_A, input=ASK, tools=[WEATHER],
                                    tool_choice="required", max_output_tokens=100,
                                    temperature=0.5, reasoning={"effort": "none"},
                                    extra_body={"seed": 1})
    [call] = [item for item in first.output if item.type == "function_call"]
    # The SDK's own output objects go back as input, with the tool's result after them.
    turn = [*ASK, *first.output, {"type": "function_call_output", "call_id": call.call_id,
                                  "output": "Sunny, 24 degrees."}]
    second = client.responses.create(model=MODEL_A, input=turn, tools=[WEATHER],
                                     max_output_tokens=8, **PLAIN)
    assert second.output[-1].type == "message" and second.status == "incomplete"
    text, prompt_tokens = chat_text(client, [
        *ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 24 degrees."}], 8,
        tools=[CHAT_WEATHER])
    assert second.usage.input_tokens == prompt_tokens > first.usage.input_tokens
    assert second.output_text == text


def test_tool_choice_none_hides_the_tools(client: openai.OpenAI) -> None:
    offered = client.responses.create(model=MODEL_A, input=ASK, tools=[WEATHER],
                                      max_output_tokens=1, **PLAIN)
    hidden = client.responses.create(model=MODEL_A, input=ASK, tools=[WEATHER],
                                     tool_choice="none", max_output_tokens=1, **PLAIN)
    bare = client.responses.create(model=MODEL_A, input=ASK, max_output_tokens=1, **PLAIN)
    assert hidden.usage.input_tokens == bare.usage.input_tokens < offered.usage.input_tokens


# -- structured output and reasoning --------------------------------------------------------------


class Verdict(BaseModel):
    answer: Literal["yes", "no"]  # bounded: a random model rarely closes a free string
    confident: bool


def test_json_schema_output_parses(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]}, "confident": {"type": "boolean"}},
        "required": ["answer", "confident"], "additionalProperties": False}
    r = client.responses.create(
        model=MODEL_A, input="Is water wet?", max_output_tokens=200, temperature=0.7,
        reasoning={"effort": "none"}, extra_body={"seed": 3},
        text={"format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True}})
    data = json.loads(r.output_text)
    assert data["answer"] in ("yes", "no") and isinstance(data["confident"], bool)
    parsed = client.responses.parse(model=MODEL_A, input="Is water wet?", text_format=Verdict,
                                    max_output_tokens=100, temperature=0.7,
                                    reasoning={"effort": "none"}, extra_body={"seed": 3})
    assert isinstance(parsed.output_parsed, Verdict)
    # A free object rarely ends with a random model: enough that the grammar shaped it.
    obj = client.responses.create(model=MODEL_A, input="JSON please", max_output_tokens=4,
                                  temperature=0.7, reasoning={"effort": "none"},
                                  text={"format": {"type": "json_object"}})
    assert obj.output_text.startswith("{")


def test_reasoning_comes_back_as_a_reasoning_item(client: openai.OpenAI) -> None:
    """With a format and thinking on, the prompt opens <think>: the model thinks, the engine
    closes the thinking at the budget, and the grammar shapes the answer after it."""
    no_tags = {**NO_NEWLINES, "151667": -100, "151668": -100}  # the engine writes </think>
    kwargs: dict[str, Any] = {
        "model": MODEL_A, "input": ASK, "max_output_tokens": 60, "temperature": 0.7,
        "reasoning": {"effort": "high"}, "extra_body": {"thinking_budget": 5, "seed": 5,
                                                        "logit_bias": no_tags},
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {
            "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": False}}}}
    r = client.responses.create(**kwargs)
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    thought = reasoning.content[0].text
    # The tiny random model thinks in blanks (newlines are banned); the tags stay markup.
    assert thought and "<think>" not in thought and "</think>" not in thought
    assert message.type == "message" and isinstance(json.loads(r.output_text)["ok"], bool)
    assert r.usage.output_tokens_details.reasoning_tokens == 5  # the budget, counted by the engine
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    final = stream.get_final_response()
    assert streamed == thought == final.output[0].content[0].text
    assert final.output_text == r.output_text


# -- errors and clients that leave ----------------------------------------------------------------


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="gpt-5", input="Hi")
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": 5}, "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0"),
])
def test_bad_parameters_are_bad_requests(client: openai.OpenAI, kwargs: dict[str, Any],
                                         param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**{"model": MODEL_A, "input": "Hi", **kwargs})
    assert info.value.body["param"] == param and info.value.body["message"]


def _slots_busy(http: httpx.Client) -> int:
    return http.get("/api/status").json()["model"]["slots_busy"]


def test_a_client_that_leaves_mid_stream_frees_its_slot(daemon: Daemon) -> None:
    body = {"model": MODEL_A, "input": "Go on forever", "max_output_tokens": 100000,
            "stream": True, "reasoning": {"effort": "none"},
            "logit_bias": {**FOREVER["logit_bias"], **NO_NEWLINES}}
    with daemon.http() as http:
        http.post("/v1/responses", json={"model": MODEL_A, "input": "x", "max_output_tokens": 1})
        with http.stream("POST", "/v1/responses", json=body) as response:
            assert response.status_code == 200, response.read()
            deltas = 0
            for line in response.iter_lines():
                deltas += line.startswith("data: ") and "response.output_text.delta" in line
                if deltas == 5:
                    break
            assert deltas == 5 and _slots_busy(http) >= 1  # still generating when it leaves
        # Left alone it would run to the 4,096-token context; cancelled, it stops in a step.
        deadline = time.monotonic() + 5
        while _slots_busy(http) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _slots_busy(http) == 0


# -- the translation into chat messages (no daemon) -----------------------------------------------


def test_output_items_passed_back_become_one_assistant_turn() -> None:
    from appliance.api.routes.responses_request import ResponsesRequest, chat_messages

    body = ResponsesRequest.model_validate({"model": "m", "instructions": "Be brief.", "input": [
        {"role": "user", "content": "Weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "Call the tool."}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{\"a\":1}"},
        {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "one"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "two"}]},
        {"role": "assistant", "content": "Done."}]})
    assert chat_messages(body) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look.", "reasoning_content": "Call the tool.",
         "tool_calls": [
             {"id": "call_1", "type": "function",
              "function": {"name": "f", "arguments": "{\"a\":1}"}},
             {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "one"},
        {"role": "tool", "tool_call_id": "call_2", "content": "two"},
        {"role": "assistant", "content": "Done."}]


def test_call_limits_and_effort() -> None:
    from appliance.api.routes.responses_request import ResponsesRequest

    def body(**fields: Any) -> ResponsesRequest:
        return ResponsesRequest.model_validate({"model": "m", "input": "x", **fields})

    assert body().call_limit is None
    assert body(parallel_tool_calls=False).call_limit == 1
    assert body(max_tool_calls=3).call_limit == 3
    assert body(max_tool_calls=3, parallel_tool_calls=False).call_limit == 1
    assert body().thinking(True) and not body().thinking(False)
    assert not body(reasoning={"effort": "minimal"}).thinking(True)
    assert body(reasoning={"effort": "low"}).thinking(False)
