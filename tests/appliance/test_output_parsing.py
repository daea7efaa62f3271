"""Streaming text splitting: thinking, tool calls, stop strings, UTF-8 across tokens."""

from __future__ import annotations

import json

import pytest

from appliance.engine.output import ChatOutputParser
from appliance.engine.text import Detokenizer, StopMatcher


def split(text: str, step: int, *, tools: bool = True, prompt: str = "") -> tuple[str, str, list]:
    parser = ChatOutputParser(prompt=prompt, parse_tools=tools)
    reasoning = content = ""
    for i in range(0, len(text), step):
        delta = parser.feed(text[i:i + step])
        reasoning += delta.reasoning
        content += delta.content
    tail, calls = parser.finish()
    return reasoning + tail.reasoning, content + tail.content, calls


@pytest.mark.parametrize("step", [1, 2, 3, 5, 1000])
def test_thinking_goes_to_reasoning(step: int) -> None:
    reasoning, content, calls = split("<think>\nFirst, 2+2.\nThat is 4.\n</think>\n\nIt is 4.",
                                      step)
    assert reasoning == "First, 2+2.\nThat is 4."
    assert content == "It is 4." and calls == []


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_no_thinking_is_all_content(step: int) -> None:
    assert split("Plain <thin answer", step) == ("", "Plain <thin answer", [])


def test_prompt_that_opens_thinking() -> None:
    assert split("plan\n</think>\n\nDone", 2, prompt="<|im_start|>assistant\n<think>\n")[:2] == (
        "plan", "Done")


@pytest.mark.parametrize("step", [1, 7, 1000])
def test_tool_calls_are_extracted(step: int) -> None:
    text = ('<think>\n\n</think>\n\nLet me check.\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "now", '
            '"arguments": {}}\n</tool_call>')
    reasoning, content, calls = split(text, step)
    assert reasoning == "" and content.strip() == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].id != calls[1].id


def test_broken_tool_call_stays_text() -> None:
    _, content, calls = split("<tool_call>\nnot json\n</tool_call>", 3)
    assert calls == [] and "not json" in content


def test_tools_off_leaves_tags_in_content() -> None:
    _, content, calls = split('<tool_call>{"name": "x"}</tool_call>', 4, tools=False)
    assert calls == [] and content.startswith("<tool_call>")


@pytest.mark.parametrize("step", [1, 2, 3, 100])
def test_stop_strings_are_held_back_and_cut(step: int) -> None:
    matcher = StopMatcher(["\nUser:", "###"])
    text = "Answer: yes.\nUse this.\nUser: next"
    out = "".join(matcher.feed(text[i:i + step]) for i in range(0, len(text), step))
    out += matcher.flush()
    assert out == "Answer: yes.\nUse this." and matcher.stopped


def test_held_back_prefix_is_released_at_the_end() -> None:
    matcher = StopMatcher(["###"])
    assert matcher.feed("a ##") == "a "
    assert matcher.flush() == "##" and not matcher.stopped


def test_utf8_split_across_tokens() -> None:
    data = "你好 🙂".encode()
    d = Detokenizer()
    pieces = [d.feed(data[i:i + 1]) for i in range(len(data))]
    assert "".join(pieces) + d.flush() == "你好 🙂"
    assert all("\ufffd" not in p for p in pieces)


def stream_calls(text: str, step: int, forced: bool = False) -> tuple[str, list, list]:
    """Content, the tool-call deltas in order, and the calls at the end."""
    parser = ChatOutputParser(prompt="", parse_tools=True, forced_tool=forced)
    content, deltas = "", []
    for i in range(0, len(text), step):
        delta = parser.feed(text[i:i + step])
        content += delta.content
        deltas += delta.tool_calls
    tail, calls = parser.finish()
    return content + tail.content, deltas + tail.tool_calls, calls


TWO_CALLS = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
             '"days": [1, 2]}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n'
             '</tool_call>')


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_tool_calls_stream_name_first_then_argument_fragments(step: int) -> None:
    content, deltas, calls = stream_calls(TWO_CALLS, step)
    assert content == "Checking.\n"
    for index, (name, arguments) in enumerate([("get_weather", {"city": "Paris", "days": [1, 2]}),
                                               ("now", {})]):
        mine = [d for d in deltas if d.index == index]
        assert mine[0].id and mine[0].name == name  # id and name come first, once
        assert all(d.id is None and d.name is None for d in mine[1:])
        assert json.loads("".join(d.arguments for d in mine)) == arguments
        assert calls[index].id == mine[0].id and json.loads(calls[index].arguments) == arguments
    if step == 1:  # character by character: the arguments really arrive in pieces
        assert len([d for d in deltas if d.index == 0]) > 10


def test_a_call_cut_short_keeps_what_it_streamed() -> None:
    _, deltas, calls = stream_calls('<tool_call>\n{"name": "f", "arguments": {"a": "bc', 2)
    assert calls[0].name == "f" and calls[0].arguments == '{"a": "bc'
    assert "".join(d.arguments for d in deltas) == calls[0].arguments


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_a_call_cut_inside_its_closing_tag_keeps_only_its_arguments(step: int) -> None:
    _, deltas, calls = stream_calls(
        '<tool_call>\n{"name": "f", "arguments": {"a": 1\n\t}\n}\n \t\n</tool', step)
    assert json.loads(calls[0].arguments) == {"a": 1}
    assert "".join(d.arguments for d in deltas) == calls[0].arguments


def test_a_call_in_another_key_order_is_parsed_whole() -> None:
    content, deltas, calls = stream_calls(
        '<tool_call>\n{"arguments": {"x": 1}, "name": "f"}\n</tool_call>', 3)
    assert content == "" and [(d.index, d.name) for d in deltas] == [(0, "f")]
    assert json.loads(deltas[0].arguments) == {"x": 1} and calls[0].name == "f"


def test_escaped_name_and_braces_inside_strings() -> None:
    _, _, calls = stream_calls(
        '<tool_call>{"name": "a\\"b", "arguments": {"s": "}} </tool_call"}}</tool_call>', 1)
    assert calls[0].name == 'a"b'
    assert json.loads(calls[0].arguments) == {"s": "}} </tool_call"}


def test_broken_forced_call_is_never_content() -> None:
    content, deltas, calls = stream_calls("<tool_call>\nnot json\n</tool_call>", 3, forced=True)
    assert content == "" and deltas == [] and calls == []
