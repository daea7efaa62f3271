"""Hostile and careless input to the Anthropic dialect against a real daemon: every probe gets a
clear 4xx in Anthropic's error shape (never a 500, never a crash), clients that leave are
cancelled, and the daemon is healthy, with no slot held, at the end.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.api.routes.anthropic import ERROR_TYPES
from tests.appliance.conftest import Daemon, run_daemon
from tests.appliance.test_hostile import deep_body, deep_value, wait_idle
from tests.conftest import MODEL_B

MODEL = MODEL_B  # the untied model writes text, not newlines, so it runs until stopped
ALLOWED_ORIGIN = "http://app.example:3000"
EVIL_ORIGIN = "http://evil.example"
USER = [{"role": "user", "content": "hi"}]
JSON = {"Content-Type": "application/json"}
MESSAGES = "/v1/messages"
COUNT = "/v1/messages/count_tokens"


def msg(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 1, **fields}


def blocks(*content: dict[str, Any], role: str = "user") -> dict[str, Any]:
    return msg(messages=[{"role": role, "content": list(content)}])


def tool(schema: dict[str, Any], name: str = "f") -> dict[str, Any]:
    return {"name": name, "description": "d", "input_schema": schema}


def forced(schema: dict[str, Any]) -> dict[str, Any]:
    return msg(tools=[tool(schema)], tool_choice={"type": "tool", "name": "f"})


def raw(body: bytes) -> dict[str, Any]:
    return {"content": body, "headers": JSON}


@pytest.fixture(scope="module")
def target(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with run_daemon(models_dir, tmp_path_factory.mktemp("hostile-anthropic"),
                    default_model=MODEL, parallel="2", max_queue="2", max_body_bytes="65536",
                    cors_origins=json.dumps([ALLOWED_ORIGIN])) as daemon:
        yield daemon


ECHO_CALL = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}
# (name, method, path, request keyword arguments, accepted statuses)
PROBES: list[tuple[str, str, str, dict[str, Any], set[int]]] = [
    # bodies
    ("invalid json", "POST", MESSAGES, raw(b"{not json"), {400}),
    ("a json list", "POST", MESSAGES, {"json": [1, 2]}, {400}),
    ("empty body", "POST", MESSAGES, raw(b""), {400}),
    ("deeply nested json", "POST", MESSAGES, raw(b"[" * 5000 + b"]" * 5000), {400}),
    ("body over the limit", "POST", MESSAGES, raw(b"{" + b" " * 70000 + b"}"), {413}),
    ("text/plain body", "POST", MESSAGES,
     {"content": json.dumps(msg()), "headers": {"Content-Type": "text/plain"}}, {415}),
    # max_tokens
    ("missing max_tokens", "POST", MESSAGES,
     {"json": {"model": MODEL, "messages": USER}}, {400}),
    ("max_tokens 0", "POST", MESSAGES, {"json": msg(max_tokens=0)}, {400}),
    ("negative max_tokens", "POST", MESSAGES, {"json": msg(max_tokens=-5)}, {400}),
    ("astronomic max_tokens", "POST", MESSAGES, {"json": msg(max_tokens=10**30)}, {400}),
    ("fractional max_tokens", "POST", MESSAGES, {"json": msg(max_tokens=1.5)}, {400}),
    ("max_tokens as text", "POST", MESSAGES, {"json": msg(max_tokens="many")}, {400}),
    # model and messages
    ("missing model", "POST", MESSAGES, {"json": {"messages": USER, "max_tokens": 1}}, {400}),
    ("a 10k-character model", "POST", MESSAGES, {"json": msg(model="m" * 10000)}, {400}),
    ("unknown model", "POST", MESSAGES, {"json": msg(model="claude-opus-4")}, {404}),
    ("traversal in a model", "POST", MESSAGES, {"json": msg(model="../../etc/passwd")}, {404}),
    ("no messages", "POST", MESSAGES, {"json": msg(messages=[])}, {400}),
    ("system role in messages", "POST", MESSAGES,
     {"json": msg(messages=[{"role": "system", "content": "x"}])}, {400}),
    ("tool role", "POST", MESSAGES, {"json": msg(messages=[{"role": "tool", "content": "x"}])},
     {400}),
    ("content as a number", "POST", MESSAGES,
     {"json": msg(messages=[{"role": "user", "content": 7}])}, {400}),
    ("content as an object", "POST", MESSAGES,
     {"json": msg(messages=[{"role": "user", "content": {"type": "text", "text": "x"}}])}, {400}),
    ("empty content list", "POST", MESSAGES, {"json": blocks()}, {400}),
    ("a block without a type", "POST", MESSAGES, {"json": blocks({"text": "x"})}, {400}),
    ("a block that is a string", "POST", MESSAGES,
     {"json": msg(messages=[{"role": "user", "content": ["x"]}])}, {400}),
    ("unknown block type", "POST", MESSAGES, {"json": blocks({"type": "hologram"})}, {400}),
    ("text block without text", "POST", MESSAGES, {"json": blocks({"type": "text"})}, {400}),
    ("text block with a number", "POST", MESSAGES,
     {"json": blocks({"type": "text", "text": 5})}, {400}),
    ("image block", "POST", MESSAGES, {"json": blocks({"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}})}, {400}),
    ("image url block", "POST", MESSAGES, {"json": blocks({"type": "image", "source": {
        "type": "url", "url": "http://169.254.169.254/"}})}, {400}),
    ("document block", "POST", MESSAGES, {"json": blocks({"type": "document", "source": {}})},
     {400}),
    ("image inside a tool result", "POST", MESSAGES, {"json": blocks(
        {"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "image", "source": {}}]})}, {400}),
    ("tool result content as a number", "POST", MESSAGES, {"json": blocks(
        {"type": "tool_result", "tool_use_id": "t", "content": 3})}, {400}),
    ("tool_use in a user message", "POST", MESSAGES, {"json": blocks(ECHO_CALL)}, {400}),
    ("tool_result in an assistant message", "POST", MESSAGES, {"json": msg(messages=[
        *USER, {"role": "assistant", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}, *USER])}, {400}),
    ("tool_use input as a string", "POST", MESSAGES, {"json": msg(messages=[
        *USER, {"role": "assistant", "content": [{**ECHO_CALL, "input": "{}"}]}, *USER])},
     {400}),
    ("assistant prefill", "POST", MESSAGES,
     {"json": msg(messages=[*USER, {"role": "assistant", "content": "{"}])}, {400}),
    ("system as a number", "POST", MESSAGES, {"json": msg(system=5)}, {400}),
    ("image in system", "POST", MESSAGES,
     {"json": msg(system=[{"type": "image", "source": {}}])}, {400}),
    # sampling and stops
    ("temperature 1.5", "POST", MESSAGES, {"json": msg(temperature=1.5)}, {400}),
    ("temperature as text", "POST", MESSAGES, {"json": msg(temperature="hot")}, {400}),
    ("top_p 0", "POST", MESSAGES, {"json": msg(top_p=0)}, {400}),
    ("negative top_k", "POST", MESSAGES, {"json": msg(top_k=-1)}, {400}),
    ("huge top_k", "POST", MESSAGES, {"json": msg(top_k=10**12)}, {400}),
    ("NaN temperature", "POST", MESSAGES, raw(
        b'{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":1,'
        b'"temperature":NaN}'), {400}),
    ("17 stop sequences", "POST", MESSAGES,
     {"json": msg(stop_sequences=[str(i) for i in range(17)])}, {400}),
    ("empty stop sequence", "POST", MESSAGES, {"json": msg(stop_sequences=[""])}, {400}),
    ("a 10k-character stop sequence", "POST", MESSAGES,
     {"json": msg(stop_sequences=["x" * 10000])}, {400}),
    ("stop_sequences as a string", "POST", MESSAGES, {"json": msg(stop_sequences="x")}, {400}),
    # tools
    ("server tool", "POST", MESSAGES,
     {"json": msg(tools=[{"type": "web_search_20250305", "name": "web_search"}])}, {400}),
    ("tool without input_schema", "POST", MESSAGES,
     {"json": msg(tools=[{"name": "f", "description": "d"}])}, {400}),
    ("tool schema as a string", "POST", MESSAGES,
     {"json": msg(tools=[{"name": "f", "input_schema": "{}"}])}, {400}),
    ("tool name with spaces", "POST", MESSAGES,
     {"json": msg(tools=[tool({"type": "object"}, name="rm -rf /")])}, {400}),
    ("a 1000-character tool name", "POST", MESSAGES,
     {"json": msg(tools=[tool({"type": "object"}, name="f" * 1000)])}, {400}),
    ("duplicate tool names", "POST", MESSAGES,
     {"json": msg(tools=[tool({"type": "object"}), tool({"type": "object"})])}, {400}),
    ("200 tools", "POST", MESSAGES,
     {"json": msg(tools=[tool({"type": "object"}, name=f"t{i}") for i in range(200)])}, {400}),
    ("tool_choice names a missing tool", "POST", MESSAGES, {"json": msg(
        tools=[tool({"type": "object"})], tool_choice={"type": "tool", "name": "g"})}, {400}),
    ("tool_choice tool without a name", "POST", MESSAGES, {"json": msg(
        tools=[tool({"type": "object"})], tool_choice={"type": "tool"})}, {400}),
    ("tool_choice any without tools", "POST", MESSAGES,
     {"json": msg(tool_choice={"type": "any"})}, {400}),
    ("unknown tool_choice", "POST", MESSAGES, {"json": msg(
        tools=[tool({"type": "object"})], tool_choice={"type": "required"})}, {400}),
    ("tool_choice as a string", "POST", MESSAGES, {"json": msg(
        tools=[tool({"type": "object"})], tool_choice="auto")}, {400}),
    # grammars from tool schemas: bounded before llama.cpp sees them
    ("forced tool with maxLength 100000", "POST", MESSAGES, {"json": forced(
        {"type": "object", "properties": {"s": {"type": "string", "maxLength": 100000}}})},
     {400}),
    ("forced tool with minItems 1e8", "POST", MESSAGES, {"json": forced(
        {"type": "object", "properties": {"l": {"type": "array", "minItems": 100000000}}})},
     {400}),
    ("forced tool nested 1000 deep", "POST", MESSAGES, deep_body(forced("DEEP"), 1000), {400}),
    ("tool_use input nested 500 deep", "POST", MESSAGES, deep_value(msg(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                           "input": "DEEP"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                      "content": "ok"}]}]), 500), {400}),
    ("forced tool with a recursive $ref", "POST", MESSAGES, {"json": forced(
        {"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {
            "next": {"$ref": "#/$defs/n"}}}}})}, {200, 400}),
    # thinking
    ("thinking enabled without a budget", "POST", MESSAGES,
     {"json": msg(thinking={"type": "enabled"})}, {400}),
    ("thinking budget 0", "POST", MESSAGES,
     {"json": msg(thinking={"type": "enabled", "budget_tokens": 0})}, {400}),
    ("astronomic thinking budget", "POST", MESSAGES,
     {"json": msg(thinking={"type": "enabled", "budget_tokens": 10**30})}, {400}),
    ("unknown thinking type", "POST", MESSAGES, {"json": msg(thinking={"type": "deep"})}, {400}),
    ("thinking with a forced tool", "POST", MESSAGES, {"json": {
        **forced({"type": "object"}), "thinking": {"type": "enabled", "budget_tokens": 1024}}},
     {400}),
    # options that would change the answer
    ("structured output with a string schema", "POST", MESSAGES, {"json": msg(output_config={
        "format": {"type": "json_schema", "schema": "{}"}})}, {400}),
    ("structured output without a schema", "POST", MESSAGES, {"json": msg(output_config={
        "format": {"type": "json_schema"}})}, {400}),
    ("structured output of an unknown type", "POST", MESSAGES, {"json": msg(output_config={
        "format": {"type": "yaml", "schema": {}}})}, {400}),
    ("structured output with thinking", "POST", MESSAGES, {"json": msg(
        output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}},
        thinking={"type": "enabled", "budget_tokens": 1024})}, {400}),
    ("structured output with a forced tool", "POST", MESSAGES, {"json": {
        **forced({"type": "object"}),
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}},
     {400}),
    ("structured output with maxLength 100000", "POST", MESSAGES, {"json": msg(output_config={
        "format": {"type": "json_schema", "schema": {"type": "string", "maxLength": 100000}}})},
     {400}),
    ("mcp servers", "POST", MESSAGES,
     {"json": msg(mcp_servers=[{"type": "url", "url": "http://evil.example"}])}, {400}),
    ("container", "POST", MESSAGES, {"json": msg(container="c1")}, {400}),
    # invalid Unicode
    ("lone surrogate in content", "POST", MESSAGES, raw(
        b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"a\\ud800b"}]}'),
     {400}),
    ("lone surrogate in system", "POST", MESSAGES, raw(
        b'{"model":"m","max_tokens":1,"system":"\\udfff",'
        b'"messages":[{"role":"user","content":"x"}]}'), {400}),
    ("lone surrogate in a tool", "POST", MESSAGES, raw(
        b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"}],'
        b'"tools":[{"name":"f","description":"\\ud800","input_schema":{"type":"object"}}]}'),
     {400}),
    ("lone surrogate in a tool result", "POST", COUNT, raw(
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"tool_result",'
        b'"tool_use_id":"t","content":"\\udc00"}]}]}'), {400}),
    # cross-site requests: a page may not drive the daemon, whatever it sends
    ("messages from a page", "POST", MESSAGES,
     {"json": msg(), "headers": {"Origin": EVIL_ORIGIN}}, {403}),
    ("count_tokens from a page", "POST", COUNT,
     {"json": {"model": MODEL, "messages": USER}, "headers": {"Origin": EVIL_ORIGIN}}, {403}),
    ("no-cors form post", "POST", MESSAGES,
     {"data": {"model": MODEL}, "headers": {"Origin": EVIL_ORIGIN}}, {403}),
    ("allowed origin", "POST", MESSAGES,
     {"json": msg(), "headers": {"Origin": ALLOWED_ORIGIN}}, {200}),
    # count_tokens
    ("count_tokens without messages", "POST", COUNT, {"json": {"model": MODEL}}, {400}),
    ("count_tokens image", "POST", COUNT, {"json": {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {}}]}]}}, {400}),
    # routes
    ("wrong method", "GET", MESSAGES, {}, {405}),
    ("unknown route under messages", "POST", "/v1/messages/batches", {"json": {}}, {404}),
    # what real clients send: accepted
    ("harmless extras", "POST", MESSAGES, {"json": msg(
        metadata={"user_id": "u"}, service_tier="auto", inference_geo="eu",
        output_config={"effort": "low"},
        system=[{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}]),
        "headers": {"anthropic-version": "2023-06-01", "anthropic-beta": "x",
                    "x-api-key": "unused"}}, {200}),
    ("a whole tool conversation", "POST", MESSAGES, {"json": msg(
        tools=[tool({"type": "object"})], messages=[
            *USER, {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "t", "signature": "sig"},
                {"type": "redacted_thinking", "data": "xyz"},
                {"type": "text", "text": "calling"}, ECHO_CALL]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                 "content": [{"type": "text", "text": "boom"}]},
                {"type": "text", "text": "go on"}]}])}, {200}),
]

@pytest.mark.parametrize("name,method,path,kwargs,expected", PROBES, ids=[p[0] for p in PROBES])
def test_probe_gets_a_clear_4xx_in_anthropic_shape(target: Daemon, name: str, method: str,
                                                   path: str, kwargs: dict[str, Any],
                                                   expected: set[int]) -> None:
    with httpx.Client(base_url=target.url, timeout=60) as http:
        r = http.request(method, path, **kwargs)
    assert r.status_code in expected, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        body = r.json()
        assert body["type"] == "error" and set(body) == {"type", "error"}, body
        assert body["error"]["type"] == ERROR_TYPES.get(r.status_code, "invalid_request_error")
        assert body["error"]["message"], body
    else:
        assert r.json()["type"] == "message"
    assert target.process.poll() is None, "the daemon died:\n" + target.log()[-3000:]


def test_errors_name_the_field(target: Daemon) -> None:
    with httpx.Client(base_url=target.url, timeout=60) as http:
        image = http.post(MESSAGES, json=msg(messages=[*USER, {"role": "assistant",
                                                               "content": "ok"}, {
            "role": "user", "content": [{"type": "text", "text": "see"},
                                        {"type": "image", "source": {}}]}]))
        surrogate = http.post(MESSAGES, **raw(b'{"model":"m","max_tokens":1,"messages":'
                                              b'[{"role":"user","content":"\\ud800"}]}'))
        call = http.post(MESSAGES, json=msg(messages=[*USER, {"role": "assistant", "content": [
            {**ECHO_CALL, "input": []}]}, *USER]))
    assert "messages.2.content.1" in image.json()["error"]["message"]
    assert "image" in image.json()["error"]["message"]
    assert "messages.0.content" in surrogate.json()["error"]["message"]
    assert "messages.1.content.0.input" in call.json()["error"]["message"]


def test_a_client_that_leaves_is_cancelled(target: Daemon) -> None:
    # Greedy: this dialect has no logit_bias to keep the random model from ending early, so a
    # sampled answer could finish inside the timeout now and then; the greedy one runs long.
    body = msg(max_tokens=3000, temperature=0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(target.url + MESSAGES, json=body, timeout=1.5)
    with httpx.Client(base_url=target.url, timeout=30) as http:
        with http.stream("POST", MESSAGES, json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if "content_block_delta" in line:
                    break  # leave mid-stream
    left = time.monotonic()
    wait_idle(target, timeout=5)
    # Left running they would take seconds to reach max_tokens; cancelled, a step or two.
    assert time.monotonic() - left < 5


def test_a_burst_past_the_queue_gets_overloaded_not_500(target: Daemon) -> None:
    def post(_: int) -> tuple[int, str]:
        r = httpx.post(target.url + MESSAGES, json=msg(max_tokens=64), timeout=120)
        return r.status_code, r.json()["type"] if r.status_code == 200 else r.json()["error"][
            "type"]

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(post, range(10)))
    assert {code for code, _ in results} == {200, 503}, results
    assert {kind for code, kind in results if code == 503} == {"overloaded_error"}
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
