"""OpenAI additions through the official `openai` client against a real daemon: streamed tool
calls, thinking before a grammar, the thinking budget, logprobs, n choices, one model by id."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.appliance.conftest import FOREVER, Daemon
from tests.conftest import MODEL_A

GREEDY = {"temperature": 0.0, "seed": 7}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
USER = [{"role": "user", "content": "What is the weather like in Paris today?"}]
# The tiny random model thinks in newlines only (which reasoning_content trims away): ban them.
# A grammar can still pick them where they are all it allows: a bias is finite.
NO_NEWLINES = {"198": -100, "271": -100}
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo"]},
        "days": {"type": "integer", "enum": [1, 2, 3]}},
        "required": ["city", "days"], "additionalProperties": False}}}]


def _metric(daemon: Daemon, name: str) -> float:
    with daemon.http() as http:
        text = http.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


# -- tool calls ---------------------------------------------------------------------------------


def test_streamed_tool_call_is_assembled_by_the_stream_helper(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model=MODEL_A, messages=USER, tools=WEATHER,
                                        tool_choice="required", max_tokens=100, temperature=0.7,
                                        seed=2, extra_body=NO_THINKING) as stream:
        fragments = [e.arguments_delta for e in stream
                     if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert arguments["city"] in ("Paris", "Oslo") and arguments["days"] in (1, 2, 3)
    assert len([f for f in fragments if f]) > 3  # streamed in pieces, not in one go
    assert "".join(fragments) == call.function.arguments


def test_the_first_tool_call_delta_carries_id_and_name(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL_A, messages=USER, tools=WEATHER, tool_choice="required", max_tokens=100,
        temperature=0.7, seed=2, stream=True, extra_body=NO_THINKING))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert deltas[0].type == "function" and deltas[0].index == 0
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_thinking_then_a_tool_call(client: openai.OpenAI) -> None:
    """Thinking stays on with a forced tool: the grammar shapes only what follows </think>,
    which the engine writes itself once the budget is spent (a random model rarely does)."""
    with client.chat.completions.stream(model=MODEL_A, messages=USER, tools=WEATHER,
                                        tool_choice="required", max_tokens=120, temperature=0.7,
                                        seed=4, extra_body={"thinking_budget": 12,
                                                            "logit_bias": NO_NEWLINES}) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    reasoning = choice.message.model_extra.get("reasoning_content") or ""
    assert reasoning.strip(), "the model did not think first"
    assert "<think>" not in reasoning and "</think>" not in reasoning
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    assert not choice.message.content


def test_thinking_then_json(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL_A, messages=USER, max_tokens=120, temperature=0.7, seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": {
            "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": False}}},
        extra_body={"thinking_budget": 6, "logit_bias": NO_NEWLINES})
    message = r.choices[0].message
    assert message.model_extra.get("reasoning_content")
    assert isinstance(json.loads(message.content)["ok"], bool)


# -- thinking budget ----------------------------------------------------------------------------


def test_the_thinking_budget_closes_thinking_and_the_answer_follows(
        client: openai.OpenAI) -> None:
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    r = client.completions.create(model=MODEL_A, prompt=prompt, max_tokens=24, logprobs=0,
                                  **GREEDY, extra_body={"thinking_budget": 6, **FOREVER})
    text = r.choices[0].text
    thought, close, answer = text.partition("\n</think>\n\n")
    assert close and answer, text
    tokens = r.choices[0].logprobs.tokens  # sampled tokens only: the close was not sampled
    assert "".join(tokens[:6]) == thought and "".join(tokens[6:]) == answer
    assert r.usage.completion_tokens == 24 and len(tokens) == 24 - 3


def test_chat_thinking_budget_splits_reasoning_from_content(client: openai.OpenAI) -> None:
    # The template lets the model open <think>; the bias makes it do so at once.
    r = client.chat.completions.create(
        model=MODEL_A, messages=[{"role": "user", "content": "Hi"}], max_tokens=30, **GREEDY,
        extra_body={"thinking_budget": 5, "logit_bias": {**FOREVER["logit_bias"], "151667": 100}})
    message = r.choices[0].message
    assert message.model_extra.get("reasoning_content") and message.content


# -- logprobs -----------------------------------------------------------------------------------


def test_chat_logprobs_shape_and_greedy_top_entry(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_A, messages=USER, max_tokens=12, logprobs=True,
                                       top_logprobs=5, **GREEDY, extra_body=NO_THINKING)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 12
    for e in entries:
        assert len(e.top_logprobs) == 5 and e.logprob <= 0
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True)
    assert b"".join(bytes(e.bytes) for e in entries) == r.choices[0].message.content.encode()


def test_logprobs_are_the_raw_distribution(client: openai.OpenAI) -> None:
    """Temperature and logit_bias change the choice, not the reported distribution."""
    def first(**sampling: object) -> tuple:
        r = client.chat.completions.create(model=MODEL_A, messages=USER, max_tokens=1,
                                           logprobs=True, top_logprobs=3, **sampling)
        e = r.choices[0].logprobs.content[0]
        return e.token, [(t.token, round(t.logprob, 4)) for t in e.top_logprobs]

    greedy_token, greedy_top = first(**GREEDY)
    assert first(temperature=1.8, seed=3)[1] == greedy_top
    banned = client.chat.completions.create(model=MODEL_A, messages=USER, max_tokens=1,
                                            logprobs=True, top_logprobs=3, **GREEDY)
    top_id = banned.choices[0].logprobs.content[0]
    assert top_id.token == greedy_token
    tokens = client.completions.create(model=MODEL_A, prompt=greedy_token, max_tokens=1)
    assert tokens.choices[0].text is not None  # the daemon took the token text back


def test_streamed_chat_logprobs_match(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL_A, "messages": USER, "max_tokens": 10, "logprobs": True,
              "top_logprobs": 2, **GREEDY, "extra_body": NO_THINKING}
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [e for c in client.chat.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_A, prompt="The capital of France is", max_tokens=8,
                                  logprobs=3, **GREEDY, extra_body=FOREVER)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(logprob)
        assert top[token] == pytest.approx(logprob)
    streamed = list(client.completions.create(model=MODEL_A, prompt="The capital of France is",
                                              max_tokens=8, logprobs=3, stream=True, **GREEDY,
                                              extra_body=FOREVER))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in streamed if c.choices and c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


# -- n choices ----------------------------------------------------------------------------------


def test_n_choices_differ_by_seed_and_read_the_prompt_once(client: openai.OpenAI,
                                                           daemon: Daemon) -> None:
    prompt = "x"  # the tiny random model repeats itself after most prompts, not after this
    client.completions.create(model=MODEL_A, prompt="unrelated", max_tokens=1)
    read_before = _metric(daemon, "appliance_batch_tokens_sum")
    r = client.completions.create(model=MODEL_A, prompt=prompt, max_tokens=6, n=3, seed=40,
                                  temperature=1.0, extra_body={**FOREVER, "top_k": 0,
                                                               "min_p": 0.0})
    read = _metric(daemon, "appliance_batch_tokens_sum") - read_before
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) > 1, texts  # each choice has its own sampler (and seed)
    fresh = r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens
    # The prompt once, then each choice's tokens fed back (the last one never is).
    assert read == fresh + 3 * (6 - 1)
    assert r.usage.completion_tokens == 18
    for i, text in enumerate(texts):  # choice i is the single request with seed + i
        alone = client.completions.create(model=MODEL_A, prompt=prompt, max_tokens=6,
                                          seed=40 + i, temperature=1.0,
                                          extra_body={**FOREVER, "top_k": 0, "min_p": 0.0})
        assert alone.choices[0].text == text


def test_n_choices_stream_with_their_indexes(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL_A, "messages": USER, "max_tokens": 8, "n": 2, "seed": 9,
              "temperature": 0.9, "extra_body": NO_THINKING}
    whole = client.chat.completions.create(**kwargs)
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {0: "length", 1: "length"}


def test_n_over_the_slots_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_A, messages=USER, n=5, max_tokens=1)
    assert info.value.body["param"] == "n"


# -- models -------------------------------------------------------------------------------------


def test_one_model_by_id(client: openai.OpenAI, daemon: Daemon) -> None:
    model = client.models.retrieve(MODEL_A)
    assert model.id == MODEL_A and model.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"
    with daemon.http() as http:
        r = http.get("/v1/models/broken")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(daemon.url + "/v1/models/" + "x" * 5000).status_code == 404
