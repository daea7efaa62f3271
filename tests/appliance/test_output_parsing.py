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
