"""Hostile and careless input to /v1/responses against a real daemon: every probe gets a clear
4xx in OpenAI's error shape naming the field (never a 500, never a crash), clients that leave
are cancelled, a stream cut by the daemon ends with `error` and `response.failed` events, and
the daemon is healthy, with no slot held, at the end.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.appliance.conftest import FOREVER, Daemon, run_daemon
from tests.appliance.test_hostile import deep_body, wait_idle
from tests.conftest import MODEL_A

ALLOWED_ORIGIN = "http://app.example:3000"
EVIL_ORIGIN = "http://evil.example"
JSON = {"Content-Type": "application/json"}
PATH = "/v1/responses"
# Runs until stopped: no end-of-generation token, and no newlines (which the tiny model
# otherwise writes, and which are held back as leading whitespace: no events at all).
ENDLESS = {"logit_bias": {**FOREVER["logit_bias"], "198": -100, "271": -100}}


def req(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_A, "input": "hi", "max_output_tokens": 1, **fields}


def items(*entries: Any) -> dict[str, Any]:
    return req(input=list(entries))


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def function(parameters: Any, name: str = "f") -> dict[str, Any]:
    return {"type": "function", "name": name, "description": "d", "parameters": parameters}


def forced(parameters: dict[str, Any]) -> dict[str, Any]:
    return req(tools=[function(parameters)], tool_choice={"type": "function", "name": "f"})


def schema(value: Any) -> dict[str, Any]:
    return req(text={"format": {"type": "json_schema", "name": "x", "schema": value}})


def raw(body: bytes) -> dict[str, Any]:
    return {"content": body, "headers": JSON}


@pytest.fixture(scope="module")
def target(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with run_daemon(models_dir, tmp_path_factory.mktemp("hostile-responses"),
                    default_model=MODEL_A, parallel="2", max_queue="2", max_body_bytes="65536",
                    switch_wait_s="1", cors_origins=json.dumps([ALLOWED_ORIGIN])) as daemon:
        yield daemon


CALL = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
# (name, request keyword arguments, accepted statuses, the param the 400 names or None)
PROBES: list[tuple[str, dict[str, Any], set[int], str | None]] = [
    # bodies
    ("invalid json", raw(b"{not json"), {400}, None),
    ("a json list", {"json": [1, 2]}, {400}, None),
    ("empty body", raw(b""), {400}, None),
    ("deeply nested json", raw(b"[" * 5000 + b"]" * 5000), {400}, None),
    ("body over the limit", raw(b"{" + b" " * 70000 + b"}"), {413}, None),
    ("chunked body over the limit", {"content": iter([b"{" + b" " * 40000,
                                                      b" " * 40000 + b"}"]), "headers": JSON},
     {413}, None),
    ("text/plain body", {"content": json.dumps(req()), "headers": {"Content-Type": "text/plain"}},
     {415}, None),
    # model
    ("missing model", {"json": {"input": "hi"}}, {400}, "model"),
    ("a 10k-character model", {"json": req(model="m" * 10000)}, {400}, "model"),
    ("unknown model", {"json": req(model="gpt-5")}, {404}, "model"),
    ("traversal in a model", {"json": req(model="../../etc/passwd")}, {404}, "model"),
    ("NUL in a model", {"json": req(model="a\u0000b")}, {404}, "model"),
    # input
    ("missing input", {"json": {"model": MODEL_A}}, {400}, "input"),
    ("input as a number", {"json": req(input=7)}, {400}, "input"),
    ("input as an object", {"json": req(input={"role": "user", "content": "x"})}, {400}, "input"),
    ("empty input list", {"json": req(input=[])}, {400}, "input"),
    ("an item that is a string", {"json": items("hi")}, {400}, "input.0"),
    ("an item without type or role", {"json": items({"content": "x"})}, {400}, "input.0.type"),
    ("unknown item type", {"json": items({"type": "hologram"})}, {400}, "input.0"),
    ("item reference", {"json": items({"type": "item_reference", "id": "msg_1"})}, {400},
     "input.0"),
    ("built-in tool call item", {"json": items(user("x"), {"type": "web_search_call", "id": "w"})},
     {400}, "input.1"),
    ("unknown role", {"json": items({"role": "root", "content": "x"})}, {400}, "input.0.role"),
    ("tool role", {"json": items({"role": "tool", "content": "x"})}, {400}, "input.0.role"),
    ("content as a number", {"json": items(user(7))}, {400}, "input.0.content"),
    ("a part that is a string", {"json": items(user(["x"]))}, {400}, "input.0.content.0"),
    ("a part without text", {"json": items(user([{"type": "input_text"}]))}, {400},
     "input.0.content.0.text"),
    ("a part with a number", {"json": items(user([{"type": "input_text", "text": 5}]))}, {400},
     "input.0.content.0.text"),
    ("image part", {"json": items(user([{"type": "input_image",
                                         "image_url": "http://169.254.169.254/"}]))}, {400},
     "input.0.content.0"),
    ("file part", {"json": items(user([{"type": "input_file", "file_id": "f"}]))}, {400},
     "input.0.content.0"),
    ("audio part", {"json": items(user([{"type": "input_audio"}]))}, {400},
     "input.0.content.0"),
    ("unknown part", {"json": items(user([{"type": "hologram"}]))}, {400}, "input.0.content.0"),
    ("function_call without call_id", {"json": items(user("x"), {**CALL, "call_id": None})},
     {400}, "input.1.call_id"),
    ("function_call arguments as an object", {"json": items(user("x"), {**CALL, "arguments": {}})},
     {400}, "input.1.arguments"),
    ("a 1000-character call_id", {"json": items(user("x"), {**CALL, "call_id": "c" * 1000})},
     {400}, "input.1.call_id"),
    ("function_call_output as a number", {"json": items(user("x"), CALL, {
        "type": "function_call_output", "call_id": "call_1", "output": 3})}, {400},
     "input.2.output"),
    ("image in a function_call_output", {"json": items(user("x"), CALL, {
        "type": "function_call_output", "call_id": "call_1",
        "output": [{"type": "input_image", "image_url": "x"}]})}, {400}, "input.2.output.0"),
    ("reasoning text as a number", {"json": items(user("x"), {
        "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": 1}]})},
     {400}, "input.1.content.0.text"),
    ("no user message", {"json": items({"role": "assistant", "content": "x"})}, {200, 400}, None),
    ("10001 items", {"json": req(input=[1] * 10001)}, {400}, "input"),
    ("instructions as a list", {"json": req(instructions=[{"role": "system"}])}, {400},
     "instructions"),
    # numbers
    ("max_output_tokens 0", {"json": req(max_output_tokens=0)}, {400}, "max_output_tokens"),
    ("negative max_output_tokens", {"json": req(max_output_tokens=-5)}, {400},
     "max_output_tokens"),
    ("astronomic max_output_tokens", {"json": req(max_output_tokens=10**30)}, {400},
     "max_output_tokens"),
    ("fractional max_output_tokens", {"json": req(max_output_tokens=1.5)}, {400},
     "max_output_tokens"),
    ("temperature 5", {"json": req(temperature=5)}, {400}, "temperature"),
    ("temperature as text", {"json": req(temperature="hot")}, {400}, "temperature"),
    ("NaN temperature", raw(b'{"model":"m","input":"x","temperature":NaN}'), {400},
     "temperature"),
    ("top_p 0", {"json": req(top_p=0)}, {400}, "top_p"),
    ("huge top_k", {"json": req(top_k=10**12)}, {400}, "top_k"),
    ("huge seed", {"json": req(seed=10**30)}, {400}, "seed"),
    ("logit_bias superscript key", {"json": req(logit_bias={"²": 1})}, {400}, "logit_bias"),
    ("logit_bias out of vocabulary", {"json": req(logit_bias={"999999999": 1})}, {400},
     "logit_bias"),
    ("thinking_budget 0", {"json": req(thinking_budget=0)}, {400}, "thinking_budget"),
    ("max_tool_calls 0", {"json": req(max_tool_calls=0)}, {400}, "max_tool_calls"),
    # state the daemon does not keep
    ("previous_response_id", {"json": req(previous_response_id="resp_1")}, {400},
     "previous_response_id"),
    ("conversation", {"json": req(conversation="conv_1")}, {400}, "conversation"),
    ("background", {"json": req(background=True)}, {400}, "background"),
    ("prompt template", {"json": req(prompt={"id": "pmpt_1"})}, {400}, "prompt"),
    ("truncation auto", {"json": req(truncation="auto")}, {400}, "truncation"),
    ("top_logprobs", {"json": req(top_logprobs=5)}, {400}, "top_logprobs"),
    ("logprobs via include", {"json": req(include=["message.output_text.logprobs"])}, {400},
     "include"),
    # tools
    ("built-in tool", {"json": req(tools=[{"type": "web_search"}])}, {400}, "tools.0.type"),
    ("mcp tool", {"json": req(tools=[{"type": "mcp", "server_url": "http://evil.example"}])},
     {400}, "tools.0.type"),
    ("tool in chat's nested shape", {"json": req(tools=[{"type": "function", "function": {
        "name": "f"}}])}, {400}, "tools.0.name"),
    ("tool without a type", {"json": req(tools=[{"name": "f"}])}, {400}, "tools.0.type"),
    ("tool as a string", {"json": req(tools=["f"])}, {400}, "tools.0"),
    ("tool parameters as a string", {"json": req(tools=[function("{}")])}, {400},
     "tools.0.parameters"),
    ("tool name with spaces", {"json": req(tools=[function({}, name="rm -rf /")])}, {400},
     "tools.0.name"),
    ("a 1000-character tool name", {"json": req(tools=[function({}, name="f" * 1000)])}, {400},
     "tools.0.name"),
    ("duplicate tool names", {"json": req(tools=[function({}), function({})])}, {400}, "tools"),
    ("200 tools", {"json": req(tools=[function({}, name=f"t{i}") for i in range(200)])}, {400},
     "tools"),
    ("tool_choice names a missing tool", {"json": req(tools=[function({})], tool_choice={
        "type": "function", "name": "g"})}, {400}, "tool_choice.name"),
    ("tool_choice required without tools", {"json": req(tool_choice="required")}, {400},
     "tool_choice"),
    ("unknown tool_choice", {"json": req(tools=[function({})], tool_choice="any")}, {400},
     "tool_choice"),
    ("tool_choice of a built-in tool", {"json": req(tools=[function({})], tool_choice={
        "type": "file_search"})}, {400}, "tool_choice"),
    # grammars, bounded before llama.cpp sees them
    ("forced tool with maxLength 100000", {"json": forced(
        {"type": "object", "properties": {"s": {"type": "string", "maxLength": 100000}}})},
     {400}, "tools.0.parameters.properties.s.maxLength"),
    ("forced tool with minItems 1e8", {"json": forced(
        {"type": "object", "properties": {"l": {"type": "array", "minItems": 100000000}}})},
     {400}, "tools.0.parameters.properties.l.minItems"),
    ("forced tool nested 1000 deep", deep_body(forced("DEEP"), 1000), {400}, None),
    ("schema with maxLength 100000", {"json": schema({"type": "string", "maxLength": 100000})},
     {400}, "text.format.schema.maxLength"),
    ("schema nested 1000 deep", deep_body(schema("DEEP"), 1000), {400}, None),
    ("recursive $ref", {"json": schema({"$ref": "#/$defs/n", "$defs": {"n": {
        "type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}})}, {200, 400}, None),
    ("schema with a pattern", {"json": schema({"type": "string", "pattern": "a+"})}, {400},
     "text.format.schema.pattern"),
    ("json_schema without a schema", {"json": req(text={"format": {"type": "json_schema",
                                                                   "name": "x"}})}, {400},
     "text.format"),
    ("schema as a string", {"json": schema("{}")}, {400}, "text.format.schema"),
    ("unknown format", {"json": req(text={"format": {"type": "yaml"}})}, {400},
     "text.format.type"),
    ("format with a forced tool", {"json": {**forced({"type": "object"}), "text": {
        "format": {"type": "json_object"}}}}, {400}, "text.format"),
    ("unknown reasoning effort", {"json": req(reasoning={"effort": "maximum"})}, {400},
     "reasoning.effort"),
    # metadata and identity
    ("17 metadata pairs", {"json": req(metadata={str(i): "v" for i in range(17)})}, {400},
     "metadata"),
    ("a 1000-character metadata value", {"json": req(metadata={"k": "v" * 1000})}, {400},
     "metadata"),
    ("metadata value as a number", {"json": req(metadata={"k": 1})}, {400}, "metadata.k"),
    ("a 10k-character user", {"json": req(user="u" * 10000)}, {400}, "user"),
    # invalid Unicode
    ("lone surrogate in input", raw(b'{"model":"m","input":"a\\ud800b"}'), {400}, "input"),
    ("lone surrogate in a part", raw(
        b'{"model":"m","input":[{"role":"user","content":[{"type":"input_text",'
        b'"text":"\\udfff"}]}]}'), {400}, "input.0.content.0.text"),
    ("lone surrogate in instructions", raw(b'{"model":"m","input":"x","instructions":"\\ud800"}'),
     {400}, "instructions"),
    ("lone surrogate in a tool", raw(
        b'{"model":"m","input":"x","tools":[{"type":"function","name":"f",'
        b'"description":"\\ud800"}]}'), {400}, "tools.0.description"),
    # cross-site requests: a page may not drive the daemon, whatever it sends
    ("responses from a page", {"json": req(), "headers": {"Origin": EVIL_ORIGIN}}, {403}, None),
    ("no-cors form post", {"data": {"model": MODEL_A}, "headers": {"Origin": EVIL_ORIGIN}},
     {403}, None),
    ("allowed origin", {"json": req(), "headers": {"Origin": ALLOWED_ORIGIN}}, {200}, None),
    # what real clients send: accepted
    ("harmless extras", {"json": req(store=True, user="u", metadata={"k": "v"},
                                     parallel_tool_calls=False, service_tier="auto",
                                     include=["reasoning.encrypted_content"],
                                     prompt_cache_key="k", safety_identifier="s",
                                     stream_options={"include_obfuscation": False},
                                     text={"format": {"type": "text"}, "verbosity": "low"},
                                     reasoning={"effort": "minimal", "summary": "auto"},
                                     truncation="disabled")}, {200}, None),
    ("a whole tool conversation", {"json": req(tools=[function({"type": "object"})], input=[
        user("x"), {"type": "reasoning", "id": "rs_1", "summary": [
            {"type": "summary_text", "text": "t"}], "encrypted_content": "zzz"},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "calling", "annotations": []},
                     {"type": "refusal", "refusal": "no"}]},
        {**CALL, "id": "fc_1", "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1",
         "output": [{"type": "input_text", "text": "done"}]},
        user("go on")])}, {200}, None),
]


@pytest.mark.parametrize("name,kwargs,expected,param", PROBES, ids=[p[0] for p in PROBES])
def test_probe_gets_a_clear_4xx_in_openai_shape(target: Daemon, name: str,
                                                kwargs: dict[str, Any], expected: set[int],
                                                param: str | None) -> None:
    with httpx.Client(base_url=target.url, timeout=60) as http:
        r = http.post(PATH, **kwargs)
    assert r.status_code in expected, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["message"] and error["type"], error
        if param is not None:
            assert error["param"] == param, error
    else:
        assert r.json()["object"] == "response"
    assert target.process.poll() is None, "the daemon died:\n" + target.log()[-3000:]


def test_a_client_that_leaves_is_cancelled(target: Daemon) -> None:
    body = req(max_output_tokens=3000, **ENDLESS)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(target.url + PATH, json=body, timeout=1.5)
    with httpx.Client(base_url=target.url, timeout=30) as http:
        with http.stream("POST", PATH, json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if "response.output_text.delta" in line:
                    break  # leave mid-stream
    left = time.monotonic()
    wait_idle(target, timeout=5)
    # Left running they would take seconds to reach max_output_tokens; cancelled, a step or two.
    assert time.monotonic() - left < 5


def test_a_stream_cut_by_the_daemon_ends_with_failed(target: Daemon) -> None:
    """An unload ends a running stream (after switch_wait_s): the client gets `error` and
    `response.failed`, with what was written so far, not a broken socket."""
    events: list[dict[str, Any]] = []
    started = threading.Event()

    def read() -> None:
        body = req(max_output_tokens=100000, stream=True, **ENDLESS)
        with httpx.stream("POST", target.url + PATH, json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))
                    if events[-1]["type"] == "response.output_text.delta":
                        started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(60)
    with httpx.Client(base_url=target.url, timeout=60) as http:
        assert http.post("/api/unload").status_code == 200
    reader.join(timeout=30)
    assert not reader.is_alive()
    kinds = [e["type"] for e in events]
    assert kinds[-2:] == ["error", "response.failed"], kinds[-4:]
    error, failed = events[-2], events[-1]["response"]
    assert error["message"] and error["code"] == "service_unavailable"
    assert failed["status"] == "failed" and failed["error"]["message"] == error["message"]
    assert failed["output"][0]["status"] == "incomplete" and failed["output"][0]["content"][0][
        "text"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    with httpx.Client(base_url=target.url, timeout=60) as http:  # and the next one loads it
        assert http.post(PATH, json=req()).status_code == 200


def test_a_burst_past_the_queue_gets_503_not_500(target: Daemon) -> None:
    def post(_: int) -> tuple[int, str]:
        r = httpx.post(target.url + PATH, json=req(max_output_tokens=64, **ENDLESS), timeout=120)
        return r.status_code, r.json()["object"] if r.status_code == 200 else r.json()["error"][
            "code"]

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(post, range(10)))
    assert {code for code, _ in results} == {200, 503}, results
    assert {kind for code, kind in results if code == 503} == {"queue_full"}
    wait_idle(target)


def test_the_daemon_is_healthy_and_never_answered_500(target: Daemon) -> None:
    """Runs last in this module (pytest keeps file order): the whole suite's verdict."""
    with httpx.Client(base_url=target.url, timeout=10) as http:
        assert http.get("/health").status_code == 200
        metrics = http.get("/metrics").text
    errors = [line for line in metrics.splitlines()
              if line.startswith("appliance_requests_total") and 'status="5' in line
              and 'status="503"' not in line]
    assert not errors, errors
    assert target.process.poll() is None
