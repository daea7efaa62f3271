"""Upstream models through every dialect, with real servers and the official clients: our
daemon in front of another `appliance serve` (the `team` upstream, with a key, serving MODEL_A
and EMBED), one we stop and start (`spare`), and a scripted OpenAI server that answers with
tool calls (which a random-weight model will not write unforced) and records what we sent it.

The front daemon holds MODEL_B only, so MODEL_A, EMBED and the scripted models are routed.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from appliance.status_view import upstream_lines
from tests.appliance.conftest import FOREVER, Daemon, free_port, run_daemon
from tests.appliance.test_upstream import (
    FRONT_KEY,
    SPARE_MODEL,
    TEAM_KEY,
    Spare,
    _status,
    key_file,
    wait_for,
)
from tests.conftest import EMBED, MODEL_A, MODEL_B

SCRIPTED_MODEL = "scripted-tools"
ENDLESS_MODEL = "scripted-endless"  # streams until its client leaves
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


# -- a scripted OpenAI server: a tool call streamed in pieces, and what it was sent ---------------


@dataclass
class Scripted:
    server: ThreadingHTTPServer
    bodies: list[dict[str, Any]] = field(default_factory=list)
    streaming: int = 0  # answers being written now (the upstream's in_flight)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": SCRIPTED_MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


# What a vLLM-style server streams for a thought, a sentence and one tool call.
TOOL_STREAM = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"reasoning_content": "The user wants weather."}),
    _chunk({"content": "Let me look."}),
    _chunk({"tool_calls": [{"index": 0, "id": "call_abc", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    _chunk({}, "tool_calls"),
    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": SCRIPTED_MODEL,
     "choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 9, "total_tokens": 40}},
]


def start_scripted() -> Scripted:
    scripted: Scripted

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = json.dumps({"object": "list", "data": [{"id": SCRIPTED_MODEL},
                                                          {"id": ENDLESS_MODEL}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            scripted.bodies.append(body)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if body["model"] == ENDLESS_MODEL:
                self._endless()
                return
            for event in TOOL_STREAM:
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

        def _endless(self) -> None:
            scripted.streaming += 1
            try:
                while True:  # a write to a closed connection ends it
                    self.wfile.write(f"data: {json.dumps(_chunk({'content': 'more '}))}\n\n"
                                     .encode())
                    self.wfile.flush()
                    time.sleep(0.02)
            except OSError:
                pass
            finally:
                scripted.streaming -= 1

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    scripted = Scripted(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return scripted


# -- the servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def team(models_dir: Path, tiny_embedding_gguf: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("team")
    folder = tmp / "models"
    folder.mkdir()
    os.link(models_dir / f"{MODEL_A}.gguf", folder / f"{MODEL_A}.gguf")
    shutil.copy(tiny_embedding_gguf, folder / f"{EMBED}.gguf")
    with run_daemon(folder, tmp, api_key_file=str(key_file(tmp, "key", TEAM_KEY)),
                    default_model=MODEL_A, parallel="2") as d:
        yield d


@dataclass
class Front:
    daemon: Daemon
    spare: Spare
    scripted: Scripted

    def ollama(self) -> ollama.Client:
        return ollama.Client(host=self.daemon.url, timeout=60,
                             headers={"Authorization": f"Bearer {FRONT_KEY}"})

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.daemon.url, api_key=FRONT_KEY, max_retries=0,
                                   timeout=60)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.daemon.base_url, api_key=FRONT_KEY, max_retries=0,
                             timeout=60)


@pytest.fixture(scope="module")
def front(models_dir: Path, team: Daemon,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("front")
    own = tmp / "models"
    own.mkdir()
    os.link(models_dir / f"{MODEL_B}.gguf", own / f"{MODEL_B}.gguf")
    spare = Spare(free_port(), models_dir, tmp_path_factory.mktemp("spare"))
    scripted = start_scripted()
    config = tmp / "config.toml"
    config.write_text(
        f'[upstreams.team]\nurl = "{team.base_url}"\n'
        f'api_key_file = "{key_file(tmp, "team.key", TEAM_KEY)}"\ntimeout_s = 60\n'
        f'[upstreams.spare]\nurl = "http://127.0.0.1:{spare.port}/v1"\n'
        f'models = ["{SPARE_MODEL}"]\n'
        f'[upstreams.scripted]\nurl = "{scripted.url}"\n')
    spare.start()
    try:
        with run_daemon(own, tmp, config=str(config),
                        api_key_file=str(key_file(tmp, "front.key", FRONT_KEY))) as d:
            f = Front(d, spare, scripted)
            wait_for(lambda: _routes(f, MODEL_A) and _routes(f, SCRIPTED_MODEL),
                     "the upstreams' listings")
            yield f
    finally:
        spare.stop()
        scripted.server.shutdown()


def _chat_model(team: Daemon) -> dict[str, Any]:
    """MODEL_A's entry in the upstream's status (it holds EMBED too once that is used)."""
    return next((m for m in _status(team).get("models") or [] if m["id"] == MODEL_A), {})


def _upstream_idle(team: Daemon) -> bool:
    model = _chat_model(team)
    return bool(model) and model["slots_busy"] == 0 and not model.get("in_flight") \
        and not model.get("queue")


def _upstream_busy(team: Daemon) -> bool:
    return _chat_model(team).get("slots_busy") == 1


def _routes(front: Front, model: str) -> bool:
    with front.openai() as client:
        return model in {m.id for m in client.models.list()}


def _direct(team: Daemon, **ask: Any) -> str:
    """The upstream's own greedy answer, asked directly on its OpenAI API."""
    with openai.OpenAI(base_url=team.base_url, api_key=TEAM_KEY, max_retries=0,
                       timeout=60) as client:
        answer = client.chat.completions.create(model=MODEL_A, temperature=0, **ask)
    message = answer.choices[0].message
    return (getattr(message, "reasoning_content", None) or "") + (message.content or "")


# -- Ollama ---------------------------------------------------------------------------------------


def test_ollama_chat_is_the_upstreams_answer_whole_and_streamed(front: Front,
                                                               team: Daemon) -> None:
    messages = [{"role": "user", "content": "Say something"}]
    options = {"temperature": 0, "num_predict": 10}
    expected = _direct(team, messages=messages, max_tokens=10)
    client = front.ollama()
    whole = client.chat(model=MODEL_A, messages=messages, options=options)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 10
    assert whole.prompt_eval_count and whole.prompt_eval_count > 0
    assert (whole.message.thinking or "") + whole.message.content == expected
    parts = list(client.chat(model=MODEL_A, messages=messages, options=options, stream=True))
    assert parts[-1].done and parts[-1].eval_count == 10
    assert all(not p.done for p in parts[:-1]) and parts[-1].message.content == ""
    streamed = "".join((p.message.thinking or "") + p.message.content for p in parts)
    assert streamed == expected
    # The tagged name an Ollama client writes reaches the same model.
    tagged = client.chat(model=f"{MODEL_A}:latest", messages=messages, options=options)
    assert tagged.message.content == whole.message.content


def test_ollama_generate_and_raw_generate(front: Front, team: Daemon) -> None:
    client = front.ollama()
    answer = client.generate(model=MODEL_A, prompt="Once", options={"temperature": 0,
                                                                     "num_predict": 6})
    assert answer.done and answer.eval_count == 6
    assert (answer.thinking or "") + answer.response == _direct(
        team, messages=[{"role": "user", "content": "Once"}], max_tokens=6)
    raw = list(client.generate(model=MODEL_A, prompt="<|im_start|>user\nHi<|im_end|>\n",
                               raw=True, stream=True, options={"num_predict": 5}))
    assert raw[-1].done and raw[-1].eval_count == 5 and "".join(p.response for p in raw)


def test_ollama_embed_is_the_upstreams_vectors(front: Front, team: Daemon) -> None:
    texts = ["a cat", "a dog"]
    result = front.ollama().embed(model=EMBED, input=texts)
    with openai.OpenAI(base_url=team.base_url, api_key=TEAM_KEY, max_retries=0) as direct:
        expected = direct.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    assert len(result.embeddings) == 2
    for got, want in zip(result.embeddings, expected.data, strict=True):
        assert got == pytest.approx(want.embedding, abs=1e-6)
    assert result.prompt_eval_count and result.prompt_eval_count > 0


def test_ollama_lists_and_shows_upstream_models(front: Front) -> None:
    client = front.ollama()
    names = {m.model: m for m in client.list().models}
    assert f"{MODEL_A}:latest" in names and f"{SCRIPTED_MODEL}:latest" in names
    assert f"{MODEL_B}:latest" in names  # the local one, listed once
    assert sum(1 for n in names if n.startswith(MODEL_B)) == 1
    with front.daemon.http() as http:
        listed = {m["name"]: m for m in http.get("/api/tags").json()["models"]}
    assert listed[f"{MODEL_A}:latest"]["upstream"] == "team"
    assert "upstream" not in listed[f"{MODEL_B}:latest"]
    shown = client.show(MODEL_A)
    assert shown.details.format == "" and shown.modelfile.startswith("# served by upstream team")


def test_ollama_tool_call_round_trip(front: Front) -> None:
    """The upstream's streamed tool call comes back as Ollama's, and the conversation that
    answers it goes upstream with ids that tie the result to the call."""
    client = front.ollama()
    first = client.chat(model=SCRIPTED_MODEL, messages=[{"role": "user", "content": "Weather?"}],
                        tools=[WEATHER], think=True)
    call = first.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    assert first.message.content == "Let me look."
    assert first.message.thinking == "The user wants weather."
    assert first.prompt_eval_count == 31 and first.eval_count == 9
    sent = front.scripted.bodies[-1]
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["chat_template_kwargs"] == {"enable_thinking": True}
    assert sent["stream"] is True and "keep_alive" not in sent
    parts = list(client.chat(
        model=SCRIPTED_MODEL, tools=[WEATHER], stream=True, messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]))
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [c.function.arguments for c in calls] == [{"city": "Paris"}]
    sent = front.scripted.bodies[-1]["messages"]
    call_id = sent[1]["tool_calls"][0]["id"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_call_id": call_id}


# -- Anthropic ------------------------------------------------------------------------------------


def test_anthropic_messages_whole_and_streamed(front: Front, team: Daemon) -> None:
    ask = {"model": MODEL_A, "max_tokens": 8, "extra_body": {"temperature": 0},
           "messages": [{"role": "user", "content": "Say something"}]}
    expected = _direct(team, messages=[{"role": "user", "content": "Say something"}],
                       max_tokens=8,
                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    with front.anthropic() as claude:
        whole = claude.messages.create(**ask)
        assert whole.model == MODEL_A and whole.stop_reason == "max_tokens"
        assert whole.usage.output_tokens == 8 and whole.usage.input_tokens > 0
        assert "".join(b.text for b in whole.content if b.type == "text") == expected
        with claude.messages.stream(**ask) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == expected and final.usage.output_tokens == 8
        counted = claude.messages.count_tokens(model=MODEL_A, messages=ask["messages"])
        assert counted.input_tokens > 0


def test_anthropic_forced_tool_call_round_trip(front: Front) -> None:
    """The upstream appliance forces the call by its grammar; the result goes back upstream."""
    tool = {"name": "get_weather", "description": "The weather in a city",
            "input_schema": {"type": "object", "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                "required": ["city"], "additionalProperties": False}}
    ask = {"role": "user", "content": "Weather in Paris?"}
    with front.anthropic() as claude:
        first = claude.messages.create(model=MODEL_A, max_tokens=100, tools=[tool],
                                       extra_body={"temperature": 0.5},
                                       tool_choice={"type": "tool", "name": "get_weather"},
                                       messages=[ask])
        assert first.stop_reason == "tool_use"
        use = next(b for b in first.content if b.type == "tool_use")
        assert use.name == "get_weather" and use.input["city"] in ("Paris", "Oslo")
        second = claude.messages.create(
            model=MODEL_A, max_tokens=4, tools=[tool], messages=[
                ask, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                              "content": "sunny"}]}])
        def prompt(usage: Any) -> int:
            return usage.input_tokens + (usage.cache_read_input_tokens or 0)

        assert prompt(second.usage) > prompt(first.usage) + 5


def test_anthropic_streamed_tool_use_and_thinking(front: Front) -> None:
    with front.anthropic() as claude:
        with claude.messages.stream(
                model=SCRIPTED_MODEL, max_tokens=50, messages=[{"role": "user",
                                                                "content": "Weather?"}],
                tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
                thinking={"type": "enabled", "budget_tokens": 100}) as stream:
            final = stream.get_final_message()
    kinds = [b.type for b in final.content]
    assert kinds == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"city": "Paris"} and final.stop_reason == "tool_use"
    assert final.usage.output_tokens == 9
    sent = front.scripted.bodies[-1]
    assert sent["max_tokens"] == 50 and sent["tool_choice"] == "auto"
    assert sent["chat_template_kwargs"] == {"enable_thinking": True}


# -- Responses ------------------------------------------------------------------------------------


def test_responses_whole_and_streamed(front: Front, team: Daemon) -> None:
    expected = _direct(team, messages=[{"role": "user", "content": "Say something"}],
                       max_tokens=8)
    with front.openai() as client:
        whole = client.responses.create(model=MODEL_A, input="Say something",
                                        max_output_tokens=8, temperature=0)
        assert whole.status == "incomplete" and whole.usage.output_tokens == 8
        text = "".join(c.text for item in whole.output for c in (item.content or [])
                       if hasattr(c, "text"))
        assert text == expected
        events = list(client.responses.create(model=MODEL_A, input="Say something",
                                              max_output_tokens=8, temperature=0,
                                              stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.usage.output_tokens == 8
    calls = None
    with front.openai() as client:
        calls = client.responses.create(model=SCRIPTED_MODEL, input="Weather?",
                                        tools=[{"type": "function", "name": "get_weather",
                                                "parameters": {"type": "object"}}])
    fc = [item for item in calls.output if item.type == "function_call"]
    assert fc[0].name == "get_weather" and json.loads(fc[0].arguments) == {"city": "Paris"}


# -- errors, recovery and cancellation ------------------------------------------------------------


def test_upstream_errors_keep_status_in_each_dialect(front: Front) -> None:
    bad_schema = {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}
    with pytest.raises(ollama.ResponseError) as e:
        front.ollama().chat(model=MODEL_A, messages=[{"role": "user", "content": "x"}],
                            format=bad_schema)
    assert e.value.status_code == 400 and "upstream team answered HTTP 400" in e.value.error
    with front.anthropic() as claude, pytest.raises(anthropic.BadRequestError) as a:
        claude.messages.create(model=MODEL_A, max_tokens=4,
                               messages=[{"role": "user", "content": "x"}],
                               output_config={"format": {"type": "json_schema",
                                                         "schema": bad_schema}})
    assert a.value.body["error"]["type"] == "invalid_request_error"
    assert "upstream team" in a.value.body["error"]["message"]


def test_upstream_down_is_503_in_each_dialect_then_recovers(front: Front) -> None:
    messages = [{"role": "user", "content": "x"}]
    client = front.ollama()
    assert client.chat(model=SPARE_MODEL, messages=messages, options={"num_predict": 2}).done
    front.spare.stop()
    try:
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model=SPARE_MODEL, messages=messages, options={"num_predict": 2})
        assert e.value.status_code == 503 and "unreachable" in e.value.error
        with front.anthropic() as claude, pytest.raises(anthropic.APIStatusError) as a:
            claude.messages.create(model=SPARE_MODEL, max_tokens=2, messages=messages)
        assert a.value.status_code == 503
        assert a.value.body["error"]["type"] == "overloaded_error"
        assert int(a.value.response.headers["retry-after"]) > 0
    finally:
        front.spare.start()
    assert client.chat(model=SPARE_MODEL, messages=messages, options={"num_predict": 2}).done


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/v1/messages"])
def test_a_client_that_leaves_closes_the_upstream_stream(front: Front, path: str) -> None:
    """The endless upstream writes until its client goes: ours must go when our client does."""
    wait_for(lambda: front.scripted.streaming == 0, "the scripted upstream to be idle")
    body: dict[str, Any] = {"model": ENDLESS_MODEL, "stream": True, "max_tokens": 100000,
                            "messages": [{"role": "user", "content": "Go on forever"}]}
    if path == "/api/generate":
        body = {"model": ENDLESS_MODEL, "prompt": "Go on forever"}
    with front.daemon.http() as http:
        with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(8):
                next(lines)
            assert front.scripted.streaming == 1
    wait_for(lambda: front.scripted.streaming == 0, "the upstream stream to close", timeout=3)


def test_a_client_that_leaves_cancels_the_upstream_appliances_work(front: Front,
                                                                  team: Daemon) -> None:
    """Through /v1/responses (whose logit_bias keeps a random model from ending) to a real
    upstream appliance: its slot is freed when our client leaves, streamed or not."""
    wait_for(lambda: _upstream_idle(team), "the upstream to be idle")
    # 128247 ('</s>') ends a generation too: llama.cpp makes it a control token in this vocab.
    body = {"model": MODEL_A, "input": "Go on forever", "max_output_tokens": 100000,
            "logit_bias": {**FOREVER["logit_bias"], "128247": -100}}
    with front.daemon.http() as http:
        with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            # response.created: the upstream has answered its headers. Its text may come late
            # (the upstream's parser holds back a run of whitespace), so its slot is watched.
            assert next(lines) == "event: response.created"
            wait_for(lambda: _upstream_busy(team), "the upstream to start")
    # Left alone it would run to the 4,096-token context, about ten seconds here.
    wait_for(lambda: _upstream_idle(team), "the upstream to cancel", timeout=3)
    done = threading.Event()

    def ask() -> None:
        with front.daemon.http() as http, pytest.raises(httpx.ReadTimeout):
            http.post("/v1/responses", json=body, timeout=httpx.Timeout(60, read=1.5))
        done.set()

    worker = threading.Thread(target=ask)
    worker.start()
    wait_for(lambda: _upstream_busy(team), "the upstream to start")
    wait_for(done.is_set, "the client to give up", timeout=10)
    worker.join()
    wait_for(lambda: _upstream_idle(team), "the upstream to cancel", timeout=3)


def test_hostile_client_fields_are_refused_before_going_upstream(front: Front) -> None:
    before = len(front.scripted.bodies)
    with front.daemon.http() as http:
        for path, body in (
                ("/api/chat", {"model": SCRIPTED_MODEL, "messages": [{"role": "robot",
                                                                      "content": "x"}]}),
                ("/api/chat", {"model": SCRIPTED_MODEL, "options": {"temperature": 9},
                               "messages": [{"role": "user", "content": "x"}]}),
                ("/v1/messages", {"model": SCRIPTED_MODEL, "max_tokens": 0,
                                  "messages": [{"role": "user", "content": "x"}]}),
                ("/v1/responses", {"model": SCRIPTED_MODEL, "input": [],
                                   "max_output_tokens": 4})):
            answer = http.post(path, json=body)
            assert answer.status_code == 400, (path, answer.text)
            if path.startswith("/api/"):
                assert isinstance(answer.json()["error"], str)
            elif path == "/v1/messages":
                assert answer.json()["type"] == "error"
    assert len(front.scripted.bodies) == before


# -- status ---------------------------------------------------------------------------------------


def test_appliance_status_prints_upstreams(front: Front) -> None:
    status = _status(front.daemon, FRONT_KEY)
    lines = "\n".join(upstream_lines(status))
    assert "team" in lines and "scripted" in lines
    env = {**os.environ, "APPLIANCE_PORT": front.daemon.url.rsplit(":", 1)[1],
           "APPLIANCE_API_KEY_FILE": str(front.daemon.log_path.parent / "front.key")}
    from tests.conftest import run_cli

    done = run_cli("status", env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "UPSTREAM" in done.stdout and "team" in done.stdout and "scripted" in done.stdout
