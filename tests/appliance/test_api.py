"""The OpenAI-compatible API through the official `openai` client, against a real daemon."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.appliance.conftest import FOREVER, Daemon
from tests.conftest import MODEL_A, MODEL_B

GREEDY = {"temperature": 0.0, "seed": 7}
# With thinking on a grammar waits for </think>, which a random-weight model rarely writes.
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def test_models_lists_usable_models_only(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {MODEL_A, MODEL_B} <= ids
    assert "broken" not in ids


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_A, max_tokens=12, **GREEDY,
                                       messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hello!"}])
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 10
    assert isinstance(choice.message.content, str) and choice.message.content


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Count to five."}]
    whole = client.chat.completions.create(model=MODEL_A, messages=messages, max_tokens=16,
                                           **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL_A, messages=messages,
                                                 max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True},
                                                 **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_A, prompt="The capital of France is",
                                  max_tokens=8, **GREEDY)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    streamed = client.completions.create(model=MODEL_A, prompt="The capital of France is",
                                         max_tokens=8, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_stop_string_cuts_output(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL_A, prompt="Hello", max_tokens=20, **GREEDY)
    text = full.choices[0].text
    stop = text[5:8]
    assert stop
    cut = client.completions.create(model=MODEL_A, prompt="Hello", max_tokens=20, stop=[stop],
                                    **GREEDY)
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_json_schema_output_parses(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "confident": {"type": "boolean"}}, "required": ["answer", "confident"],
        "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL_A, messages=[{"role": "user", "content": "Is water wet?"}], max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        temperature=0.7, seed=3, extra_body=NO_THINKING)
    data = json.loads(r.choices[0].message.content)
    assert data["answer"] in ("yes", "no") and isinstance(data["confident"], bool)


def test_required_tool_call(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "enum": ["Paris", "Oslo"]}}, "required": ["city"],
            "additionalProperties": False}}}]
    r = client.chat.completions.create(
        model=MODEL_A, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
        tool_choice="required", max_tokens=100, temperature=0.5, seed=1, extra_body=NO_THINKING)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    # The call and its result go back through the template for the next turn.
    follow = client.chat.completions.create(
        model=MODEL_A, max_tokens=4, **GREEDY, tools=tools, messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.usage.prompt_tokens > r.usage.prompt_tokens


def test_enable_thinking_reaches_the_template(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    on = client.chat.completions.create(model=MODEL_A, messages=messages, max_tokens=1,
                                        **GREEDY)
    off = client.chat.completions.create(model=MODEL_A, messages=messages, max_tokens=1,
                                         extra_body={"chat_template_kwargs":
                                                     {"enable_thinking": False}}, **GREEDY)
    # "<think>\n\n</think>\n\n" closes thinking in the prompt: 4 more tokens.
    assert off.usage.prompt_tokens == on.usage.prompt_tokens + 4


def test_concurrent_requests_match_solo_runs(client: openai.OpenAI) -> None:
    """Batching must not change results: each request keeps its own sampling."""
    requests = [("Tell me a story.", {"temperature": 0.0}),
                ("List three colours.", {"temperature": 0.9, "seed": 11, "top_k": 50}),
                ("What is 2+2?", {"temperature": 0.7, "seed": 5, "top_p": 0.8}),
                ("你好", {"temperature": 1.2, "seed": 3, "min_p": 0.1}),
                ("Hi", {"temperature": 0.0, "presence_penalty": 1.5}),
                ("Bye", {"temperature": 0.5, "seed": 9, "stop": ["e"]})]

    def ask(prompt: str, params: dict) -> str:
        r = client.completions.create(model=MODEL_A, prompt=prompt, max_tokens=24,
                                      extra_body={k: v for k, v in params.items()
                                                  if k in ("top_k", "min_p")},
                                      **{k: v for k, v in params.items()
                                         if k not in ("top_k", "min_p")})
        return r.choices[0].text

    solo = [ask(p, params) for p, params in requests]
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i, p=p, params=params:
                                together.__setitem__(i, ask(p, params)))
               for i, (p, params) in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(len(requests))] == solo


def test_prefix_reuse_reads_fewer_tokens_and_changes_nothing(client: openai.OpenAI,
                                                             daemon: Daemon) -> None:
    system = "You are a careful assistant. " * 20
    first = client.chat.completions.create(model=MODEL_A, max_tokens=4, **GREEDY, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": "First question"}])
    with daemon.http() as http:
        hits_before = _metric(http.get("/metrics").text, "appliance_prefix_cache_hit_tokens_total")
    question = [{"role": "system", "content": system}, {"role": "user", "content": "Second one"}]
    reused = client.chat.completions.create(model=MODEL_A, max_tokens=12, **GREEDY,
                                            messages=question)
    assert reused.usage.prompt_tokens_details.cached_tokens > 100
    assert first.usage.prompt_tokens == reused.usage.prompt_tokens
    with daemon.http() as http:
        hits_after = _metric(http.get("/metrics").text, "appliance_prefix_cache_hit_tokens_total")
    assert hits_after - hits_before == reused.usage.prompt_tokens_details.cached_tokens
    # Overwrite every slot (least recently used first) with unrelated prompts, then ask again
    # with nothing to reuse.
    for i in range(5):
        client.completions.create(model=MODEL_A, prompt=f"unrelated {i} " * 40, max_tokens=2)
    fresh = client.chat.completions.create(model=MODEL_A, max_tokens=12, **GREEDY,
                                           messages=question)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fresh.choices[0].message.content == reused.choices[0].message.content


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


# -- errors ---------------------------------------------------------------------------------


def test_bad_parameter_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_A, messages=[{"role": "user", "content": "x"}],
                                       temperature=5)
    assert info.value.body["param"] == "temperature"
    assert info.value.body["type"] == "invalid_request_error"


def test_prompt_longer_than_context_gives_both_numbers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_A, prompt="word " * 5000, max_tokens=4)
    message = info.value.body["message"]
    assert "5000" in message or "5001" in message
    assert "4096" in message and info.value.body["code"] == "context_length_exceeded"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"
    assert MODEL_A in info.value.body["message"]


def test_unusable_model_says_why(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
    assert "truncated" in info.value.body["message"]


def test_body_too_large_is_413(daemon: Daemon) -> None:
    with daemon.http() as http:
        r = http.post("/v1/completions", content=b"{" + b" " * (5 * 2**20) + b"}",
                      headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_foreign_host_header_is_refused(daemon: Daemon) -> None:
    with daemon.http() as http:
        r = http.get("/v1/models", headers={"Host": "attacker.example:8471"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        assert http.get("/v1/models", headers={"Host": "localhost:8471"}).status_code == 200


def test_daemon_keeps_serving_after_errors(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_A, prompt="Still here?", max_tokens=2)
    assert r.usage.completion_tokens == 2


# -- lifecycle ------------------------------------------------------------------------------


def test_health_status_and_metrics(daemon: Daemon, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL_A, prompt="warm", max_tokens=2)
    with daemon.http() as http:
        assert http.get("/health").json()["status"] == "ok"
        status = http.get("/api/status").json()
        assert status["state"] == "ready" and status["memory"]["gpu_probe"] == "none"
        assert status["model"]["offload"]["device"] == "cpu"
        assert status["memory"]["ram"]["process_rss"] > 0
        metrics = http.get("/metrics").text
    for name in ("appliance_requests_total", "appliance_prompt_tokens_total",
                 "appliance_time_to_first_token_seconds_bucket",
                 "appliance_inter_token_latency_seconds_bucket", "appliance_queue_depth",
                 "appliance_model_load_seconds", "appliance_batch_tokens_bucket",
                 "appliance_prefix_cache_hit_tokens_total"):
        assert name in metrics
    decode_s = _metric(metrics, "appliance_decode_seconds_total")
    step_s = _metric(metrics, "appliance_engine_step_seconds_total")
    assert 0 < decode_s <= step_s  # llama_decode is one part of every engine step


def test_switch_while_streaming(daemon: Daemon, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL_A, prompt="x", max_tokens=1)
    stream = client.completions.create(model=MODEL_A, prompt="Once upon a time",
                                       max_tokens=150, stream=True, **GREEDY)
    first = next(iter(stream))
    assert first.choices
    with daemon.http() as http:
        switched = http.post(f"/api/models/{MODEL_B}/load", timeout=120)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"  # the old stream finished
    assert switched.status_code == 200 and switched.json()["model"]["id"] == MODEL_B
    r = client.completions.create(model=MODEL_B, prompt="after", max_tokens=2)
    assert r.model == MODEL_B


def test_request_naming_another_model_loads_it(client: openai.OpenAI, daemon: Daemon) -> None:
    client.completions.create(model=MODEL_B, prompt="x", max_tokens=1)
    r = client.completions.create(model=MODEL_A, prompt="x", max_tokens=1)
    assert r.model == MODEL_A
    with daemon.http() as http:
        assert http.get("/api/status").json()["model"]["id"] == MODEL_A


def test_disconnect_stops_generation(daemon: Daemon) -> None:
    body = {"model": MODEL_A, "prompt": "Go on forever", "max_tokens": 100000, "stream": True,
            **FOREVER}
    with daemon.http() as http:
        http.post("/v1/completions", json={"model": MODEL_A, "prompt": "x", "max_tokens": 1})
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(5):
                next(lines)
        # Left alone it would run to the 4,096-token context, about ten seconds here.
        deadline = time.monotonic() + 2
        while http.get("/api/status").json()["model"]["slots_busy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get("/api/status").json()["model"]["slots_busy"] == 0


def test_unload_and_just_in_time_load(daemon: Daemon, client: openai.OpenAI) -> None:
    with daemon.http() as http:
        assert http.post("/api/unload").json()["state"] == "unloaded"
        assert http.get("/health").status_code == 200
    r = client.completions.create(model=MODEL_A, prompt="back", max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_control_api_models(daemon: Daemon) -> None:
    with daemon.http() as http:
        models = {m["id"]: m for m in http.get("/api/models").json()["models"]}
    a = models[MODEL_A]
    assert a["architecture"] == "qwen3" and a["quantization"] == "Q4_K_M"
    assert a["trained_context_length"] == 40960 and a["chat_template"] is True
    assert models[MODEL_B]["quantization"] == "Q8_0"
    assert models["broken"]["usable"] is False and "truncated" in models["broken"]["error"]


def test_errors_are_openai_shaped_for_unknown_routes(daemon: Daemon) -> None:
    with daemon.http() as http:
        r = http.get("/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_invalid_json_body_is_400(daemon: Daemon) -> None:
    r = httpx.post(daemon.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
