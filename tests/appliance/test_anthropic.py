"""Anthropic's Messages API through the official `anthropic` client, against a real daemon.

The daemon serves the tiny model and a copy of it whose chat template opens `<think>` in the
prompt when thinking is on (as Qwen3's thinking-only templates do), so a random-weight model
produces a thinking block whenever it is asked to think.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from converter.synthetic import CHAT_TEMPLATE
from tests.appliance.conftest import Daemon, run_daemon
from tests.conftest import MODEL_B

# The untied model: the tied one only repeats the prompt's last newline in a chat.
MODEL = MODEL_B
THINKER = "tiny-qwen3-thinker"
# Anthropic's newest clients have no sampling arguments; older ones do: the body takes them.
GREEDY: dict[str, Any] = {"extra_body": {"temperature": 0.0}}
HELLO = [{"role": "user", "content": "Hello!"}]
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {
               "city": {"type": "string", "enum": ["Paris", "Oslo"]}},
               "required": ["city"], "additionalProperties": False}}


def thinking_template() -> str:
    closed = "{% if not thinking %}<think>\n\n</think>\n\n{% endif -%}"
    assert closed in CHAT_TEMPLATE
    return CHAT_TEMPLATE.replace(
        closed, "{% if not thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif -%}")


@pytest.fixture(scope="module")
def anthropic_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("anthropic-models")
    (folder / f"{MODEL}.gguf").symlink_to(models_dir / f"{MODEL}.gguf")
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata",
                    str(models_dir / f"{MODEL}.gguf"), str(folder / f"{THINKER}.gguf"),
                    "--chat-template", thinking_template(), "--force"],
                   check=True, capture_output=True)
    return folder


@pytest.fixture(scope="module")
def target(anthropic_models: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Daemon]:
    with run_daemon(anthropic_models, tmp_path_factory.mktemp("anthropic"),
                    default_model=MODEL, parallel="4", switch_wait_s="1") as daemon:
        yield daemon


@pytest.fixture()
def claude(target: Daemon) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=target.url, api_key="unused", max_retries=0,
                             timeout=60) as c:
        yield c


def count(claude: anthropic.Anthropic, **fields: Any) -> int:
    return claude.messages.count_tokens(**{"model": MODEL, "messages": HELLO, **fields}
                                        ).input_tokens


def raw_events(target: Daemon, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The SSE events of a streamed request as (event name, data), read without the client."""
    events = []
    with httpx.stream("POST", target.url + "/v1/messages", json={**body, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert name == data["type"], (name, data)  # event line and data agree
                events.append((name, data))
    return events


# -- create, stream, count -----------------------------------------------------------------------


def test_create(claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(model=MODEL, max_tokens=12, system="Be brief.", messages=HELLO,
                               metadata={"user_id": "u1"}, **GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.model == MODEL
    assert m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason == "max_tokens" and m.stop_sequence is None
    assert m.usage.output_tokens == 12
    total = m.usage.input_tokens + m.usage.cache_read_input_tokens
    assert total == count(claude, system="Be brief.")


def test_system_as_text_blocks_equals_system_string(claude: anthropic.Anthropic) -> None:
    blocks = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.",
                                                     "cache_control": {"type": "ephemeral"}}]
    assert count(claude, system=blocks) == count(claude, system="Be brief.\n\nBe kind.")


def test_stream_matches_create(claude: anthropic.Anthropic) -> None:
    whole = claude.messages.create(model=MODEL, max_tokens=16, messages=HELLO, **GREEDY)
    with claude.messages.stream(model=MODEL, max_tokens=16, messages=HELLO, **GREEDY) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == whole.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 16


def test_stream_event_sequence(target: Daemon) -> None:
    events = raw_events(target, {"model": MODEL, "max_tokens": 8, "messages": HELLO,
                                 "temperature": 0.0})
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert all(data["delta"]["type"] == "text_delta" for _, data in events[3:-3])
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens"
    assert delta["usage"]["output_tokens"] == 8


def test_stop_sequences(claude: anthropic.Anthropic) -> None:
    full = claude.messages.create(model=MODEL, max_tokens=24, messages=HELLO, **GREEDY)
    text = full.content[0].text
    stop = text.strip()[3:6]
    assert len(stop) == 3, text
    cut = claude.messages.create(model=MODEL, max_tokens=24, messages=HELLO,
                                 stop_sequences=["never-seen", stop], **GREEDY)
    assert cut.content[0].text == text[:text.index(stop)]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.usage.output_tokens < 24
    with claude.messages.stream(model=MODEL, max_tokens=24, messages=HELLO,
                                stop_sequences=[stop], **GREEDY) as s:
        final = s.get_final_message()
    assert final.content[0].text == cut.content[0].text
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_count_tokens_sees_tools_and_thinking(claude: anthropic.Anthropic) -> None:
    plain = count(claude)
    assert count(claude, tools=[WEATHER]) > plain + 20
    # Thinking off closes an empty <think></think> in the prompt: 4 more tokens.
    assert count(claude, thinking={"type": "disabled"}) == plain
    assert count(claude, thinking={"type": "enabled", "budget_tokens": 1024}) == plain - 4


def test_the_prefix_cache_shows_as_cache_read(claude: anthropic.Anthropic) -> None:
    system = "You are a careful assistant who answers in full sentences. " * 20
    first = claude.messages.create(model=MODEL, max_tokens=2, system=system,
                                   messages=HELLO, **GREEDY)
    again = claude.messages.create(model=MODEL, max_tokens=2, system=system,
                                   messages=[{"role": "user", "content": "Hello again!"}],
                                   **GREEDY)
    assert again.usage.cache_read_input_tokens > 200
    total = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert total == count(claude, system=system)
    assert again.usage.input_tokens < 20


# -- thinking -------------------------------------------------------------------------------------


def test_thinking_streams_as_a_thinking_block(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model=THINKER, max_tokens=16, messages=HELLO, **GREEDY,
                                thinking={"type": "enabled", "budget_tokens": 1024}) as s:
        kinds = {e.delta.type for e in s if e.type == "content_block_delta"}
        final = s.get_final_message()
    assert kinds == {"thinking_delta", "signature_delta"}
    block = final.content[0]
    assert block.type == "thinking" and block.thinking and isinstance(block.signature, str)
    # Without a budget the thinking runs until max_tokens (random weights never close it).
    assert final.stop_reason == "max_tokens"
    # The block goes back in the next turn as Anthropic's clients send it.
    follow = claude.messages.create(model=THINKER, max_tokens=2, **GREEDY, messages=[
        *HELLO, {"role": "assistant", "content": [block.model_dump(), {"type": "text",
                                                                      "text": "Hi."}]},
        {"role": "user", "content": "And now?"}])
    assert follow.stop_reason == "max_tokens"


def test_thinking_off_and_omitted(claude: anthropic.Anthropic) -> None:
    off = claude.messages.create(model=THINKER, max_tokens=6, messages=HELLO, **GREEDY)
    assert [b.type for b in off.content] == ["text"]  # absent means off, as on Anthropic's API
    hidden = claude.messages.create(model=THINKER, max_tokens=6, messages=HELLO, **GREEDY,
                                    thinking={"type": "enabled", "budget_tokens": 1024,
                                              "display": "omitted"})
    assert [(b.type, b.thinking) for b in hidden.content] == [("thinking", "")]


def test_the_thinking_budget_closes_thinking_and_the_answer_follows(
        claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model=THINKER, max_tokens=40, messages=HELLO, **GREEDY,
                                thinking={"type": "enabled", "budget_tokens": 8}) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"], final.content
    thought = count(claude, messages=[{"role": "user", "content": final.content[0].thinking}])
    assert thought - count(claude, messages=[{"role": "user", "content": ""}]) <= 8 + 2
    assert final.content[1].text and final.usage.output_tokens <= 40


# -- tools ----------------------------------------------------------------------------------------


def test_forced_tool_streams_a_tool_use_block(claude: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    with claude.messages.stream(model=MODEL, max_tokens=100, messages=ask, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"},
                                extra_body={"temperature": 0.5}) as s:
        deltas = [e.delta for e in s if e.type == "content_block_delta"]
        final = s.get_final_message()
    assert [d.type for d in deltas] == ["input_json_delta"]  # the whole input, once parsed
    assert final.stop_reason == "tool_use"
    call = final.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather"
    assert call.id.startswith("toolu_")
    assert isinstance(call.input, dict) and call.input["city"] in ("Paris", "Oslo")
    # The call and its result go back through the template for the next turn.
    follow = claude.messages.create(model=MODEL, max_tokens=4, tools=[WEATHER], **GREEDY,
                                    messages=[*ask, {"role": "assistant",
                                                     "content": [call.model_dump()]},
                                              {"role": "user", "content": [
                                                  {"type": "tool_result", "tool_use_id": call.id,
                                                   "content": [{"type": "text",
                                                                "text": "sunny"}]}]}])
    assert follow.stop_reason == "max_tokens"
    total = follow.usage.input_tokens + follow.usage.cache_read_input_tokens
    assert total > final.usage.input_tokens + final.usage.cache_read_input_tokens + 10


def test_tool_choice_any_creates_a_tool_use(claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(model=MODEL, max_tokens=100, tools=[WEATHER],
                               tool_choice={"type": "any"}, extra_body={"temperature": 0.5},
                               messages=[{"role": "user", "content": "Weather in Oslo?"}])
    assert m.stop_reason == "tool_use"
    assert [b.type for b in m.content] == ["tool_use"]
    assert m.content[0].input["city"] in ("Paris", "Oslo")


def test_tool_choice_none_leaves_the_tools_out(claude: anthropic.Anthropic) -> None:
    assert count(claude, tools=[WEATHER], tool_choice={"type": "none"}) == count(claude)
    m = claude.messages.create(model=MODEL, max_tokens=4, tools=[WEATHER], messages=HELLO,
                               tool_choice={"type": "none"}, **GREEDY)
    assert m.stop_reason == "max_tokens" and m.content[0].type == "text"


def test_structured_output_parses(claude: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]}, "confident": {"type": "boolean"}},
        "required": ["answer", "confident"], "additionalProperties": False}
    m = claude.messages.create(model=MODEL, max_tokens=60, extra_body={"temperature": 0.5},
                               output_config={"format": {"type": "json_schema",
                                                         "schema": schema}},
                               messages=[{"role": "user", "content": "Is water wet?"}])
    data = json.loads(m.content[0].text)
    assert data["answer"] in ("yes", "no") and isinstance(data["confident"], bool)
    assert m.stop_reason == "end_turn"


# -- errors ---------------------------------------------------------------------------------------


def test_unknown_model_is_not_found(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="claude-none", max_tokens=4, messages=HELLO)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.count_tokens(model="claude-none", messages=HELLO)


def test_bad_params_are_bad_requests(claude: anthropic.Anthropic) -> None:
    for fields in ({"extra_body": {"temperature": 1.5}}, {"max_tokens": 0},
                   {"messages": [{"role": "user", "content": [
                       {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                    "data": "iVBORw0KGgo="}}]}]}):
        with pytest.raises(anthropic.BadRequestError) as e:
            claude.messages.create(**{"model": MODEL, "max_tokens": 4, "messages": HELLO,
                                      **fields})
        assert e.value.body["error"]["type"] == "invalid_request_error"
        assert e.value.body["error"]["message"]


def test_a_stream_cut_by_an_error_ends_with_an_error_event(claude: anthropic.Anthropic,
                                                           target: Daemon) -> None:
    seen: list[str] = []
    failure: list[BaseException] = []

    def read() -> None:
        try:
            with claude.messages.stream(model=MODEL, max_tokens=4000, messages=HELLO) as s:
                for text in s.text_stream:
                    seen.append(text)
        except anthropic.APIStatusError as e:
            failure.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 30
    while not seen:
        assert time.monotonic() < deadline and reader.is_alive(), "no text arrived"
        time.sleep(0.02)
    with httpx.Client(base_url=target.url, timeout=30) as http:
        assert http.post("/api/unload").status_code == 200  # after switch_wait_s (1 s)
    reader.join(timeout=30)
    assert not reader.is_alive() and failure, seen
    assert failure[0].body["error"]["type"] == "overloaded_error"  # 503: try again


def test_the_api_key_arrives_as_x_api_key(models_dir: Path, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sekrit")
    key.chmod(0o600)
    with run_daemon(models_dir, tmp_path, api_key_file=str(key)) as daemon:
        with anthropic.Anthropic(base_url=daemon.url, api_key="sekrit", max_retries=0) as ok:
            assert ok.messages.count_tokens(model=MODEL, messages=HELLO).input_tokens > 0
        with anthropic.Anthropic(base_url=daemon.url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(anthropic.AuthenticationError) as e:
                bad.messages.create(model=MODEL, max_tokens=4, messages=HELLO)
    assert e.value.body["error"]["type"] == "authentication_error"
